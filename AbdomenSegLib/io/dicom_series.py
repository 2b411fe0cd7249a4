"""Refuse a DICOM series whose slices do not form one regular 3D grid, before it is read.

SimpleITK's ImageSeriesReader (GDCM underneath) trusts the file list blindly: GDCM silently leaves out a
file it cannot parse (a truncated slice), keeps a copied slice twice, and ITK then takes the slice
spacing from the first and last positions and places every slice on that regular grid. A missing,
corrupt or duplicated slice therefore gives a volume with a wrong spacing (111 slices at 3.027 mm instead
of 112 at 3 mm), a displaced slice or a gantry tilt gives wrongly placed slices, and a slice with another
orientation is read as if it were parallel. Labels drawn on such a volume do not match the patient.

`check_series_geometry` reads only the headers (ImageFileReader.ReadImageInformation, about a
millisecond per file), checks the positions along the slice normal and raises AbdomenSegError naming the
offending file(s). It returns the checked slice spacing, which `check_read_spacing` compares with what ITK
computed after the (long) pixel read, as a second guard.

Every attribute that sets the grid is checked on every slice, since ITK takes it from the first slice for
all: Rows/Columns, PixelSpacing (one slice at 3.5 mm among 3.0 mm ones was read as 3.0), orientation and
position. The same rules (`check_stack`) check the frames of a multi-frame object (dicom_multiframe.py).
MONOCHROME1 slices are refused (`refuse_monochrome1` says why), and so is a folder holding several
multi-frame objects, each of which is a volume by itself.

Tolerances: a slice step may differ from the median step by max(0.01 mm, 1 % of it); orientation cosines
by 1e-3 (0.06 degrees); in-plane drift of a slice from the stack axis by the same tolerance as the step;
pixel spacing by 1e-4 of itself (0.05 pixel over 512). They absorb the rounding of values written as
decimal strings, not real geometry errors.
"""

from __future__ import annotations

import math
import os
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError

STEP_TOLERANCE_MM = 0.01
STEP_TOLERANCE_FRACTION = 0.01
ORIENTATION_TOLERANCE = 1e-3
PIXEL_SPACING_TOLERANCE_FRACTION = 1e-4

_POSITION = "0020|0032"
_ORIENTATION = "0020|0037"
_PIXEL_SPACING = "0028|0030"
_PHOTOMETRIC = "0028|0004"
_SERIES_UID = "0020|000e"
_INSTANCE = "0020|0013"

# Files GDCM never lists as image slices because they hold no pixels: not a lost slice, so not an error.
_NON_IMAGE_SOP_CLASSES = (
    "1.2.840.10008.1.3.10",  # DICOMDIR
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF / CDA
    "1.2.840.10008.5.1.4.1.1.9",  # waveforms
    *(f"1.2.840.10008.5.1.4.1.1.481.{n}" for n in range(3, 10)),  # RT structures, plans, records
)
# Suffixes of files people keep beside a series; never worth parsing as DICOM.
_NOT_DICOM_SUFFIXES = (
    ".txt",
    ".md",
    ".json",
    ".xml",
    ".csv",
    ".html",
    ".pdf",
    ".log",
    ".ini",
    ".py",
    ".sh",
    ".bat",
    ".jpg",
    ".jpeg",
    ".png",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".zip",
    ".gz",
    ".bz2",
    ".xz",
    ".7z",
    ".nii",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".raw",
    ".vtk",
    ".stl",
    ".obj",
)
_LISTED_NAMES = 5


@dataclass(frozen=True)
class SliceHeader:
    """The header fields that place one slice file, or one frame of a multi-frame object, on the grid."""

    name: str
    size: tuple[int, ...]  # columns, rows (and the frame count, for a multi-frame file as GDCM reports it)
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: np.ndarray | None = None  # as DICOM writes it: between rows, then between columns
    series_uid: str = ""
    instance: int | None = None
    photometric: str = ""

    @property
    def frames(self) -> int:
        return self.size[2] if len(self.size) > 2 else 1


