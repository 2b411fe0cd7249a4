"""Multi-frame (enhanced) DICOM images: one file holding a whole volume, each frame placed by functional groups.

An Enhanced CT/MR Image (or a Legacy Converted Enhanced one) stores every slice as a frame of one file and puts
each frame's geometry in the Per-frame Functional Groups (Plane Position, and Plane Orientation and Pixel
Measures unless the Shared Functional Groups hold them for all frames). GDCM, under SimpleITK, places the frames
only when they are stored in position order with one regular step: with one frame missing or the frames out of
order it reads the volume with 1.0 mm spacing on every axis, without a word (issue 31's audit: liver 1805 mL,
Dice 0.16).

Here pydicom reads every frame's geometry, the rules a series of slice files must meet check it
(`dicom_series.check_stack`: one pixel spacing and orientation, no two frames at one place, even steps along the
slice normal, no shear, no hole in the in-stack position numbers), and the volume is built from the frames sorted
along the normal, each frame rescaled by its own Pixel Value Transformation (CT numbers), in the grid the
functional groups give: the same array and geometry as the series of slice files it was converted from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core import limits
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.io.dicom_series import SliceHeader, Stack, check_stack, refuse_monochrome1

# A file's pixel data is left on disk until the geometry has passed (pydicom's deferred read).
_DEFER_PIXELS = "1 MB"
_EXPORT_AGAIN = "export the complete volume again from the scanner or PACS"


def is_multiframe(path) -> bool:
    """A DICOM file holding more than one frame (read from its header alone)."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
        return _frame_count(header) > 1
    except Exception:  # noqa: BLE001 - pydicom raises many types on files that are not DICOM
        return False


def read_multiframe(path) -> sitk.Image:
    """The volume of a multi-frame DICOM image file, its frames checked like the slices of a series."""
    path = Path(path)
    dataset = _read_dataset(path)
    title = f"multi-frame DICOM file '{path}'"
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    refuse_monochrome1(title, [path.name] if photometric == "MONOCHROME1" else [])
    if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
        raise AbdomenSegError(
            f"'{path}' is a multi-component (e.g. RGB) image", "give a single-channel CT or MR volume"
        )
    headers = _frame_headers(dataset, title)
    if len(headers) < 2:
        raise AbdomenSegError(f"{title} holds a single frame, a 2D image, not a volume", "give a 3D volume")
    checked = check_stack(
        Stack(title, unit="frame", numbering="in-stack position numbers", quoted=False, recopy=_EXPORT_AGAIN),
        headers,
    )
    limits.check_voxel_count((*headers[0].size, len(headers)), f"'{path}'")
    order = checked.order
    values = _rescaled(_pixels(dataset, path, len(headers))[order], [_rescale(dataset, int(k)) for k in order])
    first = headers[int(order[0])]
    assert first.position is not None and first.orientation is not None and first.pixel_spacing is not None
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((float(first.pixel_spacing[1]), float(first.pixel_spacing[0]), checked.spacing))
    image.SetOrigin(tuple(float(v) for v in first.position))
    axes = np.column_stack([first.orientation[:3], first.orientation[3:], checked.normal])
    image.SetDirection(tuple(float(v) for v in axes.ravel()))
    modality = str(dataset.get("Modality", "")).strip()
    if modality:  # an MR image gets the MR model (models/choice.py), as for a series
        image.SetMetaData("0008|0060", modality)
    return image


def _read_dataset(path: Path) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(path, defer_size=_DEFER_PIXELS)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise AbdomenSegError(
            f"'{path}' could not be read as DICOM ({str(exc)[:200]})", "copy the file again from the scanner or PACS"
        ) from None


def _frame_count(dataset: Any) -> int:
    try:
        return int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


# --- per-frame geometry ----------------------------------------------------------------------------------


