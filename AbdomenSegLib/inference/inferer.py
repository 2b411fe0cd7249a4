"""The one way a network turns a model-space volume into softmax probabilities, built from the model's card.

`inferer_for(card)` reads the card's `inference` block (3D: sliding window; 2D: slice-wise batches) and
returns the inferer that `Segmenter` runs for users and that `Trainer.validate` runs on the validation cases
while training, so the figures a card records come from the very path users run. The trainer writes the
block it validated with into the card it exports (`inference_block`); defaults for cards that omit a value
live here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from AbdomenSegLib.core.options import CancelCallback, ProgressCallback
from AbdomenSegLib.core.progress import check_cancel
from AbdomenSegLib.models.footprint import DEFAULT_ROI_SIZE, WINDOW_BATCH

OVERLAP = 0.25  # sliding-window overlap of cards that give none (and of every card the trainer exports)
MODE = "gaussian"  # window blending
# How windows pad a volume shorter than themselves (a thin MR slab, a few CT slices), for cards that give none:
# by repeating its edge slices, which look like the body going on, not by zeros, which look like nothing any
# training crop held. On 60 mm slabs cut from the validation cases (experiments/bench_thin_slabs.py), mean Dice over
# (slab, organ) pairs rose from 0.41 to 0.62 (CT 3D model), 0.30 to 0.56 (MR T2-SPIR) and 0.68 to 0.73 (MR any).
PADDING = "replicate"
# WINDOW_BATCH (models/footprint.py, which counts its memory): windows per network call
SLICE_BATCH = 8  # slices per network call of a 2D model


def inference_block(dimensions: int, patch: list, mirror_axes=()) -> dict:
    """The card's `inference` block for a model trained on `patch`-sized crops: a 3D model slides a window of
    the training patch over the volume; a 2D model goes through the slices in batches. `mirror_axes`: the axes
    training mirrored along, the only ones test-time augmentation may mirror (tta.py)."""
    if dimensions == 3:
        block = {"roi_size": list(patch), "overlap": OVERLAP, "mode": MODE, "padding_mode": PADDING}
    else:
        block = {"batch_size": SLICE_BATCH}
    if mirror_axes:
        block["tta_mirror_axes"] = list(mirror_axes)
    return block


def inferer_for(card, overlap: float | None = None, tta: bool = False, padding: str | None = None):
    """The card's inferer (`card`: a ModelCard or a card dict); `overlap` and `padding` override the card's
    (3D only); `tta` averages it over the card's mirror axes (tta.py; refused for a card trained without
    mirroring)."""
    plain = _plain_inferer(card, overlap, padding)
    if tta:
        from AbdomenSegLib.inference.tta import mirrored

        return mirrored(card, plain)
    return plain


def _plain_inferer(card, overlap, padding):
    from AbdomenSegLib.models.networks import divisor

    block = card.get("inference") or {}
    if card["dimensions"] == 3:
        return SlidingWindow(
            roi=tuple(block.get("roi_size", DEFAULT_ROI_SIZE)),
            overlap=overlap if overlap is not None else block.get("overlap", OVERLAP),
            mode=block.get("mode", MODE),
            padding_mode=padding or block.get("padding_mode", PADDING),
            fit_multiple=divisor(card["architecture"]),
        )
    return SliceWise(
        in_channels=int(card.get("in_channels", 1)),
        multiple=divisor(card["architecture"]),
        batch=int(block.get("batch_size", SLICE_BATCH)),
    )


@dataclass(frozen=True)
class SlidingWindow:
    """3D models: roi-sized windows, `batch` per call, blended into one volume (sliding_window.py)."""

    roi: tuple
    overlap: float = OVERLAP
    mode: str = MODE
    batch: int = WINDOW_BATCH
    padding_mode: str = PADDING  # card_schema.PADDING_MODES
    # In-plane axes narrower than the roi get a window only as wide as the volume rounded up to this multiple
    # (the network's down-sampling), instead of the roi: less padding to compute, and the padding is what the
    # body-box crop leaves around the body anyway (air). The default CT model's validation Dice was identical to
    # 3 decimals for every organ, and a 512x512x200 CT's inference 14% faster (experiments/bench_windows.py; measured
    # with zero padding). z keeps the card's roi: models are validated with short volumes padded to a full window
    # there. Training pads a case shorter than its patch with zeros (training/recipe.py, MONAI's SpatialPadd): rare,
    # since training cases are whole scans; the edge padding above was measured on networks trained so.
    fit_multiple: int = 0

    def window_roi(self, shape) -> tuple:
        """The window for a model-space volume of `shape` (z, y, x)."""
        m = self.fit_multiple
        if not m:
            return tuple(self.roi)
        return (self.roi[0],) + tuple(min(r, m * math.ceil(n / m)) for n, r in zip(shape[1:], self.roi[1:]))

    def windows(self, shape) -> int:
        """Number of windows over a volume of `shape` (axes under the window are padded to one window)."""
        roi = self.window_roi(shape)
        return window_count([max(n, r) for n, r in zip(shape, roi)], roi, self.overlap)

    def __call__(
        self,
        network,
        array: np.ndarray,
        device: str,
        precision: str = "fp32",
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
    ) -> np.ndarray:
        """Softmax probabilities (C, z, y, x), float32 on the CPU, of the model-space `array` (z, y, x).

        No padding up to a multiple of the network's stride: every window is roi-sized already (checked when
        the card is read), and a slab of padding inside the last windows is context the network never saw in
        training (it cost MR liver Dice 0.82 -> 0.45 on a 36-slice volume padded to 48). Volumes under the roi
        are padded to one window, as MONAI does, with `padding_mode` (PADDING above says why edge slices)."""
        import torch

        from AbdomenSegLib.inference import (
            sliding_window,  # looked up per call: the tests swap in MONAI's for comparison
        )

        calls = math.ceil(self.windows(array.shape) / self.batch)
        done = [0]

        def predictor(x):
            check_cancel(cancel)
            out = network(x)
            if out.dtype == torch.bfloat16:
                out = out.float()  # windows are blended in float32
            done[0] += 1
            if progress:
                progress(0.05 + 0.85 * done[0] / calls, f"segmenting ({done[0]}/{calls})")
            return out

        x = torch.as_tensor(np.ascontiguousarray(array)[None, None], device=device)
        with torch.inference_mode(), autocast(device, precision):
            logits = sliding_window.sliding_window(
                x,
                list(self.window_roi(array.shape)),
                self.batch,
                predictor,
                overlap=self.overlap,
                mode=self.mode,
                padding_mode=self.padding_mode,
            )
            probabilities = torch.softmax(logits.float(), dim=1)[0]
        return probabilities.cpu().numpy()


@dataclass(frozen=True)
class SliceWise:
    """2D models: axial slices in batches; a 2.5D model sees `in_channels` neighbouring slices (edges
    replicated). Slices are padded to a multiple of the network's down-sampling, and the padding cut off."""

    in_channels: int
    multiple: int
    batch: int = SLICE_BATCH

    def __call__(
        self,
        network,
        array: np.ndarray,
        device: str,
        precision: str = "fp32",
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
    ) -> np.ndarray:
        """Softmax probabilities (C, z, y, x), float32 on the CPU. On the CPU the network is left in
        channels_last memory format (~1.4x faster 2D convolutions there; a Segmenter keeps it for its next
        call; the trainer puts it back before training on)."""
        import torch

        from AbdomenSegLib.preprocessing.preprocess import pad_to_multiple

        context = self.in_channels // 2
        padded, unpad = pad_to_multiple(array, [self.multiple] * 2)
        stack = np.pad(padded, ((context, context), (0, 0), (0, 0)), mode="edge")
        channels_last = _device_type(device) == "cpu"
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        slices, out = padded.shape[0], None
        with torch.inference_mode(), autocast(device, precision):
            for start in range(0, slices, self.batch):
                check_cancel(cancel)
                stop = min(start + self.batch, slices)
                x = torch.as_tensor(
                    np.stack([stack[z : z + 2 * context + 1] for z in range(start, stop)]), device=device
                )
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                probabilities = torch.softmax(network(x).float(), dim=1)
                if out is None:
                    out = np.empty((probabilities.shape[1],) + padded.shape, dtype=np.float32)
                out[:, start:stop] = probabilities.permute(1, 0, 2, 3).cpu().numpy()
                if progress:
                    progress(0.05 + 0.85 * stop / slices, f"segmenting slices {stop}/{slices}")
        assert out is not None  # the image has at least one slice
        return out[(slice(None),) + unpad]


def autocast(device: str, precision: str):
    """CUDA: float16 mixed precision; CPU: bfloat16 where `precision` says so (precision.py decides), else off."""
    import torch

    if _device_type(device) == "cuda":
        return torch.autocast(device_type="cuda")
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def window_count(shape, roi, overlap) -> int:
    """Number of windows the sliding window visits (sliding_window.window_starts: MONAI's scan rule, in one place)."""
    from AbdomenSegLib.inference.sliding_window import window_starts

    return math.prod(len(window_starts(size, r, overlap)) for size, r in zip(shape, roi))


def _device_type(device) -> str:
    """'cuda' or 'cpu' for a device given as text ("cuda:1") or a torch.device."""
    return str(device).split(":")[0]
