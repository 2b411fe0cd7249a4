"""Per-organ intensity statistics of the scan under each organ: mean, standard deviation, median (in HU for CT),
as 3D Slicer's Segment Statistics and TotalSegmentator's `--statistics` give them. The result check adds them to
each organ (qc.json, the folder CSVs, the Slicer panel's organ table, the command line's summary)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

# BTCV-style windowed CT (uint8 0..255 for HU -125..275, shared data README): back to HU for the statistics.
_TO_HU = {"btcv_uint8": lambda a: a.astype(np.float64) * (400.0 / 255.0) - 125.0}


def intensity_unit(modality: str) -> str:
    """ "HU" for a CT model's input (native HU, or a windowed file converted back), "" (scanner units) for MR."""
    return "HU" if str(modality).upper() == "CT" else ""


def organ_intensities(image: sitk.Image, labels: sitk.Image, boxes: dict, input_intensity: str = "native") -> dict:
    """{organ: (mean, sd, median)} of the image's voxels under each organ of `labels` (same grid); `boxes` are
    the organs' array boxes (check.organ_shapes), so each organ reads only its box. The first component of a
    multi-channel image. Empty dict when the grids differ."""
    from AbdomenSegLib.core.organs import BY_NAME

    if image is None or image.GetSize() != labels.GetSize():
        return {}
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, 0)
    values = sitk.GetArrayViewFromImage(image)
    label_array = sitk.GetArrayViewFromImage(labels)
    convert = _TO_HU.get(input_intensity)
    out = {}
    for name, box in boxes.items():
        inside = np.asarray(values[box])[np.asarray(label_array[box]) == BY_NAME[name].label].astype(np.float64)
        if inside.size == 0:
            continue
        if convert:
            inside = convert(inside)
        out[name] = (float(inside.mean()), float(inside.std()), float(np.median(inside)))
    return out
