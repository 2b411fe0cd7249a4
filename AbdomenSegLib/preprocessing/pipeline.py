"""From a user's image to the network's input grid and intensities, and input sanity checks.

Inference and the training cache both go through `to_model_space`, so a model sees at inference
exactly the preprocessing it was trained with (the card holds every parameter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core import limits
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.preprocessing import preprocess as pp

# Some inputs are not stored in the unit the model expects; these convert them first.
INPUT_INTENSITIES = {
    "native": None,  # HU for CT, raw signal for MR
    # BTCV distribution: HU window [-125, 275] stored as uint8 0..255 (see shared data README).
    "btcv_uint8": lambda a: a.astype(np.float32) * (400.0 / 255.0) - 125.0,
}


@dataclass
class ModelSpace:
    image: sitk.Image  # resampled raw intensities, carries the model-space geometry
    array: np.ndarray  # (z, y, x) float32 network input in [0, 1]
    box: tuple  # body bounding box (slices) in model space


def check_input(
    image: sitk.Image,
    modality: str,
    *,
    input_intensity: str = "native",
    name: str = "input",
    model_spacing=None,
    channels: int = 0,
):
    """Refuse inputs a model cannot meaningfully segment, naming the fix; with the model's spacing and
    channel count, also inputs whose model-space grid would not fit the memory limit (`limits`)."""
    limits.check_geometry(image.GetSize(), image.GetSpacing(), name)
    if model_spacing is not None:
        check_memory_for(image, model_spacing, channels, name)
    array = sitk.GetArrayViewFromImage(image)
    if array.size == 0 or min(image.GetSize()) < 2:
        raise AbdomenSegError(
            f"{name} is empty or too thin (size {image.GetSize()})",
            "give a 3D volume with at least 2 voxels along each axis",
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise AbdomenSegError(
            f"{name} contains NaN or infinite values",
            "fix the image (e.g. replace NaN with the background value) and try again",
        )
    sample = np.asarray(array[::4, ::4, ::4])
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise AbdomenSegError(f"{name} is constant (every voxel is {low:g})", "give the real scan, not a blank volume")
    if np.issubdtype(array.dtype, np.integer) and low >= 0 and len(np.unique(sample)) <= 32:
        raise AbdomenSegError(
            f"{name} looks like a label map ({len(np.unique(sample))} distinct values), not a scan",
            "give the CT/MR image as input; label maps go to `evaluate` as the reference",
        )
    limits.check_field_of_view(image.GetSize(), image.GetSpacing(), name)
    if modality == "CT" and input_intensity == "native":
        # Air, lung, bowel gas or out-of-field padding put every abdominal CT in HU below -200;
        # 0-255 windowed exports and unrescaled DICOM (0..4095) never go there.
        if low > -200:
            raise AbdomenSegError(
                f"{name} does not look like CT in Hounsfield units (values {low:g} to {high:g}; "
                "air should be near -1000)",
                "for BTCV's 0-255 windowed files pass --input-intensity btcv_uint8; for an MR scan use "
                f"--model {_mr_model()} (the recommended MR model)",
            )
        _check_hu_scale(sample, name)
        _check_zero_filled_tail(array, name)


def _mr_model() -> str:
    from AbdomenSegLib.models.packages import recommended_model

    try:
        return recommended_model("MR") or "mr-any-3d-unet"
    except Exception:  # noqa: BLE001 - a broken catalog must not hide the refusal itself
        return "mr-any-3d-unet"


# Soft tissue, fluid and fat (-250..250 HU) fill a large part of any abdominal CT, air around the body
# included: 59% of TotalSegmentator's example CT (every fourth voxel), 46% of the synthetic phantom. A rescale
# slope or intercept gone wrong (x100, or -1000 more) leaves almost nothing there.
_SOFT_TISSUE_HU = (-250.0, 250.0)
_MIN_SOFT_TISSUE_FRACTION = 0.05


def _check_hu_scale(sample: np.ndarray, name: str) -> None:
    inside = np.count_nonzero((sample >= _SOFT_TISSUE_HU[0]) & (sample <= _SOFT_TISSUE_HU[1]))
    fraction = inside / max(sample.size, 1)
    if fraction < _MIN_SOFT_TISSUE_FRACTION:
        raise AbdomenSegError(
            f"{name} does not look like CT in Hounsfield units: only {100 * fraction:.1f}% of its voxels lie in the soft-"
            f"tissue range {_SOFT_TISSUE_HU[0]:g} to {_SOFT_TISSUE_HU[1]:g} HU (TotalSegmentator's example CT: 59%)",
            "the rescale slope/intercept (DICOM) or scl_slope/scl_inter (NIfTI) is probably wrong: fix the header",
        )


def _check_zero_filled_tail(array: np.ndarray, name: str) -> None:
    """The end of the voxel data exactly 0 HU over at least half a slice: what a reader that zero-fills a cut
    file produces. CT pads with -1024 or below, never with water; 0 over half a slice of real tissue does not
    happen."""
    run = 0
    for z in range(array.shape[0] - 1, -1, -1):
        flat = np.asarray(array[z]).ravel()
        nonzero = np.flatnonzero(flat)
        if nonzero.size:
            run += flat.size - 1 - int(nonzero[-1])
            break
        run += flat.size
    half_slice = array.shape[1] * array.shape[2] / 2
    if run >= half_slice:
        raise AbdomenSegError(
            f"{name} ends in {run:,} voxels of exactly 0 HU ({run / (2 * half_slice):.1f} slices), as a file that "
            "was cut short and zero-filled by the reader does",
            "copy the file again from its source",
        )


def check_memory_for(
    image: sitk.Image, model_spacing, channels: int, name: str = "input", fixed_bytes: float = 0.0
) -> None:
    """Refuse an image whose model-space grid at `model_spacing` (x, y, z mm) would not fit the memory limit;
    `fixed_bytes`: the model's own needs (models/footprint.py)."""
    limits.check_memory(
        image.GetSize(), image.GetSpacing(), per_image_axis(image, model_spacing), channels, name, fixed_bytes
    )


