"""Dataset reading: header corrections, and the anatomical check that justifies the BTCV one."""

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import BY_NAME, convert_labels
from AbdomenSegLib.io.phantom import make_phantom
from AbdomenSegLib.models.packages import RESOURCES
from AbdomenSegLib.preprocessing.datasets import (
    cache_case,
    cached_cases,
    check_direction,
    decode_image,
    encode_image,
    read_case,
    split_cases,
)
from AbdomenSegLib.training.run import read_config
from helpers import shared

FLIP_AP = [1, 0, 0, 0, -1, 0, 0, 0, 1]


def posterior_of(label: sitk.Image, convention: str, back: str, front: str) -> float:
    """How far (mm) organ `back` lies posterior of organ `front` in LPS world space (y grows posteriorly)."""
    ours = convert_labels(sitk.GetArrayFromImage(label), convention)

    def centre(organ):
        index = np.argwhere(ours == BY_NAME[organ].label).mean(0)[::-1]
        return np.array(label.TransformContinuousIndexToPhysicalPoint(index.tolist()))

    return float(centre(back)[1] - centre(front)[1])


def test_btcv_copy_is_anterior_posterior_mirrored_and_its_configs_correct_it():
    """The kidneys are retroperitoneal: posterior of the stomach and of the liver's centre in every patient.

    In the shared BTCV copy, read as its headers say, they come out anterior: the anterior-posterior axis is
    reversed (left-right and head-foot are right: the liver is on the patient's right, the pelvis below).
    Every BTCV config gives the correcting direction; CHAOS and TotalSegmentator's files need none.
    """
    image_path = shared("btcv_ct", "images", "btcv_img0001.nii.gz")
    label_path = shared("btcv_ct", "labels", "btcv_img0001.nii.gz")
    for organ in ("kidney_right", "kidney_left"):
        assert posterior_of(read_case(image_path, label_path)[1], "btcv", organ, "stomach") < -30
        assert posterior_of(read_case(image_path, label_path, FLIP_AP)[1], "btcv", organ, "stomach") > 30
    chaos = shared("chaos_mr_t2", "labels", "chaosT2_01.nii.gz")
    assert posterior_of(sitk.ReadImage(str(chaos)), "chaos", "kidney_left", "liver") > 20
    totalseg = shared("totalseg_example", "example_seg_fast_force_split.nii.gz")
    assert posterior_of(sitk.ReadImage(str(totalseg)), "totalseg", "kidney_left", "stomach") > 30
    for config in [
        *(RESOURCES / "configs").glob("btcv_*.json"),
        *(RESOURCES.parent / "experiments" / "configs").glob("btcv_*.json"),
    ]:
        data = read_config(config)  # with what it extends
        assert data["data"]["direction"] == FLIP_AP and data["model"]["orientation"] == "LAS", config.name


def test_direction_override_applies_to_image_and_label_and_is_checked(tmp_path):
    image, labels = make_phantom(size=(40, 36, 20))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    plain = read_case(tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz")
    fixed = read_case(tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz", FLIP_AP)
    for im in fixed:
        assert im.GetDirection() == tuple(float(v) for v in FLIP_AP)
        assert im.GetOrigin() == plain[0].GetOrigin() and im.GetSpacing() == plain[0].GetSpacing()
    assert np.array_equal(sitk.GetArrayFromImage(fixed[1]), sitk.GetArrayFromImage(plain[1]))  # voxels untouched
    with pytest.raises(AbdomenSegError, match="not a rotation or reflection"):
        read_case(tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz", [2, 0, 0, 0, 1, 0, 0, 0, 1])


def test_cache_in_las_of_an_ap_corrected_file_equals_lps_of_the_raw_file(tmp_path):
    """Why the shipped BTCV weights stay valid: correcting the header and declaring the model's grid LAS gives
    the very arrays the model was trained on (built from the raw headers in LPS)."""
    image, labels = make_phantom(size=(40, 36, 20))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    settings = dict(
        spacing=[8.0, 8.0, 14.0], intensity={"mode": "ct_window", "window": [-125, 275]}, convention="abdomenseg"
    )
    raw = cache_case(tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz", **settings)
    fixed = cache_case(
        tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz", orientation="LAS", direction=FLIP_AP, **settings
    )
    assert np.array_equal(raw[0], fixed[0]) and np.array_equal(raw[1], fixed[1])


def test_the_cache_encoding_round_trips_in_one_place():
    """The trainer reads cached images only through decode_image: 1/255 steps, float32, [0, 1]."""
    array = np.random.default_rng(0).random((4, 5, 6), dtype=np.float32)
    decoded = decode_image(encode_image(array))
    assert decoded.dtype == np.float32 and np.abs(decoded - array).max() <= 0.5 / 255 + 1e-7
    arrays = {
        "settings": np.array("x"),
        "image/b": encode_image(array),
        "label/b": np.ones((4, 5, 6), np.uint8),
        "image/a": encode_image(array[:1]),
        "label/a": np.zeros((1, 5, 6), np.uint8),
    }
    cases = cached_cases(arrays)
    assert list(cases) == ["a", "b"] and cases["b"][1].max() == 1


@pytest.mark.parametrize(
    "direction", [[1, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0, float("nan")], "LPS", [2, 0, 0, 0, 1, 0, 0, 0, 1]]
)
def test_a_bad_direction_override_is_refused(direction):
    with pytest.raises(AbdomenSegError, match="not a rotation or reflection"):
        check_direction(direction)


def test_cross_validation_folds_are_disjoint_cover_every_case_and_never_train_on_their_own_cases():
    names = [f"case{i:02d}" for i in range(24)]
    folds = [split_cases(names, 4, seed=0, fold={"index": k, "of": 4}) for k in range(4)]
    vals = [set(val) for _, val in folds]
    assert [len(v) for v in vals] == [6, 6, 6, 6]
    assert set().union(*vals) == set(names) and sum(map(len, vals)) == len(names)  # each case in exactly one fold
    for train, val in folds:
        assert not set(train) & set(val) and set(train) | set(val) == set(names)
    # the same seed gives the same folds; another seed deals them otherwise
    assert split_cases(names, 4, 0, {"index": 1, "of": 4}) == folds[1]
    assert split_cases(names, 4, 1, {"index": 1, "of": 4}) != folds[1]
    # 25 cases: sizes differ by at most one
    assert sorted(len(split_cases(names + ["x"], 4, 0, {"index": k, "of": 4})[1]) for k in range(4)) == [6, 6, 6, 7]
    # without a fold, val_count cases as before
    assert len(split_cases(names, 4, 0)[1]) == 4
    with pytest.raises(AbdomenSegError, match="fold 3 of 4 holds no case: the dataset has only 3"):
        split_cases(names[:3], 4, 0, {"index": 3, "of": 4})