@dataclass(frozen=True)
class Stack:
    """How the messages name a stack and its members: the slice files of a series or the frames of one file."""

    title: str  # "DICOM series '/data/ct'"
    unit: str = "slice"
    numbering: str = "instance numbers"
    quoted: bool = True  # the members' names are file names
    recopy: str = "copy the complete series again from the scanner, PACS or original media"

    def label(self, name: str) -> str:
        return f"'{name}'" if self.quoted else name

    def labels(self, names: list[str]) -> str:
        shown = ", ".join(self.label(n) for n in names[:_LISTED_NAMES])
        rest = len(names) - _LISTED_NAMES
        return shown + (f" and {rest} more" if rest > 0 else "")

    def units(self, count: int) -> str:
        return self.unit if count == 1 else self.unit + "s"

    def regular(self, spacing: float) -> str:
        return (
            f"where the series has {_mm(spacing)} mm"
            if self.quoted
            else f"where the frames are {_mm(spacing)} mm apart"
        )


@dataclass(frozen=True)
class CheckedStack:
    """A stack that passed `check_stack`: its members in position order on one regular grid."""

    order: np.ndarray  # indices of the members, sorted along the slice normal
    normal: np.ndarray  # unit slice normal: row direction x column direction
    spacing: float  # the step between neighbours along the normal, mm


def check_series_geometry(folder: Path, files: Sequence[str]) -> float | None:
    """Raise AbdomenSegError unless `files` (GDCM's list for one series in `folder`) are a regular stack.

    Returns the slice spacing measured from the positions (the median step along the slice normal), or
    None when there is nothing to measure: a single file (one slice, or one multi-frame file, whose frames
    io/dicom_multiframe.py checks and reads).
    """
    folder = Path(folder)
    headers = [_read_header(folder, path) for path in files]
    _refuse_stray_files(folder, files, headers[0].series_uid if headers else "")
    refuse_monochrome1(f"DICOM series '{folder}'", [h.name for h in headers if h.photometric == "MONOCHROME1"])
    _refuse_several_multiframe_objects(folder, headers)
    if len(headers) < 2:
        return None
    _refuse_missing_geometry(folder, headers)
    checked = check_stack(Stack(f"DICOM series '{folder}'"), headers)
    _refuse_unsorted_list(folder, headers, np.array([float(_position(h) @ checked.normal) for h in headers]))
    return checked.spacing


def check_read_spacing(image: sitk.Image, spacing: float | None, folder: Path) -> None:
    """Second guard after the pixel read: ITK's slice spacing must equal the one checked from the headers."""
    if spacing is None or image.GetDimension() < 3:
        return
    read = image.GetSpacing()[2]
    if abs(read - spacing) > _step_tolerance(spacing):
        raise AbdomenSegError(
            f"DICOM series '{folder}' was read with {_mm(read)} mm between slices but its slice positions "
            f"are {_mm(spacing)} mm apart",
            "re-export the series from the scanner or PACS, or convert it to NIfTI/NRRD in 3D Slicer and check "
            "the result before segmenting",
        )


def check_stack(stack: Stack, headers: list[SliceHeader]) -> CheckedStack:
    """The rules every stack of 2 or more slices or frames must meet (each with position and orientation):
    one size, one pixel spacing, one orientation, no two at one place, even steps along the normal, no shear,
    no hole in their numbering."""
    _refuse_odd_one_out(
        stack,
        headers,
        [h.size[:2] for h in headers],
        "image size",
        lambda size: f"{size[0]}x{size[1]} (columns x rows)",
        "put each series (e.g. localizers, reformats) in its own folder and segment the axial volume",
    )
    _refuse_odd_one_out(
        stack,
        headers,
        [h.pixel_spacing for h in headers],
        "PixelSpacing",
        lambda spacing: "\\".join(f"{v:g}" for v in spacing) + " mm",  # every digit written: 0.703125
        f"{stack.recopy}; a {stack.unit} with another pixel spacing would be stretched onto the grid of the others",
    )
    normal = _refuse_mixed_orientations(stack, headers)
    depths = np.array([float(_position(h) @ normal) for h in headers])
    order = np.argsort(depths, kind="stable")
    _refuse_duplicates(stack, headers, depths, order)
    spacing = _refuse_uneven_steps(stack, headers, depths, order)
    _refuse_tilt(stack, headers, normal, order, spacing)
    _refuse_numbering_gaps(stack, headers, order)
    return CheckedStack(order=order, normal=normal, spacing=spacing)


