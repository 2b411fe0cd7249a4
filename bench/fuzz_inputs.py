"""Fuzz the command line with damaged real inputs and faults: is any result silently wrong? ("Never silently wrong")

    .venv/bin/python bench/fuzz_inputs.py [--all | --cases 60] [--seed 0] [--model NAME|DIR] [--out DIR]
                                          [--families a,b] [--match REGEX] [--list]

Takes the real CT (TotalSegmentator's example, NIfTI), the real 3-slice DICOM series and the
TotalSegmentator label map from ../shared/data, damages their headers and bytes in ways that happen in
practice (cut downloads, edited or corrupt header fields, a slice missing from a series, the wrong label
convention), builds the hostile inputs and faults of the second audit (issue 31), runs `segment` /
`evaluate` / `models` / the engine worker on each, and sorts the outcome of each case.

The pool is organised as the audit's families, one section each (`--list` shows them with their cases,
`--families` selects sections by key or finer sub-labels):

  formats       formats and encodings: gzip/.nii truncation, header fields and bytes, NRRD, re-encodings,
                uncompressed data named .nii.gz, NIfTI-2, complex64, a FIFO as input
  dicom         DICOM variants: missing/duplicated/moved slices, enhanced multi-frame objects built with
                highdicom (intact, a frame missing, shuffled, two files), one slice's PixelSpacing,
                orientation or Rows changed
  intensities   scaling fields, negated HU, a MONOCHROME1 series, CT given to the MR model
  geometry      2- and 5-slice slabs, a 45-degree oblique resample, a half-liver crop
  evaluate      damaged or mismatched references, a reference covering the upper quarter only, a NaN voxel,
                background -1
  models        card.json with roi 512^3, channels 4096x5, nested 100,000 deep; a nested catalog.json; a
                card title with terminal escapes (`models`)
  dask          --scheduler-file not JSON, --scheduler at a web server on 127.0.0.1, --workers 12
  worker        malformed requests to `python -m AbdomenSegLib.worker` (list, null, string, number, not JSON,
                bad argv, a log in a missing folder or that is a folder)
  concurrency   two folder runs into one folder, SIGTERM in the middle of a folder run
  disk          output names of 250 and 260 bytes, a dangling-symlink output, a file named qc, a read-only
                output folder, no space left at the lock, the label map (ITK raising or writing one page),
                the result check's JSON and picture, the manifest

Outcomes:

  clean    exit 0 and the answer is right: for a mutation that keeps the image ("same"), the labels agree
           with the intact input's (Dice >= 0.9 for liver, spleen and both kidneys); for a "right-answer"
           case, the stated right result (evaluate: the Dice of the matching crop; folder runs: every case
           done once and the manifest right; `models`: no control character printed raw)
  flagged  exit 3 (written, with a `warning:` line from the result check)
  refused  exit 2, the last stderr line is `error: <problem>. <fix>`, no file left in the output folder
  WRONG    exit 0 but the answer is not right: a corrupt input ("refuse", "flag-or-refuse") was
           segmented without a word, or a harmless change ("same") changed the labels, or a right-answer
           case gave another answer
  crashed  an exception escaped `main`, a traceback was printed, a hang (subprocess cases are killed after
           a bounded time), an exit status outside {0, 2, 3}, or a refusal that was not clean (malformed
           error line, output, lock or partial file left behind)

Each case says what a correct tool must do with it:
  refuse          the file is incomplete or unreadable as declared, or the fault stops the work: exit 2;
  flag-or-refuse  the file reads, but its header lies (mirrored direction, absurd spacing, wrong data
                  type) or it is too thin to judge: exit 2 or 3 are right, a clean exit 0 is silently wrong;
  same            the image is unchanged (re-encoded, re-ordered voxels with a matching direction, moved
                  origin, unused header field edited, an oblique or cropped acquisition judged physically or
                  within the crop) or a careful reader can still recover it: the labels must agree with the
                  intact result. Refusing it is not wrong but is listed as a note (a needless refusal);
  right-answer    a stated right result (see clean above).
A refusal whose message blames the wrong thing (the audit's "unclear" cases) is listed as a note.

Most cases run `main` in this process (the model stays loaded; full-disk and read-only faults are simulated
by patching the write functions in this process, restored afterwards). Cases that may hang or allocate
without bound (a FIFO, a wrong service at the scheduler address, absurd card values, the worker, concurrent
runs, SIGTERM) run in a subprocess with a time limit (and a memory cap for cards). Servers listen on
127.0.0.1 only.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_CT = SHARED / "totalseg_example" / "example_ct.nii.gz"
DEFAULT_DICOM = SHARED / "dcmqi_ct3slice" / "ct-3slice"
DEFAULT_TS_LABELS = SHARED / "totalseg_example" / "example_seg_fast_force_split.nii.gz"

REFUSE, FLAG_OR_REFUSE, SAME, RIGHT = "refuse", "flag-or-refuse", "same", "right-answer"
OUTCOMES = ("clean", "flagged", "refused", "WRONG", "crashed")

# The audit's families (issue 31), one section of the pool each: key -> title. A mutation's finer family
# (gzip-truncation, nifti-header, ...) is its sub-label inside its section.
SECTIONS = {
    "formats": "formats and encodings",
    "dicom": "DICOM variants",
    "intensities": "intensities",
    "geometry": "geometry",
    "evaluate": "evaluate",
    "models": "model packages",
    "dask": "Dask/cluster options",
    "worker": "engine worker protocol",
    "concurrency": "concurrency",
    "disk": "disk faults",
}
SECTION_OF = {
    "gzip-truncation": "formats",
    "nii-truncation": "formats",
    "zero-fill": "formats",
    "nifti-header": "formats",
    "nifti-benign": "formats",
    "header-byteflip": "formats",
    "stream-byteflip": "formats",
    "nrrd": "formats",
    "hostile-files": "formats",
    "dicom": "dicom",
    "dicom-multiframe": "dicom",
    "dicom-per-slice": "dicom",
    "nifti-scaling": "intensities",
    "inverted": "intensities",
    "ct-vs-mr": "intensities",
    "thin-volume": "geometry",
    "oblique-partial": "geometry",
    "evaluate": "evaluate",
    "evaluate-partial": "evaluate",
    "card": "models",
    "scheduler": "dask",
    "worker-request": "worker",
    "folder-runs": "concurrency",
    "output-names": "disk",
    "writability": "disk",
    "full-disk": "disk",
}
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
    model: str | None = None  # --model as given (None: the catalog's default)
    threads: int = 1  # for commands run in a subprocess
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
    output: Path | None = None  # segment: the output path, when not <out>/labels.nii.gz
    extra: list[str] = field(default_factory=list)  # arguments after the driver's own (--model)
    crop: tuple[int, int] | None = None  # compare="crop": the z index range of the intact result to compare
    expected_dice: dict | None = None  # evaluate RIGHT: the Dice per organ the right answer has
    # A custom case runs and judges itself: judge(out_dir) -> (outcome, detail, note). `fault` wraps the
    # in-process call (a monkeypatched write failure), restored afterwards.
    judge: Callable[[Path], tuple[str, str, str]] | None = None
    fault: Callable[[], contextlib.AbstractContextManager] | None = None


@dataclass(frozen=True)
class Mutation:
    name: str  # unique, with its parameters, so a line of the report says exactly what was done
    family: str
    expected: str  # REFUSE | FLAG_OR_REFUSE | SAME | RIGHT
    make: Callable[[Sources, Path], Made]  # writes the mutated input(s) into the given folder
    needs: str = "ct"  # which source must exist: ct | dicom | ts_labels | mr_model
    command: str = "segment"  # segment | evaluate | custom (make returns Made with `judge` set)
    compare: str = "array"  # how SAME is judged: array | physical (resampled) | crop (within Made.crop) | table
    # A refusal whose message matches this (case-insensitive) blames the wrong thing (the audit's "unclear"
    # cases): still refused, but listed as a note.
    unclear: str = ""

    @property
    def section(self) -> str:
        return SECTION_OF[self.family]


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


# -- issue 31 round two: helpers shared by the new sections -------------------------------------------


def _sitk_image(path: Path):
    import SimpleITK as sitk

    return sitk.ReadImage(str(path))


def _write_image(image, path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def _superior_last(image) -> bool:
    """Whether the last slices (highest k) are the superior end: the direction's z part of the third axis."""
    return image.GetDirection()[8] > 0


