"""What running a card costs in memory, known from the card alone, before any network is built.

A card's values reach network construction and the sliding window unchecked by anything but the schema, so a
card inside every per-field bound could still ask for more memory than the engine has: `inference.roi_size`
512^3 is 134 M voxels per window, and `architecture.args.channels` [4096]*5 a UNet of about 9.5 billion
parameters (38 GB of float32), built in full before the strict weight load found it did not fit the file.
`card_footprint` gives, from the card's numbers only (no torch), the bytes of

- the weights: the parameter count, exact for the UNet (the shipped 3D class: MONAI's layout, unet3d.py), held
  twice while loading (the file's tensors and the network);
- one batch of windows: WINDOW_BATCH windows of the input and of every output channel (float32), and the
  importance map;
- the network's activations on that batch (`activation_bytes`).

The model-grid part (the accumulators the windows are blended into) depends on the input and is added by
core.limits.estimate_memory. Other architectures than the UNet are not estimated (None): their strict weight
load still refuses a card that does not match its weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Sliding-window size for 3D cards that name no inference.roi_size (inference must use this one).
DEFAULT_ROI_SIZE = (64, 96, 96)
WINDOW_BATCH = 2  # windows per network call (inference.inferer.SlidingWindow)
FLOAT_BYTES = 4
# Peak memory of the network's forward pass over the sum, level by level, of channels x voxels at that level
# (level 0 at the window's full size, each next level down-sampled by its stride) x 4 bytes x batch. Measured with
# resource.getrusage (peak RSS before and after one forward pass, CPU, fp32, torch.inference_mode) on the shipped
# 3D UNet (channels 16-256, strides 2, 2 residual units): 3.17 for one 48x160x160 window (332 MB over 105 MB),
# 2.71 for two, 2.91 for two 32x96x96 windows. 3.5 keeps a margin above the largest.
ACTIVATION_FACTOR = 3.5
# UNet arguments whose parameter count is exact here (unet3d.SUPPORTED_ARGS: MONAI's defaults otherwise).
EXACT_UNET_ARGS = {"channels", "strides", "num_res_units"}


@dataclass(frozen=True)
class Footprint:
    """Bytes a card needs whatever the input (None: not estimated for this architecture)."""

    weights: float | None  # the parameters as float32, once
    window: float  # one batch of windows in and out, and the importance map
    activations: float | None  # the network's activations on that batch

    @property
    def fixed(self) -> float:
        """Peak bytes before the model grid: the weights twice (file and network), the windows, the activations."""
        return 2 * (self.weights or 0.0) + self.window + (self.activations or 0.0)


def card_footprint(data: dict[str, Any], out_channels: int) -> Footprint | None:
    """The footprint of a 3D card's values (already judged valid field by field); None for 2D and ensemble cards."""
    if data.get("dimensions") != 3:
        return None
    arch = data["architecture"]
    roi = window_roi(data)
    in_channels = int(data.get("in_channels", 1))
    params = parameter_count(arch, in_channels, out_channels)
    return Footprint(
        weights=None if params is None else params * FLOAT_BYTES,
        window=window_bytes(roi, WINDOW_BATCH, in_channels, out_channels),
        activations=activation_bytes(arch, roi, WINDOW_BATCH),
    )


def window_roi(data: dict[str, Any]) -> tuple[int, int, int]:
    """The card's sliding window (z, y, x), or the default one."""
    block = data.get("inference") or {}
    roi = block.get("roi_size", DEFAULT_ROI_SIZE)
    return (int(roi[0]), int(roi[1]), int(roi[2]))


def window_bytes(roi: Sequence[int], batch: int, in_channels: int, out_channels: int) -> float:
    """One network call's windows in and out (float32) and the importance map they are weighted by."""
    voxels = math.prod(roi)
    return float(voxels * batch * (in_channels + out_channels) * FLOAT_BYTES + voxels * FLOAT_BYTES)