def refuse_monochrome1(title: str, names: list[str]) -> None:
    """MONOCHROME1 ('minimum is white') changes only how a viewer greys the values: the CT numbers stay what the
    rescale gives. GDCM, under ITK's series reader, negates the stored values of such slices all the same: a
    synthetic int16 series re-tagged MONOCHROME1 reads back as -v-1 (air -1000 -> +999 HU, SimpleITK 2.5 / GDCM
    3.2, tested in Testing/test_io_dicom_multiframe.py), and an image whose values were really stored inverted
    cannot be told from one that was not. Refused rather than guessed."""
    if not names:
        return
    raise AbdomenSegError(
        f"{title} stores its pixels as MONOCHROME1 (inverted grey scale; PhotometricInterpretation of "
        f"{_names(names)}): GDCM, the DICOM reader, negates such values (air would read +999 instead of -1000 "
        "HU), and values stored inverted for display cannot be told from CT numbers",
        "export the images as MONOCHROME2 from the scanner or PACS, then check that air reads about -1000 HU",
    )


# --- files in the folder that the series list leaves out -------------------------------------------------


def _refuse_stray_files(folder: Path, files: Sequence[str], series_uid: str) -> None:
    """A DICOM-looking file GDCM did not list is a slice it dropped (corrupt) or another series' file."""
    listed = {os.path.realpath(path) for path in files}
    strays: dict[str, list[str]] = {"corrupt": [], "other series": [], "left out": []}
    for path in _candidate_files(folder):
        if os.path.realpath(path) not in listed:
            verdict = _stray_verdict(path, series_uid)
            if verdict in strays:
                strays[verdict].append(path.name)
    if strays["corrupt"]:
        names = strays["corrupt"]
        raise AbdomenSegError(
            f"in DICOM folder '{folder}', {_names(names)} cannot be read (truncated or corrupt file); the "
            f"reader would silently leave {'it' if len(names) == 1 else 'them'} out and stretch the slice "
            "spacing over the gap",
            "copy the series again from the scanner, PACS or original media (or delete the file only if it is "
            "not a slice of this series)",
        )
    if strays["other series"]:
        raise AbdomenSegError(
            f"DICOM folder '{folder}' mixes in files of another series: {_names(strays['other series'])} "
            f"(besides the {len(files)} slices of the series being read)",
            "put each series in its own folder, holding only that series' files",
        )
    if strays["left out"]:
        raise AbdomenSegError(
            f"the DICOM reader leaves {_names(strays['left out'])} out of the series in '{folder}' although "
            "they carry its series UID",
            "copy the series again from the scanner or PACS, or convert it in 3D Slicer's DICOM module",
        )


