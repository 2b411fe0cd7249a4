import numpy as np
import pytest

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import (
    BY_LABEL,
    CONVENTIONS,
    ORGANS,
    convert_labels,
    organ_from_name,
    organ_from_terminology,
)


def test_table_is_the_fixed_one():
    expected = [
        "liver",
        "spleen",
        "kidney_right",
        "kidney_left",
        "pancreas",
        "gallbladder",
        "stomach",
        "aorta",
        "inferior_vena_cava",
        "esophagus",
        "portal_splenic_vein",
        "adrenal_gland_right",
        "adrenal_gland_left",
        "urinary_bladder",
    ]
    assert [o.name for o in ORGANS] == expected
    assert [o.label for o in ORGANS] == list(range(1, 15))
    assert len({o.color for o in ORGANS}) == len(ORGANS)
    assert BY_LABEL[1].snomed_type[1] == "10200004" and BY_LABEL[3].snomed_modifier[2] == "Right"


@pytest.mark.parametrize(
    "convention,value,organ",
    [
        ("btcv", 1, "spleen"),
        ("btcv", 6, "liver"),
        ("btcv", 11, "pancreas"),
        ("btcv", 13, "adrenal_gland_left"),
        ("chaos", 1, "liver"),
        ("chaos", 4, "spleen"),
        ("totalseg", 5, "liver"),
        ("totalseg", 52, "aorta"),
        ("totalseg", 21, "urinary_bladder"),
        ("totalseg_mr", 23, "aorta"),
    ],
)
def test_conventions_map_to_our_labels(convention, value, organ):
    out = convert_labels(np.array([[[0, value, 99]]]), convention)
    assert out[0, 0, 0] == 0 and BY_LABEL[int(out[0, 0, 1])].name == organ and out[0, 0, 2] == 0


def test_every_convention_names_known_organs():
    for mapping in CONVENTIONS.values():
        for name in mapping.values():
            assert organ_from_name(name) is not None


@pytest.mark.parametrize(
    "name,organ",
    [
        ("Liver", "liver"),
        ("Right kidney", "kidney_right"),
        ("kidney_left", "kidney_left"),
        ("portal_vein_and_splenic_vein", "portal_splenic_vein"),
        ("Inferior Vena Cava", "inferior_vena_cava"),
        ("right_adrenal_gland", "adrenal_gland_right"),
        ("Urinary bladder", "urinary_bladder"),
        ("spine", None),
    ],
)
def test_names_from_other_tools_match(name, organ):
    found = organ_from_name(name)
    assert (found.name if found else None) == organ


def test_unknown_convention_is_a_clear_error():
    with pytest.raises(AbdomenSegError, match="unknown label convention"):
        convert_labels(np.zeros((2, 2, 2)), "nnunet-task99")


# -- Slicer terminology -------------------------------------------------------------------------------------------
# Verified by hand against the files Slicer ships, Modules/Loadable/Terminologies/Resources/ (Slicer/Slicer, identical
# at v5.6.2 and v5.10.0; line numbers of each type's "CodeValue"):
#   GA = SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json, :2 names the context; category
#        "Anatomical Structure" SCT 123037004 at :312; Right SCT 24028007 / Left SCT 7771000 modifiers of
#        Adrenal gland at :396/:412 and of Kidney at :2012/:2028.
#   DM = SegmentationCategoryTypeModifier-DICOM-Master.json, :2 names the context; category at :1135.
# Neither file has SCT 64131007 (inferior vena cava) or SCT 32764006 (portal vein) in GA, nor any code for "portal
# and splenic vein" together (DM has Splenic vein SCT 35819009 at :8411 on its own).
GA = "Segmentation category and type - 3D Slicer General Anatomy list"
DM = "Segmentation category and type - DICOM master list"
SLICER_TERMINOLOGY = {  # organ: (context, scheme, code, meaning in the file, modifier code)   file:line
    "liver": (GA, "SCT", "10200004", "Liver", ""),  # GA:915
    "spleen": (GA, "SCT", "78961009", "Spleen", ""),  # GA:995
    "kidney_right": (GA, "SCT", "64033007", "Kidney", "24028007"),  # GA:2001, :2012
    "kidney_left": (GA, "SCT", "64033007", "Kidney", "7771000"),  # GA:2001, :2028
    "pancreas": (GA, "SCT", "15776009", "Pancreas", ""),  # GA:3052
    "gallbladder": (GA, "SCT", "28231008", "Gallbladder", ""),  # GA:1644
    "stomach": (GA, "SCT", "69695003", "Stomach", ""),  # GA:3718
    "aorta": (GA, "SCT", "15825003", "Aorta", ""),  # GA:492
    "inferior_vena_cava": (DM, "SCT", "64131007", "Inferior vena cava", ""),  # DM:8257 (not in GA)
    "esophagus": (GA, "SCT", "32849002", "Esophagus", ""),  # GA:1316
    "portal_splenic_vein": (DM, "SCT", "32764006", "Portal vein", ""),  # DM:8345 (not in GA)
    "adrenal_gland_right": (GA, "SCT", "23451007", "Adrenal gland", "24028007"),  # GA:385, :396
    "adrenal_gland_left": (GA, "SCT", "23451007", "Adrenal gland", "7771000"),  # GA:385, :412
    "urinary_bladder": (GA, "SCT", "89837001", "Bladder", ""),  # GA:616
}


