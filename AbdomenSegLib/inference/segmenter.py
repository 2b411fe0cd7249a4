"""Segment a volume with a model package: device choice, the card's inferer (inferer.py), back to the input grid.

`Segmenter.segment(image)` returns a uint8 label map (our organ table) in the input's exact grid.
Long work reports through `progress(fraction, message)` and stops when `cancel()` returns True
(raising `Cancelled`), which is what the Slicer module's Cancel button uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.channels import channels_to_organs
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.options import (
    CancelCallback,
    Device,
    InputIntensity,
    LargestComponent,
    LogCallback,
    Precision,
    ProgressCallback,
)
from AbdomenSegLib.core.precision import resolve_precision
from AbdomenSegLib.core.progress import check_cancel
from AbdomenSegLib.inference import postprocess
from AbdomenSegLib.inference.confidence import organ_confidence
from AbdomenSegLib.inference.inferer import inferer_for
from AbdomenSegLib.models.card import ModelCard
from AbdomenSegLib.models.card_schema import PADDING_MODES
from AbdomenSegLib.models.extent import check_extent_for
from AbdomenSegLib.models.footprint import model_bytes
from AbdomenSegLib.models.packages import cpu_copy, load_network
from AbdomenSegLib.preprocessing.pipeline import ModelSpace, check_input, check_memory_for, to_model_space
from AbdomenSegLib.preprocessing.preprocess import bounding_box


def resolve_device(device: Device = "auto", log: LogCallback = print) -> Literal["cpu", "cuda"]:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise AbdomenSegError(f"unknown device '{device}'", "use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        log("CUDA is not available on this machine; running on the CPU instead (slower).")
        return "cpu"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class Options:
    """What a user can choose for one segmentation; the values are options.py's, shared with the CLI and panel."""

    input_intensity: InputIntensity = "native"
    organs: list | None = None  # organ names to keep; None = all the model has
    # "model": the organs the model's card names (anatomically single pieces); "all"; "none".
    largest_component: LargestComponent = "model"
    fill_holes: bool = False
    smooth_resample: bool = True  # resample probabilities (linear) back, not labels (nearest)
    overlap: float | None = None  # sliding-window overlap; None = the card's
    padding: str | None = None  # how windows pad a volume shorter than themselves; None = the card's
    precision: Precision = "auto"  # CPU: fp32, bf16 or auto (bf16 where the CPU has it and the card validated it)
    tta: bool = False  # average over the mirror axes the model was trained with (tta.py)


@dataclass
class Timings:
    stages: dict = field(default_factory=dict)
    device: str = "cpu"

    def add(self, stage, seconds):
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


@dataclass
class Prepared:
    """An input checked against a card and brought into its model space (`prepare_input`)."""

    space: ModelSpace
    input_intensity: str
    model: str  # the card's name and sha256: a preparation for another model is not used


def prepare_input(card, image: sitk.Image, input_intensity: InputIntensity = "native", check: bool = True) -> Prepared:
    """Check `image` for the model `card` (clear refusal before any long work), then resample and normalise it
    into the model's space. Needs no torch: it can run while torch is being imported. `check=False`: a crop of
    an input already checked whole (cascade.py), which need not look like a whole scan."""
    if check:
        _check_for(card, image, input_intensity)
    return Prepared(_to_model_space(card, image, input_intensity), input_intensity, _model_key(card))


def _check_for(card, image: sitk.Image, input_intensity: str) -> None:
    check_input(
        image,
        card["modality"],
        input_intensity=input_intensity,
        model_spacing=card["spacing"],
        channels=card.out_channels,
    )
    check_extent_for(card, image.GetSize(), image.GetSpacing(), image.GetDirection())  # models/extent.py
    # the model's own needs on top of the grid (models/footprint.py): its weights, window and activations
    check_memory_for(image, card["spacing"], card.out_channels, fixed_bytes=model_bytes(card))


def _to_model_space(card, image: sitk.Image, input_intensity: str):
    return to_model_space(
        image,
        card["spacing"],
        card["intensity"],
        orientation=card.get("orientation", "LPS"),
        input_intensity=input_intensity,
    )


def _model_key(card) -> str:
    """What a preparation depends on: the weights' model and the card's grid and intensity (a card edited in place
    keeps its name and sha256)."""
    import json

    grid = [card.get("spacing"), card.get("intensity"), card.get("orientation", "LPS")]
    return f"{card.get('name', '')}:{card.get('sha256', '')}:{json.dumps(grid, sort_keys=True)}"


def _prepared_for(prepared: Prepared | None, card, options) -> bool:
    return prepared is not None and (prepared.input_intensity, prepared.model) == (
        options.input_intensity,
        _model_key(card),
    )