def _group_item(dataset: Any, frame: int, sequence: str) -> Any:
    """The functional group `sequence` of one frame: its own (Per-frame) if it has one, else the Shared one."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence") or []
    shared = dataset.get("SharedFunctionalGroupsSequence") or []
    for groups in (per_frame[frame] if frame < len(per_frame) else None, shared[0] if shared else None):
        items = groups.get(sequence) if groups is not None else None
        if items:
            return items[0]
    return None


def _floats(item: Any, keyword: str, count: int) -> np.ndarray | None:
    """A numeric multi-value attribute of a functional group item; None when absent or malformed."""
    if item is None or keyword not in item:
        return None
    try:
        values = np.array([float(v) for v in item[keyword].value], dtype=float)
    except (TypeError, ValueError):
        return None
    return values if values.size == count and np.all(np.isfinite(values)) else None


def _in_stack_number(dataset: Any, frame: int) -> int | None:
    content = _group_item(dataset, frame, "FrameContentSequence")
    try:
        return int(content.InStackPositionNumber) if content is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def _frame_headers(dataset: Any, title: str) -> list[SliceHeader]:
    frames = _frame_count(dataset)
    described = len(dataset.get("PerFrameFunctionalGroupsSequence") or [])
    if described != frames:
        raise AbdomenSegError(
            f"{title} declares {frames} frames but places {described} of them (Per-frame Functional Groups); "
            "its frames cannot be put where they belong",
            f"{_EXPORT_AGAIN} as an enhanced image (or as a series of single-frame slices)",
        )
    size = (int(dataset.Columns), int(dataset.Rows))
    headers = [
        SliceHeader(
            name=f"frame {k + 1}",
            size=size,
            position=_floats(_group_item(dataset, k, "PlanePositionSequence"), "ImagePositionPatient", 3),
            orientation=_floats(_group_item(dataset, k, "PlaneOrientationSequence"), "ImageOrientationPatient", 6),
            pixel_spacing=_floats(_group_item(dataset, k, "PixelMeasuresSequence"), "PixelSpacing", 2),
            instance=_in_stack_number(dataset, k),
        )
        for k in range(frames)
    ]
    _refuse_frames_without_geometry(title, headers)
    return headers


def _refuse_frames_without_geometry(title: str, headers: list[SliceHeader]) -> None:
    for what, lacking in (
        ("position (Plane Position Sequence)", [h.name for h in headers if h.position is None]),
        ("orientation (Plane Orientation Sequence)", [h.name for h in headers if h.orientation is None]),
        ("pixel spacing (Pixel Measures Sequence)", [h.name for h in headers if h.pixel_spacing is None]),
    ):
        if lacking:
            shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
            raise AbdomenSegError(
                f"in {title}, {shown} {'has' if len(lacking) == 1 else 'have'} no valid {what} in the Per-frame "
                "or Shared Functional Groups, so the frames cannot be placed",
                f"{_EXPORT_AGAIN} as an enhanced CT/MR image (or as a series of single-frame slices)",
            )


# --- pixels ----------------------------------------------------------------------------------------------


def _pixels(dataset: Any, path: Path, frames: int) -> np.ndarray:
    try:
        pixels = np.asarray(dataset.pixel_array)
    except Exception as exc:  # noqa: BLE001 - a missing decoder, damaged or truncated pixel data
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        named = f" ({syntax.name})" if syntax is not None else ""
        raise AbdomenSegError(
            f"the pixel data of '{path}'{named} cannot be decoded ({str(exc).strip()[:200]})",
            "copy the file again, or export it uncompressed from the scanner or PACS",
        ) from None
    expected = (frames, int(dataset.Rows), int(dataset.Columns))
    if pixels.shape != expected:
        raise AbdomenSegError(
            f"the pixel data of '{path}' holds an array of shape {pixels.shape}, not the {expected} its header "
            "declares (frames, rows, columns)",
            "copy the file again from the scanner or PACS",
        )
    return pixels


def _rescale(dataset: Any, frame: int) -> tuple[float, float]:
    """(slope, intercept) of one frame: its Pixel Value Transformation, else the shared one, else the top level."""
    item = _group_item(dataset, frame, "PixelValueTransformationSequence") or dataset
    try:
        slope = float(item.get("RescaleSlope", 1) or 1)
        intercept = float(item.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        raise AbdomenSegError(
            f"frame {frame + 1} has a malformed RescaleSlope/RescaleIntercept", _EXPORT_AGAIN
        ) from None
    return slope, intercept


def _rescaled(stored: np.ndarray, rescales: list[tuple[float, float]]) -> np.ndarray:
    """CT numbers (or MR values) frame by frame. Integers stay integers where the rescale keeps them so (as GDCM
    gives int16 for a slope of 1 and a whole intercept); otherwise float32."""
    slopes = np.array([s for s, _ in rescales])[:, None, None]
    intercepts = np.array([i for _, i in rescales])[:, None, None]
    if np.all(slopes == 1) and np.all(intercepts == 0):
        return np.ascontiguousarray(stored)
    if np.all(slopes == 1) and np.all(intercepts == np.round(intercepts)):
        values = stored.astype(np.int64) + intercepts.astype(np.int64)
        for dtype in (np.int16, np.int32):
            if values.min() >= np.iinfo(dtype).min and values.max() <= np.iinfo(dtype).max:
                return np.ascontiguousarray(values.astype(dtype))
    return np.ascontiguousarray((stored.astype(np.float64) * slopes + intercepts).astype(np.float32))
