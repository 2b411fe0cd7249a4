"""A two-stage run (nnU-Net's cascade idea, applied to a region): the first model segments the whole scan, a
fine second model (cascade_card.py) re-segments the box around the small organs it found.

The box is the first stage's region organs plus the card's margin, in the input's grid (preprocessing/region.py); the input
is cropped to it with its geometry exact, and the second model runs on the crop through the same predictor as
any model (inference.Segmenter: its preprocessing, sliding window and resampling back to the crop's grid).
Inside the box the region organs the card's `take` names (default: all of them) take the second stage's labels:
a voxel the first stage called such an organ and the second does not becomes background, another organ's voxel
keeps its first-stage label unless the second stage calls it such an organ. Outside the box nothing changes, and
the output is in the input's grid.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.options import LogCallback
from AbdomenSegLib.core.precision import resolve_precision
from AbdomenSegLib.core.progress import check_cancel, progress_span
from AbdomenSegLib.inference.segmenter import Options, Segmenter, Timings, prepare_input
from AbdomenSegLib.preprocessing.region import Box, crop, organ_values, region_box

FIRST_SHARE = 0.5  # of the progress bar; the second stage runs on a crop, the region step is quick


class CascadeSegmenter:
    """inference.Segmenter's `segment(image, options, progress, cancel, prepared)` for a first stage and its
    fine second stage. `card` is the first stage's: it names the organs of the output."""

    def __init__(self, first, second_card, log: LogCallback = print):
        """`first`: the first stage's loaded segmenter (predictor.get_segmenter); the second runs on its device."""
        self.first = first
        self.second = Segmenter(second_card, self.first.device, log=log)  # the plain model: only on crops
        self.card, self.device, self.log = self.first.card, self.first.device, log
        self.region = second_card["cascade"]
        self.timings = Timings(device=self.device)
        self.last_confidence: dict[str, float] = {}
        self.precision = "fp32"
        self.last_box: Box | None = None  # region.Box of the last segment(); None when the second stage was skipped
        # The region organs whose labels the second stage gives (cascade.take; default all of them): the others
        # define the box but keep the first stage's labels, where the second stage measured worse.
        self.taken = list(self.region.get("take") or self.region["organs"])

    def largest_component_organs(self, choice) -> list:
        return self.first.largest_component_organs(choice)

    def check(self, image, options, prepared=None) -> None:
        """Both stages' refusals before any work (the second runs on a crop of this image, checked whole)."""
        self.first.check(image, options, prepared)
        resolve_precision(options.precision, self.device, self.second.card)
        if options.tta:
            from AbdomenSegLib.models.mirroring import check_tta

            check_tta(self.second.card)

    def segment(self, image: sitk.Image, options: Options | None = None, progress=None, cancel=None, prepared=None):
        options = options or Options()
        progress = progress or (lambda fraction, message: None)
        self.check(image, options, prepared)
        self.timings = Timings(device=self.device)
        whole = replace(options, organs=None)  # the user's organ choice applies to the merged result
        first = self.first.segment(image, whole, progress_span(progress, 0.0, FIRST_SHARE), cancel, prepared)
        self._add_timings(self.first, "")
        self.last_confidence, self.precision = dict(self.first.last_confidence), self.first.precision
        labels = sitk.GetArrayFromImage(first)
        t = time.perf_counter()
        self.last_box = region_box(first, self.region["organs"], self.region["margin_mm"])
        self.timings.add("region", time.perf_counter() - t)
        if self.last_box is None:
            self.log(
                f"note: the first stage found none of {', '.join(self.region['organs'])}; the fine second stage "
                f"'{self.second.card.name}' was skipped"
            )
        else:
            check_cancel(cancel)
            share = progress_span(progress, FIRST_SHARE, 0.98, f"fine stage {self.second.card.name}: ")
            fine = segment_crop(self.second, crop(image, self.last_box), whole, share, cancel)
            self._add_timings(self.second, "fine_")
            t = time.perf_counter()
            merge(labels, sitk.GetArrayViewFromImage(fine), self.last_box, self.taken)
            self.timings.add("region", time.perf_counter() - t)
            fine_confidence = self.second.last_confidence
            for organ in self.taken:
                self.last_confidence.pop(organ, None)
                if organ in fine_confidence:
                    self.last_confidence[organ] = fine_confidence[organ]
        labels = self.first._finish_labels(labels, Options(organs=options.organs, largest_component="none"))
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(image)
        progress(1.0, "done")
        return out

    def _add_timings(self, stage, prefix):
        for name, seconds in stage.timings.stages.items():
            self.timings.add(prefix + name, seconds)


def made_by(segmenter) -> tuple:
    """(name, sha256) of what a segmenter's labels come from: a two-stage run names both models ("first>fine"),
    so its records are not taken for the first model's alone."""
    cards = [segmenter.card, segmenter.second.card] if isinstance(segmenter, CascadeSegmenter) else [segmenter.card]
    return ">".join(c.name for c in cards), ">".join(c.get("sha256", "") for c in cards)


def segment_crop(segmenter, image: sitk.Image, options: Options, progress=None, cancel=None) -> sitk.Image:
    """A single model's labels on a crop of an input that was checked whole (a crop need not look like a whole
    scan: it may hold no air, or be narrow), in the crop's grid."""
    from AbdomenSegLib.models.footprint import model_bytes
    from AbdomenSegLib.preprocessing.pipeline import check_memory_for

    card = segmenter.card  # the crop need not look like a scan, but it must fit in memory at this card's spacing
    check_memory_for(image, card["spacing"], card.out_channels, "the small organs' region", model_bytes(card))
    prepared = prepare_input(card, image, options.input_intensity, check=False)
    return segmenter.segment(image, options, progress, cancel, prepared=prepared)


def merge(labels: np.ndarray, fine: np.ndarray, box, organs) -> None:
    """In place: inside `box` of `labels` (the first stage, input grid), the region `organs` take the labels of
    `fine` (the second stage on the box's crop); elsewhere nothing changes."""
    values = organ_values(organs)
    inside = labels[box.slices]
    inside[np.isin(inside, values)] = 0
    wins = np.isin(fine, values)
    inside[wins] = fine[wins]