class Segmenter:
    def __init__(self, card: ModelCard, device: str = "cpu", log: LogCallback = print):
        # The card was validated when read (card_schema): dimensions, roi_size against the stride, overlap.
        self.card, self.device, self.log = card, device, log
        self.network = load_network(card, device)
        self.timings = Timings(device=device)
        self.last_confidence: dict[str, float] = {}  # {organ: confidence} of the last segment() (confidence.py)
        self.precision = "fp32"  # of the last segment() (precision.py)

    # -- public -------------------------------------------------------------------------------
    def segment(
        self,
        image: sitk.Image,
        options: Options | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
        prepared: Prepared | None = None,
    ) -> sitk.Image:
        """`prepared`: this image's `prepare_input` for this card, done ahead (read_ahead.py overlaps it with
        torch's import); made here when absent or made for another input intensity."""
        options = options or Options()
        progress = progress or (lambda fraction, message: None)
        self.timings = Timings(device=self.device)
        probabilities, space = self.model_space_probabilities(image, options, progress, cancel, prepared)
        return self.labels_from(probabilities, space, image, options, progress)

    def check(self, image: sitk.Image, options: Options, prepared: Prepared | None = None) -> None:
        """What must fail before any work: the options, and the input for this model."""
        card = self.card
        self.precision = resolve_precision(options.precision, self.device, card)
        if options.organs is not None and not list(options.organs):
            raise AbdomenSegError("no organ is selected", "select at least one organ to segment")
        if options.padding is not None and options.padding not in PADDING_MODES:
            raise AbdomenSegError(
                f"window padding '{options.padding}' is unknown", f"use one of: {', '.join(PADDING_MODES)}"
            )
        if options.tta:
            from AbdomenSegLib.models.mirroring import check_tta

            check_tta(card)
        if not _prepared_for(prepared, card, options):  # else prepare_input checked it already
            _check_for(card, image, options.input_intensity)

    def model_space_probabilities(self, image, options, progress, cancel, prepared: Prepared | None = None) -> tuple:
        """(softmax probabilities (C, z, y, x) of the body box, the ModelSpace) of `image` in this model's grid;
        an ensemble (ensemble.py) averages its members' before `labels_from`."""
        card = self.card
        t = time.perf_counter()
        self.check(image, options, prepared)
        progress(0.02, "preprocessing")
        if _prepared_for(prepared, card, options):
            assert prepared is not None  # _prepared_for checked it
            space = prepared.space
        else:
            space = _to_model_space(card, image, options.input_intensity)
        self.timings.add("preprocess", time.perf_counter() - t)
        check_cancel(cancel)

        t = time.perf_counter()
        probabilities = self._infer(space.array[space.box], options, progress, cancel)
        self.timings.add("infer", time.perf_counter() - t)
        return probabilities, space

    def labels_from(self, probabilities, space, image, options, progress) -> sitk.Image:
        """The label image in `image`'s grid from model-space `probabilities` of `space`'s body box, post-processed."""
        t = time.perf_counter()
        self.last_confidence = organ_confidence(probabilities, self.card.channel_organs, options.organs)
        progress(0.9, "resampling to the input grid")
        labels = self._to_input_grid(probabilities, space, image, options.smooth_resample)
        self.timings.add("resample_back", time.perf_counter() - t)
        t = time.perf_counter()
        labels = self._finish_labels(labels, options, float(np.prod(image.GetSpacing())) / 1000.0)
        self.timings.add("postprocess", time.perf_counter() - t)
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(image)
        progress(1.0, "done")
        return out

    # -- steps --------------------------------------------------------------------------------
    def _infer(self, array, options, progress, cancel):
        """Softmax probabilities (C, z, y, x) for the cropped model-space array, by the card's inferer.

        A CUDA out-of-memory error finishes this call on the CPU with a CPU copy of the weights; the network
        stays on its device, so the next call (and the cache entry keyed by that device) is on the GPU again."""
        import torch

        inferer = inferer_for(self.card, overlap=options.overlap, tta=options.tta, padding=options.padding)
        try:
            return inferer(self.network, array, self.device, self.precision, progress, cancel)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            self.log(
                "The GPU ran out of memory for this volume; finishing it on the CPU instead "
                "(slower). Close other GPU programs or use a smaller model to stay on the GPU."
            )
            self.timings.device = "cpu"
            return inferer(cpu_copy(self.card, self.network), array, "cpu", self.precision, progress, cancel)

    def _to_input_grid(self, probabilities, space, reference, smooth):
        """Organ labels in `reference`'s grid from model-space probabilities of the cropped box.

        smooth: resample_back.py interpolates only the voxels whose model-grid cell can change the
        argmax, with the same result as `_smooth_back` (per-organ-box linear resampling), which
        `self.resample_back = "boxes"` selects instead (Testing/test_inference_resample_back.py compares them)."""
        if smooth and getattr(self, "resample_back", "cells") == "cells":
            from AbdomenSegLib.inference.resample_back import labels_on_input_grid

            return labels_on_input_grid(
                probabilities,
                space.box,
                space.image,
                reference,
                lut=self._channels_to_organs(np.arange(256, dtype=np.uint8)),
            )
        channels = probabilities.shape[0]
        full = np.zeros((channels,) + space.array.shape, dtype=np.float32)
        full[0] = 1.0  # outside the body box: background
        full[(slice(None),) + space.box] = probabilities
        argmax = full.argmax(0).astype(np.uint8)
        if not smooth:
            labels = sitk.GetImageFromArray(argmax)
            labels.CopyInformation(space.image)
            from AbdomenSegLib.preprocessing.preprocess import resample_to_reference

            ch = sitk.GetArrayFromImage(resample_to_reference(labels, reference, is_label=True))
            return self._channels_to_organs(ch)
        return self._smooth_back(full, argmax, space.image, reference)

    def _smooth_back(self, full, argmax, model_image, reference):
        """Linear resampling of each channel's probability, only inside that organ's box.

        Resampling all channels over the whole input grid would cost C full-size float volumes;
        organs occupy small boxes, so each is resampled where it can win the argmax.
        """
        size = reference.GetSize()[::-1]
        labels = np.zeros(size, dtype=np.uint8)
        present = [c for c in range(1, full.shape[0]) if (argmax == c).any()]
        if not present:
            return labels
        boxes = {c: bounding_box(argmax == c, margin=2) for c in present}
        union = bounding_box(argmax > 0, margin=2)
        best = np.ones(size, dtype=np.float32)
        box, region = self._resample_box(full[0], union, model_image, reference, default=1.0)
        if region is not None:
            best[region] = box
        for c in present:
            box, region = self._resample_box(full[c], boxes[c], model_image, reference, default=0.0)
            if region is None:
                continue
            wins = box > best[region]
            best[region][wins] = box[wins]
            labels[region][wins] = c
        return self._channels_to_organs(labels)

    @staticmethod
    def _resample_box(channel, box, model_image, reference, default):
        """Resample channel[box] onto the part of `reference` that box covers."""
        start = [s.start for s in box][::-1]  # x, y, z
        stop = [s.stop - 1 for s in box][::-1]
        sub = sitk.GetImageFromArray(np.ascontiguousarray(channel[box]))
        sub.SetSpacing(model_image.GetSpacing())
        sub.SetDirection(model_image.GetDirection())
        sub.SetOrigin(model_image.TransformIndexToPhysicalPoint([int(v) for v in start]))
        # The box's corners in the reference's continuous index space give the region to fill.
        corners = []
        for cx in (start[0] - 0.5, stop[0] + 0.5):
            for cy in (start[1] - 0.5, stop[1] + 0.5):
                for cz in (start[2] - 0.5, stop[2] + 0.5):
                    point = model_image.TransformContinuousIndexToPhysicalPoint((cx, cy, cz))
                    corners.append(reference.TransformPhysicalPointToContinuousIndex(point))
        corners = np.array(corners)
        size = reference.GetSize()
        low = np.maximum(np.floor(corners.min(0)).astype(int), 0)
        high = np.minimum(np.ceil(corners.max(0)).astype(int) + 1, size)
        if np.any(high <= low):
            return None, None
        target = sitk.Image([int(v) for v in high - low], sitk.sitkFloat32)
        target.SetSpacing(reference.GetSpacing())
        target.SetDirection(reference.GetDirection())
        target.SetOrigin(reference.TransformIndexToPhysicalPoint([int(v) for v in low]))
        out = sitk.Resample(sub, target, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
        region = tuple(slice(int(lo), int(hi)) for lo, hi in zip(low[::-1], high[::-1]))
        return sitk.GetArrayFromImage(out), region

    def _channels_to_organs(self, channels: np.ndarray) -> np.ndarray:
        return channels_to_organs(self.card["labels"])[channels]

    def largest_component_organs(self, choice) -> list:
        """Organ labels that keep only their largest piece under `choice` (model, all, none; or a bool)."""
        from AbdomenSegLib.core.organs import BY_NAME

        choice = {True: "all", False: "none"}.get(choice, choice)
        if choice not in ("model", "all", "none"):
            raise AbdomenSegError(f"unknown largest-component choice '{choice}'", "use model, all or none")
        if choice == "none":
            return []
        names = list(self.card["labels"].values())
        if choice == "model":
            names = self.card.get("postprocess", {}).get("largest_component", [])
        return [BY_NAME[n].label for n in names]

    def _finish_labels(self, labels, options, voxel_ml=None):
        if options.organs:
            from AbdomenSegLib.core.organs import BY_NAME

            unknown = [o for o in options.organs if o not in BY_NAME]
            if unknown:
                raise AbdomenSegError(f"unknown organ(s) {unknown}", f"use names from: {', '.join(BY_NAME)}")
            keep = np.zeros(256, dtype=bool)
            keep[[BY_NAME[o].label for o in options.organs]] = True
            labels[~keep[labels]] = 0
        organs = self.largest_component_organs(options.largest_component)
        if organs:
            postprocess.keep_largest_component(labels, organs)
        post = self.card.get("postprocess", {})
        island_ml = float(post.get("remove_islands_ml", 0) or 0)
        if voxel_ml and island_ml > 0 and options.largest_component != "none":  # "none": the network's labels
            from AbdomenSegLib.core.organs import BY_NAME

            kept = set(post.get("keep_islands", []))
            islands = [
                BY_NAME[n].label
                for n in self.card["labels"].values()
                if BY_NAME[n].label not in organs and n not in kept
            ]
            postprocess.remove_small_islands(labels, voxel_ml, island_ml, islands)
        if options.fill_holes:
            postprocess.fill_holes(labels)
        return labels