def test_terminology_table_covers_every_organ():
    assert sorted(SLICER_TERMINOLOGY) == sorted(o.name for o in ORGANS)


@pytest.mark.parametrize("organ", ORGANS, ids=lambda o: o.name)
def test_terminology_entry_names_a_context_and_code_slicer_ships(organ):
    context, scheme, code, meaning, modifier = SLICER_TERMINOLOGY[organ.name]
    fields = organ.terminology_entry().split("~")
    # 7 fields: vtkSlicerTerminologiesModuleLogic::DeserializeTerminologyEntry refuses any other count
    # (.cxx:2033-2036 @ v5.6.2, :2082-2085 @ v5.10.0).
    assert len(fields) == 7
    assert fields[0] == context
    assert fields[1] == "SCT^123037004^Anatomical Structure"
    assert fields[2] == f"{scheme}^{code}^{meaning}"
    assert fields[3] == (
        {"24028007": "SCT^24028007^Right", "7771000": "SCT^7771000^Left"}[modifier] if modifier else "^^"
    )
    assert fields[4:] == ["Anatomic codes - DICOM master list", "^^", "^^"]


def test_terminology_entry_has_the_layout_of_slicers_own_default_entry():
    # vtkSegment's constructor sets this entry (Libs/vtkSegmentationCore/vtkSegment.cxx:68-69 @ v5.6.2, :71 @ v5.10.0)
    slicer_default = (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~"
        "SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    liver = BY_LABEL[1].terminology_entry()
    assert liver == slicer_default.replace(
        "SCT^85756007^Tissue~SCT^85756007^Tissue", "SCT^123037004^Anatomical Structure~SCT^10200004^Liver"
    )


def test_veins_are_not_claimed_from_the_general_anatomy_list():
    # The defect: IVC and portal vein were written with the General Anatomy context, which does not hold them, so
    # Slicer 5.6/5.8 failed to resolve the entry ("Failed to get terminology type").
    for name in ("inferior_vena_cava", "portal_splenic_vein"):
        entry = organ_from_name(name).terminology_entry()
        assert entry.startswith("Segmentation category and type - DICOM master list~"), entry


@pytest.mark.parametrize("organ", ORGANS, ids=lambda o: o.name)
def test_organ_from_terminology_round_trips(organ):
    assert organ_from_terminology(organ.terminology_entry()) is organ


@pytest.mark.parametrize(
    "entry,organ",
    [
        # the same code from another list, with another meaning spelling: matched by scheme + value like Slicer does
        (
            "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^89837001^"
            "Urinary bladder~^^~Anatomic codes - DICOM master list~^^~^^",
            "urinary_bladder",
        ),
        (
            "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~"
            "SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^",
            "kidney_left",
        ),
        # TotalSegmentator's own code for the combined vein (its term.json:469)
        (
            "Segmentation category and type - Total Segmentator~SCT^123037004^Anatomical Structure~SCT^110765007^"
            "Portal vein and splenic vein~^^~Anatomic codes - DICOM master list~^^~^^",
            "portal_splenic_vein",
        ),
        # a paired organ without laterality cannot be decided
        (
            f"{GA}~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~^^~Anatomic codes - DICOM master list~^^~^^",
            None,
        ),
        # Slicer's default "Tissue" entry, a non-anatomical category, malformed and empty strings
        (f"{GA}~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^", None),
        (f"{GA}~SCT^49755003^Morphologically Altered Structure~SCT^10200004^Liver~^^~~^^~^^", None),
        ("SCT^10200004^Liver", None),
        (f"{GA}~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^", None),
        ("", None),
    ],
)
def test_organ_from_terminology_reads_other_entries(entry, organ):
    found = organ_from_terminology(entry)
    assert (found.name if found else None) == organ


def test_organ_colours_are_distinct_at_a_glance():
    """No two organs within MIN_COLOUR_DISTANCE in CIE Lab (issue 28: liver, stomach and esophagus shared a
    salmon, IVC and portal vein a blue), so the sheet's outlines and Slicer's segments tell organs apart."""
    import itertools

    import numpy as np
    from skimage.color import rgb2lab

    from AbdomenSegLib.core.organs import MIN_COLOUR_DISTANCE

    lab = {o.name: rgb2lab(np.array(o.color, float)[None, None] / 255.0)[0, 0] for o in ORGANS}
    close = [
        (a, b, round(float(np.linalg.norm(lab[a] - lab[b])), 1))
        for a, b in itertools.combinations(lab, 2)
        if np.linalg.norm(lab[a] - lab[b]) < MIN_COLOUR_DISTANCE
    ]
    assert close == []