def activation_bytes(arch: dict[str, Any], roi: Sequence[int], batch: int) -> float | None:
    """The network's activations for `batch` windows of `roi` (ACTIVATION_FACTOR says how it was measured)."""
    levels = _unet_levels(arch)
    if levels is None:
        return None
    total, scale = 0.0, (1, 1, 1)
    for channels, stride in levels:
        total += channels * math.prod(max(1, r // s) for r, s in zip(roi, scale))
        scale = (scale[0] * stride[0], scale[1] * stride[1], scale[2] * stride[2])
    return total * FLOAT_BYTES * batch * ACTIVATION_FACTOR


def parameter_count(arch: dict[str, Any], in_channels: int, out_channels: int) -> int | None:
    """The network's parameter count from its card, without building it: exact for the UNet (unet3d.UNet3D, the
    same tree as MONAI's), None for the others."""
    args = arch.get("args", {})
    if arch.get("class") != "UNet" or set(args) - EXACT_UNET_ARGS:
        return None
    channels, strides = list(args["channels"]), list(args["strides"])
    return _unet_level(in_channels, out_channels, channels, strides, int(args.get("num_res_units", 0)), True)


def _unet_levels(arch: dict[str, Any]) -> list[tuple[int, tuple[int, int, int]]] | None:
    """(channels, stride to the next level) per UNet level, top first; None for other classes."""
    if arch.get("class") != "UNet":
        return None
    args = arch.get("args", {})
    strides = [_axes(s) for s in args["strides"]] + [(1, 1, 1)]
    return list(zip((int(c) for c in args["channels"]), strides))


def _axes(stride: Any) -> tuple[int, int, int]:
    if isinstance(stride, (list, tuple)):
        return (int(stride[0]), int(stride[1]), int(stride[2]))
    return (int(stride), int(stride), int(stride))


# -- the UNet's parameters, following unet3d.UNet3D's (and MONAI's) construction ----------------------------
def _conv(inc: int, outc: int, kernel: int = 27) -> int:
    return inc * outc * kernel + outc  # weights and bias (a transposed convolution has as many)


def _conv_unit(inc: int, outc: int, conv_only: bool = False) -> int:
    return _conv(inc, outc) + (0 if conv_only else 1)  # instance norm has no weights; PReLU one slope


def _residual_unit(inc: int, outc: int, strided: bool, subunits: int, last_conv_only: bool = False) -> int:
    subunits = max(1, subunits)
    count = sum(
        _conv_unit(inc if i == 0 else outc, outc, conv_only=last_conv_only and i == subunits - 1)
        for i in range(subunits)
    )
    if strided:
        count += _conv(inc, outc)
    elif inc != outc:
        count += _conv(inc, outc, kernel=1)
    return count


def _down(inc: int, outc: int, strided: bool, units: int) -> int:
    return _residual_unit(inc, outc, strided, units) if units > 0 else _conv_unit(inc, outc)


def _up(inc: int, outc: int, units: int, is_top: bool) -> int:
    if units > 0:
        return _conv_unit(inc, outc) + _residual_unit(outc, outc, False, 1, last_conv_only=is_top)
    return _conv_unit(inc, outc, conv_only=is_top)


def _unet_level(inc: int, outc: int, channels: list[int], strides: list[Any], units: int, is_top: bool) -> int:
    c = channels[0]
    strided = _axes(strides[0]) != (1, 1, 1)
    if len(channels) > 2:
        below = _unet_level(c, c, channels[1:], strides[1:], units, False)
        up_in = 2 * c
    else:
        below = _down(c, channels[1], False, units)  # the bottom layer, stride 1
        up_in = c + channels[1]
    return _down(inc, c, strided, units) + below + _up(up_in, outc, units, is_top)


def model_bytes(card: Any) -> float:
    """What a loaded model (a ModelCard) needs whatever the input: Footprint.fixed, summed over an ensemble's
    members (all of them stay loaded)."""
    members = getattr(card, "members", ())
    if members:
        return sum(model_bytes(member) for member in members)
    footprint = card_footprint(card.data, card.out_channels)
    return footprint.fixed if footprint is not None else 0.0
