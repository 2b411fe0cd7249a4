"""The project's organ table: label values, names, colours and SNOMED CT codes.

Fixed once and used everywhere (label maps, .seg.nrrd files, Slicer segments, metrics tables).
Also holds the label conventions of the datasets we read references from, so a reference in
BTCV, CHAOS or TotalSegmentator numbering can be evaluated without conversion by the user.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# DICOM/Slicer terminology context names, used to build Slicer terminology entry strings.
CATEGORY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")


@dataclass(frozen=True)
class Organ:
    label: int
    name: str  # machine name, used in files, CSVs and on the command line
    display_name: str  # human name, used for Slicer segment names
    color: tuple  # RGB 0-255, close to Slicer's GenericAnatomyColors
    snomed_type: tuple  # (scheme, code, meaning)
    snomed_modifier: tuple = ("", "", "")  # laterality where the type is paired

    @property
    def color_float(self) -> tuple:
        return tuple(c / 255.0 for c in self.color)

    def terminology_entry(self) -> str:
        """Slicer's terminology string (category~type~modifier~region context~region~modifier)."""
        def code(t):
            return "^".join(t)
        return "~".join([
            CATEGORY_CONTEXT,
            code(ANATOMICAL_STRUCTURE),
            code(self.snomed_type),
            code(self.snomed_modifier),
            ANATOMIC_CONTEXT,
            "^^",
            "^^",
        ])


_RIGHT = ("SCT", "24028007", "Right")
_LEFT = ("SCT", "7771000", "Left")

ORGANS: tuple = (
    Organ(1, "liver", "Liver", (221, 130, 101), ("SCT", "10200004", "Liver")),
    Organ(2, "spleen", "Spleen", (157, 108, 162), ("SCT", "78961009", "Spleen")),
    Organ(3, "kidney_right", "Right kidney", (185, 102, 83), ("SCT", "64033007", "Kidney"), _RIGHT),
    Organ(4, "kidney_left", "Left kidney", (212, 126, 151), ("SCT", "64033007", "Kidney"), _LEFT),
    Organ(5, "pancreas", "Pancreas", (249, 180, 111), ("SCT", "15776009", "Pancreas")),
    Organ(6, "gallbladder", "Gallbladder", (139, 150, 98), ("SCT", "28231008", "Gallbladder")),
    Organ(7, "stomach", "Stomach", (216, 132, 105), ("SCT", "69695003", "Stomach")),
    Organ(8, "aorta", "Aorta", (224, 97, 76), ("SCT", "15825003", "Aorta")),
    Organ(9, "inferior_vena_cava", "Inferior vena cava", (0, 151, 206), ("SCT", "64131007", "Inferior vena cava")),
    Organ(10, "esophagus", "Esophagus", (211, 171, 143), ("SCT", "32849002", "Esophagus")),
    Organ(11, "portal_splenic_vein", "Portal and splenic vein", (0, 112, 165), ("SCT", "32764006", "Portal vein")),
    Organ(12, "adrenal_gland_right", "Right adrenal gland", (244, 214, 49), ("SCT", "23451007", "Adrenal gland"), _RIGHT),
    Organ(13, "adrenal_gland_left", "Left adrenal gland", (226, 198, 28), ("SCT", "23451007", "Adrenal gland"), _LEFT),
    Organ(14, "urinary_bladder", "Urinary bladder", (222, 154, 132), ("SCT", "89837001", "Urinary bladder")),
)

BY_LABEL = {o.label: o for o in ORGANS}
BY_NAME = {o.name: o for o in ORGANS}
MAX_LABEL = max(BY_LABEL)

# Dataset label conventions -> our organ names. Values not listed map to background.
CONVENTIONS: dict = {
    "abdomenseg": {o.label: o.name for o in ORGANS},
    "btcv": {
        1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus",
        6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_splenic_vein",
        11: "pancreas", 12: "adrenal_gland_right", 13: "adrenal_gland_left",
    },
    "chaos": {1: "liver", 2: "kidney_right", 3: "kidney_left", 4: "spleen"},
    # TotalSegmentator v2 "total" task (CT).
    "totalseg": {
        1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver",
        6: "stomach", 7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left",
        15: "esophagus", 21: "urinary_bladder", 52: "aorta", 63: "inferior_vena_cava",
        64: "portal_splenic_vein",
    },
    # TotalSegmentator "total_mr" task.
    "totalseg_mr": {
        1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver",
        6: "stomach", 7: "pancreas", 16: "urinary_bladder", 23: "aorta",
    },
}

# Names other tools give the same structures (matched case-insensitively, spaces/underscores folded).
ALIASES: dict = {
    "kidney_right": ["right kidney", "kidney r", "r kidney", "right_kidney", "organ_right_kidney"],
    "kidney_left": ["left kidney", "kidney l", "l kidney", "left_kidney", "organ_left_kidney"],
    "adrenal_gland_right": ["right adrenal gland", "right_adrenal_gland", "adrenal r", "adrenal gland right"],
    "adrenal_gland_left": ["left adrenal gland", "left_adrenal_gland", "adrenal l", "adrenal gland left"],
    "inferior_vena_cava": ["ivc", "vena cava inferior", "inferior vena cava", "postcava"],
    "portal_splenic_vein": ["portal vein and splenic vein", "portal_vein_and_splenic_vein", "portal vein",
                            "portal and splenic vein", "portal + splenic vein"],
    "gallbladder": ["gall bladder"],
    "urinary_bladder": ["bladder"],
    "esophagus": ["oesophagus"],
}


def _fold(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


_NAME_INDEX = {}
for _o in ORGANS:
    for _alias in [_o.name, _o.display_name, *ALIASES.get(_o.name, [])]:
        _NAME_INDEX[_fold(_alias)] = _o


def organ_from_name(name: str):
    """Our organ for a segment/structure name from any supported convention, or None."""
    return _NAME_INDEX.get(_fold(name))


def conversion_lut(convention: str) -> np.ndarray:
    """Lookup table converting a label map in `convention` to our organ labels."""
    if convention not in CONVENTIONS:
        from .errors import AbdomenSegError
        raise AbdomenSegError(
            f"unknown label convention '{convention}'",
            f"use one of: {', '.join(sorted(CONVENTIONS))}",
        )
    mapping = CONVENTIONS[convention]
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for value, name in mapping.items():
        lut[value] = BY_NAME[name].label
    return lut


def convert_labels(labels: np.ndarray, convention: str) -> np.ndarray:
    """Map a label array from a dataset convention to our organ table (unknown values -> 0)."""
    lut = conversion_lut(convention)
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.uint8)
    inside = (labels >= 0) & (labels < len(lut))
    out[inside] = lut[labels[inside].astype(np.int64)]
    return out
