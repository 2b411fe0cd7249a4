"""3D inference without `import monai` (issue 16): unet3d.UNet3D and sliding_window.sliding_window must give
what MONAI's UNet and sliding_window_inference give, and segmenting must not import monai at all."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from AbdomenSegLib.inference.inferer import window_count
from AbdomenSegLib.inference.sliding_window import importance_map, sliding_window, window_starts
from AbdomenSegLib.models.networks import build_network
from AbdomenSegLib.models.packages import find_model
from AbdomenSegLib.models.unet3d import UNet3D
from helpers import ROOT, segment_with_both_networks, shared

SHIPPED_3D = ["btcv-ct-3d-unet", "chaos-mr-t2-3d-unet"]


def _shipped_weights(card):
    from safetensors.torch import load_file

    return load_file(str(card.weights_path))


def _max_diff(a, b):
    return (a - b).abs().max().item()


# -- (a) the network ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED_3D)
def test_fast_unet_loads_shipped_weights_and_matches_monai(name):
    from monai.networks.nets import UNet

    card = find_model(name)
    arch, weights = card["architecture"], _shipped_weights(card)
    fast = build_network(arch, card.in_channels, card.out_channels, for_inference=True)
    slow = build_network(arch, card.in_channels, card.out_channels)
    assert isinstance(fast, UNet3D) and isinstance(slow, UNet)
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in slow.state_dict().items()}
    fast.load_state_dict(weights, strict=True)
    slow.load_state_dict(weights, strict=True)
    torch.manual_seed(0)
    x = torch.randn(2, card.in_channels, 32, 48, 64)
    with torch.inference_mode():
        diff = _max_diff(fast.eval()(x), slow.eval()(x))
    assert diff <= 1e-4, diff


@pytest.mark.parametrize(
    "args",
    [
        {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0},
        {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        {"channels": [4, 8, 16, 16], "strides": [2, 2, 1], "num_res_units": 1},
        {"channels": [3, 6, 12], "strides": [2, 2], "num_res_units": 2},
        {"channels": [4, 8, 16], "strides": [2, 2]},  # num_res_units defaults to 0, as in MONAI
        {"channels": [4, 8, 16], "strides": [[1, 2, 2], 2], "num_res_units": 2},  # anisotropic (card_schema allows it)
        {"channels": [4, 8, 16], "strides": [[1, 2, 2], [2, 1, 1]], "num_res_units": 0},
    ],
)
def test_fast_unet_matches_monai_on_small_configs(args):
    arch = {"class": "UNet", "args": args}
    torch.manual_seed(1)
    slow = build_network(arch, 2, 5).eval()
    with torch.no_grad():  # PReLU slopes other than the 0.25 default, so that they matter
        for name, p in slow.named_parameters():
            if name.endswith("A.weight"):
                p.uniform_(0.0, 0.5)
    fast = build_network(arch, 2, 5, for_inference=True).eval()
    assert isinstance(fast, UNet3D)
    fast.load_state_dict(slow.state_dict(), strict=True)
    x = torch.randn(1, 2, 16, 24, 32)
    with torch.inference_mode():
        assert _max_diff(fast(x), slow(x)) <= 1e-4


@pytest.mark.parametrize(
    "args",
    [
        {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 2, "dropout": 0.1},
        {"channels": [4, 8, 16], "strides": [2, 2], "kernel_size": 5},
        {"channels": [4, 8, 16], "strides": [2, 2, 2]},  # MONAI ignores the extra stride (with a warning)
        {"channels": [4, 8, 16], "strides": [[2, 2], 2]},  # a stride per axis needs 3 values
    ],
)
def test_other_unet_args_are_built_by_monai(args):
    from monai.networks.nets import UNet

    assert isinstance(build_network({"class": "UNet", "args": args}, 1, 3, for_inference=True), UNet)


def test_training_builds_monai_classes():
    from monai.networks.nets import UNet

    assert isinstance(build_network(find_model(SHIPPED_3D[0])["architecture"], 1, 14), UNet)


# -- (b) the sliding window -----------------------------------------------------------------------------------
def _predictor():
    """A fixed, deterministic net: output the size of its input, 3 channels, not linear."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 3, 3, padding=1))
    return net.eval()


