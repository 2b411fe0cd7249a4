"""A pure-torch 3D UNet for inference, interchangeable with MONAI's `UNet` for the models we ship.

`import monai` loads every MONAI subpackage (torchvision, torch._dynamo, monai.apps, monai.data, ...), about
3 s of a 10 s segmentation. Inference only needs the network's forward pass, so this module rebuilds MONAI's
`monai.networks.nets.UNet(spatial_dims=3, ..., kernel_size=3, up_kernel_size=3, act=PRELU, norm=INSTANCE,
dropout=0.0, bias=True, adn_ordering="NDA")` from plain torch layers, with the same module tree and therefore
the same `state_dict()` keys and shapes: a package's .safetensors loads into either strictly, and the outputs
agree to float rounding (Testing/test_inference_fast.py checks both against MONAI on the shipped weights).

Written from a reading of MONAI 1.x (Apache-2.0): monai/networks/nets/unet.py (the recursive layout),
monai/networks/blocks/convolutions.py (Convolution, ResidualUnit), monai/networks/blocks/acti_norm.py (ADN)
and monai/networks/layers/simplelayers.py (SkipConnection). Training keeps using MONAI's own classes
(networks.build_network); anything beyond the arguments in `SUPPORTED_ARGS` is built by MONAI too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Union, cast

import torch
from torch import nn

# UNet arguments this class reproduces; a card with any other argument is built by MONAI (networks.py).
SUPPORTED_ARGS = {"channels", "strides", "num_res_units"}

Stride = Union[int, Sequence[int]]  # one stride for every axis, or one per axis (z, y, x)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def supports(args: dict[str, Any]) -> bool:
    """True when `args` (a card's UNet args) describe a network this module builds exactly like MONAI."""
    if set(args) - SUPPORTED_ARGS:
        return False
    channels, strides = args.get("channels"), args.get("strides")
    units = args.get("num_res_units", 0)
    return (
        isinstance(channels, (list, tuple))
        and len(channels) >= 2
        and all(map(_positive_int, channels))
        # MONAI ignores (with a warning) strides beyond len(channels) - 1; leave that case to MONAI.
        and isinstance(strides, (list, tuple))
        and len(strides) == len(channels) - 1
        # One stride per level, or one per axis (z, y, x) for anisotropic down-sampling.
        and all(
            _positive_int(s) or (isinstance(s, (list, tuple)) and len(s) == 3 and all(map(_positive_int, s)))
            for s in strides
        )
        and isinstance(units, int)
        and not isinstance(units, bool)
        and units >= 0
    )


def _axes(stride: Stride) -> tuple[int, int, int]:
    axes = tuple(stride) if isinstance(stride, (list, tuple)) else (stride,) * 3
    return cast("tuple[int, int, int]", axes)  # supports() lets only three per-axis strides through


class ConvUnit(nn.Sequential):
    """MONAI's `Convolution`: a 3x3x3 (transposed) convolution, then `adn` = InstanceNorm, PReLU.

    Dropout (MONAI's "D", p=0.0) is left out: it holds no weights and does nothing at p=0. The transposed
    convolution uses output_padding = stride - 1 so that it exactly undoes a stride-s down-sampling."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: Stride = 1, transposed: bool = False, conv_only: bool = False
    ) -> None:
        super().__init__()
        axes = _axes(stride)
        self.conv: nn.Module
        if transposed:
            self.conv = nn.ConvTranspose3d(
                in_channels, out_channels, 3, axes, padding=1, output_padding=(axes[0] - 1, axes[1] - 1, axes[2] - 1)
            )
        else:
            self.conv = nn.Conv3d(in_channels, out_channels, 3, axes, padding=1)
        if not conv_only:
            # Instance norm without affine weights or running statistics (torch's defaults), then one PReLU slope.
            self.adn = nn.Sequential(OrderedDict(N=nn.InstanceNorm3d(out_channels), A=nn.PReLU()))


class ResidualUnit(nn.Module):
    """MONAI's `ResidualUnit`: `subunits` ConvUnits (only the first strided) plus a residual path, which is
    the identity, or a 1x1x1 convolution when only the channel count changes, or a strided 3x3x3 one."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: Stride = 1, subunits: int = 2, last_conv_only: bool = False
    ) -> None:
        super().__init__()
        subunits = max(1, subunits)
        self.conv = nn.Sequential()
        channels, unit_stride = in_channels, stride
        self.residual: nn.Module
        for i in range(subunits):
            self.conv.add_module(
                f"unit{i}",
                ConvUnit(channels, out_channels, unit_stride, conv_only=last_conv_only and i == subunits - 1),
            )
            channels, unit_stride = out_channels, 1
        if _axes(stride) != (1, 1, 1):
            self.residual = nn.Conv3d(in_channels, out_channels, 3, _axes(stride), padding=1)
        elif in_channels != out_channels:
            self.residual = nn.Conv3d(in_channels, out_channels, 1)
        else:
            self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x) + self.residual(x)
        return out


class SkipConnection(nn.Module):
    """The UNet's skip: the input concatenated (channels) with what the level below makes of it."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class UNet3D(nn.Module):
    """MONAI's UNet (3D, kernel 3, PReLU, instance norm, no dropout, NDA ordering), built the same way:
    each level is Sequential(down, SkipConnection(level below), up), from the top level down to a
    stride-1 bottom layer, kept under the attribute `model` as MONAI does."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[Stride],
        num_res_units: int = 0,
    ) -> None:
        super().__init__()
        self.num_res_units = num_res_units
        self.model = self._level(in_channels, out_channels, list(channels), list(strides), is_top=True)

    def _level(self, inc: int, outc: int, channels: list[int], strides: list[Stride], is_top: bool) -> nn.Sequential:
        c, s = channels[0], strides[0]
        below: nn.Module
        if len(channels) > 2:
            below = self._level(c, c, channels[1:], strides[1:], is_top=False)
            up_in = 2 * c  # this level's c channels + the c the level below returns
        else:
            below = self._down(c, channels[1], 1)  # the bottom layer
            up_in = c + channels[1]
        return nn.Sequential(self._down(inc, c, s), SkipConnection(below), self._up(up_in, outc, s, is_top))

    def _down(self, inc: int, outc: int, stride: Stride) -> nn.Module:
        if self.num_res_units > 0:
            return ResidualUnit(inc, outc, stride, subunits=self.num_res_units)
        return ConvUnit(inc, outc, stride)

    def _up(self, inc: int, outc: int, stride: Stride, is_top: bool) -> nn.Module:
        # The top level's output is raw logits: no norm/activation after its last convolution.
        conv = ConvUnit(inc, outc, stride, transposed=True, conv_only=is_top and self.num_res_units == 0)
        if self.num_res_units > 0:
            return nn.Sequential(conv, ResidualUnit(outc, outc, 1, subunits=1, last_conv_only=is_top))
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out
