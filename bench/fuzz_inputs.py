"""Fuzz the command line with damaged real inputs: is any result silently wrong? ("Never silently wrong")

    .venv/bin/python bench/fuzz_inputs.py [--cases 60] [--seed 0] [--model NAME|DIR] [--out DIR]
                                          [--families a,b] [--list]

Takes the real CT (TotalSegmentator's example, NIfTI), the real 3-slice DICOM series and the
TotalSegmentator label map from ../shared/data, damages their headers and bytes in ways that happen in
practice (cut downloads, edited or corrupt header fields, a slice missing from a series, the wrong label
convention), runs `segment` / `evaluate` on each in this process (the model stays loaded) and sorts the
outcome of each case into one of:

  refused  exit 2, the last stderr line is `error: <problem>. <fix>`, nothing left in the output folder
  flagged  exit 3 (written, with a `warning:` line from the result check)
  correct  exit 0 and the answer is right: for a mutation that keeps the image ("same"), the labels agree
           with the intact input's (Dice >= 0.9 for liver, spleen and both kidneys)
  WRONG    exit 0 but the answer is not right: a corrupt input ("refuse", "flag-or-refuse") was
           segmented without a word, or a harmless change ("same") changed the labels
  crashed  an exception escaped `main`, a traceback was printed, an exit status outside {0, 2, 3}, or a
           refusal that was not clean (malformed error line, output or partial file left behind)

Each mutation says what a correct tool must do with it:
  refuse          the file is incomplete or unreadable as declared: the only right answer is exit 2;
  flag-or-refuse  the file reads, but its header lies (mirrored direction, absurd spacing, wrong data
                  type): exit 2 or 3 are right, a clean exit 0 is silently wrong;
  same            the image is unchanged (re-encoded, re-ordered voxels with a matching direction, moved
                  origin, unused header field edited) or a careful reader can still recover it (the
                  sform when only pixdim is damaged): the labels must agree with the intact result.
                  Refusing it is not wrong but is listed as a note (a needless refusal).

It is a report, not a test: it always exits 0. One line is printed per WRONG or crashed case, and notes
for surprising but acceptable outcomes. With --out DIR the mutated inputs, outputs and a results.json
are kept there for inspection; otherwise everything lives in a temporary folder that is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_CT = SHARED / "totalseg_example" / "example_ct.nii.gz"
DEFAULT_DICOM = SHARED / "dcmqi_ct3slice" / "ct-3slice"
DEFAULT_TS_LABELS = SHARED / "totalseg_example" / "example_seg_fast_force_split.nii.gz"

REFUSE, FLAG_OR_REFUSE, SAME = "refuse", "flag-or-refuse", "same"
OUTCOMES = ("refused", "flagged", "correct", "WRONG", "crashed")
DICE_MIN = 0.9
# Large organs every abdominal model segments well; small ones (adrenals, gallbladder) are too noisy for
# a 0.9 threshold even between two correct runs.
CHECKED_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")
NIFTI_HEADER_BYTES = 348
NIFTI_DATA_OFFSET = 352  # header + 4-byte extension flag; the CT has no extensions


# ---------------------------------------------------------------------------------------------------
# Inputs and mutations
# ---------------------------------------------------------------------------------------------------


@dataclass
class Sources:
    """The intact inputs (None where absent) and the folder that mutated copies are written into."""

    ct: Path | None
    dicom: Path | None
    ts_labels: Path | None
    prediction: Path | None = None  # the intact CT's segmentation, used as `evaluate`'s prediction
    _ct_bytes: bytes | None = None

    def ct_bytes(self) -> bytes:
        """The CT as an uncompressed NIfTI byte string (header + extension flag + voxels), read once."""
        if self._ct_bytes is None:
            self._ct_bytes = (
                gzip.decompress(self.ct.read_bytes()) if self.ct.name.endswith(".gz") else self.ct.read_bytes()
            )
        return self._ct_bytes


@dataclass
class Made:
    """What a mutation produced: the command's arguments before the output, and whether the mutation,
    on inspection, turned out harmless (e.g. a flipped byte in a gzip header's timestamp)."""

    args: list[str]
    expected: str | None = None  # overrides the mutation's expectation when not None
    note: str = ""


@dataclass(frozen=True)
class Mutation:
    name: str  # unique, with its parameters, so a line of the report says exactly what was done
    family: str
    expected: str  # REFUSE | FLAG_OR_REFUSE | SAME
    make: Callable[[Sources, Path], Made]  # writes the mutated input(s) into the given folder
    needs: str = "ct"  # which source must exist: ct | dicom | ts_labels
    command: str = "segment"  # segment | evaluate
    compare: str = "array"  # how SAME is judged: array (voxel by voxel) | physical (resampled) | table


# -- NIfTI helpers -----------------------------------------------------------------------------------


def _nifti_header(raw: bytes):
    import nibabel as nib

    return nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:NIFTI_HEADER_BYTES]))


def _write(path: Path, data: bytes, level: int = 1) -> Path:
    """Bytes to `path`, gzip-compressed when it ends in .gz (level 1: these files are thrown away)."""
    path.write_bytes(gzip.compress(data, compresslevel=level, mtime=0) if path.name.endswith(".gz") else data)
    return path


def _header_edit(edit: Callable) -> Callable[[Sources, Path], Made]:
    """A mutation that changes header fields only and keeps every byte after the 348-byte header."""

    def make(src: Sources, folder: Path) -> Made:
        raw = src.ct_bytes()
        header = _nifti_header(raw)
        edit(header)
        return Made([str(_write(folder / "ct.nii.gz", header.binaryblock + raw[NIFTI_HEADER_BYTES:]))])

    return make


def _set(**fields) -> Callable:
    """Header edit that assigns fields; `pixdim1=0` style keys change one element of an array field."""

    def edit(header):
        for key, value in fields.items():
            match = re.fullmatch(r"(pixdim|dim|srow_[xyz])(\d)", key)
            if match:
                array = header[match.group(1)].copy()
                array[int(match.group(2))] = value
                header[match.group(1)] = array
            else:
                header[key] = value

    return edit


def _dim_delta(axis: int, delta: int) -> Callable:
    def edit(header):
        _set(**{f"dim{axis}": int(header["dim"][axis]) + delta})(header)

    return edit


def _swap_dims(header):
    dim = header["dim"].copy()
    dim[1], dim[2] = dim[2], dim[1]
    header["dim"] = dim


def _one_slice_offset(header):
    """vox_offset moved one slice into the data: the reader starts a slice late and runs off the end."""
    dim = header["dim"]
    header["vox_offset"] = NIFTI_DATA_OFFSET + int(dim[1]) * int(dim[2]) * header.get_data_dtype().itemsize


