"""Build networks from a model card's architecture block (no weights downloaded, ever)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from AbdomenSegLib.core.errors import AbdomenSegError

if TYPE_CHECKING:
    from torch import nn

MONAI_3D = ("UNet", "SegResNet", "DynUNet")
SMP_2D = ("Unet", "UnetPlusPlus")


def build_network(
    architecture: dict[str, Any], in_channels: int, out_channels: int, *, for_inference: bool = False
) -> nn.Module:
    """The card's network, untrained. `for_inference=True` builds a UNet as unet3d.UNet3D, a pure-torch twin of
    MONAI's UNet (same state_dict keys, same outputs) that spares inference `import monai` (~3 s), and a
    ResNet18/34 Unet as unet2d.Unet2D, the same for smp's Unet (spares `import segmentation_models_pytorch`,
    timm and torchvision, ~1.6 s); anything they do not reproduce, and every network built for training,
    comes from MONAI or smp itself."""
    name = architecture.get("class")
    args = copy.deepcopy(architecture.get("args", {}))
    if for_inference and name == "UNet":
        from AbdomenSegLib.models import unet3d

        if unet3d.supports(args):
            return unet3d.UNet3D(in_channels, out_channels, **args)
    if for_inference and name == "Unet":
        from AbdomenSegLib.models import unet2d

        if unet2d.supports(args):
            return unet2d.Unet2D(in_channels, out_channels, **args)
    if name in MONAI_3D:
        from monai.networks import nets

        args.update(spatial_dims=3, in_channels=in_channels, out_channels=out_channels)
        if name == "DynUNet":
            args.setdefault("kernel_size", [[3, 3, 3]] * 5)
            args.setdefault("strides", [[1, 1, 1]] + [[2, 2, 2]] * 4)
            args.setdefault("upsample_kernel_size", args["strides"][1:])
        if name == "SegResNet":
            args.pop("spatial_dims")
            args["spatial_dims"] = 3
        network: nn.Module = getattr(nets, name)(**args)
        return network
    if name in SMP_2D:
        import segmentation_models_pytorch as smp

        # encoder_weights must stay None: the default ("imagenet") downloads from a hub at run time.
        args["encoder_weights"] = None
        args.update(in_channels=in_channels, classes=out_channels)
        smp_network: nn.Module = getattr(smp, name)(**args)
        return smp_network
    raise AbdomenSegError(
        f"unknown architecture '{name}'", f"use one of {', '.join(MONAI_3D + SMP_2D)} in the model card/config"
    )


def divisor(architecture: dict[str, Any]) -> int:
    """Spatial size the network's input must be a multiple of (product of its down-samplings)."""
    name = architecture.get("class")
    args = architecture.get("args", {})
    if name == "UNet":
        factor = 1
        for s in args.get("strides", (2, 2, 2, 2)):
            factor *= s if isinstance(s, int) else max(s)
        return factor
    if name == "SegResNet":
        levels: int = 2 ** (len(args.get("blocks_down", (1, 2, 2, 4))) - 1)  # int ** int is typed Any
        return levels
    if name == "DynUNet":  # strides per level, the first usually 1
        factor = 1
        for s in args.get("strides", (1, 2, 2, 2, 2)):
            factor *= s if isinstance(s, int) else max(s)
        return factor
    if name in SMP_2D:
        stages: int = 2 ** args.get("encoder_depth", 5)
        return stages
    return 16
