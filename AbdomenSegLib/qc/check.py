"""The result check: every segmentation says how much to trust it.

`assess(labels, ...)` returns a `QCReport`: per organ its volume, connected pieces, the volume outside the
largest piece, the image borders it touches, the network's confidence; and flags of two levels:
- **warning**: the result as a whole is likely wrong — nothing found; organs mirrored in patient coordinates
  (a flipped header); liver and spleen mixed up; an organ the model segments missing where the image covers
  its place. The command line exits with status 3 on warnings (the output is still written).
- **note**: something atypical the user should know, which does not make the result wrong by itself — a
  volume outside the adult band, an organ cut by the image border, an organ in several pieces, a low
  confidence (calibrated per model on its validation split), an often-absent organ not found.

Positions are compared in patient coordinates (ITK's LPS: +x towards the patient's left, +y posterior,
+z superior), from the label map and its geometry, so they hold for any voxel order or direction matrix.
The relations used hold in normal adult anatomy (situs solitus); each was checked on the 24 BTCV reference
label maps and on TotalSegmentator's example CT (Testing/test_qc_check.py). Volume bands and the atlas of organ
offsets are in qc/anatomy.py, with their sources.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.organs import BY_LABEL, BY_NAME
from AbdomenSegLib.inference.postprocess import connected_pieces
from AbdomenSegLib.qc.anatomy import ANCHORS, EXPECTED_WHEN_COVERED, NOTED_WHEN_MISSING, OFFSETS_MM, VOLUME_BANDS_ML
from AbdomenSegLib.qc.cuts import (
    LYING_ACROSS,
    centroid_bounds,
    cut_faces,
    expected_position,
    expected_region,
    is_head_feet,
    verdict,
)
from AbdomenSegLib.qc.statistics import organ_intensities

# An organ under this volume is a few stray voxels: listed as "not found" (the CLI's table, the picture), without a
# confidence note; _missing says "not found" below it too.
TRACE_ML = 0.5
MIN_ML = 5.0  # organs smaller than this (a few stray voxels) say nothing about position
PIECES_NOTE_FRACTION = 0.10  # volume outside the largest piece worth a note (and at least PIECES_NOTE_ML)
PIECES_NOTE_ML = 5.0
COVER_SD = 2.0  # a missing organ is expected when its atlas position +- this many SDs lies inside the image
# An organ this many SDs (and MISPLACED_MM) from its atlas position is not where that organ lies: a mislabel
# (e.g. a transplant kidney in the iliac fossa called kidney_left). The 24 BTCV references reach 2.9 SD.
MISPLACED_SD = 4.5
MISPLACED_MM = 50.0
# An organ with a volume band found at under this fraction of the band's low end is counted as not found:
# a few stray voxels, or an atrophic organ (the 10 mL native kidneys), not a kidney where one lies.
TOKEN_FRACTION = 0.25
WARNING, NOTE = "warning", "note"

# (a, b, axis, sign): organ a's centroid minus organ b's along the LPS axis must have this sign.
_LEFT_RIGHT = (("liver", "spleen", 0, -1), ("kidney_right", "kidney_left", 0, -1))
_SUPERIOR_INFERIOR = (("liver", "kidney_right", 2, +1), ("spleen", "kidney_left", 2, +1))
_ANTERIOR_POSTERIOR = (
    ("kidney_left", "stomach", 1, +1),
    ("kidney_right", "liver", 1, +1),
    ("aorta", "pancreas", 1, +1),
)
_AXES = {
    "left-right": (_LEFT_RIGHT, "the liver or right kidney lies on the patient's left of the spleen or left kidney"),
    "superior-inferior": (_SUPERIOR_INFERIOR, "the kidneys lie above the liver or spleen"),
    "anterior-posterior": (_ANTERIOR_POSTERIOR, "the kidneys or aorta lie in front of the stomach, liver or pancreas"),
}
_FACES = ("right", "left", "anterior", "posterior", "inferior", "superior")


@dataclass(frozen=True)
class Flag:
    code: str
    problem: str
    fix: str
    level: str = WARNING
    organ: str | None = None

    def __str__(self) -> str:
        return f"{self.problem}. {self.fix}"


@dataclass
class OrganQC:
    volume_ml: float
    pieces: int = 1
    outside_largest_ml: float = 0.0
    at_border: list = field(default_factory=list)
    confidence: float | None = None
    normal_range_ml: tuple | None = None
    mean: float | None = None  # intensity under the organ (qc/statistics.py): HU for CT
    sd: float | None = None
    median: float | None = None


@dataclass
class QCReport:
    flags: list = field(default_factory=list)
    organs: dict = field(default_factory=dict)  # organ name -> OrganQC

    @property
    def warnings(self) -> list:
        return [f for f in self.flags if f.level == WARNING]

    @property
    def notes(self) -> list:
        return [f for f in self.flags if f.level == NOTE]

    def as_dict(self, **extra) -> dict:
        """JSON-ready (qc.json, the Slicer node attribute, the picture): see README 'Result check'."""

        def flag(f):
            return {
                "code": f.code,
                "problem": f.problem,
                "fix": f.fix,
                "organ": f.organ,
            }

        organs = {
            name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(o).items()}
            for name, o in self.organs.items()
        }
        return {
            **extra,
            "warnings": [flag(f) for f in self.warnings],
            "notes": [flag(f) for f in self.notes],
            "organs": organs,
        }

    @classmethod
    def from_dict(cls, data: dict) -> QCReport:
        """The report back from `as_dict` (a Slicer node attribute, a child process's JSON line)."""
        flags = [
            Flag(f["code"], f["problem"], f["fix"], level, f.get("organ"))
            for level, key in ((WARNING, "warnings"), (NOTE, "notes"))
            for f in data.get(key, [])
        ]
        organs = {
            name: OrganQC(
                o["volume_ml"],
                o.get("pieces", 1),
                o.get("outside_largest_ml", 0.0),
                list(o.get("at_border", [])),
                o.get("confidence"),
                tuple(o["normal_range_ml"]) if o.get("normal_range_ml") else None,
                o.get("mean"),
                o.get("sd"),
                o.get("median"),
            )
            for name, o in data.get("organs", {}).items()
        }
        return cls(flags, organs)

    def columns(self) -> dict:
        """Flat columns for a CSV row: counts and codes of the flags, and per organ volume and confidence."""
        row = {
            "qc_warnings": len(self.warnings),
            "qc_notes": len(self.notes),
            "qc_flags": ";".join(f.code + (f":{f.organ}" if f.organ else "") for f in self.flags),
        }
        for name, organ in self.organs.items():
            row[f"{name}_ml"] = round(organ.volume_ml, 2)
            if organ.confidence is not None:
                row[f"{name}_confidence"] = round(organ.confidence, 4)
            for stat in ("mean", "sd", "median"):
                if getattr(organ, stat) is not None:
                    row[f"{name}_{stat}"] = round(getattr(organ, stat), 1)
        return row


# -- measurements -------------------------------------------------------------------------------------
def organ_volumes_and_centroids(labels: sitk.Image) -> tuple:
    """({organ: mL}, {organ: LPS centroid in mm}) for every organ present."""
    volumes, centroids, _ = organ_shapes(labels)
    return volumes, centroids


def organ_shapes(labels: sitk.Image) -> tuple:
    """({organ: mL}, {organ: LPS centroid in mm}, {organ: box as array slices (z, y, x)}) for every organ present,
    from one pass of ITK's label statistics (multi-threaded C++; 0.02 s on a 512x512x200 map where NumPy's
    bincount, SciPy's centre of mass and find_objects took 0.2 s)."""
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.ComputePerimeterOff()  # only counts, centroids and boxes are needed
    shapes.ComputeFeretDiameterOff()
    shapes.ComputeOrientedBoundingBoxOff()
    shapes.Execute(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    volumes, centroids, boxes = {}, {}, {}
    for value in sorted(shapes.GetLabels()):
        if value not in BY_LABEL:
            continue
        name = BY_LABEL[value].name
        volumes[name] = float(shapes.GetNumberOfPixels(value)) * voxel_ml
        centroids[name] = np.array(shapes.GetCentroid(value))  # physical (LPS) mm, as the image's geometry says
        x, y, z, sx, sy, sz = shapes.GetBoundingBox(value)
        boxes[name] = (slice(z, z + sz), slice(y, y + sy), slice(x, x + sx))
    return volumes, centroids, boxes


def _pieces_and_borders(array: np.ndarray, value: int, box, voxel_ml: float, faces: list, single: bool) -> tuple:
    """(pieces, mL outside the largest piece, image faces touched) of one organ, computed in its box. `single`:
    the post-processing already kept only its largest piece (nothing to count)."""
    touched = []
    for axis, sl in enumerate(box):  # array axes z, y, x
        if sl.start == 0:
            touched.append(faces[axis][0])
        if sl.stop == array.shape[axis]:
            touched.append(faces[axis][1])
    if single:
        return 1, 0.0, touched
    count, sizes, _ = connected_pieces(array[box] == value, full=True, numbered=False)
    return count, float(sum(sizes[1:])) * voxel_ml, touched


def _face_names(labels: sitk.Image) -> list:
    """Per array axis (z, y, x): the patient side its first and last slice lie towards (LPS direction)."""
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    names = []
    for image_axis in (2, 1, 0):  # array axis 0 is image z
        column = direction[:, image_axis]
        physical = int(np.argmax(np.abs(column)))
        low, high = _FACES[2 * physical], _FACES[2 * physical + 1]
        names.append((low, high) if column[physical] > 0 else (high, low))
    return names


# -- checks ---------------------------------------------------------------------------------------------
def _meaningful(name: str, volume: float) -> bool:
    band = VOLUME_BANDS_ML.get(name)
    return volume >= MIN_ML and (band is None or volume >= TOKEN_FRACTION * band[0])


def _usable(centroids: dict, volumes: dict) -> dict:
    """Centroids of the organs found in a meaningful amount: the only ones whose positions say anything."""
    return {n: c for n, c in centroids.items() if _meaningful(n, volumes.get(n, 0.0))}


def _orientation(bounds: dict) -> list:
    flags = []
    for axis, (rules, what) in _AXES.items():
        found = [verdict(bounds, a, b, dim, sign) for a, b, dim, sign in rules if a in bounds and b in bounds]
        verdicts = [v for v in found if v is not None]
        if verdicts and not any(verdicts):
            extra = " (or the patient has situs inversus)" if axis == "left-right" else ""
            flags.append(
                Flag(
                    f"flipped_{axis}",
                    f"organs lie mirrored {axis}: {what}; the image header is probably flipped " f"{axis}{extra}",
                    "check the image's orientation (direction matrix) against the scanner's, fix the "
                    "header, and segment again; do not use this result as it is",
                )
            )
        elif verdicts and not all(verdicts):
            flags.append(
                Flag(
                    f"inconsistent_{axis}",
                    f"organ positions disagree {axis} ({what}, for some organs but not others)",
                    "look at the result before using it: some organs are probably mislabelled",
                )
            )
    return flags


def _liver_spleen(labels: sitk.Image, volumes: dict, faces: dict, bounds: dict) -> list:
    """A network shown a left-right mirrored abdomen keeps the organs' usual sides but mixes up liver and
    spleen (TotalSegmentator's example CT, header mirrored: liver 1191 -> 367 mL, spleen 271 -> 643 mL), so
    their positions look normal and their sizes give it away: a spleen larger than a liver that is itself
    below the adult band. With a liver of normal size it is massive splenomegaly (btcv_img0009: 3.1 L
    spleen, 2.2 L liver): a note. `faces`: {organ: the image faces that cut it (cuts.cut_faces)}."""
    liver, spleen = volumes.get("liver", 0.0), volumes.get("spleen", 0.0)
    if liver < MIN_ML or spleen < MIN_ML or spleen <= liver:
        return []
    if not _fairly_cut(labels, faces, bounds):
        return []
    if liver < VOLUME_BANDS_ML["liver"][0]:
        return [
            Flag(
                "liver_spleen_mixed_up",
                f"the spleen came out larger than the liver ({spleen:.0f} vs {liver:.0f} mL) and the liver is "
                "far below an adult liver's size: liver and spleen are probably mixed up, as when the image "
                "header is mirrored left-right",
                "check the header's left-right direction, fix it and segment again",
            )
        ]
    return [
        Flag(
            "spleen_larger_than_liver",
            f"the spleen is larger than the liver ({spleen:.0f} vs {liver:.0f} mL)",
            "massive splenomegaly, or a mislabelled result: look at it",
            NOTE,
            "spleen",
        )
    ]


def _volume_bands(volumes: dict, cut: set) -> list:
    flags = []
    for name, (low, high) in VOLUME_BANDS_ML.items():
        volume = volumes.get(name)
        # A cut organ's volume is a lower bound: too small says nothing, too large still holds.
        if volume is None or low <= volume <= high or (name in cut and volume < low):
            continue
        side = "below" if volume < low else "above"
        flags.append(
            Flag(
                f"volume_{'low' if volume < low else 'high'}",
                f"{name} {volume:.0f} mL is {side} the adult band {low:.0f}-{high:.0f} mL",
                "atypical anatomy or an incomplete/overgrown result: look at it",
                NOTE,
                name,
            )
        )
    return flags


def _fairly_cut(labels: sitk.Image, faces: dict, bounds: dict) -> bool:
    """Can a cut liver's volume still be weighed against the spleen's? Only where the field of view ends above or
    below both (the mirrored example: both cut at the top) with both their atlas centres inside it, judged from
    the other organs: the spleen lies at the liver's level (anatomy.OFFSETS_MM), so such a field cuts both
    alike. A crop through the body's side, front or back (only its left half in), or a field ending at the
    kidneys that holds only the liver's tip beside the spleen, leaves a small liver that is the crop's, not a
    mix-up (BTCV label maps cropped so: 42 such false warnings before)."""
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    liver_faces, spleen_faces = set(faces.get("liver", ())), set(faces.get("spleen", ()))
    if not liver_faces:
        return True
    if not all(face in spleen_faces and is_head_feet(face, direction) for face in liver_faces):
        return False
    for organ in ("liver", "spleen"):
        guess = expected_position(organ, bounds)
        if guess is None or not _covers(labels, guess[0], guess[0]):
            return False
    return True


def _covers(labels: sitk.Image, low: np.ndarray, high: np.ndarray) -> bool:
    """Does the image hold the LPS box between corners `low` and `high` (False for a NaN or infinite corner)?"""
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        return False
    size = np.array(labels.GetSize())
    for corner in np.array(np.meshgrid(*zip(low, high))).reshape(3, -1).T:
        index = np.array(labels.TransformPhysicalPointToContinuousIndex(corner.tolist()))
        if np.any(index < -0.5) or np.any(index > size - 0.5):
            return False
    return True


def _missing(labels: sitk.Image, expected, volumes: dict, bounds: dict) -> list:
    anchors = {a: b for a, b in bounds.items() if a in ANCHORS}
    flags = []
    for name in expected:
        if name in bounds or name not in OFFSETS_MM:
            continue
        # Every place the atlas allows, given where the anchors may lie, must be inside the image.
        region = expected_region(name, anchors, COVER_SD)
        if region is None or not _covers(labels, *region):
            continue
        found = volumes.get(name, 0.0)
        what = f"only {found:.0f} mL of {name} was found" if found >= TRACE_ML else f"{name} was not found"
        if name in EXPECTED_WHEN_COVERED:
            flags.append(
                Flag(
                    "missing_organ",
                    f"{what} although the image covers where it lies",
                    "it may be absent (removed, atrophic, displaced) or missed: look at the result",
                    WARNING,
                    name,
                )
            )
        elif name in NOTED_WHEN_MISSING:
            flags.append(Flag("not_found", what, "it may be absent or missed", NOTE, name))
    return flags


def _misplaced(bounds: dict) -> list:
    """Organs found far from where anatomy puts them, judged from the other organs (the atlas anchors) along the
    axes the border's cuts leave sure for both (cuts.py)."""
    anchors = {a: b for a, b in bounds.items() if a in ANCHORS}
    flags = []
    for name, (low, high) in bounds.items():
        guess = expected_position(name, anchors)
        if guess is None:
            continue
        # How far the expected point lies outside the interval the organ's centroid may lie in (0 inside it).
        offset = np.nan_to_num(np.maximum(low - guess[0], 0.0) + np.minimum(high - guess[0], 0.0), nan=0.0)
        if (
            np.max(np.abs(offset) / np.nan_to_num(guess[1], nan=1.0)) > MISPLACED_SD
            and np.linalg.norm(offset) > MISPLACED_MM
        ):
            flags.append(
                Flag(
                    "misplaced_organ",
                    f"{name} lies {np.linalg.norm(offset):.0f} mm from where the other organs put it",
                    "it may be mislabelled (another organ, a transplant) or "
                    "the anatomy is unusual: look at the result",
                    WARNING,
                    name,
                )
            )
    return flags


_LARGE = ("liver", "spleen", "kidney_right", "kidney_left")


def _no_large_organ(expected, usable: dict) -> list:
    """Only small structures found although the model segments the large ones: the image is probably not what
    the model expects (a wrong spacing shrank the body, another body part, another modality)."""
    large = [n for n in _LARGE if n in expected]
    if not large or any(n in usable for n in large):
        return []
    return [
        Flag(
            "no_large_organ",
            f"none of {', '.join(large)} was found in a meaningful amount",
            "check that the image shows the abdomen, that its spacing is right and that the model fits the " "modality",
        )
    ]


# Vessels and the esophagus run through any abdominal field of view: their volume is the field's, and that they
# touch the border says nothing (the 4 BTCV validation cases: aorta, IVC and esophagus touch it in every one).
PASS_THROUGH = ("aorta", "inferior_vena_cava", "esophagus", "portal_splenic_vein")


def _cut_by_border(organs: dict) -> list:
    """A note per organ the image border cuts (not the PASS_THROUGH tubes); the summary line and the picture show
    them as one line (outputs.summary_lines, sheet._flag_lines)."""
    return [
        Flag(
            "cut_by_border",
            f"{name} touches the image border ({', '.join(organ.at_border)}): its volume is incomplete",
            "extend the scan range if the whole organ matters",
            NOTE,
            name,
        )
        for name, organ in organs.items()
        if organ.at_border and name not in PASS_THROUGH
    ]


# Organs whose top no abdominal scan cuts: in the 40 manual references here (24 BTCV CT, 16 CHAOS MR) neither kidney
# nor the pancreas touches the scan's head end (two CHAOS kidneys touch its feet end). A scan whose head end cuts
# them lacks the upper abdomen, the context the network reads these organs in: TotalSegmentator's example CT cut
# 72 mm lower (slices 0:88 of 112) gave, against the intact scan's result inside the crop, liver 0.85, spleen 0.80,
# right kidney 0.85, pancreas 0.15, degrading smoothly the lower the cut (0:100: 0.95 / 0.97 / 0.93 / 0.75); the
# model input there is bit-identical, so it is the network's missing context, not the engine. Cutting the feet
# end instead (24:112) left every organ at 0.96-0.99.
UPPER_ABDOMEN_MARKERS = ("kidney_right", "kidney_left", "pancreas")
UPPER_ABDOMEN_MIN_ML = 5.0  # a trace at the border is no organ


def _upper_abdomen_cut(organs: dict) -> list:
    """One warning when the scan's head end cuts a kidney or the pancreas: the upper abdomen is missing, and every
    organ near that end comes out less reliably, not only incomplete."""
    cut = [
        name
        for name in UPPER_ABDOMEN_MARKERS
        if name in organs and "superior" in organs[name].at_border and organs[name].volume_ml >= UPPER_ABDOMEN_MIN_ML
    ]
    if not cut:
        return []
    return [
        Flag(
            "upper_abdomen_cut",
            f"the scan's head end cuts {' and '.join(cut)}: the upper abdomen is missing, and the organs near that end "
            "come out less reliably (on a scan cut this way, liver 0.85 and pancreas 0.15 Dice against the whole "
            "scan's result)",
            "check the organs near the scan's top, or segment a scan covering the upper abdomen (liver dome included)",
            WARNING,
            cut[0],
        )
    ]


def _below(value: float, threshold: float) -> str:
    """ "value < threshold" with as many decimals as it takes for the rounding not to contradict it (never
    "0.90 < 0.90")."""
    for decimals in (2, 3, 4, 6):
        a, b = f"{value:.{decimals}f}", f"{threshold:.{decimals}f}"
        if float(a) < float(b):
            return f"{a} < {b}"
    return f"{value:.6g} < {threshold:.6g}"


def assess(
    labels: sitk.Image,
    *,
    expected=None,
    asked=None,
    confidence=None,
    confidence_low=None,
    single_piece=(),
    image=None,
    input_intensity="native",
) -> QCReport:
    """Check a label map in our organ table.

    expected: the organ names the model segments (and the user kept); only those can be 'missing'.
    asked: the organ names the user asked for (for the message of an empty result).
    confidence: organ name -> the network's confidence (confidence.organ_confidence); confidence_low: the
    model's calibrated threshold (card qc.confidence.low_below) under which a note is raised.
    single_piece: organ names the post-processing reduced to their largest piece (their pieces are not counted).
    image: the scan in the label map's grid: each organ gets the mean, SD and median intensity under it
    (qc/statistics.py; `input_intensity` "btcv_uint8" converts a windowed file back to HU).
    """
    volumes, centroids, boxes = organ_shapes(labels)
    report = QCReport()
    if not volumes:
        what = ", ".join(asked) if asked else "any organ"
        report.flags.append(
            Flag(
                "empty",
                f"no organ was found ({what})",
                "check that the image covers the abdomen, that its spacing and intensities are "
                "right, and that the model fits the modality",
            )
        )
        return report
    array = np.asarray(sitk.GetArrayViewFromImage(labels))
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    faces = _face_names(labels)
    confidence = confidence or {}
    intensities = organ_intensities(image, labels, boxes, input_intensity) if image is not None else {}
    for name, volume in volumes.items():
        value = BY_NAME[name].label
        pieces, outside, touched = _pieces_and_borders(array, value, boxes[name], voxel_ml, faces, name in single_piece)
        report.organs[name] = OrganQC(
            volume,
            pieces,
            outside,
            touched,
            confidence.get(name),
            VOLUME_BANDS_ML.get(name),
            *intensities.get(name, ()),
        )
    cut = {name for name, organ in report.organs.items() if organ.at_border}
    usable = _usable(centroids, volumes)
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    bounds = centroid_bounds(direction, array.shape, usable, boxes)
    cut_by = {name: cut_faces(boxes[name], array.shape) for name in boxes}
    report.flags += _orientation(bounds)
    report.flags += _liver_spleen(labels, volumes, cut_by, bounds)
    report.flags += _missing(labels, expected or [], volumes, bounds)
    report.flags += _misplaced(centroid_bounds(direction, array.shape, usable, boxes, LYING_ACROSS))
    report.flags += _no_large_organ(expected or [], usable)
    report.flags += _volume_bands(volumes, cut)
    report.flags += _cut_by_border(report.organs)
    report.flags += _upper_abdomen_cut(report.organs)
    for name, organ in report.organs.items():
        if organ.outside_largest_ml > max(PIECES_NOTE_ML, PIECES_NOTE_FRACTION * organ.volume_ml):
            report.flags.append(
                Flag(
                    "pieces",
                    f"{name} is in {organ.pieces} pieces; {organ.outside_largest_ml:.0f} mL "
                    f"({100 * organ.outside_largest_ml / organ.volume_ml:.0f}%) lies outside the "
                    "largest",
                    "look at the smaller pieces: stray islands or a split organ",
                    NOTE,
                    name,
                )
            )
        if (
            confidence_low is not None
            and organ.confidence is not None
            and organ.confidence < confidence_low
            and organ.volume_ml >= TRACE_ML
        ):
            report.flags.append(
                Flag(
                    "low_confidence",
                    f"{name}: the network is unsure (confidence {_below(organ.confidence, confidence_low)})",
                    "its outline is likely inaccurate: look at it",
                    NOTE,
                    name,
                )
            )
    return report