def _affine_edit(transform: Callable) -> Callable:
    """Header edit that rewrites the geometry consistently (sform and pixdim agree; the qform stays unused),
    as a tool that really believed the new geometry would write it: affine -> transform(affine)."""

    def edit(header):
        import numpy as np

        affine = transform(np.array(header.get_sform(), dtype=float))
        header.set_sform(affine, code=int(header["sform_code"]) or 2)
        zooms = np.linalg.norm(affine[:3, :3], axis=0)
        header["pixdim"][1:4] = zooms

    return edit


def _scale_axis(axis: int, factor: float) -> Callable:
    def transform(affine):
        affine = affine.copy()
        affine[:3, axis] *= factor
        return affine

    return transform


def _mirror_axis(axis: int) -> Callable:
    """The direction of one voxel axis reversed, voxels untouched: the header now lies about the side."""
    return _scale_axis(axis, -1.0)


def _shift_origin(offset) -> Callable:
    def transform(affine):
        affine = affine.copy()
        affine[:3, 3] += offset
        return affine

    return transform


def _nibabel_rewrite(change: Callable) -> Callable[[Sources, Path], Made]:
    """A mutation that rewrites the whole file with nibabel: change(array, affine, header) -> (array, affine,
    header). Used for voxel re-ordering and data type changes that keep the image the same."""

    def make(src: Sources, folder: Path) -> Made:
        import nibabel as nib
        import numpy as np

        image = nib.load(str(src.ct))
        array = np.asanyarray(image.dataobj)
        array, affine, header = change(array, image.affine.copy(), image.header.copy())
        out = nib.Nifti1Image(array, affine, header)
        out.set_sform(affine, code=2)
        path = folder / "ct.nii.gz"
        nib.save(out, str(path))
        return Made([str(path)])

    return make


def _flip_voxels(axis: int) -> Callable:
    """Voxel order reversed along one axis AND the affine changed to match: the same image, physically."""

    def change(array, affine, header):
        import numpy as np

        flip = np.eye(4)
        flip[axis, axis] = -1
        flip[axis, 3] = array.shape[axis] - 1
        return np.flip(array, axis=axis).copy(), affine @ flip, header

    return change


def _cast(dtype: str) -> Callable:
    def change(array, affine, header):
        header.set_data_dtype(dtype)
        return array.astype(dtype), affine, header

    return change


def _offset_storage(src: Sources, folder: Path) -> Made:
    """HU stored unsigned as HU+2048 with scl_inter -2048, as many scanners store CT: the same values.
    (Written by hand: nibabel recomputes scl_slope/scl_inter on save. 2048, not 1024: this CT reaches
    -1207 HU.)"""
    import numpy as np

    raw = src.ct_bytes()
    header = _nifti_header(raw)
    count = int(np.prod(header.get_data_shape()))
    start = len(raw) - count * header.get_data_dtype().itemsize
    values = np.frombuffer(raw, dtype=header.get_data_dtype(), count=count, offset=start)
    stored = np.round(values.astype(np.float64)) + 2048
    if stored.min() < 0 or stored.max() > 65535:
        raise RuntimeError("the CT's values do not fit uint16 with offset 2048")
    header.set_data_dtype(np.uint16)
    header["scl_slope"], header["scl_inter"] = 1.0, -2048.0
    header["vox_offset"] = NIFTI_DATA_OFFSET
    data = header.binaryblock + raw[NIFTI_HEADER_BYTES:NIFTI_DATA_OFFSET] + stored.astype("<u2").tobytes()
    return Made([str(_write(folder / "ct.nii.gz", data))])


def _truncate_gz(fraction: float) -> Callable[[Sources, Path], Made]:
    """The .nii.gz cut to `fraction` of its length, as an interrupted download leaves it."""

    def make(src: Sources, folder: Path) -> Made:
        data = src.ct.read_bytes()
        return Made([str(_raw_write(folder / "ct.nii.gz", data[: max(1, int(len(data) * fraction))]))])

    return make


def _raw_write(path: Path, data: bytes) -> Path:
    """Bytes to `path` exactly as given (no compression added, even for .gz names)."""
    path.write_bytes(data)
    return path


def _truncate_gz_tail(cut: int) -> Callable[[Sources, Path], Made]:
    """The last `cut` bytes of the .nii.gz missing: the gzip trailer (CRC, length) or a little more."""

    def make(src: Sources, folder: Path) -> Made:
        data = src.ct.read_bytes()
        return Made([str(_raw_write(folder / "ct.nii.gz", data[:-cut]))])

    return make


def _truncate_nii(keep: Callable[[int], int]) -> Callable[[Sources, Path], Made]:
    """Uncompressed .nii cut to keep(total size) bytes."""

    def make(src: Sources, folder: Path) -> Made:
        raw = src.ct_bytes()
        return Made([str(_raw_write(folder / "ct.nii", raw[: keep(len(raw))]))])

    return make


def _zero_tail(fraction: float) -> Callable[[Sources, Path], Made]:
    """The last part of the voxel data replaced by zeros, file length intact: what a reader that zero-fills
    a cut file produces, or a copy tool that pre-allocated the file and died."""

    def make(src: Sources, folder: Path) -> Made:
        raw = bytearray(src.ct_bytes())
        itemsize = _nifti_header(bytes(raw)).get_data_dtype().itemsize
        start = NIFTI_DATA_OFFSET + int((len(raw) - NIFTI_DATA_OFFSET) * (1 - fraction))
        start -= (start - NIFTI_DATA_OFFSET) % itemsize  # whole voxels
        raw[start:] = bytes(len(raw) - start)
        return Made([str(_write(folder / "ct.nii.gz", bytes(raw)))])

    return make


def _header_byte(offset: int, value: int) -> Callable[[Sources, Path], Made]:
    """One byte of the 348-byte NIfTI header replaced. Judged as SAME: many bytes are unused text, and a
    byte that matters must be refused or flagged, or leave the answer intact."""

    def make(src: Sources, folder: Path) -> Made:
        raw = bytearray(src.ct_bytes())
        old = raw[offset]
        raw[offset] = value
        field_name = _nifti_field_at(offset)
        return Made(
            [str(_write(folder / "ct.nii.gz", bytes(raw)))],
            note=f"byte {offset} ({field_name}) {old:#04x} -> {value:#04x}",
        )

    return make


def _nifti_field_at(offset: int) -> str:
    import nibabel as nib

    dtype = nib.Nifti1Header.template_dtype
    for name in dtype.names:
        start = dtype.fields[name][1]
        if start <= offset < start + dtype.fields[name][0].itemsize:
            return name
    return "?"


def _gzip_header_length(data: bytes) -> int:
    """Bytes before the deflate stream: 10 fixed, plus the optional extra field, name and comment."""
    flags, pos = data[3], 10
    if flags & 4:
        pos += 2 + int.from_bytes(data[pos : pos + 2], "little")
    for bit in (8, 16):
        if flags & bit:
            pos = data.index(b"\0", pos) + 1
    return pos + (2 if flags & 2 else 0)


