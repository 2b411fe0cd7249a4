"""Per-organ confidence from the network's probabilities (confidence.py), the Segmenter's hook, and the qc block
the shipped cards carry (experiments/qc_confidence.py)."""

import importlib.util
import json
import time

import numpy as np
import pytest
from scipy import ndimage

from AbdomenSegLib.inference.confidence import MEASURE, MEASURES, confidence_measures, organ_confidence
from AbdomenSegLib.inference.segmenter import Options, Segmenter
from AbdomenSegLib.io.phantom import make_phantom
from AbdomenSegLib.models.packages import find_model
from helpers import ROOT, shared

SHIPPED = ("btcv-ct-3d-unet", "btcv-ct-2d-unet-r18", "chaos-mr-t2-3d-unet")
IDENTITY = {1: 1, 2: 2, 3: 3}  # channel -> organ label: liver, spleen, kidney_right


def one_hot(labels: np.ndarray, channels: int) -> np.ndarray:
    return (np.arange(channels)[:, None, None, None] == labels[None]).astype(np.float32)


def two_organs() -> np.ndarray:
    """Background, a liver block (channel 1) and a spleen block (channel 2) in a 20x24x24 box."""
    labels = np.zeros((20, 24, 24), dtype=np.uint8)
    labels[4:16, 3:11, 3:11] = 1
    labels[4:16, 13:21, 13:21] = 2
    return labels


def blurred(probabilities: np.ndarray, channel: int, sigma: float) -> np.ndarray:
    """`channel`'s probability smoothed and the rest renormalised: an organ the network is unsure of."""
    out = probabilities.copy()
    out[channel] = ndimage.gaussian_filter(out[channel], sigma) * 0.8
    others = [c for c in range(out.shape[0]) if c != channel]
    rest = out[others].sum(0)
    out[0] += np.where(rest > 0, 0.0, 1.0)  # where the organ was sure, what it gives up goes to background
    out[others] *= (1 - out[channel]) / np.maximum(out[others].sum(0), 1e-6)
    return out


def test_perfectly_confident_one_hot_is_one():
    p = one_hot(two_organs(), 4)
    for measure, values in confidence_measures(p, IDENTITY).items():
        assert values == {"liver": 1.0, "spleen": 1.0}, measure
    assert organ_confidence(p, IDENTITY) == {"liver": 1.0, "spleen": 1.0}


def test_ambiguous_organ_scores_lower_and_the_sure_one_does_not():
    p = blurred(one_hot(two_organs(), 4), 1, sigma=1.5)
    assert np.allclose(p.sum(0), 1.0, atol=1e-5)
    for measure, values in confidence_measures(p, IDENTITY).items():
        assert 0.0 <= values["liver"] < 0.95, (measure, values)
        assert values["spleen"] > values["liver"], (measure, values)
    # More blur, less confidence.
    assert (
        organ_confidence(blurred(one_hot(two_organs(), 4), 1, sigma=3.0), IDENTITY)["liver"]
        < organ_confidence(p, IDENTITY)["liver"]
    )


def test_measures_match_their_formulas():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6, 7, 8)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    arg = p.argmax(0)
    values = confidence_measures(p, IDENTITY)
    assert organ_confidence(p, IDENTITY) == values[MEASURE]
    for channel, name in ((1, "liver"), (2, "spleen"), (3, "kidney_right")):
        inside = arg == channel
        assert values["mean_max_probability"][name] == pytest.approx(p.max(0)[inside].mean(), rel=1e-5)
        expected = 2 * p[channel][inside].sum() / (p[channel].sum() + inside.sum())
        assert values["expected_dice"][name] == pytest.approx(expected, rel=1e-5)
        entropy = -(p * np.log(p)).sum(0)[inside].mean() / np.log(4)
        assert values["entropy"][name] == pytest.approx(1 - entropy, rel=1e-4)
    # A cropped, non-contiguous view (as the 2.5D models return) gives the same as its copy.
    view = p[:, 1:5, 1:6, 2:7]
    assert confidence_measures(view, IDENTITY) == confidence_measures(np.ascontiguousarray(view), IDENTITY)


def test_absent_organs_are_left_out_and_values_in_unit_range():
    labels = two_organs()
    p = blurred(one_hot(labels, 4), 2, sigma=2.0)
    p[3] += 0.01  # some probability for kidney_right, never the argmax
    p /= p.sum(0, keepdims=True)
    for measure, values in confidence_measures(p, IDENTITY).items():
        assert set(values) == {"liver", "spleen"}, measure
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert organ_confidence(one_hot(np.zeros((4, 4, 4), np.uint8), 4), IDENTITY) == {}


