"""Is an image file whole and self-consistent? Checked before its pixels are trusted.

ITK's readers are lenient where a clinical tool may not be:
- NIfTI: a truncated `.nii`/`.nii.gz` is zero-filled and reported as read (liver Dice 0.003 against the
  intact file, exit 0); a file holding more data than the header declares (wrong dimensions) is read
  scrambled; a zero or negative pixdim becomes 1 mm while the sform says 3 mm; when qform and sform both
  claim to be valid but disagree, ITK takes one of them silently.
- NRRD with its data in the same or a detached raw file: more data than `sizes` declares is read scrambled.
- MetaImage (.mha, .mhd + .raw/.zraw): a cut data file was reported as "No such file or directory".
The header (NIfTI via nibabel's header parser; NRRD's and MetaImage's text headers) says exactly how many bytes of
voxel data follow; the file must hold exactly those, and a gzip stream must end with a valid checksum (Python's gzip
verifies the CRC-32 and length trailer and raises EOFError on a cut stream).

Compression is read from the bytes, never from the name: ITK reads a `.nii.gz` holding uncompressed data (and NRRD
data marked gzip that is not) as it is, so the size check must count those bytes as they are; a cut one was
zero-filled and passed (Dice 0 everywhere, exit 0).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from AbdomenSegLib.core.errors import AbdomenSegError

_CHUNK = 1 << 22
GZIP_MAGIC = b"\x1f\x8b"
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


def check_complete(path, *, written: bool = False) -> None:
    """Raise AbdomenSegError when a NIfTI, NRRD or MetaImage file does not hold exactly the voxel data its header
    declares, or when a NIfTI header contradicts itself.

    `written`: a file this process has just written (io.images.write_image), checked against a full disk that cut it
    short. A compressed stream whose own length record agrees with the header (gzip's ISIZE trailer, MetaImage's
    CompressedDataSize) is taken as whole without inflating it (a cut stream ends in compressed bytes, which match
    the declared length by chance once in 2**32); any disagreement gets the full check."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path, written)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path, written)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path, written)


def check_readable(path) -> None:
    """Before ITK looks at the file: the NIfTI variants ITK cannot read, named as what they are (both were "could
    not be read ... give a NIfTI"): a gzip-compressed file named `.nii`, and NIfTI-2 (SimpleITK 2.5 / ITK 5.4 finds
    no reader for the 540-byte header)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nhdr", ".nrrd", ".mhd", ".mha")):
        _require_data_files(path)
    if not name.endswith((".nii", ".nii.gz")):
        return
    if name.endswith(".nii") and is_gzip(path):
        raise AbdomenSegError(
            f"'{path}' is gzip-compressed but its name ends in .nii, and ITK reads .nii files uncompressed only",
            f"rename it to '{path.name}.gz'",
        )
    header = _raw_nifti_header(path)
    if header is not None and int(header["sizeof_hdr"]) == 540:
        raise AbdomenSegError(
            f"'{path}' is a NIfTI-2 file (540-byte header), which the image reader (ITK) cannot read",
            "convert it to NIfTI-1, e.g. in Python: nibabel.save(nibabel.Nifti1Image.from_image(nibabel.load(path)), "
            "'scan.nii.gz'), or export it as NRRD",
        )


def _require_data_files(path: Path) -> None:
    """A detached NRRD or MetaImage data file that is missing: ITK's message names neither file clearly."""
    if path.name.lower().endswith((".nhdr", ".nrrd")):
        fields = _nrrd_header(path)[0] or {}
        data_file = fields.get("data file") or fields.get("datafile") or ""
    else:
        fields = _metaimage_header(path)[0] or {}
        data_file = fields.get("elementdatafile", "")
        data_file = "" if data_file.upper() == "LOCAL" else data_file
    if data_file and not data_file.upper().startswith("LIST") and "%" not in data_file:
        _require_data_file(path, path.parent / data_file.strip())


def is_gzip(path: Path, start: int = 0) -> bool:
    """Does a gzip stream begin at byte `start` of `path`? (its two magic bytes 1f 8b)"""
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(2) == GZIP_MAGIC


# -- NIfTI ----------------------------------------------------------------------------------------------
def _check_nifti(path: Path, written: bool = False) -> None:
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
    actual = _gunzipped_size(path, 0, expected if written else None) if is_gzip(path) else path.stat().st_size
    _compare_sizes(path, expected, actual)
    _check_nifti_geometry(path, header)


def _raw_nifti_header(path: Path):
    """The header as written, not 'fixed': nibabel's loader silently repairs zero pixdims and low offsets, which
    are exactly what must be seen here (check=False keeps every field as stored). Compressed or not as the bytes
    say, whatever the name."""
    import nibabel as nib

    try:
        opener = gzip.open if is_gzip(path) else open
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
def _check_nrrd(path: Path, written: bool = False) -> None:
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
        _require_data_file(path, source)
    else:
        source, start = path, header_bytes
    # ITK reads data marked gzip that is not compressed as it is: count it as it is.
    compressed = encoding != "raw" and is_gzip(source, start)
    actual = (
        _gunzipped_size(source, start, expected if written else None) if compressed else source.stat().st_size - start
    )
    if encoding == "raw" and actual != expected and is_gzip(source, start):
        raise AbdomenSegError(
            f"'{path}' declares raw (uncompressed) image data but its data{_in(source, path)} is gzip-compressed",
            "set 'encoding: gzip' in its header, or export the image again",
        )
    _compare_sizes(source, expected, actual, header=path)


