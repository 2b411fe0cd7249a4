"""Labelled datasets on disk and their compact model-space cache.

Layouts understood: `images/` + `labels/` with matching file names (BTCV, CHAOS as shipped in
../shared/data) and nnU-Net/MSD `imagesTr/` + `labelsTr/` (`case_0000.nii.gz` -> `case.nii.gz`).
The cache stores each case resampled to the model's grid as uint8 (image scaled from [0, 1],
labels in our organ table) in one .npz, small enough to carry to a GPU machine; `cached_cases` and
`decode_image` are the only readers of that encoding.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import convert_labels
from AbdomenSegLib.io.images import IMAGE_SUFFIXES, case_name, read_image
from AbdomenSegLib.preprocessing import preprocess as pp
from AbdomenSegLib.preprocessing.pipeline import to_model_space


def find_cases(root) -> list:
    """[(case name, image path, label path)] for a dataset folder."""
    root = Path(root)
    for images, labels in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (root / images).is_dir() and (root / labels).is_dir():
            break
    else:
        raise AbdomenSegError(
            f"dataset '{root}' has neither images/+labels/ nor imagesTr/+labelsTr/",
            "lay the dataset out as images/ and labels/ folders with matching file names",
        )
    cases = []
    for image in sorted((root / images).iterdir()):
        if not image.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        name = case_name(image)
        label_name = name[:-5] if name.endswith("_0000") else name
        candidates = [p for p in (root / labels).glob(label_name + ".*") if case_name(p) == label_name]
        if not candidates:
            raise AbdomenSegError(
                f"image '{image.name}' has no label in '{root / labels}'",
                "give every image a label file with the same name",
            )
        cases.append((label_name, image, candidates[0]))
    if not cases:
        raise AbdomenSegError(f"dataset '{root}' holds no images", "check the dataset path")
    return cases


def split_cases(names: list, val_count: int, seed: int, fold=None) -> tuple:
    """Deterministic train/validation split (the validation cases are never trained on). `fold` ({"index": k,
    "of": n}, data.fold) takes the k-th of n cross-validation folds instead of `val_count` cases: the cases
    shuffled by `seed` and dealt round-robin, so the n folds are disjoint, cover every case once and differ in
    size by at most one."""
    names = sorted(names)
    rng = random.Random(seed)
    shuffled = names[:]
    rng.shuffle(shuffled)
    val = sorted(shuffled[fold["index"] :: fold["of"]] if fold else shuffled[:val_count])
    if fold and not val:
        raise AbdomenSegError(
            f"fold {fold['index']} of {fold['of']} holds no case: the dataset has only {len(names)}",
            "use fewer folds (data.fold.of)",
        )
    return [n for n in names if n not in val], val


def read_case(image_path, label_path, direction=None) -> tuple:
    """(image, label) of a dataset case. `direction` (9 numbers, row-major) replaces both files' direction
    matrix where a dataset's headers are known to be wrong: the shared BTCV copy says identity (LPS), but its
    anterior-posterior axis runs the other way (the spine lies anterior of the organs in world space), so its
    configs give [1, 0, 0, 0, -1, 0, 0, 0, 1]. Left-right and up-down are right, so this is a mirror that no
    reorientation can undo: a model trained on the raw headers learns mirrored anatomy and misses organs on
    correctly oriented scans."""
    image, label = read_image(image_path), sitk.ReadImage(str(label_path))
    if direction is not None:
        matrix = check_direction(direction)
        for im in (image, label):
            im.SetDirection([float(v) for v in matrix.ravel()])
    return image, label


def check_direction(direction) -> np.ndarray:
    """The 3x3 matrix of a data.direction override (9 numbers, row-major); refused unless orthonormal."""
    try:
        matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    except (TypeError, ValueError):
        matrix = None
    if (
        matrix is None
        or not np.all(np.isfinite(matrix))
        or not np.allclose(np.abs(np.linalg.det(matrix)), 1.0)
        or not np.allclose(matrix @ matrix.T, np.eye(3))
    ):
        raise AbdomenSegError(
            f"data.direction {direction!r} is not a rotation or reflection matrix",
            "give 9 numbers of an orthonormal direction matrix, row-major",
        )
    return matrix


def cache_case(
    image_path,
    label_path,
    *,
    spacing,
    intensity,
    convention,
    input_intensity="native",
    orientation=pp.CANONICAL_ORIENTATION,
    direction=None,
    region=None,
):
    """(uint8 model-space image, organ labels) of a case; with a `region` (preprocessing/region.py: {"organs", "margin_mm"}) only
    the box around those organs of its reference, the way a cascade's second stage sees it (cascade.py)."""
    image, label = read_case(image_path, label_path, direction)
    check_mapped(label, convention, label_path)
    if region:
        from AbdomenSegLib.preprocessing.region import reference_crop

        image, label, convention = reference_crop(image, label, convention, region)
    space = to_model_space(image, spacing, intensity, orientation=orientation, input_intensity=input_intensity)
    label = pp.resample_to_reference(label, space.image, is_label=True)
    organs = convert_labels(sitk.GetArrayFromImage(label), convention)
    return encode_image(space.array), organs


