"""Test-time augmentation by mirroring: the mean softmax of the volume and of its mirror images.

A model sees mirrored volumes only if it was trained on them; mirroring a model trained without would feed it
anatomy it never saw (a liver on the left) and average that in. So the axes come from the card alone
(`inference.tta_mirror_axes`, written by the trainer from train.augment.flip_axes), and a card without them is
refused (`check_tta`) before any work. Every combination of those axes is run (2**k passes, the original
included); each output is mirrored back and, where the left-right axis was mirrored, its paired left/right organ
channels traded back (models/mirroring.py), then all are averaged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from AbdomenSegLib.core.progress import progress_span
from AbdomenSegLib.models.mirroring import array_axis, channel_pairs, check_tta, lateral_axis, mirror_axes


def mirrored(card, inferer) -> MirrorMean:
    """`inferer` (inferer.inferer_for) wrapped to average over the card's mirror axes."""
    check_tta(card)
    axes = mirror_axes(card)
    lateral = lateral_axis(card.get("orientation", "LPS"))
    perm = np.arange(max(int(c) for c in card["labels"]) + 1)
    for a, b in channel_pairs(card["labels"]):
        perm[a], perm[b] = b, a
    return MirrorMean(
        inner=inferer,
        axes=tuple(array_axis(a) for a in axes),
        lateral=array_axis(lateral) if lateral in axes else None,
        channels=tuple(int(c) for c in perm),
    )


@dataclass(frozen=True)
class MirrorMean:
    inner: Callable[..., np.ndarray]  # the card's plain inferer (SlidingWindow or SliceWise)
    axes: tuple  # array axes (0 = z) to mirror along
    lateral: int | None  # the array axis that runs left-right, when it is one of `axes`
    channels: tuple  # channel order of a left-right mirrored output put back: out[c] = p[channels[c]]

    def passes(self) -> list:
        """Every combination of the axes, the original (no axis) first."""
        return [c for k in range(len(self.axes) + 1) for c in itertools.combinations(self.axes, k)]

    def __call__(self, network, array, device, precision="fp32", progress=None, cancel=None) -> np.ndarray:
        passes = self.passes()
        total = None
        for index, flip in enumerate(passes):
            # the inferer reports 0.05..0.9 for its pass; pass `index` takes its share of that range
            span = (0.05 + 0.85 * index / len(passes), 0.05 + 0.85 * (index + 1) / len(passes))
            report = progress_span(progress, *span, f"mirror {index + 1}/{len(passes)}: ", inner=(0.05, 0.9))
            view = np.ascontiguousarray(np.flip(array, flip)) if flip else array
            out = self.inner(network, view, device, precision, report, cancel)
            if flip:
                out = np.flip(out, tuple(a + 1 for a in flip))  # (C, z, y, x): channel axis first
                if self.lateral in flip:
                    out = out[list(self.channels)]
            if total is None:
                total = np.array(out, dtype=np.float32, copy=True)
            else:
                total += out
        assert total is not None  # the original pass at least
        return total / np.float32(len(passes))
