"""Shared fixtures. Real data from ../shared/data when present; tests needing it skip otherwise."""

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def shared(*parts) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)} (real data is not part of the repository)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    """An untrained, tiny 3D model exported as a real package (for geometry/plumbing, not accuracy)."""
    import torch

    from AbdomenSegLib.models import export_package
    from AbdomenSegLib.networks import build_network

    torch.manual_seed(0)
    arch = {"class": "UNet", "args": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}}
    organs = ["liver", "spleen", "kidney_right", "kidney_left", "pancreas"]
    net = build_network(arch, 1, len(organs) + 1)
    card = {
        "name": "tiny-test",
        "title": "untrained test model",
        "dimensions": 3,
        "architecture": arch,
        "modality": "CT",
        "labels": {str(i): o for i, o in enumerate(organs, 1)},
        "spacing": [4.0, 4.0, 5.0],
        "orientation": "LPS",
        "intensity": {"mode": "ct_window", "window": [-125, 275]},
        "inference": {"roi_size": [32, 32, 32], "overlap": 0.25, "mode": "gaussian"},
        "training": {"data": "none (random init)"},
    }
    models = tmp_path_factory.mktemp("models")
    return export_package(net, card, models / "tiny-test", register_in=models, make_default=True)


@pytest.fixture(scope="session")
def background_only_package(tiny_package, tmp_path_factory):
    """The tiny package's network with its last layer made to answer background everywhere: an honest
    empty result."""
    import torch

    from AbdomenSegLib.models import export_package
    from AbdomenSegLib.networks import build_network

    card = dict(tiny_package.data, name="background-only")
    channels = len(card["labels"]) + 1
    net = build_network(card["architecture"], 1, channels)
    with torch.no_grad():
        last = [n for n, p in net.named_parameters() if n.endswith("bias") and p.shape[0] == channels][-1]
        layer = net.get_submodule(last.rsplit(".", 1)[0])
        layer.weight.zero_()
        layer.bias.zero_()
        layer.bias[0] = 10.0
    return export_package(net, card, tmp_path_factory.mktemp("bg") / "background-only")


@functools.cache
def validation_rows(name: str) -> tuple:
    """A shipped model's card protocol re-run on the untouched validation files (once per session and model)."""
    from AbdomenSegLib.models import find_model
    from AbdomenSegLib.training import validation_rows as run_protocol

    card = find_model(name)
    root = shared(card["training"]["config"]["data"]["root"].split("/")[-1])
    return tuple(run_protocol(card, root, log=lambda m: None)[0])


@pytest.fixture(scope="session")
def default_card():
    from AbdomenSegLib.models import find_model

    return find_model()


def write_phantom_dataset(root: Path, cases: int = 2, ref_suffix: str = ".nii.gz"):
    """images/ and refs/ folders of small phantom cases (CT in HU + organ labels); returns both folders."""
    import SimpleITK as sitk

    from AbdomenSegLib.phantom import make_phantom

    images, refs = root / "images", root / "refs"
    images.mkdir(parents=True), refs.mkdir(parents=True)
    for i in range(cases):
        ct, labels = make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0), seed=i)
        sitk.WriteImage(ct, str(images / f"case{i}.nii.gz"))
        sitk.WriteImage(labels, str(refs / f"case{i}{ref_suffix}"))
    return images, refs


def segment_with_both_networks(card, image, options=None, before_library=None):
    """The labels (and the probabilities before them) of a shipped model on `image`, once with the plain-torch
    inference network and once with MONAI's/smp's class loaded with the same weights; `before_library()` runs
    before the second pass (e.g. to swap in MONAI's sliding window). Returns (labels, probabilities) pairs."""
    import SimpleITK as sitk
    from safetensors.torch import load_file

    from AbdomenSegLib.inference import Segmenter
    from AbdomenSegLib.networks import build_network

    weights = load_file(str(card.weights_path))
    segmenter = Segmenter(card, "cpu", log=lambda m: None)
    probabilities, labels = [], []

    def infer(*args, **kwargs):
        probabilities.append(Segmenter._infer(segmenter, *args, **kwargs))
        return probabilities[-1]

    segmenter._infer = infer
    for fast in (True, False):
        network = build_network(card["architecture"], card.in_channels, card.out_channels, for_inference=fast)
        network.load_state_dict(weights, strict=True)
        segmenter.network = network.eval()
        if not fast and before_library is not None:
            before_library()
        labels.append(sitk.GetArrayFromImage(segmenter.segment(image, options)))
    return labels, probabilities