def _env(threads: int, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads),
        **extra,
    )
    return env


def call_subprocess(
    argv: list[str], timeout: float, threads: int = 1, memory_gib: float | None = None, env: dict | None = None
) -> Run:
    """`python -m AbdomenSegLib ARGV` in its own process: for cases that may hang (a FIFO, a wrong service at the
    scheduler address) or allocate without bound (absurd card values), which must not take the driver with them.
    A hang past `timeout` is killed and reported as the exception 'hung'; `memory_gib` caps the address space."""
    import subprocess

    def limit():
        os.setsid()
        if memory_gib:
            import resource

            size = int(memory_gib * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "AbdomenSegLib", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env or _env(threads),
        preexec_fn=limit,
        cwd=str(ROOT),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        exception = ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        exception = f"hung: no answer within {timeout:.0f} s (killed)"
    code = proc.returncode if not exception else None
    text_err = err.decode("utf-8", "replace")
    return Run(code, text_err, text_err, out.decode("utf-8", "replace"), exception, time.perf_counter() - start)


def _out_of(folder: Path) -> Path:
    """The output folder of the case whose inputs are in `folder` (see run_case)."""
    return folder.parent / "out"


def _leftovers(folder: Path) -> list[str]:
    """Lock files and partial files anywhere under `folder`: what a clean stop never leaves."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".lock") or p.name.startswith(".part-")
    )


def _segment_cmd(src: Sources, inputs: list[str], output: Path, *extra: str) -> list[str]:
    return _segment_argv(inputs, output, src.model) + list(extra)


def _custom(run_and_judge: Callable[[Path], tuple[str, str, str]], note: str = "") -> Made:
    """A case that runs and judges itself (subprocesses, several commands, faults): see Made.judge."""
    return Made([], judge=run_and_judge, note=note)


def _judge_plain(run: Run, expected: str, out_dir: Path, before: set[str] = frozenset()) -> tuple[str, str, str]:
    """judge_exit, then judge_written: for custom cases whose written answer is not compared."""
    new = [name for name in _new_entries(out_dir, set(before))]
    verdict = judge_exit(run, expected, new)
    if verdict:
        return verdict
    return judge_written(run, expected)


# -- formats and encodings: hostile files --------------------------------------------------------------


def _uncompressed_named_gz(fraction: float | None) -> Callable[[Sources, Path], Made]:
    """Uncompressed NIfTI bytes under a .nii.gz name (many tools write this), whole or cut to `fraction`."""

    def make(src: Sources, folder: Path) -> Made:
        raw = src.ct_bytes()
        data = raw if fraction is None else raw[: int(len(raw) * fraction)]
        return Made([str(_raw_write(folder / "ct.nii.gz", data))])

    return make


def _nifti2(src: Sources, folder: Path) -> Made:
    import nibabel as nib

    image = nib.load(str(src.ct))
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti2Image(image.get_fdata(dtype="float32").astype("int16"), image.affine), str(path))
    return Made([str(path)])


def _complex64(src: Sources, folder: Path) -> Made:
    import nibabel as nib
    import numpy as np

    image = nib.load(str(src.ct))
    data = np.asanyarray(image.dataobj).astype(np.complex64)
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), str(path))
    return Made([str(path)])


def _fifo_input(src: Sources, folder: Path) -> Made:
    """A named pipe where the scan should be: opening it for reading waits for a writer that never comes."""
    fifo = folder / "ct.nii.gz"
    os.mkfifo(fifo)
    out_dir = _out_of(folder)

    def judge(out: Path) -> tuple[str, str, str]:
        run = call_subprocess(_segment_cmd(src, [str(fifo)], out_dir / "labels.nii.gz"), 90, src.threads)
        left = _leftovers(out_dir)
        verdict = _judge_plain(run, REFUSE, out_dir)
        if verdict[0] != "crashed" and left:
            return "crashed", f"{verdict[1]}; left behind: {', '.join(left)}", ""
        return verdict

    return _custom(judge)


# -- DICOM variants: enhanced multi-frame and per-slice attributes ---------------------------------------


def _series_datasets(src: Sources) -> list:
    import pydicom

    files = sorted(p for p in src.dicom.iterdir() if p.is_file())
    datasets = [pydicom.dcmread(str(p)) for p in files]
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))


def _multiframe(order: str) -> Callable[[Sources, Path], Made]:
    """An enhanced CT (one file, per-frame functional groups) converted from the series with highdicom:
    all frames in order, the middle one missing, or frames shuffled (positions still in each frame's group);
    'two-files': the same object twice in one folder."""

    def make(src: Sources, folder: Path) -> Made:
        import warnings

        import highdicom as hd
        from highdicom.legacy import LegacyConvertedEnhancedCTImage

        datasets = _series_datasets(src)
        if order == "missing":
            datasets = datasets[:1] + datasets[2:]
        elif order == "shuffled":
            datasets = [datasets[-1], *datasets[:-1]]
        series = folder / "series"
        series.mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the test series' patient name has one component
            enhanced = LegacyConvertedEnhancedCTImage(
                datasets, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1
            )
        enhanced.save_as(str(series / "enhanced.dcm"))
        if order == "two-files":
            shutil.copyfile(series / "enhanced.dcm", series / "enhanced_copy.dcm")
        positions = [
            round(float(f.PlanePositionSequence[0].ImagePositionPatient[2]), 2)
            for f in enhanced.PerFrameFunctionalGroupsSequence
        ]
        return Made([str(series)], note=f"{enhanced.NumberOfFrames} frames at z {positions}")

    return make


def _dicom_per_slice(change: str) -> Callable[[Sources, Path], Made]:
    """One slice of the series edited with pydicom in a way that changes its grid."""

    def make(src: Sources, folder: Path) -> Made:
        import numpy as np
        import pydicom

        series, files = _dicom_copy(src, folder)
        target = sorted(files)[len(files) // 2]
        ds = pydicom.dcmread(str(target))
        if change == "pixel-spacing":
            old = [float(v) for v in ds.PixelSpacing]
            ds.PixelSpacing = [f"{v * 3.5 / 3.0:.6f}" for v in old]  # the audit's 3.0 -> 3.5, at this series' scale
            note = f"{target.name}: PixelSpacing {old} -> {list(ds.PixelSpacing)}"
        elif change == "orientation":
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "0.965926", "0.258819"]  # tilted 15 degrees
            note = f"{target.name}: orientation tilted 15 degrees"
        elif change == "rows":
            pixels = ds.pixel_array[:-16]
            ds.Rows = pixels.shape[0]
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
            note = f"{target.name}: 16 rows fewer"
        elif change == "monochrome1":
            for path in files:  # the whole series: a photometric edit of one slice would be another case
                each = pydicom.dcmread(str(path))
                each.PhotometricInterpretation = "MONOCHROME1"
                each.save_as(str(path))
            return Made([str(series)], note="PhotometricInterpretation MONOCHROME1 on every slice, values as stored")
        else:
            raise ValueError(change)
        ds.save_as(str(target))
        return Made([str(series)], note=note)

    return make


# -- intensities ----------------------------------------------------------------------------------------


def _negated_hu(src: Sources, folder: Path) -> Made:
    image = _sitk_image(src.ct)
    return Made([str(_write_image(-image, folder / "ct.nii.gz"))])


def _ct_to_mr_model(src: Sources, folder: Path) -> Made:
    return Made([str(src.ct)], extra=["--model", "mr-any-3d-unet"])


# -- geometry ---------------------------------------------------------------------------------------------


def _liver_slices(src: Sources) -> tuple[int, int]:
    """First and last slice (k) holding liver in the intact result."""
    import numpy as np
    import SimpleITK as sitk

    from AbdomenSegLib.core.organs import BY_NAME

    labels = sitk.GetArrayViewFromImage(sitk.ReadImage(str(src.prediction)))
    ks = np.nonzero((labels == BY_NAME["liver"].label).any(axis=(1, 2)))[0]
    if not len(ks):
        raise RuntimeError("the intact result has no liver")
    return int(ks[0]), int(ks[-1])


def _thin(slices: int) -> Callable[[Sources, Path], Made]:
    """`slices` slices through the middle of the liver: a thin slab, as a scout or a mis-exported series."""

    def make(src: Sources, folder: Path) -> Made:
        image = _sitk_image(src.ct)
        try:
            first, last = _liver_slices(src)
            middle = (first + last) // 2
        except (RuntimeError, TypeError):  # no intact result, or one without liver (an untrained model)
            middle = image.GetSize()[2] // 2
        start = max(0, min(middle - slices // 2, image.GetSize()[2] - slices))
        return Made([str(_write_image(image[:, :, start : start + slices], folder / "ct.nii.gz"))])

    return make


def _half_liver(src: Sources, folder: Path) -> Made:
    """The scan cut through the middle of the liver (the upper half of the liver left out): a partial scan
    whose right answer is the intact answer inside the crop."""
    image = _sitk_image(src.ct)
    first, last = _liver_slices(src)
    middle = (first + last) // 2
    if _superior_last(image):
        z0, z1 = 0, middle
    else:
        z0, z1 = middle, image.GetSize()[2]
    return Made([str(_write_image(image[:, :, z0:z1], folder / "ct.nii.gz"))], crop=(z0, z1), note=f"slices {z0}:{z1}")


def _oblique(degrees: float) -> Callable[[Sources, Path], Made]:
    """The CT resampled (linear) onto a grid rotated `degrees` about the patient's z axis, large enough to hold
    all of it: an oblique acquisition of the same body. Judged physically against the intact answer."""

    def make(src: Sources, folder: Path) -> Made:
        import itertools
        import math

        import numpy as np
        import SimpleITK as sitk

        image = _sitk_image(src.ct)
        a = math.radians(degrees)
        rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        direction = rotation @ np.array(image.GetDirection()).reshape(3, 3)
        corners = np.array(
            [
                image.TransformContinuousIndexToPhysicalPoint([c - 0.5 for c in corner])
                for corner in itertools.product(*[(0, n) for n in image.GetSize()])
            ]
        )
        local = corners @ direction  # coordinates along the new axes (columns of direction)
        spacing = np.array(image.GetSpacing())
        low, high = local.min(axis=0), local.max(axis=0)
        size = [int(math.ceil(v)) for v in (high - low) / spacing]
        origin = direction @ (low + spacing / 2)
        grid = sitk.Image(size, image.GetPixelID())
        grid.SetSpacing(tuple(spacing))
        grid.SetDirection(tuple(direction.ravel()))
        grid.SetOrigin(tuple(origin))
        resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, image.GetPixelID())
        return Made([str(_write_image(resampled, folder / "ct.nii.gz"))], note=f"grid {size}")

    return make


# -- evaluate with partial or odd references -------------------------------------------------------------


def _eval_upper_quarter(src: Sources, folder: Path) -> Made:
    """A reference that covers only the superior quarter of the prediction's slices. The right answer is the
    Dice of the matching crop: evaluate run on the prediction and the reference both cut to that quarter."""
    import csv

    reference = _sitk_image(src.ts_labels)
    prediction = _sitk_image(src.prediction)
    depth = reference.GetSize()[2]
    z0, z1 = (depth - depth // 4, depth) if _superior_last(reference) else (0, depth // 4)
    ref_path = _write_image(reference[:, :, z0:z1], folder / "ref_upper_quarter.nii.gz")
    pred_crop = _write_image(prediction[:, :, z0:z1], folder / "pred_upper_quarter.nii.gz")
    side = folder / "matching_crop"
    run = call_cli(
        ["evaluate", str(pred_crop), str(ref_path), "--reference-labels", "totalseg", "--csv", str(side / "m.csv")]
    )
    if run.code != 0:
        raise RuntimeError(f"evaluate on the matching crop failed (exit {run.code}): {_lines(run.stderr)[-1:]}")
    with open(side / "m.csv", newline="", encoding="utf-8") as handle:
        rows = {row["organ"]: row for row in csv.DictReader(handle)}
    expected = {
        organ: float(rows[organ]["dice"])
        for organ in CHECKED_ORGANS
        if organ in rows and rows[organ]["status"] == "ok" and float(rows[organ]["volume_ref_ml"]) > 5
    }
    return Made(
        [str(src.prediction), str(ref_path), "--reference-labels", "totalseg"],
        expected_dice=expected,
        note=f"reference slices {z0}:{z1} of {depth}",
    )


def _ts_with(change: str) -> Callable[[Sources, Path], Path]:
    def make(src: Sources, folder: Path) -> Path:
        import numpy as np
        import SimpleITK as sitk

        reference = _sitk_image(src.ts_labels)
        array = sitk.GetArrayFromImage(reference)
        if change == "nan-voxel":
            array = array.astype(np.float32)
            k, j, i = (n // 2 for n in array.shape)
            array[k, j, i] = np.nan
        elif change == "background-1":
            array = array.astype(np.int16)
            array[array == 0] = -1
        else:
            raise ValueError(change)
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(reference)
        return _write_image(image, folder / "ref.nii.gz")

    return make


# -- model packages -------------------------------------------------------------------------------------


def _package_dir(src: Sources) -> Path:
    """The package the driver runs (--model DIR, a name, or the catalog's default) as a folder."""
    if src.model and Path(src.model).is_dir():
        return Path(src.model)
    catalog = json.loads((ROOT / "Resources" / "models" / "catalog.json").read_text())
    return ROOT / "Resources" / "models" / (src.model or catalog["default"])


def _card_edit(edit: Callable[[dict], object], raw: Callable[[], str] | None = None, memory_gib: float = 6.0):
    """A copy of the driver's model package with its card.json edited (or replaced by raw()), run on the CT in a
    subprocess with its memory capped: a card the engine cannot run within its limits must be refused before
    the network is built or the scan read."""

    def make(src: Sources, folder: Path) -> Made:
        package = folder / "package"
        shutil.copytree(_package_dir(src), package)
        card_path = package / "card.json"
        if raw is not None:
            card_path.write_text(raw())
        else:
            card = json.loads(card_path.read_text())
            edit(card)
            card_path.write_text(json.dumps(card, indent=2))
        out_dir = _out_of(folder)

        def judge(out: Path) -> tuple[str, str, str]:
            argv = ["segment", str(src.ct), str(out_dir / "labels.nii.gz"), "--model", str(package)]
            run = call_subprocess(argv, 300, src.threads, memory_gib=memory_gib)
            if run.code is not None and run.code < 0:
                return "crashed", f"killed by signal {-run.code}", ""
            verdict = _judge_plain(run, REFUSE, out_dir)
            if "MemoryError" in run.stderr or "Cannot allocate" in run.stderr:
                return "crashed", "ran out of memory: " + verdict[1], ""
            return verdict

        return _custom(judge)

    return make


def _set_roi(size: list[int]) -> Callable[[dict], None]:
    def edit(card: dict) -> None:
        card.setdefault("inference", {})["roi_size"] = size

    return edit


def _set_channels(channels: list[int]) -> Callable[[dict], None]:
    def edit(card: dict) -> None:
        card["architecture"]["args"]["channels"] = channels

    return edit


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _escape_title(src: Sources, folder: Path) -> Made:
    """A package whose card title carries terminal escape sequences (clear screen, set window title, bell),
    installed where `models` lists packages: what it prints must not reach the terminal raw."""
    models = folder / "models"
    package = models / "escape-title"
    shutil.copytree(_package_dir(src), package)
    card = json.loads((package / "card.json").read_text())
    card["name"] = "escape-title"
    card["title"] = "Evil\x1b[2J\x1b]0;pwned\x07 title"
    (package / "card.json").write_text(json.dumps(card, indent=2))
    catalog = {"default": "escape-title", "models": [{"name": "escape-title", "path": "escape-title", "for": "fuzz"}]}
    (models / "catalog.json").write_text(json.dumps(catalog))

    def judge(out: Path) -> tuple[str, str, str]:
        run = call_subprocess(["models"], 120, src.threads, env=_env(src.threads, ABDOMENSEG_MODELS=str(models)))
        verdict = _judge_plain(run, SAME, out)
        if verdict[0] in ("crashed", "refused"):
            return verdict
        raw = [c for c in "\x1b\x07" if c in run.stdout + run.stderr]
        if raw:
            return "WRONG", f"`models` printed control characters {[hex(ord(c)) for c in raw]} raw", ""
        if "escape-title" not in run.stdout:
            return "WRONG", "`models` did not list the package at all", ""
        return "clean", "listed with its control characters made visible", ""

    return _custom(judge)


def _catalog_nested(src: Sources, folder: Path) -> Made:
    """A models folder whose catalog.json is nested 100,000 deep: `models` must refuse it, not recurse."""
    models = folder / "models"
    models.mkdir()
    (models / "catalog.json").write_text(_nested(100_000))

    def judge(out: Path) -> tuple[str, str, str]:
        run = call_subprocess(["models"], 120, src.threads, env=_env(src.threads, ABDOMENSEG_MODELS=str(models)))
        return _judge_plain(run, REFUSE, out)

    return _custom(judge)


# -- Dask/cluster options -----------------------------------------------------------------------------------


def _one_case_folder(src: Sources, folder: Path, cases: int = 1) -> Path:
    """A folder of `cases` copies of the CT (case0, case1, ...): the input of a folder run."""
    cases_dir = folder / "cases"
    cases_dir.mkdir()
    for i in range(cases):
        shutil.copyfile(src.ct, cases_dir / f"case{i}.nii.gz")
    return cases_dir


def _scheduler_file_not_json(src: Sources, folder: Path) -> Made:
    cases = _one_case_folder(src, folder)
    bad = folder / "scheduler.json"
    bad.write_text("this is not JSON {\n")
    out_dir = _out_of(folder) / "results"

    def judge(out: Path) -> tuple[str, str, str]:
        run = call_subprocess(_segment_cmd(src, [str(cases)], out_dir, "--scheduler-file", str(bad)), 120, src.threads)
        return _judge_plain(run, REFUSE, out)

    return _custom(judge)


def _scheduler_is_web_server(src: Sources, folder: Path) -> Made:
    """--scheduler pointing at a port where an HTTP server (on 127.0.0.1 only) listens: a wrong service must be
    refused within a bounded time, not waited on."""
    import http.server
    import threading

    cases = _one_case_folder(src, folder)
    out_dir = _out_of(folder) / "results"

    def judge(out: Path) -> tuple[str, str, str]:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
        server.RequestHandlerClass.log_message = lambda *a, **k: None
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            address = f"tcp://127.0.0.1:{server.server_address[1]}"
            run = call_subprocess(_segment_cmd(src, [str(cases)], out_dir, "--scheduler", address), 150, src.threads)
        finally:
            server.shutdown()
            server.server_close()
        verdict = _judge_plain(run, REFUSE, out)
        return verdict[0], f"{verdict[1]} ({run.seconds:.0f} s)", verdict[2]

    return _custom(judge)


def _many_workers(src: Sources, folder: Path) -> Made:
    """--workers 12 on this machine: the local cluster must be capped by its cores and the memory estimate,
    with a message saying so, and the run must still be right (every case done, manifest right)."""
    cases = _one_case_folder(src, folder, cases=2)
    out_dir = _out_of(folder) / "results"

    def judge(out: Path) -> tuple[str, str, str]:
        argv = _segment_cmd(src, [str(cases)], out_dir, "--workers", "12", "--no-qc-png")
        run = call_subprocess(argv, 600, src.threads)
        verdict = judge_exit(run, RIGHT, _leftovers(out_dir))
        if verdict:
            return verdict
        problems = _manifest_problems(out_dir, ["case0", "case1"])
        if problems:
            return "WRONG", "; ".join(problems), ""
        capped = [line for line in _lines(run.stderr) if "worker" in line.lower() and "12" in line]
        note = "" if capped else "no line says the 12 workers were capped"
        outcome = "flagged" if run.code == 3 else "clean"
        return outcome, (capped or ["manifest right"])[0][:200], note

    return _custom(judge)


# -- engine worker protocol --------------------------------------------------------------------------------


def _worker_request(kind: str) -> Callable[[Sources, Path], Made]:
    """One malformed request to `python -m AbdomenSegLib.worker`, then a second one: each must get exactly one
    JSON error line and the worker must stay up to answer the second (and exit on quit)."""

    def make(src: Sources, folder: Path) -> Made:
        out_dir = _out_of(folder)
        segment = ["segment", str(src.ct), str(out_dir / "labels.nii.gz"), "--progress-json"]
        lines = {
            "list": "[1, 2, 3]",
            "null": "null",
            "string": '"segment"',
            "number": "42",
            "not-json": "segment this please",
            "log-missing-folder": json.dumps({"argv": segment, "log": str(folder / "missing" / "run.log")}),
            "log-is-folder": json.dumps({"argv": segment, "log": str(folder)}),
            "argv-not-strings": json.dumps({"argv": ["segment", 1, None]}),
        }
        request = lines[kind]

        def judge(out: Path) -> tuple[str, str, str]:
            answers, alive, stderr = _talk_to_worker(src, [request, "[]"])
            new = _new_entries(out_dir, set())
            if "Traceback (most recent call last)" in stderr:
                return "crashed", "the worker printed a traceback: " + (_lines(stderr)[-1:] or [""])[0], ""
            if len(answers) < 2:
                return "crashed", f"the worker answered {len(answers)} of 2 requests ({answers}); alive: {alive}", ""
            bad = [a for a in answers if not (isinstance(a, dict) and set(a) == {"error"})]
            if bad:
                return "crashed", f"answers are not one {{\"error\"}} line each: {answers}", ""
            if (folder / "missing").exists() or new:
                return "crashed", f"the request wrote: {new or 'created the missing log folder'}", ""
            if not alive:
                return "crashed", "the worker did not stay up (or did not quit when asked)", ""
            return "refused", answers[0]["error"][:160], ""

        return _custom(judge)

    return make


def _talk_to_worker(src: Sources, requests: list[str], timeout: float = 60.0) -> tuple[list, bool, str]:
    """Start the worker, wait for ready, send each request and read one answer line per request; then quit.
    Returns (answers as parsed JSON or raw text, whether it answered all and exited on quit, its stderr)."""
    import selectors
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "AbdomenSegLib.worker", "--idle-exit", "120"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(src.threads),
        cwd=str(ROOT),
        text=True,
    )
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)

    def read_line() -> str | None:
        if not selector.select(timeout):
            return None
        return proc.stdout.readline() or None

    answers: list = []
    alive = False
    try:
        ready = read_line()
        if not ready or '"ready"' not in ready:
            return [], False, proc.stderr.read() if proc.poll() is not None else ""
        for request in requests:
            proc.stdin.write(request + "\n")
            proc.stdin.flush()
            line = read_line()
            if line is None:
                break
            try:
                answers.append(json.loads(line))
            except ValueError:
                answers.append(line.strip())
        alive = proc.poll() is None and len(answers) == len(requests)
        proc.stdin.write('{"quit": true}\n')
        proc.stdin.flush()
        proc.wait(timeout=30)
        alive = alive and proc.returncode == 0
    except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
        alive = False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read()
        selector.close()
    return answers, alive, stderr


# -- concurrency: folder runs ---------------------------------------------------------------------------------


def _manifest_problems(out_dir: Path, cases: list[str]) -> list[str]:
    """Where the manifest and the folder disagree: every case must be recorded once, `done` with its output
    present and readable, and no case `failed` whose output is whole."""
    import SimpleITK as sitk

    from AbdomenSegLib.cohort.manifest import NAME, read_manifest

    problems = []
    rows = read_manifest(out_dir / NAME) if (out_dir / NAME).exists() else {}
    for case in cases:
        row = rows.get(case)
        output = out_dir / f"{case}.nii.gz"
        if row is None:
            problems.append(f"{case}: not in the manifest" + (" (its output is there)" if output.exists() else ""))
            continue
        if row.get("status") != "done":
            problems.append(f"{case}: manifest says {row.get('status')} ({(row.get('error') or '')[:80]})")
        if not output.exists():
            problems.append(f"{case}: no output")
            continue
        try:
            sitk.ReadImage(str(output))
        except RuntimeError:
            problems.append(f"{case}: output unreadable")
    return problems


def _two_runs_one_folder(src: Sources, folder: Path) -> Made:
    """Two folder runs started together into one output folder: each case done once, all outputs whole and the
    manifest right (or the second run refused at once)."""
    import subprocess

    cases = _one_case_folder(src, folder, cases=3)
    names = [f"case{i}" for i in range(3)]
    out_dir = _out_of(folder) / "results"

    def judge(out: Path) -> tuple[str, str, str]:
        argv = [sys.executable, "-m", "AbdomenSegLib", *_segment_cmd(src, [str(cases)], out_dir, "--no-qc-png")]
        procs = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(src.threads), cwd=str(ROOT))
            for _ in range(2)
        ]
        runs = []
        for proc in procs:
            try:
                stdout, stderr = proc.communicate(timeout=420)
                runs.append(Run(proc.returncode, stderr.decode(errors="replace"), "", stdout.decode(errors="replace")))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                runs.append(Run(None, "", "", "", "hung: no answer within 420 s (killed)"))
        for run in runs:  # exit 1 is a folder run's "some cases failed": the manifest says which, judged below
            if run.exception or "Traceback (most recent call last)" in run.stderr or run.code not in (0, 1, 2, 3):
                return "crashed", run.exception or f"exit {run.code}: {(_lines(run.stderr) or [''])[-1]}", ""
        left = _leftovers(out_dir)
        if left:
            return "crashed", f"left behind: {', '.join(left)}", ""
        problems = _manifest_problems(out_dir, names)
        codes = [run.code for run in runs]
        if problems:
            return "WRONG", f"exits {codes}; " + "; ".join(problems), ""
        if 3 in codes:
            return "flagged", f"exits {codes}; manifest right", ""
        return "clean", f"exits {codes}; each case done once, manifest right", ""

    return _custom(judge)