def _candidate_files(folder: Path) -> list[Path]:
    """Regular files worth a look: not hidden, not DICOMDIR, not an obviously non-DICOM type."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.upper() == "DICOMDIR" or not entry.is_file():
                continue
            if name.lower().endswith(_NOT_DICOM_SUFFIXES):
                continue
            found.append(Path(entry.path))
    return sorted(found)


def _stray_verdict(path: Path, series_uid: str) -> str:
    """'corrupt', 'other series', 'left out' (readable, same series UID) or 'ignore' (not DICOM, no pixels)."""
    header = _try_read_header(path)
    if header is not None:
        return "left out" if series_uid and header.series_uid == series_uid else "other series"
    sop_class = _media_storage_sop_class(path)
    if sop_class is None:
        return "ignore"  # no DICM preamble and unreadable: not a DICOM file
    if any(sop_class == uid or sop_class.startswith(uid + ".") for uid in _NON_IMAGE_SOP_CLASSES):
        return "ignore"
    return "corrupt"


def _media_storage_sop_class(path: Path) -> str | None:
    """SOP class from the file meta header (explicit VR little endian by the standard), '' if that header is
    unreadable; None when the file lacks the 128-byte preamble + 'DICM' of a DICOM file."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return None
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    offset = 132
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            break
        vr = head[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length = struct.unpack_from("<I", head, offset + 8)[0]
            value_at = offset + 12
        else:
            length = struct.unpack_from("<H", head, offset + 6)[0]
            value_at = offset + 8
        if element == 0x0002:
            return head[value_at : value_at + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset = value_at + length
    return ""


# --- headers of the listed slices ------------------------------------------------------------------------


def _try_read_header(path) -> SliceHeader | None:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    pixel_spacing = _numbers(reader, _PIXEL_SPACING, 2)
    if pixel_spacing is None:  # e.g. ImagerPixelSpacing only: what GDCM made of it, (row, column) like the tag
        pixel_spacing = np.array(reader.GetSpacing()[1::-1], dtype=float)
    return SliceHeader(
        name=Path(path).name,
        size=tuple(reader.GetSize()),
        position=_numbers(reader, _POSITION, 3),
        orientation=_numbers(reader, _ORIENTATION, 6),
        pixel_spacing=pixel_spacing,
        series_uid=_tag(reader, _SERIES_UID),
        instance=_instance_number(reader),
        photometric=_tag(reader, _PHOTOMETRIC).upper(),
    )


def _read_header(folder: Path, path: str) -> SliceHeader:
    header = _try_read_header(path)
    if header is None:
        raise AbdomenSegError(
            f"slice '{Path(path).name}' of the DICOM series in '{folder}' cannot be read (truncated or corrupt file)",
            "copy the series again from the scanner, PACS or original media",
        )
    return header


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _numbers(reader: sitk.ImageFileReader, key: str, count: int) -> np.ndarray | None:
    """A backslash-separated DS tag as floats; None when absent or malformed (treated as missing)."""
    parts = _tag(reader, key).split("\\")
    try:
        values = np.array([float(p) for p in parts], dtype=float)
    except ValueError:
        return None
    return values if values.size == count and np.all(np.isfinite(values)) else None


# --- geometry checks -------------------------------------------------------------------------------------


def _position(header: SliceHeader) -> np.ndarray:
    assert header.position is not None  # headers without one were refused first
    return header.position


def _orientation(header: SliceHeader) -> np.ndarray:
    assert header.orientation is not None  # headers without one were refused first
    return header.orientation


def _refuse_several_multiframe_objects(folder: Path, headers: list[SliceHeader]) -> None:
    """A multi-frame object is a whole volume in one file: several in one folder are several volumes (or one
    volume split up), never one stack of slices, and their top level carries no slice position to stack by."""
    multiframe = [h.name for h in headers if h.frames > 1]
    if not multiframe or len(headers) < 2:
        return
    others = len(headers) - len(multiframe)
    beside = f", beside {others} single-frame slice file{'s' if others > 1 else ''}" if others else ""
    raise AbdomenSegError(
        f"DICOM folder '{folder}' holds {len(multiframe)} multi-frame DICOM objects ({_names(multiframe)}){beside}: "
        "each multi-frame file is a whole volume by itself, and several cannot be stacked into one",
        f"give one multi-frame file as the input (e.g. '{folder / multiframe[0]}'), or put each multi-frame "
        "object in its own folder",
    )


def _refuse_missing_geometry(folder: Path, headers: list[SliceHeader]) -> None:
    lacking = [h.name for h in headers if h.position is None or h.orientation is None]
    if lacking:
        raise AbdomenSegError(
            f"in DICOM series '{folder}', {_names(lacking)} {'has' if len(lacking) == 1 else 'have'} no valid "
            "slice position/orientation (ImagePositionPatient, ImageOrientationPatient), e.g. secondary "
            "captures or screenshots, so the slices cannot be stacked",
            "export the original CT/MR image series (not screenshots or secondary captures)",
        )


def _same(a, b) -> bool:
    """Equal sizes, or spacings within rounding (DS strings): a drift over 512 pixels stays below 0.05 pixel."""
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= PIXEL_SPACING_TOLERANCE_FRACTION * np.abs(b)))


def _refuse_odd_one_out(stack: Stack, headers: list[SliceHeader], values: list, attribute: str, show, fix: str) -> None:
    """Every member must share the value most of them have (an attribute that sets the grid: ITK takes it from the
    first slice for all). The majority, not the first file, is the reference, so the odd one is named."""

    def key(value):
        return None if value is None else tuple(np.round(np.asarray(value, dtype=float), 4))

    votes = Counter(key(v) for v in values)
    majority, count = votes.most_common(1)[0]
    reference = next(k for k, v in enumerate(values) if key(v) == majority)
    odd = [k for k, v in enumerate(values) if not _same(v, values[reference])]
    if not odd:
        return

    def shown(value) -> str:
        return "none" if value is None else show(value)

    first = values[odd[0]]
    alike = all(_same(values[k], first) for k in odd)
    has = (
        f"{'has' if len(odd) == 1 else 'have'} {attribute} {shown(first)}"
        if alike
        else f"have other {attribute} values (e.g. {shown(first)} in {stack.label(headers[odd[0]].name)})"
    )
    raise AbdomenSegError(
        f"{stack.title} mixes {attribute} values: {stack.labels([headers[k].name for k in odd])} {has} where the "
        f"{count} {stack.units(count)} like {stack.label(headers[reference].name)} have {shown(values[reference])}",
        fix,
    )


