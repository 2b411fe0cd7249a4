"""Volumes thinner than a 3D model's window (a 60 mm MR slab, a few centimetres of CT) on the shipped models.

The window pads such a volume by repeating its edge slices (inferer.PADDING); padded with zeros instead, the
networks grew kidneys into the perirenal fat or lost them (experiments/bench_thin_slabs.py has the figures)."""

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.evaluation.metrics import evaluate
from AbdomenSegLib.inference.predictor import get_segmenter
from AbdomenSegLib.inference.segmenter import Options
from AbdomenSegLib.io.images import read_image
from AbdomenSegLib.models.packages import find_model
from AbdomenSegLib.preprocessing.datasets import find_cases, read_case
from helpers import shared

FOUR = ["liver", "spleen", "kidney_right", "kidney_left"]


def _dice(prediction, reference, convention, organs=FOUR) -> dict:
    rows = evaluate(prediction, reference, reference_convention=convention, organs=organs)
    return {r["organ"]: r["dice"] for r in rows}


def test_the_any_sequence_model_on_totalsegmentators_example_mr():
    """Issue 17's figure: a 20-slice (60 mm) T1 opposed-phase slab, a sequence the model never saw, against
    labels TotalSegmentator's MR model made (not a person). Measured fp32: liver 0.834, spleen 0.717, kidneys
    0.750 / 0.799; with zero padding 0.867, 0.679, 0.677 / 0.456 (the kidneys drawn with their perirenal fat)."""
    image = read_image(shared("totalseg_example", "example_mr_sm.nii.gz"))
    reference = sitk.ReadImage(str(shared("totalseg_example", "example_seg_mr.nii.gz")))
    segmenter = get_segmenter(find_model("mr-any-3d-unet"), "cpu", log=lambda m: None)
    dice = _dice(segmenter.segment(image, Options(precision="fp32")), reference, "totalseg_mr")
    for organ in FOUR:
        assert dice[organ] >= 0.70, (organ, dice)


def test_a_60_mm_ct_slab_through_the_kidneys_keeps_them():
    """The default CT model on a 60 mm slab centred on the kidneys of a validation case (btcv_img0034, 20 of
    its 99 slices). Measured fp32: kidneys 0.783 / 0.909 padded with edge slices, 0.078 / 0.242 with zeros."""
    card = find_model("btcv-ct-3d-unet")
    data = card["training"]["config"]["data"]
    root = shared("btcv_ct")
    paths = {name: (image, label) for name, image, label in find_cases(root)}
    if "btcv_img0034" not in paths:
        pytest.skip("needs btcv_img0034 in ../shared/data/btcv_ct")
    image, label = read_case(*paths["btcv_img0034"], data["direction"])
    kidneys = np.flatnonzero(np.isin(sitk.GetArrayViewFromImage(label), [2, 3]).any(axis=(1, 2)))  # BTCV 2, 3
    count = int(round(60 / label.GetSpacing()[2]))
    first = int(kidneys.mean()) - count // 2
    slab, reference = image[:, :, first : first + count], label[:, :, first : first + count]
    segmenter = get_segmenter(card, "cpu", log=lambda m: None)
    kidney_pair = ["kidney_right", "kidney_left"]
    options = Options(input_intensity="btcv_uint8", precision="fp32")
    edge = _dice(segmenter.segment(slab, options), reference, "btcv", kidney_pair)
    assert min(edge.values()) >= 0.75, edge
    options.padding = "constant"
    zeros = _dice(segmenter.segment(slab, options), reference, "btcv", kidney_pair)
    assert max(zeros.values()) < 0.5, zeros  # why the default is not zeros
