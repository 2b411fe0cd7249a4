"""Preprocessing steps, each a small function: orientation, resampling, intensity, crop and pad.

Images are `SimpleITK.Image`s while geometry matters and (z, y, x) numpy arrays afterwards.
Resampling works in physical space, so going back to the input grid is one resample onto the
input image itself, which reproduces its size, spacing, origin and direction exactly.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

CANONICAL_ORIENTATION = "LPS"  # ITK's native axes: identity direction for axis-aligned images


def reorient(image: sitk.Image, orientation: str = CANONICAL_ORIENTATION) -> sitk.Image:
    """Permute/flip axes to the closest `orientation` (no interpolation, exact voxel values)."""
    return sitk.DICOMOrient(image, orientation)


def resample_to_spacing(image: sitk.Image, spacing, *, is_label: bool = False) -> sitk.Image:
    """Resample onto a grid with `spacing` (x, y, z mm) covering the same physical extent.

    Linear for images, nearest for label maps (label values must never be blended).
    """
    spacing = [float(s) for s in spacing]
    old_size, old_spacing = image.GetSize(), image.GetSpacing()
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(old_size, old_spacing, spacing)]
    # Keep the grid centred on the same physical extent: shift the first voxel centre by half the
    # difference between the old and new voxel footprints.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    extent_old = np.array(old_size) * np.array(old_spacing)
    extent_new = np.array(size) * np.array(spacing)
    shift = (extent_old - extent_new) / 2.0 + (np.array(spacing) - np.array(old_spacing)) / 2.0
    origin = np.array(image.GetOrigin()) + direction @ shift
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear,
        origin.tolist(),
        spacing,
        image.GetDirection(),
        0,
        image.GetPixelID() if is_label else sitk.sitkFloat32,
    )


# How far an axis may lean off the model's axes before the image is resampled onto them. Small tilts stay on the
# permute-only path the shipped models were trained and validated on: CHAOS T2 cases 21, 22 and 33 lean up to 1.34
# degrees (under 7 mm across 300 mm), and resampling them changed the MR model's validation Dice (liver 0.8152 ->
# 0.8125). 3 degrees keeps every training scan on that path; a 45-degree acquisition (right kidney Dice 0.40
# without resampling) goes onto the model's axes.
OBLIQUE_DEGREES = 3.0


def is_oblique(image: sitk.Image) -> bool:
    """Does one of `image`'s axes lean more than OBLIQUE_DEGREES off the nearest patient axis (an oblique or tilted
    acquisition)? From the direction cosines alone: reorienting (DICOMOrient) only permutes and flips the axes, which
    changes no angle, and would copy every voxel to find that out."""
    nearest = np.abs(np.array(image.GetDirection()).reshape(3, 3)).max(axis=0)  # cosine to its nearest axis
    return bool(np.degrees(np.arccos(np.clip(nearest.min(), 0.0, 1.0))) > OBLIQUE_DEGREES)


def _axes_of(orientation: str) -> np.ndarray:
    return np.array(sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(orientation)).reshape(3, 3)


def resample_onto_axes(image: sitk.Image, orientation: str, spacing) -> sitk.Image:
    """An oblique `image` resampled (linear, float32) onto a grid along `orientation`'s axes at `spacing` (x, y, z mm)
    that covers all of it; outside the scan, its lowest value (air for CT, background for MR: 0 would be water in
    HU). A network trained on axis-aligned scans then sees the body upright, as in training, whatever the
    acquisition's angle; going back to the input grid is the same physical resampling as for any grid."""
    axes = _axes_of(orientation)
    size = np.array(image.GetSize())
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in size])).reshape(3, -1).T
    ]
    along = np.array(corners) @ axes  # corner coordinates along the new axes (the columns of `axes`)
    spacing = np.array([float(s) for s in spacing])
    low, high = along.min(axis=0), along.max(axis=0)
    new_size = np.maximum(1, np.ceil((high - low) / spacing - 1e-6)).astype(int)
    origin = axes @ (low + spacing / 2)
    fill = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(
        image,
        [int(n) for n in new_size],
        sitk.Transform(),
        sitk.sitkLinear,
        origin.tolist(),
        spacing.tolist(),
        axes.ravel().tolist(),
        fill,
        sitk.sitkFloat32,
    )