def _refuse_mixed_orientations(stack: Stack, headers: list[SliceHeader]) -> np.ndarray:
    """Every member must share the orientation of most members; returns the unit slice normal.

    The majority, not the first file, is the reference, so that a stray localizer sorted first is the
    one named rather than every real slice.
    """
    votes = Counter(tuple(np.round(_orientation(h), 3)) for h in headers)
    majority = votes.most_common(1)[0][0]
    first = next(h for h in headers if tuple(np.round(_orientation(h), 3)) == majority)
    odd = [h.name for h in headers if np.max(np.abs(_orientation(h) - _orientation(first))) > ORIENTATION_TOLERANCE]
    if odd:
        raise AbdomenSegError(
            f"{stack.title} mixes {stack.unit} orientations: {stack.labels(odd)} "
            f"{'is' if len(odd) == 1 else 'are'} not parallel to the {votes[majority]} {stack.unit}(s) like "
            f"{stack.label(first.name)} (ImageOrientationPatient differs)",
            "put each orientation (e.g. localizers, sagittal/coronal reformats) in its own folder and segment "
            "the axial series",
        )
    normal = np.cross(_orientation(first)[:3], _orientation(first)[3:])
    length = float(np.linalg.norm(normal))
    if length < 0.5:
        raise AbdomenSegError(
            f"{stack.unit} {stack.label(first.name)} of {stack.title} has an invalid ImageOrientationPatient "
            f"({', '.join(f'{v:g}' for v in _orientation(first))})",
            "re-export the series from the scanner or PACS",
        )
    return normal / length


def _refuse_duplicates(stack: Stack, headers: list[SliceHeader], depths: np.ndarray, order: np.ndarray) -> None:
    steps = np.diff(depths[order])
    same = np.flatnonzero(steps <= STEP_TOLERANCE_MM)
    if same.size:
        a, b = headers[order[same[0]]], headers[order[same[0] + 1]]
        more = f" ({same.size - 1} more pair{'s' if same.size > 2 else ''} like it)" if same.size > 1 else ""
        several = (
            "several phases/echoes/stacks in one file" if not stack.quoted else "several phases/echoes in one series"
        )
        raise AbdomenSegError(
            f"{stack.title} has two {stack.unit}s at the same position: {stack.label(a.name)} and "
            f"{stack.label(b.name)} (z={_mm(depths[order[same[0]]])} mm){more}; a copied {stack.unit}, or {several}",
            "remove the duplicate file(s), or split the phases/echoes into separate folders"
            if stack.quoted
            else "export each phase, echo or stack as its own series",
        )


def _refuse_unsorted_list(folder: Path, headers: list[SliceHeader], depths: np.ndarray) -> None:
    """ITK stacks slices in list order; GDCM's order must run monotonically along the normal."""
    steps = np.diff(depths)
    wrong = np.flatnonzero(np.sign(steps) != np.sign(steps[0]))
    if wrong.size:
        name = headers[wrong[0] + 1].name
        raise AbdomenSegError(
            f"the DICOM reader lists the slices of '{folder}' out of position order (at '{name}')",
            "convert the series in 3D Slicer (DICOM module) and save it as NRRD/NIfTI, then segment that file",
        )


def _refuse_uneven_steps(stack: Stack, headers: list[SliceHeader], depths: np.ndarray, order: np.ndarray) -> float:
    """Every step must equal the median step (the stack's spacing); returns it."""
    z = depths[order]
    steps = np.diff(z)
    spacing = float(np.median(steps))
    tolerance = _step_tolerance(spacing)
    uneven = np.flatnonzero(np.abs(steps - spacing) > tolerance)
    if uneven.size == 0:
        return spacing
    i = int(uneven[0])
    names = [headers[k].name for k in order]
    problem = _describe_step(stack, names, z, steps, i, spacing, tolerance)
    more = uneven.size - (2 if _is_displaced(steps, i, spacing, tolerance) else 1)
    if more > 0:
        problem += f" ({more} more uneven step{'s' if more > 1 else ''})"
    damaged = "a slice file is missing or damaged" if stack.quoted else "a frame is missing or misplaced"
    raise AbdomenSegError(
        f"{stack.title} is not evenly spaced: {problem}; reading it would put {stack.unit}s where they are not",
        f"{stack.recopy} ({damaged})",
    )


def _is_displaced(steps: np.ndarray, i: int, spacing: float, tolerance: float) -> bool:
    """Steps i and i+1 both wrong but summing to two regular steps: the slice between them is out of place."""
    return i + 1 < steps.size and abs(steps[i] + steps[i + 1] - 2 * spacing) <= tolerance


