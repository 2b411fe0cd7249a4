"""2D inference without `import segmentation_models_pytorch` (issue 16): unet2d.Unet2D must give what smp's Unet
gives on the shipped 2.5D weights, and segmenting with the 2.5D model must not import smp, timm, torchvision or
huggingface_hub at all."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from AbdomenSegLib.inference.segmenter import Options, Segmenter
from AbdomenSegLib.models.networks import build_network
from AbdomenSegLib.models.packages import find_model
from AbdomenSegLib.models.unet2d import Unet2D, supports
from helpers import ROOT, segment_with_both_networks, shared

SHIPPED_2D = "btcv-ct-2d-unet-r18"


def _shipped_weights(card):
    from safetensors.torch import load_file

    return load_file(str(card.weights_path))


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _shapes(network):
    return {k: v.shape for k, v in network.state_dict().items()}


def _randomise_batchnorm(network, seed):
    """Running statistics and affine parameters other than the 1/0 defaults, so that eval-mode BN matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.rand(t.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# -- (a) the network ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped_pair():
    import segmentation_models_pytorch as smp

    card = find_model(SHIPPED_2D)
    arch, weights = card["architecture"], _shipped_weights(card)
    fast = build_network(arch, card.in_channels, card.out_channels, for_inference=True)
    slow = build_network(arch, card.in_channels, card.out_channels)
    assert isinstance(fast, Unet2D) and isinstance(slow, smp.Unet)
    assert _shapes(fast) == _shapes(slow)
    fast.load_state_dict(weights, strict=True)
    slow.load_state_dict(weights, strict=True)
    return fast.eval(), slow.eval()


@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 256, 256),
        (2, 3, 160, 224),  # odd multiples of 32
        (1, 3, 97, 130),  # no multiple of 32: smp's Unet takes it (up-sampling to each skip's size), so must we
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_unet_loads_shipped_weights_and_matches_smp(shipped_pair, shape, channels_last):
    fast, slow = shipped_pair
    torch.manual_seed(0)
    x = torch.randn(shape)
    if channels_last:  # what inferer.SliceWise feeds on CPU
        x = x.contiguous(memory_format=torch.channels_last)
        fast, slow = fast.to(memory_format=torch.channels_last), slow.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            a, b = fast(x), slow(x)
    finally:
        fast.to(memory_format=torch.contiguous_format), slow.to(memory_format=torch.contiguous_format)
    assert a.shape == b.shape == (shape[0], 14) + shape[2:]
    diff = _max_diff(a, b)
    print(f"{shape} channels_last={channels_last}: max |fast - smp| = {diff:.3g}")
    assert diff <= 1e-4, diff


@pytest.mark.parametrize(
    "args,in_channels",
    [
        ({"encoder_name": "resnet34", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}, 5),
        ({"encoder_name": "resnet34", "decoder_channels": [64, 32, 16, 16, 8]}, 1),  # depth defaults to 5
        ({"encoder_depth": 4, "decoder_channels": [32, 16, 16, 8], "decoder_use_norm": True}, 3),  # resnet34 default
        (
            {
                "encoder_name": "resnet18",
                "encoder_depth": 3,
                "decoder_channels": [16, 16, 8],
                "decoder_use_norm": "batchnorm",
                "decoder_attention_type": None,
                "activation": None,
            },
            3,
        ),
    ],
)
def test_fast_unet_matches_smp_on_small_configs(args, in_channels):
    arch = {"class": "Unet", "args": args}
    torch.manual_seed(1)
    slow = build_network(arch, in_channels, 4)
    _randomise_batchnorm(slow, 2)
    fast = build_network(arch, in_channels, 4, for_inference=True)
    assert isinstance(fast, Unet2D)
    assert list(_shapes(fast).items()) == list(_shapes(slow).items())
    fast.load_state_dict(slow.state_dict(), strict=True)
    fast.eval(), slow.eval()
    for x in (
        torch.randn(2, in_channels, 64, 96),
        torch.randn(1, in_channels, 50, 37),
        torch.randn(2, in_channels, 64, 32).contiguous(memory_format=torch.channels_last),
    ):
        with torch.inference_mode():
            assert _max_diff(fast(x), slow(x)) <= 1e-4