def _nrrd_header(path: Path) -> tuple:
    """(field -> value, bytes up to and including the blank line), or (None, 0) if this is not an NRRD. A detached
    header (.nhdr, ITK's included) may end without the blank line: then the file is all header."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if not head.startswith(b"NRRD"):
        return None, 0
    end = head.find(b"\n\n")
    if end < 0 and len(head) < 1 << 16 and b"\0" not in head:
        end = len(head) - 1
    if end < 0:
        return None, 0
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line or ":=" in line:
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    return fields, end + 2


# -- MetaImage ------------------------------------------------------------------------------------------
# Bytes per element of MetaIO's types (metaTypes.h: MET_LONG is 4 bytes, whatever the platform's long).
_MET_TYPES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _check_metaimage(path: Path, written: bool = False) -> None:
    fields, header_bytes = _metaimage_header(path)
    if fields is None:
        return  # not a MetaImage header: ITK decides
    itemsize = _MET_TYPES.get(fields.get("elementtype", "").upper())
    try:
        dims = [int(n) for n in fields.get("dimsize", "").split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        skip = int(fields.get("headersize", "0"))
    except ValueError:
        return
    data_file = fields.get("elementdatafile", "")
    if itemsize is None or not dims or data_file.upper().startswith("LIST") or "%" in data_file:
        return  # other types, or data split over several files: left to ITK
    expected = math.prod(dims) * channels * itemsize
    if data_file.upper() == "LOCAL":
        source, start = path, header_bytes
    else:
        source, start = path.parent / data_file, 0
        _require_data_file(path, source)
    if fields.get("compresseddata", "false").lower() == "true":
        declared = fields.get("compresseddatasize", "")
        if written and declared.isdigit() and source.stat().st_size - start == int(declared):
            return  # all the compressed bytes ITK counted are there
        actual = _inflated_size(source, start, expected, header=path)
    else:
        actual = source.stat().st_size - start - max(skip, 0)
        if skip == -1:  # HeaderSize = -1: the data are the file's last bytes; only a short file shows
            actual = min(actual, expected)
    _compare_sizes(source, expected, actual, header=path)


def _metaimage_header(path: Path) -> tuple:
    """(field -> value with lower-case keys, bytes up to and including the ElementDataFile line), or (None, 0).
    ElementDataFile is the header's last line: in a .mha the voxel data follow it at once."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    fields, offset = {}, 0
    for line in head.split(b"\n"):
        offset += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            return None, 0
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            return (fields, offset) if "dimsize" in fields else (None, 0)
        if offset >= len(head):
            break
    return None, 0


def _inflated_size(path: Path, start: int, expected: int, header: Path) -> int:
    """The size of a MetaImage's zlib stream once inflated; a stream that stops short is a cut file."""
    inflater, total = zlib.decompressobj(), 0
    try:
        with open(path, "rb") as raw:
            raw.seek(start)
            while not inflater.eof and (chunk := raw.read(_CHUNK)):
                total += len(inflater.decompress(chunk))
    except zlib.error as exc:
        raise AbdomenSegError(
            f"'{path}'{_of(path, header)} holds corrupt compressed image data ({exc})",
            "the file is damaged (interrupted copy or download): copy it again from its source",
        ) from None
    if not inflater.eof:
        raise AbdomenSegError(
            f"'{path}'{_of(path, header)} is truncated: its compressed image data stop after {total:,} of the "
            f"{expected:,} bytes its header declares",
            "the file was cut short (interrupted copy or download): copy it again from its source",
        )
    return total


# -- shared ---------------------------------------------------------------------------------------------
def _require_data_file(header: Path, data: Path) -> None:
    """A detached data file (NRRD `data file`, MetaImage `ElementDataFile`) must be there: ITK said "No such file
    or directory" about the header, which exists."""
    if not data.is_file():
        raise AbdomenSegError(
            f"the image data file '{data}' that the header '{header}' names is missing",
            "copy the data file next to its header (both files belong together)",
        )


def _of(source: Path, header: Path) -> str:
    return f" (the data file of '{header}')" if source != header else ""


def _in(source: Path, header: Path) -> str:
    return f" (in '{source}')" if source != header else ""


def _compare_sizes(path: Path, expected: int, actual: int, header: Path | None = None) -> None:
    named = f"'{path}'{_of(path, header or path)}"
    if actual < expected:
        raise AbdomenSegError(
            f"{named} is truncated: its header declares {expected:,} bytes of image data but the file holds "
            f"{actual:,}",
            "the file was cut short (interrupted copy or download): copy it again from its source",
        )
    if actual > expected:
        raise AbdomenSegError(
            f"{named} holds {actual - expected:,} bytes more image data than its header declares ({expected:,})",
            "the header's dimensions or data type are probably wrong: export the image again",
        )


def _gunzipped_size(path: Path, start: int = 0, trailer_says: int | None = None) -> int:
    """The size of the gzip stream at `start` once decompressed, its checksum verified. With `trailer_says`, a stream
    whose ISIZE trailer (the length mod 2**32) records that size is taken as having it, unread."""
    if trailer_says is not None and _gzip_trailer_size(path) == trailer_says % (1 << 32):
        return trailer_says
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


def _gzip_trailer_size(path: Path) -> int:
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        if handle.tell() < 18:  # a 10-byte header and an 8-byte trailer at least
            return -1
        handle.seek(-4, 2)
        return int.from_bytes(handle.read(4), "little")
