"""How sure the network was of each organ it found, from its own softmax probabilities.

`organ_confidence(probabilities, channel_organs)` gives one number in [0, 1] per organ present in the
argmax, meant to predict that organ's Dice: a low value means a likely poor result. It is computed on the
probabilities `Segmenter.segment` has anyway (model space, the body box), so it costs no extra inference.

The measure kept (`MEASURE`) is the mean max-probability over the organ's voxels (where argmax == organ).
Four measures (`confidence_measures`) were compared on the three shipped models' validation splits by
experiments/qc_confidence.py (full pipeline, Dice in the input grid, 116 predicted organs in 12 cases); Pearson /
Spearman against Dice, pooled over the models:
- mean_max_probability  0.831 / 0.892  (kept: best rank correlation, which is what a threshold uses)
- entropy               0.863 / 0.876  mean of 1 - H(p) / log(C) over the organ (normalised entropy)
- expected_dice         0.752 / 0.878  the self-consistency estimate 2 sum(p_c [argmax == c]) /
                                       (sum(p_c) + count(argmax == c)) over the box
- border_probability    0.607 / 0.542  mean max-probability on the organ's 1-voxel inner border shell
Entropy is as good within the noise of so few cases (and caught as many poor organs at the cards' threshold
rule), but costs a logarithm per channel and voxel; the border shell is uninformative (every border is unsure).
Per model and the thresholds derived from them: the cards' "qc" block.

Cost (2-core CPU shared with other work): ~0.25 s for 14 channels x 3.0 M voxels (a BTCV body box at 2x2x3 mm),
~0.55 s for 14 x 6.25 M in a cropped, non-contiguous view (as the 2.5D models give); 10-30 ms for the MR model
(5 x 0.6 M). One streaming pass per channel for the argmax and max, then bincounts; no copy of the input.
"""

from __future__ import annotations

import numpy as np

MEASURE = "mean_max_probability"
MEASURES = ("expected_dice", "mean_max_probability", "border_probability", "entropy")


def _argmax_and_max(probabilities: np.ndarray) -> tuple:
    """(argmax as uint8, max) over axis 0 of a (C, ...) array, channel by channel: C streaming passes are
    several times faster than np.argmax over the strided axis plus a gather, and they read a cropped
    (non-contiguous) view in place instead of copying it (the 2.5D models' probabilities are one). Ties go to
    the lower channel, as np.argmax (and so the label map) does."""
    best = np.array(probabilities[0], dtype=np.float32, order="C")
    arg = np.zeros(best.shape, dtype=np.uint8)
    wins = np.empty(best.shape, dtype=bool)
    for c in range(1, probabilities.shape[0]):
        np.greater(probabilities[c], best, out=wins)
        np.copyto(best, probabilities[c], where=wins)
        np.copyto(arg, np.uint8(c), where=wins)
    return arg, best


def _inner_border(labels: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour (inside the array) of another label."""
    border = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        ahead = [slice(None)] * labels.ndim
        behind = [slice(None)] * labels.ndim
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        differs = labels[tuple(ahead)] != labels[tuple(behind)]
        border[tuple(ahead)] |= differs
        border[tuple(behind)] |= differs
    return border


def confidence_measures(probabilities: np.ndarray, channel_organs: dict, measures=MEASURES, organs=None) -> dict:
    """{measure: {organ name: value in [0, 1]}} for every organ channel present in the argmax.

    probabilities: softmax (C, z, y, x) (or (C, ...)); channel 0 is background. channel_organs: channel ->
    organ label in our organ table (ModelCard.channel_organs). organs: organ names to keep (None: all).
    """
    from AbdomenSegLib.core.organs import BY_LABEL

    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"unknown confidence measure(s) {unknown}; known: {', '.join(MEASURES)}")
    probabilities = np.asarray(probabilities)
    channels = probabilities.shape[0]
    if channels > 255:
        raise ValueError(f"{channels} channels do not fit the uint8 argmax")
    if probabilities.dtype != np.float32:
        probabilities = probabilities.astype(np.float32)
    grid, top = _argmax_and_max(probabilities)
    arg, top = grid.ravel(), top.ravel()
    counts = np.bincount(arg, minlength=channels)
    inside = np.bincount(arg, weights=top, minlength=channels)  # sum of p_c where argmax == c
    names = {}
    for c in range(1, channels):
        organ = channel_organs.get(c)
        if counts[c] and organ in BY_LABEL:
            name = BY_LABEL[organ].name
            if organs is None or name in organs:
                names[c] = name
    out: dict[str, dict[str, float]] = {m: {} for m in measures}
    if not names:
        return out
    if "expected_dice" in measures:
        totals = [float(probabilities[c].sum(dtype=np.float64)) for c in range(channels)]
        for c, name in names.items():
            out["expected_dice"][name] = _unit(2.0 * inside[c] / (totals[c] + counts[c]))
    if "mean_max_probability" in measures:
        for c, name in names.items():
            out["mean_max_probability"][name] = _unit(inside[c] / counts[c])
    if "border_probability" in measures:
        border = _inner_border(grid).ravel()
        edge_counts = np.bincount(arg[border], minlength=channels)
        edge_sums = np.bincount(arg[border], weights=top[border], minlength=channels)
        for c, name in names.items():  # an organ with no border voxel fills the whole box: use its interior
            out["border_probability"][name] = _unit(
                edge_sums[c] / edge_counts[c] if edge_counts[c] else inside[c] / counts[c]
            )
    if "entropy" in measures:
        entropy = np.zeros(grid.shape, dtype=np.float32)
        for c in range(channels):
            p = probabilities[c]
            entropy -= p * np.log(np.maximum(p, 1e-12))
        certainty = np.bincount(arg, weights=entropy.ravel(), minlength=channels)
        for c, name in names.items():
            out["entropy"][name] = _unit(1.0 - certainty[c] / counts[c] / np.log(channels))
    return out


def organ_confidence(probabilities: np.ndarray, channel_organs: dict, organs=None) -> dict:
    """{organ name: confidence in [0, 1]} for each organ present in the argmax of `probabilities`
    (softmax, (C, z, y, x), channel 0 background); organs absent from the argmax are left out. The measure
    is `MEASURE` (see the module's docstring). organs: organ names to keep (None: all)."""
    return confidence_measures(probabilities, channel_organs, (MEASURE,), organs)[MEASURE]


def _unit(value) -> float:
    return float(min(max(float(value), 0.0), 1.0))