def _sigterm_mid_run(src: Sources, folder: Path) -> Made:
    """SIGTERM to a folder run once its first output is written: it must stop with no lock or partial file
    left and a manifest that records every output in the folder."""
    import signal
    import subprocess

    cases = _one_case_folder(src, folder, cases=4)
    out_dir = _out_of(folder) / "results"

    def judge(out: Path) -> tuple[str, str, str]:
        argv = [sys.executable, "-m", "AbdomenSegLib", *_segment_cmd(src, [str(cases)], out_dir, "--no-qc-png")]
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(src.threads), cwd=str(ROOT)
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if out_dir.exists() and any(out_dir.glob("case*.nii.gz")):
                break
            time.sleep(0.2)
        if proc.poll() is not None:
            return "crashed", f"DRIVER: the run ended (exit {proc.returncode}) before it could be interrupted", ""
        time.sleep(0.5)  # into the next case
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return "crashed", "did not stop within 60 s of SIGTERM", ""
        text = stderr.decode(errors="replace")
        if "Traceback (most recent call last)" in text:
            return "crashed", "a traceback was printed: " + (_lines(text)[-1:] or [""])[0], ""
        left = _leftovers(out_dir)
        if left:
            return "crashed", f"exit {proc.returncode}; left behind: {', '.join(left)}", ""
        written = sorted(p.name[: -len(".nii.gz")] for p in out_dir.glob("case*.nii.gz"))
        problems = _manifest_problems(out_dir, written)
        if problems:
            return "WRONG", f"exit {proc.returncode}; " + "; ".join(problems), ""
        return "clean", f"exit {proc.returncode}; {len(written)} outputs, all in the manifest, nothing left", ""

    return _custom(judge)


