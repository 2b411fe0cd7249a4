"""The shipped default CT model on real data: card honesty, real-HU input, oblique input."""

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.inference import Options, get_segmenter
from AbdomenSegLib.io import read_image
from AbdomenSegLib.metrics import evaluate
from AbdomenSegLib.organs import BY_NAME
from AbdomenSegLib.phantom import rotation

from conftest import shared, validation_rows

BTCV_ORGANS = ["liver", "spleen", "kidney_right", "kidney_left", "pancreas", "gallbladder", "stomach", "aorta",
               "inferior_vena_cava", "esophagus", "portal_splenic_vein", "adrenal_gland_right", "adrenal_gland_left"]


def test_default_is_the_btcv_ct_3d_model(default_card):
    # Generic card/weights/validation checks for every package are in test_shipped_models.py.
    card = default_card
    assert card["modality"] == "CT" and card["dimensions"] == 3
    assert sorted(card["labels"].values()) == sorted(BTCV_ORGANS)
    assert card["intensity"]["window"] == [-125, 275]
    assert card["training"]["data"].endswith("btcv_ct")


def test_large_organs_are_found_on_every_validation_case(default_card):
    # Floors under the measured per-case values (README: validation table); a regression fails here.
    # (test_shipped_models checks that the card's mean Dice reproduces.)
    # Measured per case: liver 0.68-0.96, spleen 0.31 (btcv_img0009) / 0.88-0.97, kidneys 0.78-0.93, aorta 0.79-0.93,
    # pancreas 0.53-0.78.
    floors = {"liver": 0.65, "spleen": 0.28, "kidney_right": 0.75, "kidney_left": 0.75, "aorta": 0.75, "pancreas": 0.50}
    for row in validation_rows(default_card.name):
        if row["organ"] in floors:
            assert row["dice"] >= floors[row["organ"]], (row["case"], row["organ"], row["dice"])


@pytest.fixture(scope="module")
def real_hu(default_card):
    """The default model on TotalSegmentator's real-HU example CT, scored once for the tests below."""
    image = read_image(shared("totalseg_example", "example_ct.nii.gz"))
    reference = sitk.ReadImage(str(shared("totalseg_example", "example_seg_fast_force_split.nii.gz")))
    prediction = get_segmenter(default_card, "cpu", log=lambda m: None).segment(image)
    rows = {r["organ"]: r for r in evaluate(prediction, reference, reference_convention="totalseg",
                                            organs=["liver", "spleen", "kidney_right", "kidney_left"])}
    return prediction, rows


def test_real_hu_ct_gets_the_liver_in_the_right_place(real_hu):
    """TotalSegmentator's example CT is in real HU (not BTCV's window): the window path must hold."""
    prediction, rows = real_hu
    assert rows["liver"]["dice"] >= 0.8, rows["liver"]["dice"]  # measured 0.889
    labels = sitk.GetArrayViewFromImage(prediction)
    idx = np.argwhere(labels == BY_NAME["liver"].label).mean(0)[::-1]
    assert prediction.TransformContinuousIndexToPhysicalPoint(idx.tolist())[0] < 0  # LPS x < 0: patient's right


@pytest.mark.xfail(strict=True, reason="known defect of the shipped CPU-trained model: on this small-FOV 3 mm "
                   "real-HU CT it misses spleen and kidneys (Dice 0.15 / 0.00 / 0.19); strict, so a model that fixes it turns this red")
def test_real_hu_ct_gets_spleen_and_kidneys(real_hu):
    _, rows = real_hu
    for organ in ("spleen", "kidney_right", "kidney_left"):
        assert rows[organ]["dice"] >= 0.6, (organ, rows[organ]["dice"])


def test_oblique_real_ct_matches_its_reference(default_card):
    """A BTCV validation case resampled onto a 15-degree oblique, LR-flipped grid: same organs."""
    case = default_card["training"]["validation_cases"][0]
    image = read_image(shared("btcv_ct", "images", f"{case}.nii.gz"))
    labels = sitk.ReadImage(str(shared("btcv_ct", "labels", f"{case}.nii.gz")))
    direction = (rotation("z", 15) @ np.diag([-1.0, 1.0, 1.0])).ravel().tolist()
    size, spacing = image.GetSize(), image.GetSpacing()
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetDirection(direction)
    grid.SetOrigin((np.array(centre) - np.array(direction).reshape(3, 3) @ ((np.array(size) - 1) / 2 * np.array(spacing))).tolist())
    oblique = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0, image.GetPixelID())
    oblique_ref = sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    prediction = get_segmenter(default_card, "cpu", log=lambda m: None).segment(oblique, Options(input_intensity="btcv_uint8"))
    assert prediction.GetDirection() == oblique.GetDirection() and prediction.GetOrigin() == oblique.GetOrigin()
    rows = {r["organ"]: r for r in evaluate(prediction, oblique_ref, reference_convention="btcv")}
    assert rows["liver"]["dice"] >= 0.85 and rows["spleen"]["dice"] >= 0.7
