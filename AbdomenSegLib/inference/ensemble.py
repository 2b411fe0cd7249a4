"""Running an ensemble (ensemble_card.py): each member's probabilities, averaged in the finest member's grid.

Each member goes through its own card's pipeline (preprocessing, inferer, test-time mirroring if asked) to
softmax probabilities in its own model space. The average is taken in the model space of the finest member
(smallest voxel): the others' probabilities are resampled into that grid (linear), channel by channel matched by
organ name; outside a member's body box it answers background, as a single model's resampling back assumes.
The finest member then resamples the average to the input grid and post-processes it exactly as it would its own
probabilities, so an ensemble of one model gives that model's labels.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.options import LogCallback
from AbdomenSegLib.core.progress import check_cancel, progress_span
from AbdomenSegLib.inference.segmenter import Segmenter, Timings
from AbdomenSegLib.models.card import finest


class EnsembleSegmenter(Segmenter):
    """inference.Segmenter's `segment(image, options, progress, cancel)` for an ensemble card: its two steps
    (model-space probabilities, then labels in the input grid) run by the members."""

    def __init__(self, card, members: list, log: LogCallback = print):
        """`members`: the loaded segmenters of `card.members`, in order (predictor.get_segmenter); no network of
        its own."""
        device = members[0].device
        self.card, self.device, self.log = card, device, log
        self.members = list(members)
        self.finest = self.members[finest(card.members)]
        self.timings = Timings(device=device)
        self.last_confidence = {}
        self.precision = "fp32"

    def largest_component_organs(self, choice) -> list:
        return self.finest.largest_component_organs(choice)

    def check(self, image, options, prepared=None) -> None:
        for member in self.members:  # every member's refusal before any member's work
            member.check(image, options)

    def model_space_probabilities(self, image, options, progress, cancel, prepared=None) -> tuple:
        """The members' mean probabilities in the finest member's body box, and its ModelSpace (`prepared` is
        ignored: each member prepares the image for its own grid)."""
        self.check(image, options)
        total, grid = None, None
        count = len(self.members)
        order = [self.finest] + [m for m in self.members if m is not self.finest]
        for index, member in enumerate(order):
            member.timings = Timings(device=member.device)
            # member `index` reports in its share of 0..0.9 (the finest member finishes 0.9..1)
            span = (0.9 * index / count, 0.9 * (index + 1) / count)
            report = progress_span(progress, *span, f"{member.card.name} ({index + 1}/{count}): ", inner=(0.0, 0.9))
            probabilities, space = member.model_space_probabilities(image, options, report, cancel)
            if grid is None:
                grid = space  # the finest member's, first
                total = probabilities.astype(np.float32, copy=True)
            else:
                total += on_grid(probabilities, space, member.card["labels"], grid, self.finest.card["labels"])
            del probabilities
            for stage, seconds in member.timings.stages.items():
                self.timings.add(stage, seconds)
            check_cancel(cancel)
        assert total is not None  # a card has at least one member
        total /= np.float32(count)
        self.precision = self.finest.precision
        return total, grid

    def labels_from(self, probabilities, space, image, options, progress) -> sitk.Image:
        """The finest member's resampling back and post-processing, as for its own probabilities."""
        self.finest.timings = Timings(device=self.finest.device)
        labels = self.finest.labels_from(probabilities, space, image, options, progress)
        self.last_confidence = self.finest.last_confidence
        for stage in ("resample_back", "postprocess"):
            self.timings.add(stage, self.finest.timings.stages.get(stage, 0.0))
        return labels


def on_grid(probabilities, space, labels, target, target_labels) -> np.ndarray:
    """A member's probabilities of `space`'s body box, resampled (linear) onto the body box of `target` (the
    finest member's ModelSpace) in the channel order of `target_labels` (matched by organ name)."""
    shape = tuple(s.stop - s.start for s in target.box)
    reference = _box_image(target, shape)
    channel_of = {organ: int(channel) for channel, organ in labels.items()}
    out = np.empty((len(target_labels) + 1,) + shape, dtype=np.float32)
    sources = [(0, 0)] + [(int(c), channel_of[organ]) for c, organ in target_labels.items()]
    for to, frm in sources:
        source = _box_image(space, probabilities.shape[1:], np.ascontiguousarray(probabilities[frm]))
        default = 1.0 if frm == 0 else 0.0  # outside the member's body box: background, as it would be answered
        resampled = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
        out[to] = sitk.GetArrayFromImage(resampled)
    return out


def _box_image(space, shape, array=None) -> sitk.Image:
    """An image on the grid of `space`'s body box (the array's voxels, or zeros of `shape`)."""
    image = (
        sitk.GetImageFromArray(array)
        if array is not None
        else sitk.Image([int(n) for n in shape[::-1]], sitk.sitkFloat32)
    )
    start = [int(s.start) for s in space.box][::-1]  # x, y, z
    image.SetSpacing(space.image.GetSpacing())
    image.SetDirection(space.image.GetDirection())
    image.SetOrigin(space.image.TransformIndexToPhysicalPoint(start))
    return image
