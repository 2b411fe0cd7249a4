"""Which numbering a plain label map uses: named by the user, or detected with evidence, never assumed.

A label map holds numbers; which organ a number means depends on the tool that wrote it (organs.CONVENTIONS:
ours, BTCV, CHAOS, TotalSegmentator's CT and MR tasks). Read in the wrong one, a BTCV reference scores our liver
against its spleen: Dice 0 without a word. So a reference (and any prediction that is not ours) is read in the
convention the user names; where none is named, `detect_convention` tries every convention and keeps those that
fit the evidence:

- values: every value present must be one the convention defines (organs.CONVENTION_MAX_VALUE);
- anatomy: read in that convention, organs of at least qc.MIN_ML must lie where the result check's atlas puts
  them relative to the liver, spleen and kidneys (anatomy.OFFSETS_MM), within FIT_SD standard deviations or
  qc.MISPLACED_MM, along the left-right and head-foot axes only: some datasets' headers reverse the
  anterior-posterior axis (BTCV), and the label map's numbering must not be refused for its header.

FIT_SD was set on the 42 label maps of ../shared/data: read in their own convention the worst organ lies 3.7 SD
from its atlas place (btcv_img0005); read in any other convention their values allow, the best reading's worst
organ lies 4.4 SD off (btcv_img0004 as TotalSegmentator MR numbering), most 9 SD or more.

Exactly one fitting convention is used (and said); none, or several (CHAOS's 1-4 where only a liver and a kidney
are labelled fits several numberings), is refused with `error: <problem>. <fix>` naming the candidates.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.options import LogCallback
from AbdomenSegLib.core.organs import CONVENTIONS

AUTO = "auto"
FIT_SD = 4.0
_AXES = (0, 2)  # LPS x (left-right) and z (head-foot); y (anterior-posterior) is left out, see above


def organ_positions(image: sitk.Image, convention: str) -> dict:
    """{organ: (centroid LPS mm as an array, volume mL)} of the organs a label map holds in `convention`."""
    from AbdomenSegLib.preprocessing.label_values import value_boxes
    from AbdomenSegLib.qc.check import MIN_ML

    array = sitk.GetArrayViewFromImage(image)
    boxes = value_boxes(array)
    if boxes is None:
        return {}
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    mapping = CONVENTIONS[convention]
    sums: dict = {}
    for value, box in enumerate(boxes, start=1):
        if box is None or value not in mapping:
            continue
        index = np.argwhere(array[box] == value)
        if not len(index):
            continue
        total, count = sums.get(mapping[value], (np.zeros(3), 0))
        start = np.array([s.start for s in box])
        sums[mapping[value]] = (total + (index + start).sum(axis=0), count + len(index))
    positions = {}
    for organ, (total, count) in sums.items():
        volume = count * voxel_ml
        if volume < MIN_ML:
            continue
        z, y, x = total / count
        positions[organ] = (np.array(image.TransformContinuousIndexToPhysicalPoint((x, y, z))), volume)
    return positions


def anatomy_misfits(positions: dict) -> tuple:
    """(relations checked, the misfits as text) of organ positions against the atlas (left-right, head-foot)."""
    from AbdomenSegLib.qc.anatomy import OFFSETS_MM
    from AbdomenSegLib.qc.check import MISPLACED_MM

    checked, misfits = 0, []
    for organ, anchors in OFFSETS_MM.items():
        if organ not in positions:
            continue
        for anchor, (mean, sd) in anchors.items():
            if anchor not in positions:
                continue
            offset = positions[organ][0] - positions[anchor][0]
            checked += 1
            for axis in _AXES:
                off = abs(offset[axis] - mean[axis])
                if off > FIT_SD * sd[axis] and off > MISPLACED_MM:
                    misfits.append(f"{organ} {off:.0f} mm off its place beside the {anchor}")
                    break
    return checked, misfits


def candidates_by_values(values) -> list:
    """The conventions that define every value present (0 is background everywhere)."""
    from AbdomenSegLib.core.organs import CONVENTION_MAX_VALUE

    top = max([int(v) for v in values] + [0])
    return [c for c in CONVENTIONS if top <= CONVENTION_MAX_VALUE[c]]


def detect_convention(image: sitk.Image, what: str = "reference", option: str = "--reference-labels") -> tuple:
    """(convention, evidence sentence) for a plain label map, or AbdomenSegError naming the candidates."""
    from AbdomenSegLib.evaluation.metrics import check_is_label_map

    values = [int(v) for v in check_is_label_map(image, what)[1] if v > 0]
    if not values:
        raise AbdomenSegError(
            f"the {what} is empty (no label value above 0): its label convention cannot be told",
            f"check the file, and name its convention with {option}",
        )
    by_values = candidates_by_values(values)
    fits, reasons = [], {}
    for convention in by_values:
        checked, misfits = anatomy_misfits(organ_positions(image, convention))
        if misfits:
            reasons[convention] = misfits[0]
        elif not checked:
            reasons[convention] = "too few organs to place"
            fits.append((convention, 0))
        else:
            fits.append((convention, checked))
    placed = [c for c, checked in fits if checked]
    shown = ", ".join(map(str, values[:12])) + (" ..." if len(values) > 12 else "")
    if len(placed) == 1 and len(fits) == 1:
        checked = dict(fits)[placed[0]]
        return placed[0], (
            f"the {what}'s values ({shown}) and the places of its organs ({checked} relations to the liver, spleen "
            f"and kidneys) fit only the '{placed[0]}' convention"
        )
    if not fits:
        why = "; ".join(f"{c}: {r}" for c, r in reasons.items()) or "its values fit none"
        raise AbdomenSegError(
            f"the {what}'s label convention cannot be told: values {shown} fit no known convention's anatomy "
            f"({why})",
            f"name it with {option} (one of: {', '.join(CONVENTIONS)})",
        )
    names = [c for c, _ in fits]
    raise AbdomenSegError(
        f"the {what}'s label convention cannot be told: values {shown} and its organs' places fit "
        f"{' and '.join(names)}",
        f"name it with {option} (one of: {', '.join(names)})",
    )


def resolve_convention(
    image: sitk.Image, convention: str | None, what: str, option: str, log: LogCallback | None = None
) -> str:
    """`convention` when named (checked), else the one `detect_convention` finds (its evidence logged)."""
    from AbdomenSegLib.evaluation.metrics import check_convention

    if convention and convention != AUTO:
        check_convention(convention)
        return convention
    found, evidence = detect_convention(image, what, option)
    if log:
        log(f"{what} label convention: {found} ({evidence}; {option} names it)")
    return found


def read_as_ours(path) -> bool:
    """A file whose numbering is known whatever its values: a DICOM SEG (`.dcm`), which io.read_image reads into our
    organ table by its segments' codes and names (dicom_seg.py)."""
    from pathlib import Path

    path = Path(path)
    return path.is_file() and path.name.lower().endswith(".dcm")