ROI = (16, 24, 20)


@pytest.mark.parametrize(
    "shape",
    [
        (16, 24, 20),  # exactly one window
        (32, 48, 40),  # exact multiples
        (17, 37, 23),  # odd sizes
        (10, 30, 20),  # smaller than the roi along the first axis
        (7, 9, 11),  # smaller along every axis (odd and even padding)
        (40, 13, 41),
    ],
)
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap,sw_batch", [(0.25, 2), (0.5, 3), (0.0, 1)])
@pytest.mark.parametrize("padding_mode", ["constant", "replicate"])
def test_sliding_window_matches_monai(shape, mode, overlap, sw_batch, padding_mode):
    from monai.inferers import sliding_window_inference

    net = _predictor()
    torch.manual_seed(3)
    x = torch.randn((1, 1) + shape)
    calls = []

    def counted(batch):
        calls.append(batch.shape[0])
        return net(batch)

    with torch.inference_mode():
        ours = sliding_window(x, ROI, sw_batch, counted, overlap=overlap, mode=mode, padding_mode=padding_mode)
        theirs = sliding_window_inference(x, ROI, sw_batch, net, overlap=overlap, mode=mode, padding_mode=padding_mode)
    assert ours.shape == theirs.shape == (1, 3) + shape and ours.dtype == theirs.dtype
    assert _max_diff(ours, theirs) <= 1e-5
    assert sum(calls) == window_count([max(n, r) for n, r in zip(shape, ROI)], ROI, overlap)


def test_padding_modes_differ_only_where_a_volume_is_shorter_than_the_window():
    """Replicated edge slices change the result of a volume shorter than the window and nothing else."""
    net = _predictor()
    short, tall = torch.randn(1, 1, 9, 30, 24), torch.randn(1, 1, 40, 30, 24)
    with torch.inference_mode():
        assert (
            _max_diff(sliding_window(short, ROI, 2, net), sliding_window(short, ROI, 2, net, padding_mode="replicate"))
            > 1e-3
        )
        assert torch.equal(
            sliding_window(tall, ROI, 2, net), sliding_window(tall, ROI, 2, net, padding_mode="replicate")
        )
    with pytest.raises(ValueError, match="padding_mode"):
        sliding_window(tall, ROI, 2, net, padding_mode="reflect")


def test_sliding_window_matches_monai_on_a_batch():
    from monai.inferers import sliding_window_inference

    net = _predictor()
    x = torch.randn(2, 1, 21, 30, 17)
    with torch.inference_mode():
        assert (
            _max_diff(sliding_window(x, ROI, 3, net), sliding_window_inference(x, ROI, 3, net, mode="gaussian")) <= 1e-5
        )


def test_sliding_window_matches_monai_with_half_precision_predictions():
    """Under CUDA autocast the network answers float16 into a float32 volume: the weighting must round as
    MONAI's does (in place, in float16) before the sum in float32."""
    from monai.inferers import sliding_window_inference

    net = _predictor()

    def half(batch):
        return net(batch).half()

    x = torch.randn(1, 1, 23, 40, 31)
    with torch.inference_mode():
        ours, theirs = sliding_window(x, ROI, 2, half), sliding_window_inference(x, ROI, 2, half, mode="gaussian")
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("roi", [(48, 160, 160), (32, 96, 96), (16, 24, 20), (7, 1, 5)])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_importance_map_is_monais(roi, mode):
    from monai.data.utils import compute_importance_map

    assert torch.equal(importance_map(roi, mode), compute_importance_map(roi, mode=mode, sigma_scale=0.125))


def test_window_starts_are_monais():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size in range(1, 60):
        for roi in (1, 7, 16, 20):
            for overlap in (0.0, 0.25, 0.5, 0.9):
                image = max(size, roi)
                interval = _get_scan_interval((image,), (roi,), 1, (overlap,))
                expected = [s[0].start for s in dense_patch_slices((image,), (roi,), interval)]
                assert window_starts(image, roi, overlap) == expected, (size, roi, overlap)


