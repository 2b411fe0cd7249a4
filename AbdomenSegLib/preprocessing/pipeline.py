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
    limits.check_field_of_view(image.GetSize(), image.GetSpacing(), name, image.GetDirection())
    check_intensity_polarity(image, modality, name)
    check_ct_for_mr_model(image, modality, input_intensity, name)
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


# -- intensity checks: inverted values, and a CT given to an MR model -----------------------------------------
# In a CT, air is the darkest thing there is, and air surrounds the body: the voxels at the image's sides (its
# faces along the head-feet axis excluded, which cut through the body) lie at the bottom of the histogram. Their
# median's mid-rank (the share of the volume darker, plus half the share equal) is 0.17 in TotalSegmentator's
# example CT and 0.17-0.30 in the 24 BTCV CTs (their air saturates at 0 with half the volume); inverted (negated,
# or max + min - value as a MONOCHROME1 series shown as stored) 0.70-0.83. Above INVERTED_RANK the air is bright:
# bone darker than air.
INVERTED_RANK = 0.6


def check_intensity_polarity(image: sitk.Image, modality: str, name: str = "input") -> None:
    """Refuse a CT whose values are inverted (the air around the body brighter than most of the body), which the
    network would segment as an upside-down contrast and the result check then blame on a mirrored header."""
    from AbdomenSegLib.models.choice import looks_like_mr

    if modality != "CT" or looks_like_mr(image):  # an MR scan is refused as such below, with the MR model named
        return
    rank, air = _side_rank(image)
    if rank < INVERTED_RANK:
        return
    array = sitk.GetArrayViewFromImage(image)
    low, high = float(array.min()), float(array.max())
    if 500 <= air <= 1500:  # air at +1000: HU times -1
        fix = f"the values look negated (air at {air:+.0f} instead of -1000): multiply them by -1 and try again"
    else:
        fix = (
            f"undo the inversion (value = {low:g} + {high:g} - value), as a MONOCHROME1 series or an inverting export "
            "leaves it, or export the series as MONOCHROME2, and try again"
        )
    raise AbdomenSegError(
        f"{name}'s values look inverted (bone darker than air: {100 * rank:.0f}% of the scan is darker than the air "
        f"around the body, at {air:g}; in a CT air is the darkest, 17-30% in the CTs measured)",
        fix,
    )


def _side_rank(image: sitk.Image) -> tuple:
    """(mid-rank of the median of the image's sides among every 4th voxel, that median); the sides are the four
    faces that run along the head-feet axis (found through the direction matrix, for any voxel order)."""
    array = sitk.GetArrayViewFromImage(image)
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    head_feet = 2 - int(np.argmax(direction[2]))  # the array axis nearest the patient's z
    sides = [
        np.asarray(np.take(array, end, axis=axis)).ravel() for axis in range(3) if axis != head_feet for end in (0, -1)
    ]
    air = float(np.median(np.concatenate(sides)))
    sample = np.asarray(array[::4, ::4, ::4])
    rank = (np.count_nonzero(sample < air) + 0.5 * np.count_nonzero(sample == air)) / max(sample.size, 1)
    return rank, air


# A CT in HU holds air at -1000 (outside the body, lungs, bowel gas): 38% of TotalSegmentator's example CT lies
# at or below -500 and its minimum is -1207. No MR scan here goes below -47 (its example MR; CHAOS T2 >= 0),
# and MR signal is a magnitude: a scan with at least CT_AIR_FRACTION of its voxels at or below CT_AIR_HU, reaching
# below -900, with soft tissue in -250..250 besides, is a CT, whatever model it was given to.
CT_AIR_HU = -500.0
CT_AIR_FRACTION = 0.01


def check_ct_for_mr_model(image: sitk.Image, modality: str, input_intensity: str, name: str = "input") -> None:
    """Refuse a CT given to an MR model (the any-sequence MR model would segment it, wrongly), naming the CT model."""
    if modality != "MR":
        return
    if input_intensity != "native":
        raise AbdomenSegError(
            f"--input-intensity {input_intensity} declares {name} a windowed CT, but the model is an MR model",
            f"use --model {_ct_model()} (the recommended CT model)",
        )
    array = sitk.GetArrayViewFromImage(image)
    if float(array.min()) > -900:
        return
    sample = np.asarray(array[::4, ::4, ::4])
    air = np.count_nonzero(sample <= CT_AIR_HU) / max(sample.size, 1)
    tissue = np.count_nonzero((sample >= _SOFT_TISSUE_HU[0]) & (sample <= _SOFT_TISSUE_HU[1])) / max(sample.size, 1)
    if air >= CT_AIR_FRACTION and tissue >= _MIN_SOFT_TISSUE_FRACTION:
        raise AbdomenSegError(
            f"{name} looks like a CT in HU (air at -1000: {100 * air:.0f}% of it at or below {CT_AIR_HU:g}, down to "
            f"{float(array.min()):g}; soft tissue at -250..250: {100 * tissue:.0f}%), but the model is an MR model",
            f"use --model {_ct_model()} (the recommended CT model), or leave --model out",
        )


def _ct_model() -> str:
    from AbdomenSegLib.models.packages import recommended_model

    try:
        return recommended_model("CT") or "btcv-ct-3d-unet"
    except Exception:  # noqa: BLE001 - a broken catalog must not hide the refusal itself
        return "btcv-ct-3d-unet"


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
    if pp.is_oblique(image):
        resampled = pp.resample_onto_axes(image, orientation, spacing)
    else:
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