def _describe_step(
    stack: Stack, names: list[str], z: np.ndarray, steps: np.ndarray, i: int, spacing: float, tolerance: float
) -> str:
    a, b = f"{stack.label(names[i])} (z={_mm(z[i])})", f"{stack.label(names[i + 1])} (z={_mm(z[i + 1])})"
    if _is_displaced(steps, i, spacing, tolerance):
        return (
            f"{stack.unit} {stack.label(names[i + 1])} lies {_mm(abs(steps[i] - spacing))} mm off its place between "
            f"{stack.label(names[i])} and {stack.label(names[i + 2])} (steps {_mm(steps[i])} and "
            f"{_mm(steps[i + 1])} mm {stack.regular(spacing)})"
        )
    missing = round(steps[i] / spacing) - 1
    where = f"between {a} and {b}: step {_mm(steps[i])} mm {stack.regular(spacing)}"
    if missing >= 1 and abs(steps[i] - (missing + 1) * spacing) <= tolerance * (missing + 1):
        return f"{missing} {stack.units(missing)} missing {where}"
    return f"uneven {stack.unit} step {where}"


def _instance_number(reader: sitk.ImageFileReader) -> int | None:
    try:
        return int(_tag(reader, _INSTANCE))
    except ValueError:
        return None


def _refuse_numbering_gaps(stack: Stack, headers: list[SliceHeader], order: np.ndarray) -> None:
    """A slice removed from an evenly spaced stack leaves the positions even (three slices 1 mm apart lose the
    middle one and read as two slices 2 mm apart, exactly placed) and only the numbers show the hole (instance
    numbers of slice files, in-stack position numbers of frames). Refused when the numbers run with the
    positions, are distinct, and skip some: the stack as the scanner made it numbers its members without holes."""
    numbers = [headers[i].instance for i in order]
    if any(n is None for n in numbers) or len(set(numbers)) != len(numbers):
        return
    steps = np.diff(numbers)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        return  # numbered in another order than the positions: the numbers say nothing about holes here
    gaps = [k for k, step in enumerate(steps) if abs(step) > 1]
    if gaps:
        k = gaps[0]
        a, b = headers[order[k]], headers[order[k + 1]]
        missing = abs(int(steps[k])) - 1
        raise AbdomenSegError(
            f"{stack.title} skips {stack.numbering} between {stack.label(a.name)} (#{a.instance}) and "
            f"{stack.label(b.name)} (#{b.instance}): {missing} {stack.units(missing)} missing"
            + (f", and {len(gaps) - 1} more gap{'s' if len(gaps) > 2 else ''}" if len(gaps) > 1 else ""),
            stack.recopy,
        )


def _refuse_tilt(
    stack: Stack, headers: list[SliceHeader], normal: np.ndarray, order: np.ndarray, spacing: float
) -> None:
    """Positions must lie on the line through the first member along the normal; else the stack is sheared
    (gantry tilt), which ITK's regular grid cannot represent."""
    positions = np.array([_position(headers[k]) for k in order])
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    worst = int(np.argmax(drift))
    if drift[worst] <= _step_tolerance(spacing):
        return
    along = float(offsets[worst] @ normal)
    angle = math.degrees(math.atan2(drift[worst], abs(along))) if along else 90.0
    raise AbdomenSegError(
        f"{stack.title} is sheared (gantry tilt of about {angle:.1f} degrees): {stack.unit} "
        f"{stack.label(headers[order[worst]].name)} is shifted {_mm(drift[worst])} mm sideways from the stack axis "
        f"of {stack.label(headers[order[0]].name)}, which a regular volume cannot represent",
        "resample the series onto a regular grid first, e.g. in 3D Slicer: enable 'Acquisition geometry "
        "regularization' (Application Settings > DICOM), load the series in the DICOM module and save the "
        "volume as NRRD/NIfTI, then segment that file",
    )


# --- formatting ------------------------------------------------------------------------------------------


def _step_tolerance(spacing: float) -> float:
    return max(STEP_TOLERANCE_MM, STEP_TOLERANCE_FRACTION * abs(spacing))


def _mm(value: float) -> str:
    """3.0 -> '3.0', 3.02703 -> '3.027', -126.69 -> '-126.69'."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _names(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:_LISTED_NAMES])
    rest = len(names) - _LISTED_NAMES
    return shown + (f" and {rest} more" if rest > 0 else "")