# -- (c) no monai in the process ------------------------------------------------------------------------------
HEAVY = (
    "monai",
    "torchvision",
    "torch._dynamo",
    "torch._inductor",
    "scipy",
    "skimage",
    "sympy",
    "matplotlib",
    "nibabel",
    "segmentation_models_pytorch",
    "timm",
    "huggingface_hub",
    "pandas",
    "tqdm",
)

SEGMENT_IN_A_FRESH_PROCESS = f"""
import json, sys
from AbdomenSegLib.inference.segmenter import Segmenter
from AbdomenSegLib.models.packages import find_model
from AbdomenSegLib.io.phantom import make_phantom
card = find_model()
assert card["dimensions"] == 3, card.name
Segmenter(card, "cpu", log=lambda m: None).segment(make_phantom(size=(48, 40, 24), spacing=(8.0, 8.0, 10.0))[0])
heavy = {{h: sorted(m for m in sys.modules if m == h or m.startswith(h + "."))
          for h in {HEAVY!r}}}
print(json.dumps({{h: len(m) for h, m in heavy.items() if m}}))
print(json.dumps(heavy["monai"][:10]))
"""


def test_segmenting_with_a_3d_model_imports_no_monai():
    result = subprocess.run(
        [sys.executable, "-c", SEGMENT_IN_A_FRESH_PROCESS], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts, monai_modules = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    print("heavy packages imported by a 3D segmentation (package: modules):", counts)
    assert not monai_modules, (
        "segmenting imported MONAI (models._build must pass for_inference=True to " f"build_network): {monai_modules}"
    )
    assert "torchvision" not in counts and "torch._dynamo" not in counts, counts


# -- (d) the shipped default model on a real CT --------------------------------------------------------------
@pytest.mark.slow
def test_default_model_on_example_ct_equals_the_monai_path(monkeypatch):
    import SimpleITK as sitk
    from monai.inferers import sliding_window_inference

    from AbdomenSegLib.inference import sliding_window as sliding_window_module

    ct = sitk.ReadImage(str(shared("totalseg_example", "example_ct.nii.gz")))
    # The old path: MONAI's UNet and MONAI's sliding_window_inference.
    outputs, probabilities = segment_with_both_networks(
        find_model(),
        ct,
        before_library=lambda: monkeypatch.setattr(sliding_window_module, "sliding_window", sliding_window_inference),
    )
    differing = int((outputs[0] != outputs[1]).sum())
    diff = float(np.abs(probabilities[0] - probabilities[1]).max())
    print(f"example CT: {differing} of {outputs[0].size} voxels differ; max probability difference {diff:.2e}")
    assert diff <= 1e-4
    assert differing <= 20


CLI_IN_A_FRESH_PROCESS = """
import json, sys, tempfile
from pathlib import Path
from AbdomenSegLib.cli import main
from AbdomenSegLib.io.images import write_image
from AbdomenSegLib.io.phantom import make_phantom
folder = Path(tempfile.mkdtemp())
write_image(make_phantom(size=(48, 40, 24), spacing=(8.0, 8.0, 10.0))[0], folder / "ct.nii.gz")
main(["segment", str(folder / "ct.nii.gz"), str(folder / "organs.nii.gz")])
loaded = {m.split(".")[0] for m in sys.modules} | set(sys.modules)
print(json.dumps(sorted(loaded & {"dask", "distributed", "highdicom", "AbdomenSegLib.io.dicom_seg", "AbdomenSegLib.cohort.cluster",
                                  "monai", "matplotlib"})))
"""


def test_the_command_line_imports_no_cluster_dicom_or_plotting_for_one_scan():
    """One scan to a NIfTI file needs neither Dask (cohorts), nor highdicom (DICOM SEG), nor matplotlib
    (pictures): each costs start-up time on every run. (pydicom is loaded by nibabel's NIfTI module when it is
    installed; that is nibabel's choice.)"""
    result = subprocess.run(
        [sys.executable, "-c", CLI_IN_A_FRESH_PROCESS], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
