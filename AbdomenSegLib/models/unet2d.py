"""A pure-torch 2D U-Net (ResNet18/34 encoder) for inference, interchangeable with smp's `Unet` for our 2.5D models.

`import segmentation_models_pytorch` imports timm, torchvision and huggingface_hub (with their own imports),
about 1.6 s of every 2.5D segmentation. Inference only needs the network's forward pass, so this module rebuilds
`smp.Unet(encoder_name="resnet18" | "resnet34", encoder_weights=None, encoder_depth=d, decoder_channels=...,
decoder_use_norm="batchnorm", decoder_attention_type=None, decoder_interpolation="nearest", activation=None)`
from plain torch layers, with the same module tree and therefore the same `state_dict()` keys and shapes: a
package's .safetensors loads into either strictly, and the outputs are smp's (the same operations in the same
order: bit-identical on CPU in fp32 and bf16 when written; Testing/test_inference_fast_2d.py checks them against
smp on the shipped weights, to 1e-4).

Written from a reading of segmentation_models_pytorch 0.6.0 (MIT): decoders/unet/model.py (Unet's arguments and
layout), decoders/unet/decoder.py (UnetDecoder, UnetDecoderBlock: nearest up-sampling to the skip's size),
encoders/resnet.py and encoders/_base.py (ResNetEncoder: torchvision's ResNet without avgpool/fc, returning the
input and the five stages), encoders/__init__.py (get_encoder, set_in_channels: in_channels only changes
conv1's weight), base/modules.py (Conv2dReLU, get_norm_layer), base/heads.py (SegmentationHead) and
base/model.py (SegmentationModel.forward; Unet sets requires_divisible_input_shape = False, so no input check);
and of torchvision's models/resnet.py (BSD-3-Clause: BasicBlock, conv3x3/conv1x1, ResNet._make_layer).
Training keeps using smp's own classes (networks.build_network); any argument or value `supports` does not
accept (another encoder, attention, another norm or interpolation, an activation, aux_params, ...) is built by
smp too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Blocks per stage (layer1..layer4) of torchvision's BasicBlock ResNets; smp's encoders/resnet.py uses these.
RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
STAGE_CHANNELS = (64, 64, 128, 256, 512)  # what the encoder's stages 1-5 return (conv1, layer1, ..., layer4)

# Unet arguments this class reproduces (with the values `supports` checks); with any other, smp builds the net.
# encoder_weights is ignored, as networks.build_network overrides it with None for smp (no download, ever; the
# package's weights are loaded afterwards); aux_params (a classification head) only as None.
SUPPORTED_ARGS = {
    "encoder_name",
    "encoder_depth",
    "encoder_weights",
    "decoder_channels",
    "decoder_use_norm",
    "decoder_use_batchnorm",
    "decoder_attention_type",
    "decoder_interpolation",
    "activation",
    "aux_params",
}
SMP_DEFAULTS: dict[str, Any] = {
    "encoder_name": "resnet34",
    "encoder_depth": 5,
    "decoder_channels": (256, 128, 64, 32, 16),
}


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _batchnorm(args: dict[str, Any]) -> bool:
    """smp 0.6.0: the deprecated decoder_use_batchnorm, when given (not None), replaces decoder_use_norm
    (default "batchnorm"); True and "batchnorm" (any case) mean nn.BatchNorm2d with default parameters."""
    norm = args.get("decoder_use_norm", "batchnorm")
    if args.get("decoder_use_batchnorm") is not None:
        norm = args["decoder_use_batchnorm"]
    return norm is True or (isinstance(norm, str) and norm.lower() == "batchnorm")


def supports(args: dict[str, Any]) -> bool:
    """True when `args` (a card's smp Unet args) describe a network this module builds exactly like smp."""
    if set(args) - SUPPORTED_ARGS:
        return False
    depth = args.get("encoder_depth", SMP_DEFAULTS["encoder_depth"])
    channels = args.get("decoder_channels", SMP_DEFAULTS["decoder_channels"])
    encoder = args.get("encoder_name", SMP_DEFAULTS["encoder_name"])
    return (
        isinstance(encoder, str)
        and encoder in RESNET_LAYERS
        and args.get("aux_params") is None
        # smp's ResNetEncoder takes depth 1-5; the decoder needs one channel count per stage (else smp raises).
        and _positive_int(depth)
        and depth <= 5
        and isinstance(channels, (list, tuple))
        and len(channels) == depth
        and all(map(_positive_int, channels))
        and _batchnorm(args)
        and args.get("decoder_attention_type") is None
        and args.get("decoder_interpolation", "nearest") == "nearest"
        and args.get("activation") in (None, "identity")
    )


def _conv3x3(inc: int, outc: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inc, outc, 3, stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, plus the input (or its 1x1 strided conv + BN
    under `downsample` when the shape changes), then ReLU."""

    def __init__(self, inc: int, outc: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inc, outc, stride)
        self.bn1 = nn.BatchNorm2d(outc)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(outc, outc)
        self.bn2 = nn.BatchNorm2d(outc)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inc != outc:
            self.downsample = nn.Sequential(nn.Conv2d(inc, outc, 1, stride, bias=False), nn.BatchNorm2d(outc))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        result: torch.Tensor = self.relu(out)
        return result


class ResNetEncoder(nn.Module):
    """smp's ResNetEncoder (torchvision's ResNet without avgpool and fc). Every stage exists whatever the depth
    (their weights are in the state_dict), but forward stops after `depth` stages, as smp's does."""

    def __init__(self, in_channels: int, layers: Sequence[int], depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        inc = 64
        for i, (outc, blocks) in enumerate(zip(STAGE_CHANNELS[1:], layers), 1):
            stride = 1 if i == 1 else 2  # layer1 keeps the maxpool's resolution; layer2-4 halve it
            # Only a stage's first block changes the shape (and has a `downsample`), as in torchvision's _make_layer.
            stage = [BasicBlock(inc, outc, stride)] + [BasicBlock(outc, outc) for _ in range(blocks - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            inc = outc

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[input, stage 1, ..., stage depth]: each stage half the size of the one before (rounded up)."""
        features = [x]
        x = self.relu(self.bn1(self.conv1(x)))
        features.append(x)
        for i in range(1, self.depth):
            if i == 1:
                x = self.maxpool(x)
            x = getattr(self, f"layer{i}")(x)
            features.append(x)
        return features


def _conv_bn_relu(inc: int, outc: int) -> nn.Sequential:
    """smp's Conv2dReLU with batchnorm: Sequential(conv 3x3 without bias, BatchNorm2d, ReLU) -> keys 0.*, 1.*."""
    return nn.Sequential(nn.Conv2d(inc, outc, 3, padding=1, bias=False), nn.BatchNorm2d(outc), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """smp's UnetDecoderBlock without attention (its Identity attention modules hold no weights): nearest
    up-sampling to the skip's size, concatenation with the skip (the last block has none), two conv-BN-ReLU."""

    def __init__(self, inc: int, skip: int, outc: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(inc + skip, outc)
        self.conv2 = _conv_bn_relu(outc, outc)

    def forward(self, x: torch.Tensor, size: torch.Size, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        out: torch.Tensor = self.conv2(self.conv1(x))
        return out


class UnetDecoder(nn.Module):
    """smp's UnetDecoder for a ResNet encoder (no center block: smp adds one only for VGG encoders)."""

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int]) -> None:
        super().__init__()
        encoder_channels = list(encoder_channels[1:])[::-1]  # deepest first, without the input itself
        in_channels = [encoder_channels[0]] + list(decoder_channels[:-1])
        skip_channels = encoder_channels[1:] + [0]
        self.blocks = nn.ModuleList(
            DecoderBlock(inc, skip, outc) for inc, skip, outc in zip(in_channels, skip_channels, decoder_channels)
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        sizes = [f.shape[2:] for f in features][::-1]  # deepest first, ending with the input's size
        features = features[1:][::-1]
        x, skips = features[0], features[1:]
        for i, block in enumerate(self.blocks):
            x = block(x, sizes[i + 1], skips[i] if i < len(skips) else None)
        return x


class Unet2D(nn.Module):
    """smp's Unet (ResNet18/34 encoder, batchnorm decoder, no attention, 3x3 head, no activation) under the same
    attribute names: encoder, decoder, segmentation_head (a Sequential whose conv is `0`, as smp's is)."""

    def __init__(
        self,
        in_channels: int,
        classes: int,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        **smp_only: Any,
    ) -> None:
        super().__init__()
        # The other supported args (encoder_weights=None, batchnorm, no attention, nearest, no activation) are
        # what this class is; anything else is refused rather than silently built differently from smp.
        args = dict(smp_only, encoder_name=encoder_name, encoder_depth=encoder_depth, decoder_channels=decoder_channels)
        if not supports(args):
            raise ValueError(f"Unet2D does not reproduce smp.Unet({args}); build it with smp")
        encoder_channels = (in_channels,) + STAGE_CHANNELS[:encoder_depth]
        self.encoder = ResNetEncoder(in_channels, RESNET_LAYERS[encoder_name], encoder_depth)
        self.decoder = UnetDecoder(encoder_channels, decoder_channels)
        self.segmentation_head = nn.Sequential(nn.Conv2d(decoder_channels[-1], classes, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.segmentation_head(self.decoder(self.encoder(x)))
        return out
