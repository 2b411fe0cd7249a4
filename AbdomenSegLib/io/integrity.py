"""Is an image file whole and self-consistent? Checked before its pixels are trusted.

ITK's readers are lenient where a clinical tool may not be:
- NIfTI: a truncated `.nii`/`.nii.gz` is zero-filled and reported as read (liver Dice 0.003 against the
  intact file, exit 0); a file holding more data than the header declares (wrong dimensions) is read
  scrambled; a zero or negative pixdim becomes 1 mm while the sform says 3 mm; when qform and sform both
  claim to be valid but disagree, ITK takes one of them silently.
- NRRD with its data in the same or a detached raw file: more data than `sizes` declares is read scrambled.
The header (NIfTI via nibabel's header parser; NRRD's text header) says exactly how many bytes of voxel data
follow; the file must hold exactly those, and a gzip stream must end with a valid checksum (Python's gzip
verifies the CRC-32 and length trailer and raises EOFError on a cut stream).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from AbdomenSegLib.core.errors import AbdomenSegError

_CHUNK = 1 << 22
_NIFTI1_MIN_OFFSET = 352  # 348-byte header + 4-byte extension flag, in a single .nii file
_NRRD_TYPES = {
    "int8": 1,
    "uint8": 1,
    "signed char": 1,
    "unsigned char": 1,
    "uchar": 1,
    "int16": 2,
    "uint16": 2,
    "short": 2,
    "unsigned short": 2,
    "ushort": 2,
    "int32": 4,
    "uint32": 4,
    "int": 4,
    "unsigned int": 4,
    "uint": 4,
    "int64": 8,
    "uint64": 8,
    "long long": 8,
    "unsigned long long": 8,
    "float": 4,
    "double": 8,
    "signed short": 2,
    "signed int": 4,
    "short int": 2,
    "signed short int": 2,
    "unsigned short int": 2,
    "int8_t": 1,
    "uint8_t": 1,
    "int16_t": 2,
    "uint16_t": 2,
    "int32_t": 4,
    "uint32_t": 4,
    "int64_t": 8,
    "uint64_t": 8,
    "longlong": 8,
    "ulonglong": 8,
    "long long int": 8,
    "signed long long": 8,
    "signed long long int": 8,
    "unsigned long long int": 8,
}


def check_complete(path) -> None:
    """Raise AbdomenSegError when a NIfTI or NRRD file does not hold exactly the voxel data its header declares,
    or when a NIfTI header contradicts itself."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)


# -- NIfTI ----------------------------------------------------------------------------------------------
def _check_nifti(path: Path) -> None:
    header = _raw_nifti_header(path)
    if header is None:
        return  # not parseable as NIfTI: ITK's own reader reports it
    offset = int(header["vox_offset"])
    expected = offset + math.prod(int(n) for n in header.get_data_shape()) * header.get_data_dtype().itemsize
    if offset < _NIFTI1_MIN_OFFSET and header["magic"] == b"n+1":
        raise AbdomenSegError(
            f"'{path}' has its image data at byte {offset}, inside the 352-byte NIfTI header",
            "the header is corrupt: export the image again",
        )
    actual = path.stat().st_size if path.name.lower().endswith(".nii") else _gunzipped_size(path)
    _compare_sizes(path, expected, actual)
    _check_nifti_geometry(path, header)


def _raw_nifti_header(path: Path):
    """The header as written, not 'fixed': nibabel's loader silently repairs zero pixdims and low offsets, which
    are exactly what must be seen here (check=False keeps every field as stored)."""
    import nibabel as nib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(540)
        nifti2 = len(head) >= 540 and int.from_bytes(head[:4], "little") in (540, 0x1C020000)
        kind, size = (nib.Nifti2Header, 540) if nifti2 else (nib.Nifti1Header, 348)
        # The fixed-size header alone: extensions (TotalSegmentator writes one) need not be parsed here.
        return kind(binaryblock=head[:size], check=False)
    except Exception:  # too short, wrong magic, unreadable: ITK reports it
        return None


def _check_nifti_geometry(path: Path, header) -> None:
    dims = int(header["dim"][0])
    pixdim = np.asarray(header["pixdim"][1 : 1 + min(dims, 3)], dtype=float)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise AbdomenSegError(
            f"'{path}' declares voxel sizes {pixdim.tolist()} (pixdim): zero, negative or not a number",
            "the header is corrupt: export the image again",
        )
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode > 0 and scode > 0:
        qform, sform = header.get_qform(), header.get_sform()
        if not np.allclose(qform[:3, :3], sform[:3, :3], rtol=1e-3, atol=1e-3) or not np.allclose(
            qform[:3, 3], sform[:3, 3], atol=0.1
        ):
            raise AbdomenSegError(
                f"'{path}' holds two different placements of the image (its qform and sform disagree), and readers "
                "pick different ones",
                "export the image again, or fix the header so that both agree",
            )


# -- NRRD -----------------------------------------------------------------------------------------------
def _check_nrrd(path: Path) -> None:
    fields, header_bytes = _nrrd_header(path)
    if fields is None or "sizes" not in fields or "type" not in fields:
        return  # not a plain NRRD header: ITK decides
    itemsize = _NRRD_TYPES.get(fields["type"].strip().lower())
    encoding = fields.get("encoding", "raw").strip().lower()
    if itemsize is None or encoding not in ("raw", "gzip", "gz"):
        return
    try:
        expected = math.prod(int(n) for n in fields["sizes"].split()) * itemsize
    except ValueError:
        return
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file:
        if data_file.strip().upper().startswith("LIST") or "%" in data_file:
            return  # multi-file data: left to ITK
        source, start = (path.parent / data_file.strip()), 0
    else:
        source, start = path, header_bytes
    if not source.is_file():
        return  # ITK names the missing file
    if encoding == "raw":
        actual = source.stat().st_size - start
    else:
        actual = _gunzipped_size(source, start)
    _compare_sizes(path, expected, actual)


def _nrrd_header(path: Path) -> tuple:
    """(field -> value, bytes up to and including the blank line), or (None, 0) if this is not an NRRD."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if not head.startswith(b"NRRD"):
        return None, 0
    end = head.find(b"\n\n")
    if end < 0:
        return None, 0
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line or ":=" in line:
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    return fields, end + 2


# -- shared ---------------------------------------------------------------------------------------------
def _compare_sizes(path: Path, expected: int, actual: int) -> None:
    if actual < expected:
        raise AbdomenSegError(
            f"'{path}' is truncated: its header declares {expected:,} bytes of image data but the file holds "
            f"{actual:,}",
            "the file was cut short (interrupted copy or download): copy it again from its source",
        )
    if actual > expected:
        raise AbdomenSegError(
            f"'{path}' holds {actual - expected:,} bytes more image data than its header declares ({expected:,})",
            "the header's dimensions or data type are probably wrong: export the image again",
        )


def _gunzipped_size(path: Path, start: int = 0) -> int:
    total = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(start)
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                while chunk := stream.read(_CHUNK):
                    total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise AbdomenSegError(
            f"'{path}' is truncated or corrupt ({exc})",
            "the compressed file is damaged (interrupted copy or download): copy it again from its source",
        ) from None
    return total
