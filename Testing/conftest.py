"""Shared fixtures (the plain helper functions are in helpers.py). Real data from ../shared/data when present;
tests needing it skip otherwise."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    """An untrained, tiny 3D model exported as a real package (for geometry/plumbing, not accuracy)."""
    import torch

    from AbdomenSegLib.models.networks import build_network
    from AbdomenSegLib.models.packages import export_package

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

    from AbdomenSegLib.models.networks import build_network
    from AbdomenSegLib.models.packages import export_package

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


@pytest.fixture(scope="session")
def default_card():
    from AbdomenSegLib.models.packages import find_model

    return find_model()