def per_image_axis(image: sitk.Image, model_spacing) -> list:
    """The model's spacing along each of the image's axes (the image may store them in another order)."""
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    return [float(model_spacing[int(direction[:, axis].argmax())]) for axis in range(3)]


def to_model_space(
    image: sitk.Image,
    spacing,
    intensity: dict,
    *,
    orientation: str = pp.CANONICAL_ORIENTATION,
    input_intensity: str = "native",
) -> ModelSpace:
    if input_intensity not in INPUT_INTENSITIES:
        raise AbdomenSegError(
            f"unknown input intensity '{input_intensity}'", f"use one of {', '.join(INPUT_INTENSITIES)}"
        )
    image = sitk.Cast(image, sitk.sitkFloat32)
    convert = INPUT_INTENSITIES[input_intensity]
    if convert is not None:
        converted = sitk.GetImageFromArray(convert(sitk.GetArrayViewFromImage(image)))
        converted.CopyInformation(image)
        image = converted
    resampled = pp.resample_to_spacing(pp.reorient(image, orientation), spacing)
    raw = sitk.GetArrayFromImage(resampled)
    mode = intensity["mode"]
    if mode == "ct_window":
        low, high = intensity["window"]
        array = pp.ct_window(raw, low, high)
        body = pp.body_mask(raw, intensity.get("body_threshold", -500.0))
    elif mode == "mr_percentile":
        body = pp.body_mask(raw, np.percentile(raw, 99) * intensity.get("body_fraction", 0.05))
        array = pp.mr_normalize(raw, intensity.get("percentiles", (0.5, 99.5)), body)
    else:
        raise AbdomenSegError(f"unknown intensity mode '{mode}' in model card", "use ct_window or mr_percentile")
    array = pp.enhance(array, intensity.get("enhancement", "none"))
    return ModelSpace(resampled, np.ascontiguousarray(array, dtype=np.float32), pp.bounding_box(body, margin=4))
