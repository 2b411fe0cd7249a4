"""The project's organ table: label values, names, colours and SNOMED CT codes.

Fixed once and used everywhere (label maps, .seg.nrrd files, Slicer segments, metrics tables).
Also holds the label conventions of the datasets we read references from, so a reference in
BTCV, CHAOS or TotalSegmentator numbering can be evaluated without conversion by the user.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Slicer terminology ("TerminologyEntry" segment tag). Context names and codes verified against the terminology files
# Slicer ships, Modules/Loadable/Terminologies/Resources/*.json, identical at v5.6.2 and v5.10.0 (and HEAD):
#  - SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json:2  "3D Slicer General Anatomy list" (Slicer's default
#    list, with colours): has every organ here except the inferior vena cava and the portal vein.
#  - SegmentationCategoryTypeModifier-DICOM-Master.json:2  "DICOM master list": has all of them (IVC :8257,
#    portal vein :8345), so those two use it.
#  - AnatomicRegionAndModifier-DICOM-Master.json:2  the anatomic (region) context, left empty for organs.
# Slicer looks a type up by coding scheme + code value only (vtkSlicerTerminologiesModuleLogic.cxx:201-204 @ v5.6.2,
# :207 @ v5.10.0); code meanings below are spelled as in those files.
GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
CATEGORY_CONTEXT = GENERAL_ANATOMY_CONTEXT  # the default; kept for callers of the old name
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")  # category, :312 / :1135 of the two lists
_EMPTY = ("", "", "")


@dataclass(frozen=True)
class Organ:
    label: int
    name: str  # machine name, used in files, CSVs and on the command line
    display_name: str  # human name, used for Slicer segment names
    # RGB 0-255: display colours (label maps, .seg.nrrd, Slicer segments, DICOM SEG, the result pictures), chosen
    # so that no two organs lie within MIN_COLOUR_DISTANCE (CIE76 delta E) of each other: Slicer's
    # GenericAnatomyColors gave liver, stomach and esophagus one salmon and IVC and portal vein one blue.
    color: tuple[int, int, int]
    snomed_type: tuple[str, str, str]  # (scheme, code, meaning)
    snomed_modifier: tuple[str, str, str] = _EMPTY  # laterality where the type is paired
    terminology_context: str = GENERAL_ANATOMY_CONTEXT  # the Slicer list that holds snomed_type

    @property
    def color_float(self) -> tuple[float, ...]:
        return tuple(c / 255.0 for c in self.color)

    def terminology_entry(self) -> str:
        """Slicer's serialized terminology entry: 7 fields joined by "~", codes as scheme^value^meaning.

        context~category~type~type modifier~anatomic context~anatomic region~region modifier, exactly as
        vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry writes it (Modules/Loadable/Terminologies/Logic/
        vtkSlicerTerminologiesModuleLogic.cxx:1933-1984 @ v5.6.2, :1989-2023 @ v5.10.0): an absent code is "^^", and
        Slicer's own default segment entry (Libs/vtkSegmentationCore/vtkSegment.cxx:68-69 @ v5.6.2, :71 @ v5.10.0)
        keeps the anatomic context name with an empty region.
        """
        return "~".join(
            [
                self.terminology_context,
                _code(ANATOMICAL_STRUCTURE),
                _code(self.snomed_type),
                _code(self.snomed_modifier),
                ANATOMIC_CONTEXT,
                _code(_EMPTY),
                _code(_EMPTY),
            ]
        )


def _code(triple: tuple[str, str, str]) -> str:
    return "^".join(triple)


_RIGHT = ("SCT", "24028007", "Right")
_LEFT = ("SCT", "7771000", "Left")

ORGANS: tuple[Organ, ...] = (
    Organ(1, "liver", "Liver", (221, 130, 101), ("SCT", "10200004", "Liver")),
    Organ(2, "spleen", "Spleen", (140, 90, 190), ("SCT", "78961009", "Spleen")),
    Organ(3, "kidney_right", "Right kidney", (255, 160, 200), ("SCT", "64033007", "Kidney"), _RIGHT),
    Organ(4, "kidney_left", "Left kidney", (250, 70, 210), ("SCT", "64033007", "Kidney"), _LEFT),
    Organ(5, "pancreas", "Pancreas", (255, 190, 60), ("SCT", "15776009", "Pancreas")),
    Organ(6, "gallbladder", "Gallbladder", (50, 180, 60), ("SCT", "28231008", "Gallbladder")),
    Organ(7, "stomach", "Stomach", (250, 250, 150), ("SCT", "69695003", "Stomach")),
    Organ(8, "aorta", "Aorta", (230, 30, 30), ("SCT", "15825003", "Aorta")),
    Organ(
        9,
        "inferior_vena_cava",
        "Inferior vena cava",
        (40, 90, 255),
        ("SCT", "64131007", "Inferior vena cava"),
        terminology_context=DICOM_MASTER_CONTEXT,
    ),
    Organ(10, "esophagus", "Esophagus", (130, 80, 20), ("SCT", "32849002", "Esophagus")),
    # No list Slicer ships has a code for portal + splenic vein together (the DICOM master list has "Portal vein"
    # :8345 and "Splenic vein" :8411 apart; SCT 110765007 "Portal vein and splenic vein" exists only in the
    # TotalSegmentator extension's own list). Coded as the portal vein: an approximation, the label holds both.
    Organ(
        11,
        "portal_splenic_vein",
        "Portal and splenic vein",
        (0, 220, 230),
        ("SCT", "32764006", "Portal vein"),
        terminology_context=DICOM_MASTER_CONTEXT,
    ),
    Organ(
        12, "adrenal_gland_right", "Right adrenal gland", (190, 255, 60), ("SCT", "23451007", "Adrenal gland"), _RIGHT
    ),
    Organ(13, "adrenal_gland_left", "Left adrenal gland", (120, 140, 20), ("SCT", "23451007", "Adrenal gland"), _LEFT),
    Organ(14, "urinary_bladder", "Urinary bladder", (150, 200, 255), ("SCT", "89837001", "Bladder")),
)

# The smallest CIE76 colour distance (Lab delta E) between two organs' colours (Testing/test_core_organs.py);
# about 2.3 is just noticeable side by side, 30 tells outlines apart at a glance. The palette above reaches 31.
MIN_COLOUR_DISTANCE = 30.0

BY_LABEL = {o.label: o for o in ORGANS}
BY_NAME = {o.name: o for o in ORGANS}
MAX_LABEL = max(BY_LABEL)

# Dataset label conventions -> our organ names. Values not listed map to background.
CONVENTIONS: dict[str, dict[int, str]] = {
    "abdomenseg": {o.label: o.name for o in ORGANS},
    "btcv": {
        1: "spleen",
        2: "kidney_right",
        3: "kidney_left",
        4: "gallbladder",
        5: "esophagus",
        6: "liver",
        7: "stomach",
        8: "aorta",
        9: "inferior_vena_cava",
        10: "portal_splenic_vein",
        11: "pancreas",
        12: "adrenal_gland_right",
        13: "adrenal_gland_left",
    },
    "chaos": {1: "liver", 2: "kidney_right", 3: "kidney_left", 4: "spleen"},
    # TotalSegmentator v2 "total" task (CT).
    "totalseg": {
        1: "spleen",
        2: "kidney_right",
        3: "kidney_left",
        4: "gallbladder",
        5: "liver",
        6: "stomach",
        7: "pancreas",
        8: "adrenal_gland_right",
        9: "adrenal_gland_left",
        15: "esophagus",
        21: "urinary_bladder",
        52: "aorta",
        63: "inferior_vena_cava",
        64: "portal_splenic_vein",
    },
    # TotalSegmentator "total_mr" task.
    "totalseg_mr": {
        1: "spleen",
        2: "kidney_right",
        3: "kidney_left",
        4: "gallbladder",
        5: "liver",
        6: "stomach",
        7: "pancreas",
        16: "urinary_bladder",
        23: "aorta",
    },
}

# Names other tools give the same structures (matched case-insensitively, spaces/underscores folded).
ALIASES: dict[str, list[str]] = {
    "kidney_right": ["right kidney", "kidney r", "r kidney", "right_kidney", "organ_right_kidney"],
    "kidney_left": ["left kidney", "kidney l", "l kidney", "left_kidney", "organ_left_kidney"],
    "adrenal_gland_right": ["right adrenal gland", "right_adrenal_gland", "adrenal r", "adrenal gland right"],
    "adrenal_gland_left": ["left adrenal gland", "left_adrenal_gland", "adrenal l", "adrenal gland left"],
    "inferior_vena_cava": ["ivc", "vena cava inferior", "inferior vena cava", "postcava"],
    "portal_splenic_vein": [
        "portal vein and splenic vein",
        "portal_vein_and_splenic_vein",
        "portal vein",
        "portal and splenic vein",
        "portal + splenic vein",
    ],
    "gallbladder": ["gall bladder"],
    "urinary_bladder": ["bladder"],
    "esophagus": ["oesophagus"],
}


def _fold(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


_NAME_INDEX: dict[str, Organ] = {}
for _o in ORGANS:
    for _alias in [_o.name, _o.display_name, *ALIASES.get(_o.name, [])]:
        _NAME_INDEX[_fold(_alias)] = _o


def organ_from_name(name: str) -> Organ | None:
    """Our organ for a segment/structure name from any supported convention, or None."""
    return _NAME_INDEX.get(_fold(name))


# Other codes that name one of our structures: SCT 110765007 "Portal vein and splenic vein" of the TotalSegmentator
# extension (lassoan/SlicerTotalSegmentator TotalSegmentator/Resources/totalsegmentator_snomed_mapping.csv:10 and
# SegmentationCategoryTypeModifier-TotalSegmentator.term.json:469), so its segments are recognised too.
_EXTRA_TYPE_CODES = {("SCT", "110765007"): "portal_splenic_vein"}


def _scheme_value(field: str) -> tuple[str, str]:
    parts = field.split("^")
    return (parts[0], parts[1]) if len(parts) == 3 else ("", "")


def organ_from_terminology(entry: str) -> Organ | None:
    """Our organ for a Slicer terminology entry string (the segment's "TerminologyEntry" tag), or None.

    Reads the entry the way vtkSlicerTerminologiesModuleLogic::DeserializeTerminologyEntry does: exactly 7
    "~"-separated fields (.cxx:2033-2036 @ v5.6.2, :2082-2085 @ v5.10.0), codes compared by coding scheme and
    value, never by meaning. The context name is not required to be ours: an entry from another list (DICOM
    master list, TotalSegmentator, ...) with the same Anatomical Structure code matches. A paired organ needs its
    laterality modifier; "Kidney" without Right/Left gives None (let the caller fall back to the segment name).
    """
    if not entry:
        return None
    fields = str(entry).split("~")
    if len(fields) != 7:
        return None
    category, type_code, modifier = (_scheme_value(f) for f in fields[1:4])
    if category != ANATOMICAL_STRUCTURE[:2]:
        return None
    if type_code in _EXTRA_TYPE_CODES:
        return BY_NAME[_EXTRA_TYPE_CODES[type_code]]
    return _CODE_INDEX.get((type_code, modifier))


_CODE_INDEX = {(o.snomed_type[:2], o.snomed_modifier[:2]): o for o in ORGANS}


# The largest value each named convention defines (the structures we do not segment included): a value above it
# means the map is in another convention.
CONVENTION_MAX_VALUE = {"abdomenseg": 14, "btcv": 13, "chaos": 4, "totalseg": 117, "totalseg_mr": 57}


def convention_map(convention: str | Mapping[Any, str]) -> dict[int, str]:
    """{value: organ name} of a convention: a name of CONVENTIONS, or a training config's own mapping (data.labels,
    an nnU-Net dataset.json: {value: organ name}, values as numbers or their text, as JSON keeps them)."""
    from AbdomenSegLib.core.errors import AbdomenSegError

    if isinstance(convention, dict):
        try:
            mapping = {int(value): name for value, name in convention.items()}
        except (TypeError, ValueError):
            mapping = None
        if mapping is None or any(v < 1 or n not in BY_NAME for v, n in mapping.items()):
            raise AbdomenSegError(
                f"label mapping {convention!r} is not {{value: organ name}} with values 1 or more",
                f"map label values to organ names from: {', '.join(BY_NAME)}",
            )
        return mapping
    if convention not in CONVENTIONS:
        raise AbdomenSegError(
            f"unknown label convention '{convention}'",
            f"use one of: {', '.join(sorted(CONVENTIONS))}",
        )
    return CONVENTIONS[convention]


def conversion_lut(convention: str | Mapping[Any, str]) -> np.ndarray:
    """Lookup table converting a label map in `convention` (a name, or a {value: organ} mapping) to our labels."""
    mapping = convention_map(convention)
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for value, name in mapping.items():
        lut[value] = BY_NAME[name].label
    return lut


def convert_labels(labels: np.ndarray, convention: str | Mapping[Any, str]) -> np.ndarray:
    """Map a label array from a dataset convention to our organ table (unknown values -> 0)."""
    lut = conversion_lut(convention)
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.uint8)
    inside = (labels >= 0) & (labels < len(lut))
    out[inside] = lut[labels[inside].astype(np.int64)]
    return out


TRANSLATION_CONTEXT = "AbdomenSeg"


def translated_display_names(translate: Callable[[str, str], str] | None = None) -> dict[str, str]:
    """Machine name -> display name in the user's language, through `translate(context, text)` (Slicer's
    slicer.i18n.translate, Base/Python/slicer/i18n.py:13-20 @ v5.10.0; None: English). Each text is a literal in a
    `translate(...)` call so Qt's lupdate, which Slicer's translation workflow runs over the sources, extracts it;
    Testing/test_organs.py checks they equal the organ table's display names."""
    if translate is None:
        return {o.name: o.display_name for o in ORGANS}
    return {
        "liver": translate("AbdomenSeg", "Liver"),
        "spleen": translate("AbdomenSeg", "Spleen"),
        "kidney_right": translate("AbdomenSeg", "Right kidney"),
        "kidney_left": translate("AbdomenSeg", "Left kidney"),
        "pancreas": translate("AbdomenSeg", "Pancreas"),
        "gallbladder": translate("AbdomenSeg", "Gallbladder"),
        "stomach": translate("AbdomenSeg", "Stomach"),
        "aorta": translate("AbdomenSeg", "Aorta"),
        "inferior_vena_cava": translate("AbdomenSeg", "Inferior vena cava"),
        "esophagus": translate("AbdomenSeg", "Esophagus"),
        "portal_splenic_vein": translate("AbdomenSeg", "Portal and splenic vein"),
        "adrenal_gland_right": translate("AbdomenSeg", "Right adrenal gland"),
        "adrenal_gland_left": translate("AbdomenSeg", "Left adrenal gland"),
        "urinary_bladder": translate("AbdomenSeg", "Urinary bladder"),
    }


def organ_choices(
    organ_names: Iterable[str], translate: Callable[[str, str], str] | None = None
) -> list[tuple[str, str]]:
    """(machine name, shown name) for a model's organs, in its order: what the panel's organ list shows (the names
    the segments get), while the engine is given the machine names."""
    shown = translated_display_names(translate)
    return [(name, shown.get(name, name)) for name in organ_names]