def split_source(text: str) -> tuple:
    """`PATH[:convention]` -> (path, convention or None); a colon not followed by a known convention is part of
    the path."""
    head, sep, tail = str(text).rpartition(":")
    if sep and tail in (*CONVENTIONS, AUTO) and head:
        return head, None if tail == AUTO else tail
    return str(text), None


def training_labels(data: dict):
    """The numbering of a training dataset's label files, named in its config and never assumed: data.convention
    (a name of organs.CONVENTIONS), data.labels ({value: organ name}), or, with neither, the `labels` of an nnU-Net
    dataset.json in data.root. Returns the convention name or the {value: organ name} mapping."""
    from pathlib import Path

    from AbdomenSegLib.core.organs import convention_map

    named = [k for k in ("convention", "labels") if data.get(k) is not None]
    if len(named) == 2:
        raise AbdomenSegError(
            "config data names both a convention and labels", "keep one: data.convention or data.labels"
        )
    if data.get("labels") is not None:
        if not isinstance(data["labels"], dict):
            raise AbdomenSegError(
                f"config data.labels {data['labels']!r} is not a mapping", 'give it as {"1": "liver", "2": "spleen"}'
            )
        return {str(v): n for v, n in convention_map(data["labels"]).items()}
    if data.get("convention") is not None:
        convention_map(data["convention"])
        return data["convention"]
    dataset_json = Path(str(data.get("root") or "")) / "dataset.json"
    if data.get("root") and dataset_json.is_file():
        return nnunet_labels(dataset_json)
    raise AbdomenSegError(
        "config data names no label numbering (which organ each label value is)",
        f"set data.convention (one of: {', '.join(CONVENTIONS)}), or data.labels "
        '{"1": "liver", ...}, or put an nnU-Net dataset.json with its "labels" in data.root',
    )


def nnunet_labels(path) -> dict:
    """{value (text): organ name} from an nnU-Net dataset.json's `labels`: v2's {name: value} (nnU-Net's
    documentation/dataset_format.md: "labels": {"background": 0, "PZ": 1, ...}) or v1/MSD's {"value": name}.
    Region labels (a list of values) and names that are no organ of ours are refused."""
    from AbdomenSegLib.core.organs import organ_from_name
    from AbdomenSegLib.core.untrusted import load_json

    fix = "give the dataset's numbering in data.labels instead"
    try:
        labels = load_json(path, "dataset file", fix)["labels"]
        if not isinstance(labels, dict):
            raise ValueError("labels is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AbdomenSegError(
            f"'{path}' has no readable labels ({exc})", "give the dataset's numbering in data.labels instead"
        ) from None
    if all(str(k).isdigit() for k in labels):  # v1 / MSD: "0": "background"
        pairs = [(int(k), str(v)) for k, v in labels.items()]
    else:
        pairs = []
        for name, value in labels.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise AbdomenSegError(
                    f"'{path}' label '{name}' is {value!r}, not one value (nnU-Net region labels)",
                    "give the dataset's numbering in data.labels instead",
                )
            pairs.append((value, str(name)))
    mapping, unknown = {}, []
    for value, name in pairs:
        if value == 0 and name.lower() == "background":
            continue
        organ = organ_from_name(name)
        if organ is None or value < 1:
            unknown.append(f"{value} '{name}'")
        else:
            mapping[str(value)] = organ.name
    if unknown:
        raise AbdomenSegError(
            f"'{path}' labels {', '.join(unknown)} are not organs AbdomenSeg knows",
            "give the dataset's numbering in data.labels, mapping each value to one of our organ names",
        )
    return mapping