def resample_to_reference(
    image: sitk.Image, reference: sitk.Image, *, is_label: bool = False, default_value: float = 0.0
) -> sitk.Image:
    """Resample `image` into `reference`'s exact grid (size, spacing, origin, direction)."""
    return sitk.Resample(
        image,
        reference,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear,
        default_value,
        image.GetPixelID() if is_label else sitk.sitkFloat32,
    )


def ct_window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip HU to [low, high] and scale to [0, 1] (the BTCV training data use [-125, 275])."""
    array = np.clip(array.astype(np.float32, copy=False), low, high)
    return (array - low) / float(high - low)


def mr_normalize(array: np.ndarray, percentiles=(0.5, 99.5), body_mask=None) -> np.ndarray:
    """Per-volume MR normalisation: clip to body percentiles, scale to [0, 1].

    MR signal has no absolute scale, so each volume is normalised on its own; percentiles are taken
    inside the body so the air background does not drag the low end.
    """
    array = array.astype(np.float32, copy=False)
    values = array[body_mask] if body_mask is not None and body_mask.any() else array
    low, high = np.percentile(values, percentiles)
    if high <= low:
        high = low + 1.0
    return np.clip((array - low) / (high - low), 0.0, 1.0)


def histogram_equalize(array01: np.ndarray, nbins: int = 256) -> np.ndarray:
    """Global histogram equalisation of a [0, 1] volume (the 'HE' variant of the 2D U-Net studies)."""
    from skimage import exposure

    return exposure.equalize_hist(array01, nbins=nbins).astype(np.float32)


def clahe(array01: np.ndarray, clip_limit: float = 0.01, kernel_size=None) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (scikit-image, works on 3D volumes)."""
    from skimage import exposure

    return exposure.equalize_adapthist(np.clip(array01, 0, 1), kernel_size=kernel_size, clip_limit=clip_limit).astype(
        np.float32
    )


def enhance(array01: np.ndarray, mode: str) -> np.ndarray:
    if mode in (None, "", "none"):
        return array01
    if mode == "histeq":
        return histogram_equalize(array01)
    if mode == "clahe":
        return clahe(array01)
    raise ValueError(f"unknown enhancement '{mode}' (none, histeq, clahe)")


def body_mask(array: np.ndarray, threshold: float) -> np.ndarray:
    """Largest connected region above `threshold` (the patient; drops table and air)."""
    mask = array > threshold
    if not mask.any():
        return mask
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == sizes.argmax()
    return mask


def bounding_box(mask: np.ndarray, margin: int = 0):
    """Slices of the mask's bounding box grown by `margin` voxels; the whole array if empty."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(0, hits[0] - margin), min(mask.shape[axis], hits[-1] + 1 + margin)))
    return tuple(box)


def pad_to_multiple(array: np.ndarray, multiple, minimum=None, value: float = 0.0):
    """Pad the trailing spatial axes so each is a multiple of `multiple` (and >= `minimum`).

    Returns the padded array and the slices that recover the original.
    """
    spatial = array.shape[-len(multiple) :]
    minimum = minimum or [0] * len(multiple)
    target = [
        max(int(math.ceil(n / m) * m), int(math.ceil(mn / m) * m)) for n, m, mn in zip(spatial, multiple, minimum)
    ]
    pads = [(0, 0)] * (array.ndim - len(multiple)) + [(0, t - n) for n, t in zip(spatial, target)]
    unpad = tuple([slice(None)] * (array.ndim - len(multiple)) + [slice(0, n) for n in spatial])
    return np.pad(array, pads, constant_values=value), unpad