def _stream_byte(position: float, value_seed: int) -> Callable[[Sources, Path], Made]:
    """One byte inside the compressed stream (or its CRC/length trailer) changed."""

    def make(src: Sources, folder: Path) -> Made:
        data = bytearray(src.ct.read_bytes())
        start = _gzip_header_length(bytes(data))
        offset = start + int((len(data) - start) * position)
        offset = min(offset, len(data) - 1)
        old = data[offset]
        data[offset] = (old + 1 + value_seed % 255) % 256  # never the same value
        path = _raw_write(folder / "ct.nii.gz", bytes(data))
        note = f"byte {offset} of {len(data)} {old:#04x} -> {data[offset]:#04x}"
        # A changed bit that deflate never reads (padding of the last block) leaves the file intact; then
        # the right answer is the intact one, not a refusal.
        try:
            intact = gzip.decompress(bytes(data)) == src.ct_bytes()
        except (OSError, EOFError, ValueError):
            intact = False
        return Made(
            [str(path)],
            expected=SAME if intact else None,
            note=note + (" (still decompresses to the intact file)" if intact else ""),
        )

    return make


def _reencode(level: int) -> Callable[[Sources, Path], Made]:
    def make(src: Sources, folder: Path) -> Made:
        return Made([str(_write(folder / "ct.nii.gz", src.ct_bytes(), level=level))])

    return make


def _uncompressed(src: Sources, folder: Path) -> Made:
    return Made([str(_raw_write(folder / "ct.nii", src.ct_bytes()))])


# -- NRRD helpers --------------------------------------------------------------------------------------


def _nrrd(
    edit: Callable[[str], str] | None = None,
    *,
    compress: bool = False,
    cut: float | None = None,
    detached: bool = False,
) -> Callable[[Sources, Path], Made]:
    """The CT written as NRRD by SimpleITK (geometry only, no NIfTI metadata), then its text header edited
    with edit(header) and/or its data cut to `cut` of its length."""

    def make(src: Sources, folder: Path) -> Made:
        import SimpleITK as sitk

        image = sitk.ReadImage(str(src.ct))
        clean = sitk.GetImageFromArray(sitk.GetArrayFromImage(image))
        clean.CopyInformation(image)
        path = folder / ("ct.nhdr" if detached else "ct.nrrd")
        sitk.WriteImage(clean, str(path), useCompression=compress)
        if detached:
            header_text, data_path = path.read_text(), folder / "ct.raw"
            if not data_path.exists():  # SimpleITK names the data file after the header
                data_path = next(folder.glob("ct.raw*"))
            if edit:
                path.write_text(edit(header_text))
            if cut is not None:
                data = data_path.read_bytes()
                data_path.write_bytes(data[: int(len(data) * cut)])
            return Made([str(path)])
        data = path.read_bytes()
        split = data.index(b"\n\n") + 2
        header_text, payload = data[:split].decode("latin-1"), data[split:]
        if edit:
            header_text = edit(header_text)
        if cut is not None:
            payload = payload[: int(len(payload) * cut)]
        path.write_bytes(header_text.encode("latin-1") + payload)
        return Made([str(path)])

    return make


