"""Is an image file whole? Checked before its pixels are trusted.

ITK's NIfTI reader zero-fills whatever a truncated `.nii`/`.nii.gz` lacks and reports success, so a
half-copied scan was segmented as if complete (liver Dice 0.003 against the intact file, exit 0).
NRRD and MetaImage readers already fail on truncation; NIfTI needs this check. The header (read with
nibabel, which only parses it) says how many bytes of voxel data must follow; the file must hold them,
and a gzip stream must decompress to its end with a valid checksum (Python's gzip verifies the CRC-32
and length trailer and raises EOFError on a cut stream).
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

from .errors import AbdomenSegError

_CHUNK = 1 << 22


def check_complete(path) -> None:
    """Raise AbdomenSegError when a NIfTI file holds fewer voxel bytes than its header declares."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    expected = _nifti_expected_bytes(path)
    if expected is None:
        return  # not parseable by nibabel: ITK's own reader reports it
    if name.endswith(".nii"):
        actual = path.stat().st_size
    else:
        actual = _gunzipped_size(path)
    if actual < expected:
        raise AbdomenSegError(
            f"'{path}' is truncated: its header declares {expected:,} bytes of image data but the file holds "
            f"{actual:,}", "the file was cut short (interrupted copy or download): copy it again from its source")


def _nifti_expected_bytes(path: Path):
    import nibabel as nib
    try:
        header = nib.load(str(path)).header
        shape = header.get_data_shape()
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except Exception:  # nibabel's errors vary by corruption; ITK reports unreadable files itself
        return None
    return offset + math.prod(int(n) for n in shape) * itemsize


def _gunzipped_size(path: Path) -> int:
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise AbdomenSegError(
            f"'{path}' is truncated or corrupt ({exc})",
            "the compressed file is damaged (interrupted copy or download): copy it again from its source") from None
    return total