def check_mapped(label: sitk.Image, convention, path) -> None:
    """Refuse a training label file holding a value its convention does not map to an organ: read as background
    it would teach the network that the structure is background (a liver labelled 1 trained as 1 = spleen was the
    other half of that mistake: the numbering must be named, conventions.training_labels)."""
    from AbdomenSegLib.core.organs import CONVENTION_MAX_VALUE, CONVENTIONS, convention_map
    from AbdomenSegLib.preprocessing.label_values import distinct_values

    mapping = convention_map(convention)
    defined = set(mapping) | {0}
    if isinstance(convention, str):  # a named dataset convention also defines the structures we do not train on
        defined |= set(range(CONVENTION_MAX_VALUE.get(convention, max(CONVENTIONS[convention])) + 1))
    values = [int(v) for v in distinct_values(sitk.GetArrayViewFromImage(label))]
    unmapped = [v for v in values if v not in defined]
    if unmapped:
        raise AbdomenSegError(
            f"label file '{path}' holds value(s) {', '.join(map(str, unmapped[:8]))} that the config's label "
            "numbering does not map to an organ",
            "map every value in data.labels (or fix the label file); unmapped values are not read as background",
        )


def encode_image(array: np.ndarray) -> np.ndarray:
    """A model-space image in [0, 1] as the cache stores it: uint8, 1/255 steps."""
    return np.round(array * 255).astype(np.uint8)


def decode_image(image: np.ndarray) -> np.ndarray:
    """A cached uint8 image back to the float32 [0, 1] model-space array the network takes."""
    return image.astype(np.float32) / 255.0


def cached_cases(arrays: dict) -> dict:
    """{case name: (uint8 image, organ labels)} of a cache built by `build_cache`."""
    names = sorted(k.split("/", 1)[1] for k in arrays if k.startswith("image/"))
    return {n: (arrays[f"image/{n}"], arrays[f"label/{n}"]) for n in names}


def build_cache(
    root,
    cache_file,
    *,
    spacing,
    intensity,
    convention,
    input_intensity="native",
    orientation=pp.CANONICAL_ORIENTATION,
    direction=None,
    region=None,
    log=print,
) -> dict:
    """Cache every case of a dataset (with a `region`, its box only: cache_case); reuse the file when it was built
    with the same settings."""
    cache_file = Path(cache_file)
    settings = repr((str(Path(root).resolve()), list(spacing), intensity, convention, input_intensity))
    if orientation != pp.CANONICAL_ORIENTATION or direction is not None:  # older caches stay valid
        settings = repr((settings, orientation, list(direction) if direction is not None else None))
    if region:
        settings = repr((settings, {k: region[k] for k in ("organs", "margin_mm")}))
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as cached:
            if str(cached["settings"]) == settings:
                return {k: cached[k] for k in cached.files}
    arrays = {"settings": np.array(settings)}
    for name, image_path, label_path in find_cases(root):
        image, labels = cache_case(
            image_path,
            label_path,
            spacing=spacing,
            intensity=intensity,
            convention=convention,
            input_intensity=input_intensity,
            orientation=orientation,
            direction=direction,
            region=region,
        )
        arrays[f"image/{name}"], arrays[f"label/{name}"] = image, labels
        log(f"cached {name}: {image.shape}")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache_file, **arrays)  # type: ignore[arg-type]  # numpy's stub checks **kwds against allow_pickle too; no key here is that
    return arrays


def config_cache(config: dict, log=print) -> dict:
    """The cache of a training config (its data and model sections), as the trainer and a GPU lease build it."""
    d, m = config["data"], config["model"]
    return build_cache(
        d["root"],
        Path(d["cache"].format(name=config["name"])),
        spacing=m["spacing"],
        intensity=m["intensity"],
        convention=d["convention"],
        input_intensity=d["input_intensity"],
        orientation=m["orientation"],
        direction=d["direction"],
        region=d["region"],
        log=log,
    )


def validation_data(data: dict) -> dict:
    """Where a run's validation cases come from: data itself, or for a synth run the validating source (with
    the prefix its case names carry in the run's split)."""
    if data.get("sources"):
        source = next(s for s in data["sources"] if s["name"] == data["val_source"])
        return {
            "root": source["root"],
            "convention": source["convention"],
            "input_intensity": "native",
            "direction": source.get("direction"),
            "prefix": f"{source['name']}/",
        }
    return {
        "root": data["root"],
        "convention": data["convention"],
        "input_intensity": data["input_intensity"],
        "direction": data.get("direction"),
        "prefix": "",
    }