def _nrrd_field(key: str, change: Callable[[str], str]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        pattern = re.compile(rf"^{re.escape(key)}: (.*)$", re.M)
        if not pattern.search(text):
            raise RuntimeError(f"NRRD header written by SimpleITK has no '{key}' field")
        return pattern.sub(lambda m: f"{key}: {change(m.group(1))}", text, count=1)

    return edit


def _scale_vectors(factors) -> Callable[[str], str]:
    def change(value: str) -> str:
        vectors = re.findall(r"\(([^)]*)\)", value)
        scaled = []
        for vector, factor in zip(vectors, factors):
            scaled.append("(" + ",".join(f"{float(v) * factor:.17g}" for v in vector.split(",")) + ")")
        return " ".join(scaled)

    return change


def _nrrd_sizes(axis: int, delta: int) -> Callable[[str], str]:
    def change(value: str) -> str:
        sizes = [int(v) for v in value.split()]
        sizes[axis] += delta
        return " ".join(map(str, sizes))

    return change


def _nrrd_origin_shift(offset) -> Callable[[str], str]:
    def change(value: str) -> str:
        numbers = [float(v) for v in value.strip("()").split(",")]
        return "(" + ",".join(f"{n + o:.17g}" for n, o in zip(numbers, offset)) + ")"

    return change


# -- DICOM helpers -------------------------------------------------------------------------------------


def _dicom_copy(src: Sources, folder: Path) -> tuple[Path, list[Path]]:
    series = folder / "series"
    series.mkdir()
    files = []
    for path in sorted(src.dicom.iterdir()):
        if path.is_file():
            shutil.copyfile(path, series / path.name)
            files.append(series / path.name)
    return series, files


def _set_dicom_z(path: Path, delta_mm: float) -> str:
    """Move a slice along z by editing its ImagePositionPatient (0020,0032) string in place (same length,
    so no other offset in the file changes). Handles implicit and explicit little-endian VR."""
    data = bytearray(path.read_bytes())
    tag = bytes.fromhex("20003200")
    at = data.find(tag, 132)
    if at < 0:
        raise RuntimeError(f"{path.name} has no ImagePositionPatient")
    if data[at + 4 : at + 6] == b"DS":
        length, value_at = int.from_bytes(data[at + 6 : at + 8], "little"), at + 8
    else:
        length, value_at = int.from_bytes(data[at + 4 : at + 8], "little"), at + 8
    old = data[value_at : value_at + length].decode("ascii")
    parts = old.strip().split("\\")
    parts[2] = f"{float(parts[2]) + delta_mm:.6f}"
    new = "\\".join(parts)
    if len(new) > length:
        raise RuntimeError(f"new position '{new}' does not fit in {length} bytes")
    data[value_at : value_at + length] = new.ljust(length).encode("ascii")
    path.write_bytes(bytes(data))
    return f"{path.name}: z {parts[2]} (was {old.strip().split(chr(92))[2]})"


def _dicom(action: str, fraction: float = 0.5) -> Callable[[Sources, Path], Made]:
    def make(src: Sources, folder: Path) -> Made:
        series, files = _dicom_copy(src, folder)
        middle, last = files[len(files) // 2], files[-1]
        note = ""
        if action == "delete-middle":
            middle.unlink()
        elif action == "duplicate":
            shutil.copyfile(middle, series / f"{middle.stem}_copy{middle.suffix}")
        elif action == "truncate":
            data = middle.read_bytes()
            middle.write_bytes(data[: int(len(data) * fraction)])
            note = f"{middle.name} cut to {int(len(data) * fraction)} of {len(data)} bytes"
        elif action == "shift-middle":
            note = _set_dicom_z(middle, 0.4)
        elif action == "gap-last":
            note = _set_dicom_z(last, -1.0 if _slice_z(files[-1]) < _slice_z(files[0]) else 1.0)
        elif action == "extra-text-file":
            (series / "notes.txt").write_text("exported by PACS\n")
        elif action == "renamed":
            for i, path in enumerate(reversed(files)):
                path.rename(series / f"IMG{i:04d}")
        else:
            raise ValueError(action)
        return Made([str(series)], note=note)

    return make


def _slice_z(path: Path) -> float:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return float(reader.GetMetaData("0020|0032").split("\\")[2])


# -- evaluate helpers ----------------------------------------------------------------------------------


def _evaluate(
    reference: Callable[[Sources, Path], Path],
    convention: str = "totalseg",
    prediction: Callable[[Sources, Path], Path] | None = None,
) -> Callable[[Sources, Path], Made]:
    def make(src: Sources, folder: Path) -> Made:
        pred = prediction(src, folder) if prediction else src.prediction
        ref = reference(src, folder)
        return Made([str(pred), str(ref), "--reference-labels", convention])

    return make


def _ts_labels(src: Sources, folder: Path) -> Path:
    return src.ts_labels


def _ts_truncated(fraction: float, compressed: bool = True) -> Callable[[Sources, Path], Path]:
    def make(src: Sources, folder: Path) -> Path:
        data = src.ts_labels.read_bytes()
        if not compressed:
            data = gzip.decompress(data)
        return _raw_write(folder / ("ref.nii.gz" if compressed else "ref.nii"), data[: int(len(data) * fraction)])

    return make


def _ts_recompressed(src: Sources, folder: Path) -> Path:
    return _write(folder / "ref.nii.gz", gzip.decompress(src.ts_labels.read_bytes()), level=9)


def _ts_half_values(src: Sources, folder: Path) -> Path:
    """Labels stored as float with +0.5: no longer a label map."""
    import SimpleITK as sitk

    ref = sitk.Cast(sitk.ReadImage(str(src.ts_labels)), sitk.sitkFloat32) + 0.5
    path = folder / "ref.nii.gz"
    sitk.WriteImage(ref, str(path))
    return path


def _ct_path(src: Sources, folder: Path) -> Path:
    return src.ct


def _prediction_truncated(src: Sources, folder: Path) -> Path:
    data = src.prediction.read_bytes()
    return _raw_write(folder / "pred.nii.gz", data[: len(data) // 2])


# -- the table -----------------------------------------------------------------------------------------


def build_pool(rng: random.Random) -> list[Mutation]:
    """Every mutation with its parameters; random parameters come from `rng` so --seed reproduces a run."""
    import numpy as np

    pool: list[Mutation] = []

    def add(name, family, expected, make, **kw):
        pool.append(Mutation(name, family, expected, make, **kw))

    # A cut download or copy. gzip's CRC/length trailer makes every cut detectable.
    for fraction in sorted(rng.uniform(0.02, 0.999) for _ in range(8)):
        add(f"gz-cut-at-{fraction:.4f}", "gzip-truncation", REFUSE, _truncate_gz(fraction))
    for cut in (1, 4, 8, 64):
        add(f"gz-cut-last-{cut}-bytes", "gzip-truncation", REFUSE, _truncate_gz_tail(cut))

    # Uncompressed: only the header's declared size can tell. Includes cuts inside the header and cuts of
    # a few bytes (smaller than the 352-byte header, which a size check that forgets the offset misses).
    for fraction in sorted(rng.uniform(0.05, 0.999) for _ in range(4)):
        add(f"nii-cut-at-{fraction:.4f}", "nii-truncation", REFUSE, _truncate_nii(lambda n, f=fraction: int(n * f)))
    for cut in (4, 100, 352, 4 * 122):
        add(f"nii-cut-last-{cut}-bytes", "nii-truncation", REFUSE, _truncate_nii(lambda n, c=cut: n - c))
    add("nii-cut-inside-header-200", "nii-truncation", REFUSE, _truncate_nii(lambda n: 200))
    add("nii-cut-after-header-352", "nii-truncation", REFUSE, _truncate_nii(lambda n: NIFTI_DATA_OFFSET))

    # Zeroed voxels in the declared region: a zero-filled cut (what ITK's reader makes of a cut .nii).
    for fraction in (0.1, 0.4):
        add(f"zero-last-{int(fraction * 100)}pct-of-voxels", "zero-fill", FLAG_OR_REFUSE, _zero_tail(fraction))

    # Header fields, one at a time, voxels untouched.
    H = "nifti-header"
    for axis in (1, 2, 3):
        # pixdim alone damaged: the sform (code 2 in this file) still holds the right geometry, so a reader
        # that uses it gives the intact answer; one that uses pixdim must refuse an absurd value.
        for value in (0.0, -3.0, 1e-3, 100.0):
            add(f"pixdim{axis}={value:g}", H, SAME, _header_edit(_set(**{f"pixdim{axis}": value})))
        # The whole geometry rewritten consistently to an absurd or wrong spacing.
        for factor in (0.0, 1e-3, 0.1, 10.0):
            add(
                f"spacing-axis{axis}x{factor:g}",
                H,
                REFUSE if factor in (0.0, 1e-3) else FLAG_OR_REFUSE,
                _header_edit(_affine_edit(_scale_axis(axis - 1, factor))),
            )
        add(f"direction-mirrored-axis{axis}", H, FLAG_OR_REFUSE, _header_edit(_affine_edit(_mirror_axis(axis - 1))))
    add("spacing-allx0.1", H, FLAG_OR_REFUSE, _header_edit(_affine_edit(lambda a: np.diag([0.1, 0.1, 0.1, 1.0]) @ a)))
    add("dim3+1 (one slice more than stored)", H, REFUSE, _header_edit(_dim_delta(3, +1)))
    # One slice fewer declared than stored: the slices read are exactly right, only the last is lost.
    add("dim3-1 (one slice less than stored)", H, SAME, _header_edit(_dim_delta(3, -1)), compare="physical")
    add("dim1-1 (rows scrambled)", H, FLAG_OR_REFUSE, _header_edit(_dim_delta(1, -1)))
    add("dim1<->dim2 swapped", H, FLAG_OR_REFUSE, _header_edit(_swap_dims))
    add("dim0=4,dim4=2 (4D, half stored)", H, REFUSE, _header_edit(_set(dim0=4, dim4=2)))
    add("dim0=2 (2D)", H, REFUSE, _header_edit(_set(dim0=2)))
    add("datatype int32->int16", H, FLAG_OR_REFUSE, _header_edit(_set(datatype=4, bitpix=16)))
    add("datatype int32->float32", H, FLAG_OR_REFUSE, _header_edit(_set(datatype=16, bitpix=32)))
    add("datatype int32->float64", H, REFUSE, _header_edit(_set(datatype=64, bitpix=64)))
    add("datatype int32->uint8", H, FLAG_OR_REFUSE, _header_edit(_set(datatype=2, bitpix=8)))
    add("datatype=9999", H, REFUSE, _header_edit(_set(datatype=9999)))
    # Without qform and sform the orientation is unknown (NIfTI "method 1"); ITK then assumes LPS, but this
    # file is RAS: the reader's guess mirrors x and y.
    add("qform_code=0,sform_code=0", H, FLAG_OR_REFUSE, _header_edit(_set(sform_code=0, qform_code=0)))
    add("scl_slope=0 (means: no scaling)", H, SAME, _header_edit(_set(scl_slope=0.0, scl_inter=0.0)))
    add("scl_slope=nan", H, SAME, _header_edit(_set(scl_slope=float("nan"))))
    add("scl_slope=inf (nifti_io: no scaling)", H, SAME, _header_edit(_set(scl_slope=float("inf"), scl_inter=0.0)))
    add(
        "scl_inter=-1000 (all voxels 1000 HU darker)",
        H,
        FLAG_OR_REFUSE,
        _header_edit(_set(scl_slope=1.0, scl_inter=-1000.0)),
    )
    add("scl_slope=100", H, FLAG_OR_REFUSE, _header_edit(_set(scl_slope=100.0, scl_inter=0.0)))
    add("vox_offset=356 (4 bytes beyond the data)", H, REFUSE, _header_edit(_set(vox_offset=356)))
    add("vox_offset=one slice in", H, REFUSE, _header_edit(_one_slice_offset))
    add("vox_offset=348 (inside the header)", H, REFUSE, _header_edit(_set(vox_offset=348)))
    add("vox_offset=1e9", H, REFUSE, _header_edit(_set(vox_offset=1e9)))
    add("srow_x=nan", H, REFUSE, _header_edit(_set(srow_x0=float("nan"))))
    add(
        "srow all zero",
        H,
        REFUSE,
        _header_edit(lambda h: [h.__setitem__(k, [0, 0, 0, 0]) for k in ("srow_x", "srow_y", "srow_z")]),
    )
    add("srow sheared", H, FLAG_OR_REFUSE, _header_edit(_set(srow_x1=1.5)))
    add(
        "quatern garbage, qform_code=0 (unused)",
        H,
        SAME,
        _header_edit(_set(quatern_b=5.0, quatern_c=-2.0, quatern_d=0.3)),
    )
    # Two contradicting orientations: the sform (code 2) is the file's geometry, the qform garbage.
    add(
        "quatern garbage, qform_code=1",
        H,
        SAME,
        _header_edit(_set(qform_code=1, quatern_b=0.9, quatern_c=-0.3, quatern_d=0.2)),
    )
    # Damaged identification fields: refusing is right, and so is reading the (intact) rest correctly.
    add("sizeof_hdr=0", H, SAME, _header_edit(_set(sizeof_hdr=0)))
    add("magic n+1 -> ni1", H, SAME, _header_edit(_set(magic=b"ni1")))

    # Changes that keep the image: the labels must not change.
    B = "nifti-benign"
    add("descrip edited", B, SAME, _header_edit(_set(descrip=b"fuzz: description only")))
    add("db_name/aux_file edited", B, SAME, _header_edit(_set(db_name=b"fuzz", aux_file=b"fuzz.txt")))
    add("gzip level 9", B, SAME, _reencode(9))
    add("gzip level 1", B, SAME, _reencode(1))
    add("uncompressed .nii", B, SAME, _uncompressed)
    add("cast to float32", B, SAME, _nibabel_rewrite(_cast("float32")))
    add("cast to int16", B, SAME, _nibabel_rewrite(_cast("int16")))
    add("uint16 + scl_inter -2048", B, SAME, _offset_storage)
    for axis in (0, 1, 2):
        add(
            f"voxels flipped axis{axis + 1} + affine to match",
            B,
            SAME,
            _nibabel_rewrite(_flip_voxels(axis)),
            compare="physical",
        )
    add(
        "origin moved (+500,-300,+1000) mm", B, SAME, _header_edit(_affine_edit(_shift_origin([500.0, -300.0, 1000.0])))
    )
    add("qform_code=1 equal to sform", B, SAME, _header_edit(lambda h: h.set_qform(h.get_sform(), code=1)))
    add("vox_offset=352 explicit", B, SAME, _header_edit(_set(vox_offset=352)))

    # Random bytes of the 348-byte header.
    for _ in range(12):
        offset = rng.randrange(NIFTI_HEADER_BYTES)
        value = rng.randrange(256)
        add(f"header-byte-{offset}={value:#04x}", "header-byteflip", SAME, _header_byte(offset, value))

    # Random bytes in the compressed stream.
    for _ in range(8):
        position = rng.random()
        add(f"stream-byte-at-{position:.4f}", "stream-byteflip", REFUSE, _stream_byte(position, rng.randrange(1 << 16)))

    # NRRD: a real conversion, then header edits.
    N = "nrrd"
    add("nrrd raw", N, SAME, _nrrd())
    add("nrrd gzip", N, SAME, _nrrd(compress=True))
    add("nhdr + raw (detached)", N, SAME, _nrrd(detached=True))
    add("nrrd origin moved", N, SAME, _nrrd(_nrrd_field("space origin", _nrrd_origin_shift([100.0, 50.0, -700.0]))))
    for fraction in sorted(rng.uniform(0.05, 0.999) for _ in range(2)):
        add(f"nrrd raw cut at {fraction:.4f}", N, REFUSE, _nrrd(cut=fraction))
        add(f"nrrd gzip cut at {fraction:.4f}", N, REFUSE, _nrrd(compress=True, cut=fraction))
    add("nhdr detached .raw cut at 0.9", N, REFUSE, _nrrd(detached=True, cut=0.9))
    add("nrrd spacing x10", N, FLAG_OR_REFUSE, _nrrd(_nrrd_field("space directions", _scale_vectors([10, 10, 10]))))
    add("nrrd spacing z x10", N, FLAG_OR_REFUSE, _nrrd(_nrrd_field("space directions", _scale_vectors([1, 1, 10]))))
    add("nrrd spacing 0", N, REFUSE, _nrrd(_nrrd_field("space directions", _scale_vectors([0, 1, 1]))))
    add("nrrd spacing 1e-3", N, REFUSE, _nrrd(_nrrd_field("space directions", _scale_vectors([1e-3, 1e-3, 1e-3]))))
    add(
        "nrrd direction mirrored x",
        N,
        FLAG_OR_REFUSE,
        _nrrd(_nrrd_field("space directions", _scale_vectors([-1, 1, 1]))),
    )
    add(
        "nrrd space LPS->RAS (mirrors x,y)",
        N,
        FLAG_OR_REFUSE,
        _nrrd(_nrrd_field("space", lambda v: "right-anterior-superior")),
    )
    add("nrrd sizes z+1", N, REFUSE, _nrrd(_nrrd_field("sizes", _nrrd_sizes(2, +1))))
    add("nrrd sizes x-1", N, FLAG_OR_REFUSE, _nrrd(_nrrd_field("sizes", _nrrd_sizes(0, -1))))
    add("nrrd type int->short", N, FLAG_OR_REFUSE, _nrrd(_nrrd_field("type", lambda v: "short")))
    add("nrrd endian little->big", N, FLAG_OR_REFUSE, _nrrd(_nrrd_field("endian", lambda v: "big")))
    # The data are not compressed although the header says so: refusing is right, and so is a reader that
    # notices and reads them correctly (ITK's does).
    add("nrrd encoding raw->gzip (not compressed)", N, SAME, _nrrd(_nrrd_field("encoding", lambda v: "gzip")))

    # DICOM: a 3-slice series; GDCM silently drops or repeats slices, so these must be refused. Deleting an
    # END slice is not among them: the rest is a complete, correctly placed series, and nothing can tell.
    D = "dicom"
    add("dicom middle slice deleted", D, REFUSE, _dicom("delete-middle"), needs="dicom")
    add("dicom slice duplicated", D, REFUSE, _dicom("duplicate"), needs="dicom")
    for fraction in (0.002, rng.uniform(0.05, 0.95)):
        add(f"dicom slice truncated at {fraction:.4f}", D, REFUSE, _dicom("truncate", fraction), needs="dicom")
    add("dicom middle slice moved 0.4 mm", D, REFUSE, _dicom("shift-middle"), needs="dicom")
    add("dicom last slice moved 1 mm (gap)", D, REFUSE, _dicom("gap-last"), needs="dicom")
    add("dicom + notes.txt in the folder", D, SAME, _dicom("extra-text-file"), needs="dicom")
    add("dicom files renamed, reverse order", D, SAME, _dicom("renamed"), needs="dicom")

    # evaluate: the prediction is the intact CT's segmentation; the reference TotalSegmentator's labels.
    E = "evaluate"
    ev = dict(needs="ts_labels", command="evaluate", compare="table")
    add("eval control: reference re-compressed", E, SAME, _evaluate(_ts_recompressed), **ev)
    add("eval reference .nii.gz cut at 0.5", E, REFUSE, _evaluate(_ts_truncated(0.5)), **ev)
    add("eval reference .nii cut at 0.7", E, REFUSE, _evaluate(_ts_truncated(0.7, compressed=False)), **ev)
    add("eval CT given as reference", E, REFUSE, _evaluate(_ct_path), **ev)
    add("eval CT given as prediction", E, REFUSE, _evaluate(_ts_labels, prediction=_ct_path), **ev)
    add(
        "eval reference convention default (abdomenseg) for totalseg labels",
        E,
        REFUSE,
        _evaluate(_ts_labels, convention="abdomenseg"),
        **ev,
    )
    add("eval reference convention btcv for totalseg labels", E, REFUSE, _evaluate(_ts_labels, convention="btcv"), **ev)
    add("eval reference float labels +0.5", E, REFUSE, _evaluate(_ts_half_values), **ev)
    add("eval prediction .nii.gz cut at 0.5", E, REFUSE, _evaluate(_ts_labels, prediction=_prediction_truncated), **ev)
    return pool


def choose(
    pool: list[Mutation], cases: int, rng: random.Random, available: set[str], families: set[str] | None
) -> list[Mutation]:
    """A bounded random subset: two of every family first (so each is represented), the rest at random."""
    usable = [m for m in pool if m.needs in available and (not families or m.family in families)]
    by_family: dict[str, list[Mutation]] = {}
    for m in usable:
        by_family.setdefault(m.family, []).append(m)
    chosen: list[Mutation] = []
    for members in by_family.values():
        chosen += rng.sample(members, min(2, len(members)))
    rest = [m for m in usable if m not in chosen]
    chosen += rng.sample(rest, max(0, min(len(rest), cases - len(chosen))))
    order = {m.name: i for i, m in enumerate(pool)}
    return sorted(chosen[:cases] if cases < len(chosen) else chosen, key=lambda m: order[m.name])


# ---------------------------------------------------------------------------------------------------
# Running the command line in this process
# ---------------------------------------------------------------------------------------------------


@dataclass
class Run:
    code: int | None
    stderr: str  # Python-level stderr (messages, warnings, tqdm)
    native: str  # C/C++-level stderr of ITK/GDCM (file descriptor 2), kept apart
    stdout: str
    exception: str = ""  # type, message and last frame of an exception that escaped main
    seconds: float = 0.0


def call_cli(argv: list[str]) -> Run:
    """`main(argv)` with stdout/stderr captured, including what ITK writes straight to descriptor 2."""
    from AbdomenSegLib.cli import main

    out, err = io.StringIO(), io.StringIO()
    code, exception = None, ""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as native:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        except KeyboardInterrupt:
            raise
        except SystemExit as exc:  # argparse; our arguments are always valid, so this is a finding
            code, exception = (exc.code if isinstance(exc.code, int) else 2), f"SystemExit({exc.code})"
        except BaseException as exc:  # noqa: BLE001 - anything escaping main is what we are looking for
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            exception = (
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                f" (at {Path(frame.filename).name}:{frame.lineno} in {frame.name})"
            )
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        native.seek(0)
        native_text = native.read().decode("utf-8", "replace")
    return Run(code, err.getvalue(), native_text, out.getvalue(), exception, time.perf_counter() - start)


def _lines(text: str) -> list[str]:
    """Non-empty lines; carriage returns (tqdm redraws) split lines as a terminal would show them."""
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


# ---------------------------------------------------------------------------------------------------
# Judging an outcome
# ---------------------------------------------------------------------------------------------------


@dataclass
class Baseline:
    """The intact inputs' results: what a SAME mutation must reproduce."""

    ct_labels: object = None  # SimpleITK image
    ct_code: int | None = None
    dicom_labels: object = None
    dicom_code: int | None = None
    evaluate_table: str | None = None


def dice_by_organ(result, reference, physical: bool = False) -> tuple[dict[str, float], str]:
    """Dice per checked organ between a result label map and the intact one; ('', problem) if the grids
    cannot be compared. `physical`: resample the result onto the reference grid first (nearest)."""
    import numpy as np
    import SimpleITK as sitk

    from AbdomenSegLib.core.organs import BY_NAME

    if physical:
        result = sitk.Resample(result, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, result.GetPixelID())
    elif result.GetSize() != reference.GetSize():
        return {}, f"grid {result.GetSize()} differs from the intact {reference.GetSize()}"
    a, b = sitk.GetArrayViewFromImage(result), sitk.GetArrayViewFromImage(reference)
    dice = {}
    for name in CHECKED_ORGANS:
        label = BY_NAME[name].label
        p, r = a == label, b == label
        total = int(p.sum()) + int(r.sum())
        if r.any() or p.any():
            dice[name] = 2.0 * float(np.logical_and(p, r).sum()) / total
    return dice, ""


def _dice_text(dice: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in dice.items()) or "no checked organ in either"


@dataclass
class Result:
    mutation: Mutation
    expected: str
    outcome: str
    detail: str = ""
    note: str = ""  # acceptable but worth a look (a needless refusal, a flag where a refusal was due)
    seconds: float = 0.0


def classify(
    m: Mutation, made: Made, run: Run, out_dir: Path, output: Path | None, baseline: Baseline
) -> tuple[str, str, str]:
    """(outcome, detail, note) for one case; see the module docstring for the categories."""
    expected = made.expected or m.expected
    lines = _lines(run.stderr)
    left = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    if run.exception:
        return "crashed", f"exception escaped main: {run.exception}", ""
    if "Traceback (most recent call last)" in run.stderr + run.stdout:
        return "crashed", "a traceback was printed: " + (lines[-1] if lines else ""), ""
    if run.code not in (0, 2, 3):
        return "crashed", f"exit status {run.code}; last stderr line: {lines[-1] if lines else '(none)'}", ""

    if run.code == 2:
        last = lines[-1] if lines else ""
        problems = []
        if not (last.startswith("error: ") and ". " in last):
            problems.append(f"last stderr line is not 'error: <problem>. <fix>': {last!r}")
        if left:
            problems.append(f"left in the output folder: {', '.join(left)}")
        if problems:
            return "crashed", "unclean refusal: " + "; ".join(problems), ""
        note = f"refused an input that keeps the image: {last}" if expected == SAME else ""
        return "refused", last, note

    # Written (exit 0 or 3).
    wanted = {output.name} if output else set()
    if m.command == "evaluate":
        wanted = {"metrics.csv", "metrics_summary.csv"}
    missing, extra = wanted - set(left), set(left) - wanted
    if missing:
        return "crashed", f"exit {run.code} but {', '.join(sorted(missing))} was not written", ""
    leftover = f"; left in the output folder besides the output: {', '.join(sorted(extra))}" if extra else ""

    if run.code == 3:
        warnings = [line for line in lines if line.startswith("warning:")]
        if not warnings:
            return "crashed", "exit 3 without a 'warning:' line on stderr" + leftover, ""
        agrees = ""
        if expected == SAME and m.command == "segment":
            dice, problem = _compare_segment(m, output, baseline)
            agrees = problem or _dice_text(dice)
        if expected == REFUSE:
            note = f"expected a refusal, got a flag: {warnings[0]}"
        elif expected == SAME and _baseline_code(m, baseline) != 3:
            note = f"flagged an input that keeps the image ({agrees}): {warnings[0]}"
        else:
            note = ""
        return "flagged", warnings[0] + leftover, note + leftover

    # Exit 0: right only for a SAME mutation whose answer agrees with the intact one.
    if m.command == "evaluate":
        if expected != SAME:
            return "WRONG", "exit 0 on a corrupt or mismatched evaluate input" + leftover, ""
        if run.stdout.strip() != (baseline.evaluate_table or "").strip():
            return "WRONG", "metrics table differs from the intact reference's" + leftover, ""
        return "correct", "same metrics table" + leftover, leftover
    dice, problem = _compare_segment(m, output, baseline)
    summary = problem or f"Dice vs intact: {_dice_text(dice)}"
    if expected != SAME:
        return "WRONG", f"exit 0 on a corrupt input, no warning ({summary})" + leftover, ""
    if problem:
        return "WRONG", problem + leftover, ""
    low = {k: v for k, v in dice.items() if v < DICE_MIN}
    if low:
        return "WRONG", f"labels changed: {summary}" + leftover, ""
    if _baseline_code(m, baseline) == 3:
        return "correct", f"{summary} (the intact input was flagged, this one not)" + leftover, leftover
    return "correct", summary + leftover, leftover


def _baseline_code(m: Mutation, baseline: Baseline) -> int | None:
    return baseline.dicom_code if m.needs == "dicom" else baseline.ct_code


def _compare_segment(m: Mutation, output: Path, baseline: Baseline) -> tuple[dict, str]:
    import SimpleITK as sitk

    reference = baseline.dicom_labels if m.needs == "dicom" else baseline.ct_labels
    if reference is None:
        return {}, "the intact input gave no result to compare with"
    try:
        result = sitk.ReadImage(str(output))
    except RuntimeError as exc:
        return {}, f"output cannot be read back: {str(exc).strip().splitlines()[-1][:200]}"
    return dice_by_organ(result, reference, physical=m.compare == "physical")


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def _segment_argv(inputs: list[str], output: Path, model: str | None) -> list[str]:
    return ["segment", *inputs, str(output)] + (["--model", model] if model else [])


def run_baseline(src: Sources, work: Path, model: str | None, log) -> Baseline:
    import SimpleITK as sitk

    base = Baseline()
    if src.ct:
        path = work / "intact" / "ct_labels.nii.gz"
        run = call_cli(_segment_argv([str(src.ct)], path, model))
        if run.code not in (0, 3) or not path.exists():
            raise SystemExit(
                f"the intact CT could not be segmented (exit {run.code}): "
                f"{(_lines(run.stderr) or [run.exception])[-1]}"
            )
        base.ct_labels, base.ct_code = sitk.ReadImage(str(path)), run.code
        src.prediction = path
        log(
            f"intact CT segmented in {run.seconds:.1f} s (exit {run.code})"
            + (f": {[line for line in _lines(run.stderr) if line.startswith('warning:')][:1]}" if run.code == 3 else "")
        )
    if src.dicom:
        path = work / "intact" / "dicom_labels.nii.gz"
        run = call_cli(_segment_argv([str(src.dicom)], path, model))
        if run.code in (0, 3) and path.exists():
            base.dicom_labels, base.dicom_code = sitk.ReadImage(str(path)), run.code
            log(f"intact DICOM series segmented in {run.seconds:.1f} s (exit {run.code})")
        else:
            log(
                f"the intact DICOM series is not segmented (exit {run.code}: "
                f"{(_lines(run.stderr) or [run.exception])[-1]}); DICOM cases that expect the intact answer "
                "will count any exit 0 as WRONG"
            )
    if src.ts_labels and src.prediction:
        csv = work / "intact" / "eval" / "metrics.csv"
        run = call_cli(
            ["evaluate", str(src.prediction), str(src.ts_labels), "--reference-labels", "totalseg", "--csv", str(csv)]
        )
        if run.code == 0:
            base.evaluate_table = run.stdout
        else:
            log(f"evaluating the intact result failed (exit {run.code}); evaluate controls will be WRONG")
    return base


def run_case(index: int, m: Mutation, src: Sources, work: Path, model: str | None, baseline: Baseline) -> Result:
    folder = work / f"{index:03d}"
    inputs, out_dir = folder / "in", folder / "out"
    inputs.mkdir(parents=True)
    out_dir.mkdir()
    try:
        made = m.make(src, inputs)
    except Exception as exc:  # the driver's own failure, not the engine's: say so, do not count as crash
        return Result(m, m.expected, "crashed", f"DRIVER could not make the mutation: {type(exc).__name__}: {exc}")
    output = out_dir / "labels.nii.gz" if m.command == "segment" else None
    if m.command == "segment":
        argv = _segment_argv(made.args, output, model)
    else:
        argv = ["evaluate", *made.args, "--csv", str(out_dir / "metrics.csv")]
    run = call_cli(argv)
    outcome, detail, note = classify(m, made, run, out_dir, output, baseline)
    hint = _native_hint(run.native)
    if hint and outcome in ("WRONG", "crashed"):  # what ITK/GDCM muttered is often the diagnosis
        detail += f" [ITK: {hint}]"
    if made.note:
        detail = f"[{made.note}] {detail}"
    return Result(m, made.expected or m.expected, outcome, detail, note, run.seconds)


def _native_hint(text: str) -> str:
    """The first informative line ITK/GDCM wrote to descriptor 2 (their warnings go there, not to Python)."""
    for line in _lines(text):
        if line.startswith("WARNING: In ") or line.startswith("/tmp/SimpleITK-build"):
            continue  # the source location line of an ITK warning; the message follows
        return re.sub(r"\(0x[0-9a-f]+\)", "", line)[:160]
    return ""


def print_report(results: list[Result], seconds: float, out=print) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        row = counts.setdefault(r.mutation.family, {k: 0 for k in ("tried", *OUTCOMES)})
        row["tried"] += 1
        row[r.outcome] += 1
    total = {k: sum(row[k] for row in counts.values()) for k in ("tried", *OUTCOMES)}
    out("")
    out(f"{'family':20s}{'tried':>6s}{'refused':>8s}{'flagged':>8s}{'correct':>8s}{'WRONG':>6s}{'crashed':>8s}")
    for family, row in list(counts.items()) + [("total", total)]:
        out(
            f"{family:20s}{row['tried']:6d}{row['refused']:8d}{row['flagged']:8d}{row['correct']:8d}"
            f"{row['WRONG']:6d}{row['crashed']:8d}"
        )
    bad = [r for r in results if r.outcome in ("WRONG", "crashed")]
    if bad:
        out("")
        for r in bad:
            out(f"{r.outcome:7s} {r.mutation.family}/{r.mutation.name} (expected {r.expected}): {r.detail}")
    notes = [r for r in results if r.note and r.outcome not in ("WRONG", "crashed")]
    if notes:
        out("")
        out("notes (acceptable, but worth a look):")
        for r in notes:
            out(f"  {r.outcome:7s} {r.mutation.family}/{r.mutation.name} (expected {r.expected}): {r.note}")
    out("")
    out(f"wall time {seconds:.0f} s for {len(results)} cases")
    counts["total"] = total
    return counts


def run(argv: list[str] | None = None) -> dict:
    """The whole fuzz run; returns {'counts': per family, 'results': [...]} (also used by the test)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=60, help="how many mutations to try (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the mutations and their random parameters")
    parser.add_argument("--model", help="installed model name or package folder (default: the catalog's default)")
    parser.add_argument("--out", help="keep mutated inputs, outputs and results.json here (default: temp, removed)")
    parser.add_argument("--families", help="comma-separated families to draw from (default: all)")
    parser.add_argument("--list", action="store_true", help="list every mutation with its expectation and exit")
    parser.add_argument("--ct", default=str(DEFAULT_CT), help="intact CT (NIfTI); '' to skip CT families")
    parser.add_argument("--dicom", default=str(DEFAULT_DICOM), help="intact DICOM series folder; '' to skip")
    parser.add_argument(
        "--ts-labels",
        default=str(DEFAULT_TS_LABELS),
        help="TotalSegmentator label map of the CT (for evaluate); '' to skip",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch/ITK threads (default 1: shared machine)")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    pool = build_pool(rng)
    if args.list:
        for m in pool:
            print(f"{m.family:18s} {m.expected:15s} {m.name}")
        return {"counts": {}, "results": []}

    def present(value: str, what: str) -> Path | None:
        if not value:
            return None
        path = Path(value)
        if not path.exists():
            print(f"skipping {what}: {path} is absent (real data are not part of the repository)")
            return None
        return path

    src = Sources(
        ct=present(args.ct, "CT families"),
        dicom=present(args.dicom, "DICOM family"),
        ts_labels=present(args.ts_labels, "evaluate family"),
    )
    if src.ct is None:
        src.ts_labels = None  # evaluate needs the CT's segmentation as its prediction
    available = {name for name, path in (("ct", src.ct), ("dicom", src.dicom), ("ts_labels", src.ts_labels)) if path}
    families = set(f.strip() for f in args.families.split(",")) if args.families else None
    chosen = choose(pool, args.cases, rng, available, families)
    if not chosen:
        print("no mutation can run: no inputs present (or no family matches --families)")
        return {"counts": {}, "results": []}

    import SimpleITK as sitk
    import torch

    keep = Path(args.out) if args.out else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        if any(keep.iterdir()):
            print(f"--out {keep} is not empty: give an empty or new folder")
            return {"counts": {}, "results": []}
    # Few threads: the machine is shared. Restored afterwards, for callers in the same process (the test).
    threads = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    try:
        return _run_cases(chosen, len(pool), src, keep, args)
    finally:
        torch.set_num_threads(threads[0])
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads[1])


def _run_cases(chosen: list[Mutation], pool_size: int, src: Sources, keep: Path | None, args) -> dict:
    start = time.perf_counter()
    holder = contextlib.nullcontext(str(keep)) if keep else tempfile.TemporaryDirectory(prefix="abdomenseg-fuzz-")
    results: list[Result] = []
    with holder as work_dir:
        work = Path(work_dir)
        print(
            f"seed {args.seed}: {len(chosen)} cases from {pool_size} mutations; work folder {work}"
            + ("" if keep else " (removed at the end)"),
            flush=True,
        )
        baseline = run_baseline(src, work, args.model, lambda msg: print(msg, flush=True))
        for index, m in enumerate(chosen, start=1):
            result = run_case(index, m, src, work, args.model, baseline)
            results.append(result)
            print(
                f"[{index:3d}/{len(chosen)}] {result.outcome:7s} {m.family}/{m.name} ({result.seconds:.1f} s)",
                flush=True,
            )
            if not keep:  # mutated copies are up to 6 MB each; do not let them pile up
                shutil.rmtree(work / f"{index:03d}", ignore_errors=True)
        counts = print_report(results, time.perf_counter() - start)
        if keep:
            (keep / "results.json").write_text(
                json.dumps(
                    [
                        {
                            "family": r.mutation.family,
                            "mutation": r.mutation.name,
                            "expected": r.expected,
                            "outcome": r.outcome,
                            "detail": r.detail,
                            "note": r.note,
                            "seconds": round(r.seconds, 2),
                        }
                        for r in results
                    ],
                    indent=2,
                )
                + "\n"
            )
    return {"counts": counts, "results": results}


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0  # a report, not a test


if __name__ == "__main__":
    sys.exit(main())