def test_channel_to_organ_mapping_is_respected():
    p = blurred(one_hot(two_organs(), 3), 2, sigma=2.0)
    # Channel 1 is the gallbladder (6), channel 2 the liver (1), as a card's labels can order them.
    values = organ_confidence(p, {1: 6, 2: 1})
    assert set(values) == {"gallbladder", "liver"}
    assert values["gallbladder"] > 0.999 and values["gallbladder"] > values["liver"] + 0.1
    assert organ_confidence(p, {1: 6, 2: 1}, organs=["liver"]) == {"liver": values["liver"]}


def test_ties_go_to_the_lower_channel_as_the_label_map():
    p = np.full((3, 2, 2, 2), 1 / 3, dtype=np.float32)
    assert organ_confidence(p, {1: 1, 2: 2}) == {}  # background wins every tie, as argmax does


def test_cost_for_a_full_abdomen_box():
    """14 channels x 3 M voxels (a BTCV body box at 2x2x3 mm): ~0.15-0.3 s on this project's 2-core CPU; the
    bound only catches a regression to something many times slower."""
    rng = np.random.default_rng(0)
    p = rng.random((14, 96, 176, 176), dtype=np.float32)
    p[0] += 0.3  # background wins most voxels, every organ some
    p /= p.sum(0, keepdims=True)
    organ_confidence(p, {c: c for c in range(1, 14)})
    start = time.perf_counter()
    values = organ_confidence(p, {c: c for c in range(1, 14)})
    seconds = time.perf_counter() - start
    assert len(values) == 13
    assert seconds < 2.0, f"organ_confidence took {seconds:.2f} s for 14 x 3 M voxels"


def test_segmenter_sets_last_confidence(tiny_package):
    import SimpleITK as sitk

    segmenter = Segmenter(tiny_package, "cpu", log=lambda m: None)
    assert segmenter.last_confidence == {}
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    labels = segmenter.segment(ct)
    confidence = segmenter.last_confidence
    assert confidence and set(confidence) <= set(tiny_package["labels"].values())
    assert all(0.0 <= v <= 1.0 for v in confidence.values())
    # Every organ in the result won the argmax somewhere, so it has a confidence.
    from AbdomenSegLib.core.organs import BY_LABEL

    present = {BY_LABEL[int(v)].name for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v}
    assert present <= set(confidence)
    kept = next(iter(confidence))
    segmenter.segment(ct, Options(organs=[kept]))
    assert segmenter.last_confidence == {kept: confidence[kept]}  # only the organs the user kept


# -- the shipped cards' qc block --------------------------------------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location("qc_confidence", ROOT / "experiments" / "qc_confidence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_cards_carry_the_confidence_qc(name):
    qc = find_model(name)["qc"]["confidence"]
    assert qc["measure"] == MEASURE and qc["measure"] in MEASURES
    assert 0.0 < qc["low_below"] < 1.0
    validation = qc["validation"]
    assert set(validation) == {"pearson", "spearman", "points"}
    assert validation["points"] >= 4 * 3  # 4 validation cases, several organs each
    assert -1.0 <= validation["pearson"] <= 1.0 and -1.0 <= validation["spearman"] <= 1.0


def test_default_card_qc_is_what_bench_computes(default_card):
    """Light check on real data: one validation case of the default model through the bench's own collection
    (the card's validation protocol); every organ there with a good Dice sits at or above low_below, as the rule
    that chose it requires. Where the bench's cached points exist for these weights, they must agree with this
    run and reproduce the card's correlations and threshold exactly."""
    bench = _bench()
    shared(bench.data_root(default_card).name)
    qc = default_card["qc"]["confidence"]
    case = sorted(default_card["training"]["validation_cases"])[0]
    points, records = bench.collect(default_card, cases=[case], log=lambda m: None)
    assert points and all(p["case"] == case for p in points)
    assert records[0]["last_confidence"] == records[0]["measures"][MEASURE]
    for p in points:
        if p["dice"] >= bench.GOOD_DICE:
            assert p[MEASURE] >= qc["low_below"], p
    if not bench.CACHE.is_file():
        return
    cached = json.loads(bench.CACHE.read_text())["models"].get(default_card.name)
    if not cached or cached["sha256"] != default_card["sha256"]:
        return
    mine = {(p["case"], p["organ"]): p for p in cached["points"] if p["case"] == case}
    assert set(mine) == {(p["case"], p["organ"]) for p in points}
    for p in points:
        assert p["dice"] == pytest.approx(mine[(p["case"], p["organ"])]["dice"], abs=2e-3)
        if p[MEASURE] is not None:
            assert p[MEASURE] == pytest.approx(mine[(p["case"], p["organ"])][MEASURE], abs=2e-3)
    block = bench.qc_block(cached["points"], MEASURE)
    assert block == qc
