"""The training cache of a contrast-agnostic (SynthSeg-style) model: tissue label maps on the model's grid.

Each source dataset (a config's `data.sources`) contributes its cases as (image, tissue map) pairs in model
space, stored like datasets.py's cache (uint8 image in 1/255 steps, uint8 labels) in one .npz:
- `kind: "ct"` (BTCV): the tissue map comes from the windowed CT's intensities (tissue_labels.ct_tissue_labels);
  the CT image itself is never shown to the network (synth.SynthTransform always paints a new image), so the
  cache keeps no image for it.
- `kind: "mr"` (CHAOS T2): the tissue map from the MR's intensities (tissue_labels.mr_tissue_labels), and the
  real image, normalised as the MR inference does (pipeline.to_model_space), for the real-image share of the
  batches and for validation.
The tissue maps are made at the scan's own resolution (the thresholds were set there) and then resampled to the
model's grid by nearest neighbour, in the same canonical orientation as every other cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.preprocessing import preprocess as pp
from AbdomenSegLib.preprocessing.datasets import encode_image, find_cases, read_case
from AbdomenSegLib.preprocessing.pipeline import to_model_space

KINDS = ("ct", "mr")


def tissue_case(
    image_path,
    label_path,
    *,
    kind: str,
    convention: str,
    spacing,
    intensity,
    direction=None,
    orientation=pp.CANONICAL_ORIENTATION,
    perirenal: bool = False,
) -> tuple:
    """(uint8 model-space image or None for CT, uint8 model-space tissue map) of one dataset case. `perirenal`:
    CT maps get the perirenal fat and renal fascia classes (tissue_labels.perirenal_classes)."""
    from AbdomenSegLib.training.tissue_labels import ct_tissue_labels, mr_tissue_labels, perirenal_classes

    image, label = read_case(image_path, label_path, direction)
    array, organs = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    spacing_zyx = image.GetSpacing()[::-1]
    if kind == "ct":
        tissue = ct_tissue_labels(np.clip(array, 0, 255).astype(np.uint8), organs, spacing_zyx, convention)
    elif kind == "mr":
        tissue = mr_tissue_labels(array, organs, spacing_zyx, convention)
    else:
        raise AbdomenSegError(f"unknown data source kind '{kind}'", f"use one of {', '.join(KINDS)}")
    tissue_image = sitk.GetImageFromArray(tissue)
    tissue_image.CopyInformation(label)
    if kind == "mr":
        space = to_model_space(image, spacing, intensity, orientation=orientation)
        grid, model_image = space.image, encode_image(space.array)
    else:  # only the grid: the CT's pixels are never used
        grid = pp.resample_to_spacing(pp.reorient(sitk.Cast(image, sitk.sitkFloat32), orientation), spacing)
        model_image = None
    tissue_model = sitk.GetArrayFromImage(pp.resample_to_reference(tissue_image, grid, is_label=True))
    # on the model grid, where the one-voxel fascia survives (tissue_labels.perirenal_classes)
    if kind == "ct" and perirenal:
        tissue_model = perirenal_classes(tissue_model, grid.GetSpacing()[::-1])
    return model_image, tissue_model.astype(np.uint8)


def build_synth_cache(
    sources: list,
    cache_file,
    *,
    spacing,
    intensity,
    orientation=pp.CANONICAL_ORIENTATION,
    perirenal: bool = False,
    log=print,
) -> dict:
    """{name: (uint8 image or None, uint8 tissue map, kind)} over every source; the .npz is reused when it was
    built with the same settings. Case names are prefixed by the source's `name` (e.g. 'btcv/img0001')."""
    cache_file = Path(cache_file)
    settings = repr(
        (
            [{k: s.get(k) for k in ("name", "root", "kind", "convention", "direction")} for s in sources],
            [float(v) for v in spacing],
            intensity,
            orientation,
            "tissue-v1",
        )
        + (("perirenal",) if perirenal else ())  # without: the settings of caches made before the option
    )
    arrays = None
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as cached:
            if str(cached["settings"]) == settings:
                arrays = {k: cached[k] for k in cached.files}
    if arrays is None:
        arrays = {"settings": np.array(settings)}
        for source in sources:
            for case, image_path, label_path in find_cases(source["root"]):
                name = f"{source['name']}/{case}"
                image, tissue = tissue_case(
                    image_path,
                    label_path,
                    kind=source["kind"],
                    convention=source["convention"],
                    spacing=spacing,
                    intensity=intensity,
                    direction=source.get("direction"),
                    orientation=orientation,
                    perirenal=perirenal,
                )
                arrays[f"tissue/{name}"] = tissue
                arrays[f"kind/{name}"] = np.array(source["kind"])
                if image is not None:
                    arrays[f"image/{name}"] = image
                log(f"cached {name}: {tissue.shape}")
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".part.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(cache_file)
    names = sorted(k.split("/", 1)[1] for k in arrays if k.startswith("tissue/"))
    return {n: (arrays.get(f"image/{n}"), arrays[f"tissue/{n}"], str(arrays[f"kind/{n}"])) for n in names}