@pytest.mark.parametrize(
    "args",
    [
        {"encoder_name": "resnet50"},  # Bottleneck blocks
        {"encoder_name": "efficientnet-b0"},
        {"encoder_name": "resnet18", "decoder_attention_type": "scse"},
        {"encoder_name": "resnet18", "decoder_use_norm": {"type": "batchnorm", "eps": 1e-3}},  # BN, other parameters
        {"encoder_name": "resnet18", "decoder_use_norm": "identity"},
        {"encoder_name": "resnet18", "decoder_use_norm": False},
        {"encoder_name": "resnet18", "decoder_use_batchnorm": False},  # the deprecated spelling overrides use_norm
        {"encoder_name": "resnet18", "decoder_interpolation": "bilinear"},
        {"encoder_name": "resnet18", "activation": "sigmoid"},
        {"encoder_name": "resnet18", "aux_params": {"classes": 2}},
        {"encoder_name": "resnet18", "encoder_output_stride": 16},  # unknown to Unet2D: smp decides what it means
    ],
)
def test_other_unet_args_are_built_by_smp(args):
    import segmentation_models_pytorch as smp

    assert not supports(args)
    assert isinstance(build_network({"class": "Unet", "args": args}, 3, 4, for_inference=True), smp.Unet)


def test_depth_without_matching_decoder_channels_is_refused_by_smp_as_before():
    with pytest.raises(ValueError):  # models._build turns it into the card error it always gave
        build_network(
            {"class": "Unet", "args": {"encoder_name": "resnet18", "encoder_depth": 3}}, 3, 4, for_inference=True
        )
    with pytest.raises(ValueError):
        Unet2D(3, 4, "resnet18", 5, decoder_attention_type="scse")


def test_training_and_unetplusplus_build_smp_classes():
    import segmentation_models_pytorch as smp

    arch = find_model(SHIPPED_2D)["architecture"]
    assert isinstance(build_network(arch, 3, 14), smp.Unet)
    assert isinstance(
        build_network({"class": "UnetPlusPlus", "args": {"encoder_name": "resnet18"}}, 3, 4, for_inference=True),
        smp.UnetPlusPlus,
    )


# -- (b) no smp in the process --------------------------------------------------------------------------------
LIGHT_2D = ("segmentation_models_pytorch", "timm", "torchvision", "huggingface_hub")
HEAVY = LIGHT_2D + (
    "monai",
    "torch._dynamo",
    "torch._inductor",
    "scipy",
    "skimage",
    "sympy",
    "matplotlib",
    "nibabel",
    "pandas",
    "tqdm",
)

SEGMENT_IN_A_FRESH_PROCESS = f"""
import json, sys
from AbdomenSegLib.inference.segmenter import Segmenter
from AbdomenSegLib.models.packages import find_model
from AbdomenSegLib.io.phantom import make_phantom
card = find_model({SHIPPED_2D!r})
segmenter = Segmenter(card, "cpu", log=lambda m: None)
segmenter.segment(make_phantom(size=(48, 40, 12), spacing=(8.0, 8.0, 10.0))[0])
heavy = {{h: sorted(m for m in sys.modules if m == h or m.startswith(h + "."))
          for h in {HEAVY!r}}}
print(json.dumps({{h: len(m) for h, m in heavy.items() if m}}))
print(json.dumps({{h: heavy[h][:5] for h in {LIGHT_2D!r} if heavy[h]}}))
print(type(segmenter.network).__module__)
"""


def test_segmenting_with_the_2d_model_imports_no_smp():
    result = subprocess.run(
        [sys.executable, "-c", SEGMENT_IN_A_FRESH_PROCESS], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *_, counts, imported, module = result.stdout.strip().splitlines()
    counts, imported = json.loads(counts), json.loads(imported)
    print("heavy packages imported by a 2.5D segmentation (package: modules):", counts)
    assert module == "AbdomenSegLib.models.unet2d", module
    assert not imported, (
        "segmenting with the 2.5D model imported smp or its dependencies (models._build must "
        f"pass for_inference=True to build_network): {imported}"
    )


# -- (c) the shipped 2.5D model on a real CT -----------------------------------------------------------------
@pytest.mark.slow
def test_2d_model_on_example_ct_equals_the_smp_path():
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(shared("totalseg_example", "example_ct.nii.gz")))
    card = find_model(SHIPPED_2D)
    assert isinstance(Segmenter(card, "cpu", log=lambda m: None).network, Unet2D)
    outputs, probabilities = segment_with_both_networks(card, ct, Options(precision="fp32"))
    differing = int((outputs[0] != outputs[1]).sum())
    diff = float(np.abs(probabilities[0] - probabilities[1]).max())
    print(
        f"example CT, 2.5D model: {differing} of {outputs[0].size} voxels differ; "
        f"max probability difference {diff:.2e}"
    )
    assert diff <= 1e-4
    assert differing == 0