# -- disk faults ------------------------------------------------------------------------------------------


def _long_name(length: int) -> Callable[[Sources, Path], Made]:
    def make(src: Sources, folder: Path) -> Made:
        name = "n" * (length - len(".nii.gz")) + ".nii.gz"
        return Made([str(src.ct)], output=_out_of(folder) / name, note=f"{len(name)}-byte name")

    return make


def _file_named_qc(src: Sources, folder: Path) -> Made:
    """A folder run whose output folder holds a file named `qc` where the result check's folder goes."""
    cases = _one_case_folder(src, folder)
    out_dir = _out_of(folder)
    (out_dir / "qc").write_text("not a folder\n")

    def judge(out: Path) -> tuple[str, str, str]:
        before = _listing(out_dir)
        run = call_cli(_segment_cmd(src, [str(cases)], out_dir))
        return _judge_plain(run, REFUSE, out_dir, before)

    return _custom(judge)


def _dangling_symlink(src: Sources, folder: Path) -> Made:
    out_dir = _out_of(folder)
    (out_dir / "labels.nii.gz").symlink_to(folder / "nowhere" / "labels.nii.gz")
    return Made([str(src.ct)], note="output is a symlink to a missing file")


@contextlib.contextmanager
def _failing_writes(errno_code: int, where: Callable[[str], bool], itk: str = "", python: bool = True):
    """Writes to paths for which where(path) holds fail with errno_code (ENOSPC, EROFS): Python's open() and
    os.open() for writing and os.mkdir (unless python=False: then only ITK's write fails, the stage after the
    lock and the temporary file were made), and SimpleITK.WriteImage ('raise': it raises as ITK does; 'short':
    it writes one page and returns, as ITK does on a full disk). Everything is restored afterwards."""
    python_where = where if python else (lambda path: False)
    import builtins

    import SimpleITK as sitk

    real_open, real_os_open, real_mkdir, real_write = builtins.open, os.open, os.mkdir, sitk.WriteImage
    message = os.strerror(errno_code)

    def fail(path):
        raise OSError(errno_code, message, str(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and python_where(os.fspath(file)):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and python_where(os.fspath(path)):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if python_where(os.fspath(path)):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    def fake_write(image, path, *args, **kwargs):
        if itk and where(str(path)):
            if itk == "raise":
                raise RuntimeError(f"Exception thrown in SimpleITK WriteImage: could not write {path}: {message}")
            real_write(image, path, *args, **kwargs)
            with real_open(path, "r+b") as handle:
                handle.truncate(4096)
            return None
        return real_write(image, path, *args, **kwargs)

    builtins.open, io.open, os.open, os.mkdir, sitk.WriteImage = (
        fake_open,
        fake_open,
        fake_os_open,
        fake_mkdir,
        fake_write,
    )
    try:
        yield
    finally:
        builtins.open, io.open, os.open, os.mkdir, sitk.WriteImage = (
            real_open,
            real_open,
            real_os_open,
            real_mkdir,
            real_write,
        )


def _judge_fault(run: Run, out_dir: Path, words: str) -> tuple[str, str, str]:
    """A write fault must end in a clean refusal naming it: exit 2, one error line, no lock or partial file, and
    nothing half-written (an output left behind must read back whole)."""
    import SimpleITK as sitk

    verdict = judge_exit(run, REFUSE, _leftovers(out_dir))
    if verdict is None:
        return judge_written(run, REFUSE)
    if verdict[0] != "refused":
        return verdict
    for path in out_dir.rglob("*.nii.gz"):
        try:
            sitk.ReadImage(str(path))
        except RuntimeError:
            return "crashed", f"{verdict[1]}; half-written file left: {path.name}", ""
    note = "" if words in verdict[1].lower() else f"the message does not say '{words}': {verdict[1]}"
    return verdict[0], verdict[1], note


def _full_disk(stage: str) -> Callable[[Sources, Path], Made]:
    """No space left at one write stage of `segment`: the lock, the label map (ITK raising, or ITK writing one
    page and returning), the result check's JSON or picture, or a folder run's manifest."""
    import errno

    def make(src: Sources, folder: Path) -> Made:
        out_dir = _out_of(folder)
        inside = str(out_dir)

        def under(path: str) -> bool:
            return os.path.abspath(path).startswith(inside)

        where = {
            "lock": lambda p: under(p) and p.endswith(".lock"),
            "labels-itk-raises": lambda p: under(p) and ".nii" in p,
            "labels-itk-short-write": lambda p: under(p) and ".nii" in p,
            "qc-json": lambda p: under(p) and p.endswith(".json"),
            "qc-picture": lambda p: under(p) and p.endswith(".png"),
            "manifest": lambda p: under(p) and p.endswith(".csv"),
        }[stage]
        itk = {"labels-itk-raises": "raise", "labels-itk-short-write": "short"}.get(stage, "")
        if stage == "manifest":
            argv = _segment_cmd(src, [str(_one_case_folder(src, folder))], out_dir / "results", "--no-qc-png")
        else:
            extra = {"qc-json": ["--qc", str(out_dir / "qc.json")], "qc-picture": ["--qc-png", str(out_dir / "qc.png")]}
            argv = _segment_cmd(src, [str(src.ct)], out_dir / "labels.nii.gz", *extra.get(stage, []))

        def judge(out: Path) -> tuple[str, str, str]:
            with _failing_writes(errno.ENOSPC, where, itk, python=not itk):
                run = call_cli(argv)
            return _judge_fault(run, out_dir, "space")

        return _custom(judge)

    return make


def _read_only_folder_run(src: Sources, folder: Path) -> Made:
    """A folder run into a read-only output folder. As root, permissions do not stop writes, so the folder's
    writes fail with EROFS by the same in-process patch as the full-disk cases."""
    import errno

    cases = _one_case_folder(src, folder)
    out_dir = _out_of(folder) / "results"
    out_dir.mkdir()
    argv = _segment_cmd(src, [str(cases)], out_dir)
    inside = str(out_dir)
    simulated = os.geteuid() == 0
    if not simulated:
        out_dir.chmod(0o555)

    def judge(out: Path) -> tuple[str, str, str]:
        patch = (
            _failing_writes(errno.EROFS, lambda p: os.path.abspath(p).startswith(inside), "raise")
            if simulated
            else contextlib.nullcontext()
        )
        try:
            with patch:
                run = call_cli(argv)
        finally:
            out_dir.chmod(0o755)
        return _judge_fault(run, out_dir, "writ")

    return Made([], judge=judge, note="EROFS simulated (root)" if simulated else "chmod 555")


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
        "nifti-scaling",
        FLAG_OR_REFUSE,
        _header_edit(_set(scl_slope=1.0, scl_inter=-1000.0)),
    )
    add("scl_slope=100", "nifti-scaling", FLAG_OR_REFUSE, _header_edit(_set(scl_slope=100.0, scl_inter=0.0)))
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
    add("nhdr detached .raw cut at 0.9", N, REFUSE, _nrrd(detached=True, cut=0.9), unclear="no such file")
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
    _round_two(add)
    return pool


def _round_two(add: Callable) -> None:
    """The second audit's cases (issue 31), by section. Expectations: refuse, flag-or-refuse, same (the intact
    answer), right-answer (a stated right result: the matching crop's Dice, a consistent manifest)."""
    custom = dict(command="custom")

    # formats and encodings: hostile files
    F = "hostile-files"
    add("uncompressed data named .nii.gz", F, SAME, _uncompressed_named_gz(None))
    add("uncompressed data named .nii.gz, cut at 0.6", F, REFUSE, _uncompressed_named_gz(0.6))
    add("NIfTI-2 of the CT", F, SAME, _nifti2, unclear="give a NIfTI")
    add("complex64 NIfTI", F, REFUSE, _complex64)
    add("FIFO as the input", F, REFUSE, _fifo_input, **custom)

    # DICOM variants: enhanced multi-frame objects, per-slice attributes that change the grid
    M, S = "dicom-multiframe", "dicom-per-slice"
    dicom = dict(needs="dicom", compare="physical")
    add("enhanced multi-frame CT from the series", M, SAME, _multiframe("intact"), **dicom)
    add("enhanced multi-frame CT, middle frame missing", M, REFUSE, _multiframe("missing"), **dicom)
    add("enhanced multi-frame CT, frames shuffled", M, SAME, _multiframe("shuffled"), **dicom)
    add(
        "two enhanced multi-frame files of one series",
        M,
        REFUSE,
        _multiframe("two-files"),
        unclear="screenshot",
        **dicom,
    )
    add("one slice's PixelSpacing x3.5/3", S, REFUSE, _dicom_per_slice("pixel-spacing"), **dicom)
    add("one slice's orientation tilted 15 degrees", S, REFUSE, _dicom_per_slice("orientation"), **dicom)
    add("one slice 16 rows shorter", S, REFUSE, _dicom_per_slice("rows"), **dicom)

    # intensities
    add("negated HU", "inverted", REFUSE, _negated_hu, unclear="flipped")
    add(
        "MONOCHROME1 series (values as stored)",
        "inverted",
        SAME,
        _dicom_per_slice("monochrome1"),
        unclear="slope/intercept|flipped",
        **dicom,
    )
    add("CT given to the any-sequence MR model", "ct-vs-mr", FLAG_OR_REFUSE, _ct_to_mr_model, needs="mr_model")

    # geometry: thin, oblique and partial volumes
    add("2-slice slab", "thin-volume", FLAG_OR_REFUSE, _thin(2))
    add("5-slice slab", "thin-volume", FLAG_OR_REFUSE, _thin(5))
    add("45-degree oblique resample", "oblique-partial", SAME, _oblique(45.0), compare="physical")
    add("half-liver crop", "oblique-partial", SAME, _half_liver, compare="crop")

    # evaluate with partial or odd references
    ev = dict(needs="ts_labels", command="evaluate", compare="table")
    P = "evaluate-partial"
    add("eval reference covers the upper quarter only", P, RIGHT, _eval_upper_quarter, **ev)
    add("eval reference with one NaN voxel", P, REFUSE, _evaluate(_ts_with("nan-voxel")), unclear="like a scan", **ev)
    add("eval reference background -1", P, REFUSE, _evaluate(_ts_with("background-1")), unclear="like a scan", **ev)

    # model packages
    C = "card"
    add("card roi_size 512^3", C, REFUSE, _card_edit(_set_roi([512, 512, 512])), **custom)
    add("card channels 4096x5", C, REFUSE, _card_edit(_set_channels([4096] * 5)), **custom)
    add("card.json nested 100,000 deep", C, REFUSE, _card_edit(None, raw=lambda: _nested(100_000)), **custom)
    add("catalog.json nested 100,000 deep (models)", C, REFUSE, _catalog_nested, **custom)
    add("card title with terminal escapes (models)", C, SAME, _escape_title, **custom)

    # Dask/cluster options
    add("--scheduler-file not JSON", "scheduler", REFUSE, _scheduler_file_not_json, **custom)
    add("--scheduler at a web server on 127.0.0.1", "scheduler", REFUSE, _scheduler_is_web_server, **custom)
    add("--workers 12 (more than the cores)", "scheduler", RIGHT, _many_workers, **custom)

    # engine worker protocol
    for kind in (
        "list",
        "null",
        "string",
        "number",
        "not-json",
        "argv-not-strings",
        "log-missing-folder",
        "log-is-folder",
    ):
        add(f"worker request: {kind}", "worker-request", REFUSE, _worker_request(kind), **custom)

    # concurrency
    add("two folder runs into one folder", "folder-runs", RIGHT, _two_runs_one_folder, **custom)
    add("SIGTERM mid folder run", "folder-runs", RIGHT, _sigterm_mid_run, **custom)

    # disk faults
    add("output name of 260 bytes", "output-names", REFUSE, _long_name(260))
    add("output name of 250 bytes", "output-names", SAME, _long_name(250))
    add("output is a dangling symlink", "output-names", REFUSE, _dangling_symlink, unclear="another process")
    add("a file named qc where the qc folder goes", "writability", REFUSE, _file_named_qc, **custom)
    add("read-only output folder (folder run)", "writability", REFUSE, _read_only_folder_run, **custom)
    for stage in ("lock", "labels-itk-raises", "labels-itk-short-write", "qc-json", "qc-picture", "manifest"):
        add(f"no space left at: {stage}", "full-disk", REFUSE, _full_disk(stage), **custom)


def choose(
    pool: list[Mutation], cases: int, rng: random.Random, available: set[str], families: set[str] | None
) -> list[Mutation]:
    """A bounded random subset: two of every family first (so each is represented), the rest at random."""
    usable = [
        m for m in pool if m.needs in available and (not families or m.family in families or m.section in families)
    ]
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


def dice_by_organ(result, reference, physical: bool = False, min_voxels: int = 0) -> tuple[dict[str, float], str]:
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
        if min_voxels and int(r.sum()) < min_voxels:
            continue
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


def _new_entries(out_dir: Path, before: set[str]) -> list[str]:
    """Files that appeared in the output folder (recursively, hidden ones included) since `before` was listed.
    Folders are not counted: an empty output folder made before a refusal holds nothing a user could mistake."""
    if not out_dir.exists():
        return []
    return sorted(
        str(p.relative_to(out_dir))
        for p in out_dir.rglob("*")
        if str(p.relative_to(out_dir)) not in before and not p.is_dir()
    )


def _listing(out_dir: Path) -> set[str]:
    return {str(p.relative_to(out_dir)) for p in out_dir.rglob("*")} if out_dir.exists() else set()


def judge_exit(run: Run, expected: str, left: list[str]) -> tuple[str, str, str] | None:
    """The verdict every command shares: crashed (exception, traceback, hang, odd status), refused (exit 2,
    clean error line, nothing new left in the output folder) or an unclean refusal; None when the command
    wrote (exit 0 or 3) and the answer itself must be judged."""
    lines = _lines(run.stderr)
    if run.exception:
        return "crashed", f"exception escaped main: {run.exception}", ""
    if "Traceback (most recent call last)" in run.stderr + run.stdout:
        return "crashed", "a traceback was printed: " + (lines[-1] if lines else ""), ""
    if run.code not in (0, 2, 3):
        return "crashed", f"exit status {run.code}; last stderr line: {lines[-1] if lines else '(none)'}", ""
    if run.code != 2:
        return None
    last = lines[-1] if lines else ""
    problems = []
    if not (last.startswith("error: ") and ". " in last):
        problems.append(f"last stderr line is not 'error: <problem>. <fix>': {last!r}")
    if left:
        problems.append(f"left in the output folder: {', '.join(left[:6])}")
    if problems:
        return "crashed", "unclean refusal: " + "; ".join(problems), ""
    note = f"refused an input that keeps the image: {last}" if expected in (SAME, RIGHT) else ""
    return "refused", last, note


def judge_written(run: Run, expected: str, detail: str = "") -> tuple[str, str, str]:
    """A command that wrote (exit 0 or 3) with no answer to compare: flagged, clean, or WRONG for a case that
    had to be refused."""
    lines = _lines(run.stderr)
    if run.code == 3:
        warnings = [line for line in lines if line.startswith("warning:")]
        if not warnings:
            return "crashed", "exit 3 without a 'warning:' line on stderr", ""
        return "flagged", warnings[0], f"expected a refusal, got a flag: {warnings[0]}" if expected == REFUSE else ""
    if expected in (REFUSE, FLAG_OR_REFUSE):
        return "WRONG", f"exit 0 where a refusal was due{': ' + detail if detail else ''}", ""
    return "clean", detail or f"exit {run.code}", ""


def classify(
    m: Mutation, made: Made, run: Run, out_dir: Path, output: Path | None, baseline: Baseline, before: set[str]
) -> tuple[str, str, str]:
    """(outcome, detail, note) for one case; see the module docstring for the categories."""
    expected = made.expected or m.expected
    lines = _lines(run.stderr)
    new = _new_entries(out_dir, before)
    left = [name for name in new if "/" not in name]
    verdict = judge_exit(run, expected, new)
    if verdict and verdict[0] == "refused" and m.unclear and re.search(m.unclear, verdict[1], re.I):
        return "refused", verdict[1], f"unclear message (blames '{m.unclear}'): {verdict[1]}"
    if verdict:
        return verdict

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
            dice, problem = _compare_segment(m, made, output, baseline)
            agrees = problem or _dice_text(dice)
        if expected == REFUSE:
            note = f"expected a refusal, got a flag: {warnings[0]}"
        elif expected == SAME and _baseline_code(m, baseline) != 3:
            note = f"flagged an input that keeps the image ({agrees}): {warnings[0]}"
        else:
            note = ""
        return "flagged", warnings[0] + leftover, note + leftover

    # Exit 0: right only for a SAME mutation whose answer agrees with the intact one.
    if m.command == "evaluate" and expected == RIGHT:
        return _judge_evaluate_right(made, out_dir / "metrics.csv", leftover)
    if m.command == "evaluate":
        if expected != SAME:
            return "WRONG", "exit 0 on a corrupt or mismatched evaluate input" + leftover, ""
        if run.stdout.strip() != (baseline.evaluate_table or "").strip():
            return "WRONG", "metrics table differs from the intact reference's" + leftover, ""
        return "clean", "same metrics table" + leftover, leftover
    dice, problem = _compare_segment(m, made, output, baseline)
    summary = problem or f"Dice vs intact: {_dice_text(dice)}"
    if expected != SAME:
        return "WRONG", f"exit 0 on a corrupt input, no warning ({summary})" + leftover, ""
    if problem:
        return "WRONG", problem + leftover, ""
    low = {k: v for k, v in dice.items() if v < DICE_MIN}
    if low:
        return "WRONG", f"labels changed: {summary}" + leftover, ""
    if _baseline_code(m, baseline) == 3:
        return "clean", f"{summary} (the intact input was flagged, this one not)" + leftover, leftover
    return "clean", summary + leftover, leftover


def _baseline_code(m: Mutation, baseline: Baseline) -> int | None:
    return baseline.dicom_code if m.needs == "dicom" else baseline.ct_code


def _compare_segment(m: Mutation, made: Made, output: Path, baseline: Baseline) -> tuple[dict, str]:
    import SimpleITK as sitk

    reference = baseline.dicom_labels if m.needs == "dicom" else baseline.ct_labels
    if reference is None:
        return {}, "the intact input gave no result to compare with"
    try:
        result = sitk.ReadImage(str(output))
    except RuntimeError as exc:
        return {}, f"output cannot be read back: {str(exc).strip().splitlines()[-1][:200]}"
    if m.compare == "crop" and made.crop:
        # The right answer for a part of the scan is the intact answer in that part; organs the crop holds
        # only a sliver of are left out (their cut edge is where two correct runs may differ most).
        reference = reference[:, :, made.crop[0] : made.crop[1]]
        return dice_by_organ(result, reference, physical=True, min_voxels=2000)
    return dice_by_organ(result, reference, physical=m.compare == "physical")


def _judge_evaluate_right(made: Made, csv_path: Path, leftover: str) -> tuple[str, str, str]:
    """evaluate's answer against the Dice the right answer has (computed on the matching crop)."""
    import csv

    if not made.expected_dice:
        return "crashed", "DRIVER: no expected Dice for this case" + leftover, ""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        got = {row["organ"]: float(row["dice"]) for row in csv.DictReader(handle) if row.get("dice")}
    wrong = {
        organ: (got.get(organ), want)
        for organ, want in made.expected_dice.items()
        if got.get(organ) is None or abs(got[organ] - want) > 0.01
    }
    text = ", ".join(f"{o} {got.get(o, float('nan')):.3f} (right {w:.3f})" for o, w in made.expected_dice.items())
    if wrong:
        return "WRONG", f"Dice differs from the matching crop's: {text}" + leftover, ""
    return "clean", f"Dice as on the matching crop: {text}" + leftover, leftover


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
    started = time.perf_counter()
    try:
        made = m.make(src, inputs)
    except Exception as exc:  # the driver's own failure, not the engine's: say so, do not count as crash
        return Result(m, m.expected, "crashed", f"DRIVER could not make the mutation: {type(exc).__name__}: {exc}")
    before = _listing(out_dir)
    if made.judge is not None:  # a custom case: it ran its command(s) in make, or runs them in judge
        try:
            outcome, detail, note = made.judge(out_dir)
        except Exception as exc:  # noqa: BLE001 - the driver's own failure: say so
            outcome, detail, note = "crashed", f"DRIVER could not judge: {type(exc).__name__}: {exc}", ""
        if made.note:
            detail = f"[{made.note}] {detail}"
        return Result(m, made.expected or m.expected, outcome, detail, note, time.perf_counter() - started)
    output = (made.output or out_dir / "labels.nii.gz") if m.command == "segment" else None
    if m.command == "segment":
        argv = _segment_argv(made.args, output, model) + made.extra
    else:
        argv = ["evaluate", *made.args, "--csv", str(out_dir / "metrics.csv")]
    with made.fault() if made.fault else contextlib.nullcontext():
        run = call_cli(argv)
    outcome, detail, note = classify(m, made, run, out_dir, output, baseline, before)
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
    """One row per audit family (section) that ran, in the audit's order, and the total; then every WRONG or
    crashed case and the notes. Returns {section key: counts} plus 'total'."""
    counts: dict[str, dict[str, int]] = {}
    for r in sorted(results, key=lambda r: list(SECTIONS).index(r.mutation.section)):
        row = counts.setdefault(r.mutation.section, {k: 0 for k in ("tried", *OUTCOMES)})
        row["tried"] += 1
        row[r.outcome] += 1
    total = {k: sum(row[k] for row in counts.values()) for k in ("tried", *OUTCOMES)}
    out("")
    out(f"{'family':24s}{'tried':>6s}{'clean':>7s}{'flagged':>8s}{'refused':>8s}{'WRONG':>6s}{'crashed':>8s}")
    for key, row in list(counts.items()) + [("total", total)]:
        out(
            f"{SECTIONS.get(key, key):24s}{row['tried']:6d}{row['clean']:7d}{row['flagged']:8d}{row['refused']:8d}"
            f"{row['WRONG']:6d}{row['crashed']:8d}"
        )
    bad = [r for r in results if r.outcome in ("WRONG", "crashed")]
    if bad:
        out("")
        for r in bad:
            out(f"{r.outcome:7s} {_label(r.mutation)} (expected {r.expected}): {r.detail}")
    notes = [r for r in results if r.note and r.outcome not in ("WRONG", "crashed")]
    if notes:
        out("")
        out("notes (acceptable, but worth a look):")
        for r in notes:
            out(f"  {r.outcome:7s} {_label(r.mutation)} (expected {r.expected}): {r.note}")
    out("")
    out(f"wall time {seconds:.0f} s for {len(results)} cases")
    counts["total"] = total
    return counts


def _label(m: Mutation) -> str:
    return f"{m.section}/{m.family}/{m.name}"


def run(argv: list[str] | None = None) -> dict:
    """The whole fuzz run; returns {'counts': per family, 'results': [...]} (also used by the test)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=60, help="how many mutations to try (default 60)")
    parser.add_argument("--all", action="store_true", help="every mutation of the chosen families (a full run)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the mutations and their random parameters")
    parser.add_argument("--model", help="installed model name or package folder (default: the catalog's default)")
    parser.add_argument("--out", help="keep mutated inputs, outputs and results.json here (default: temp, removed)")
    parser.add_argument(
        "--families",
        help="comma-separated families to draw from: section keys (" + ",".join(SECTIONS) + ") or the finer "
        "sub-labels --list shows (default: all)",
    )
    parser.add_argument("--list", action="store_true", help="list the families and every mutation, then exit")
    parser.add_argument("--match", help="only mutations whose name matches this regular expression")
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
    if args.match:
        pool = [m for m in pool if re.search(args.match, m.name)]
    if args.list:
        for key, title in SECTIONS.items():
            members = [m for m in pool if m.section == key]
            print(f"{key} ({title}): {len(members)} cases")
            for m in members:
                print(f"    {m.family:18s} {m.expected:15s} {m.name}")
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
    src.model, src.threads = args.model, args.threads
    available = {name for name, path in (("ct", src.ct), ("dicom", src.dicom), ("ts_labels", src.ts_labels)) if path}
    if src.ct and (ROOT / "Resources" / "models" / "mr-any-3d-unet" / "card.json").is_file():
        available.add("mr_model")
    families = set(f.strip() for f in args.families.split(",")) if args.families else None
    chosen = choose(pool, len(pool) if args.all else args.cases, rng, available, families)
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
                f"[{index:3d}/{len(chosen)}] {result.outcome:7s} {_label(m)} ({result.seconds:.1f} s)",
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
                            "section": r.mutation.section,
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
