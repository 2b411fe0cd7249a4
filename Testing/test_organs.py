import numpy as np
import pytest

from AbdomenSegLib.errors import AbdomenSegError
from AbdomenSegLib.organs import BY_LABEL, CONVENTIONS, ORGANS, convert_labels, organ_from_name


def test_table_is_the_fixed_one():
    expected = ["liver", "spleen", "kidney_right", "kidney_left", "pancreas", "gallbladder", "stomach", "aorta",
                "inferior_vena_cava", "esophagus", "portal_splenic_vein", "adrenal_gland_right",
                "adrenal_gland_left", "urinary_bladder"]
    assert [o.name for o in ORGANS] == expected
    assert [o.label for o in ORGANS] == list(range(1, 15))
    assert len({o.color for o in ORGANS}) == len(ORGANS)
    assert BY_LABEL[1].snomed_type[1] == "10200004" and BY_LABEL[3].snomed_modifier[2] == "Right"


@pytest.mark.parametrize("convention,value,organ", [
    ("btcv", 1, "spleen"), ("btcv", 6, "liver"), ("btcv", 11, "pancreas"), ("btcv", 13, "adrenal_gland_left"),
    ("chaos", 1, "liver"), ("chaos", 4, "spleen"), ("totalseg", 5, "liver"), ("totalseg", 52, "aorta"),
    ("totalseg", 21, "urinary_bladder"), ("totalseg_mr", 23, "aorta"),
])
def test_conventions_map_to_our_labels(convention, value, organ):
    out = convert_labels(np.array([[[0, value, 99]]]), convention)
    assert out[0, 0, 0] == 0 and BY_LABEL[int(out[0, 0, 1])].name == organ and out[0, 0, 2] == 0


def test_every_convention_names_known_organs():
    for mapping in CONVENTIONS.values():
        for name in mapping.values():
            assert organ_from_name(name) is not None


@pytest.mark.parametrize("name,organ", [
    ("Liver", "liver"), ("Right kidney", "kidney_right"), ("kidney_left", "kidney_left"),
    ("portal_vein_and_splenic_vein", "portal_splenic_vein"), ("Inferior Vena Cava", "inferior_vena_cava"),
    ("right_adrenal_gland", "adrenal_gland_right"), ("Urinary bladder", "urinary_bladder"), ("spine", None),
])
def test_names_from_other_tools_match(name, organ):
    found = organ_from_name(name)
    assert (found.name if found else None) == organ


def test_unknown_convention_is_a_clear_error():
    with pytest.raises(AbdomenSegError, match="unknown label convention"):
        convert_labels(np.zeros((2, 2, 2)), "nnunet-task99")
