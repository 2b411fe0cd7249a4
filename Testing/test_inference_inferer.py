"""One inference path (issue 14): the card's inferer is what Segmenter runs and what training validates with,
and a GPU out-of-memory error sends only that one call to the CPU."""

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.inference import predictor
from AbdomenSegLib.inference import segmenter as inference
from AbdomenSegLib.inference.inferer import (
    OVERLAP,
    PADDING,
    SLICE_BATCH,
    SliceWise,
    SlidingWindow,
    inference_block,
    inferer_for,
)
from AbdomenSegLib.io.phantom import make_phantom


def test_the_inferer_comes_from_the_card():
    card = {
        "dimensions": 3,
        "architecture": {"class": "UNet", "args": {"channels": [4, 8], "strides": [2]}},
        "inference": {"roi_size": [32, 48, 48], "overlap": 0.5, "mode": "constant"},
    }
    assert inferer_for(card) == SlidingWindow(roi=(32, 48, 48), overlap=0.5, mode="constant", fit_multiple=2)
    assert inferer_for(card, overlap=0.1).overlap == 0.1  # the user's choice over the card's
    assert PADDING == "replicate" and inferer_for(card).padding_mode == PADDING  # cards that give none
    padded = dict(card, inference=dict(card["inference"], padding_mode="constant"))
    assert inferer_for(padded).padding_mode == "constant"
    assert inferer_for(padded, padding="replicate").padding_mode == "replicate"  # Options.padding over the card
    assert inferer_for(dict(card, inference={})) == SlidingWindow(roi=(64, 96, 96), overlap=OVERLAP, fit_multiple=2)
    flat = {"dimensions": 2, "in_channels": 3, "architecture": {"class": "Unet", "args": {"encoder_depth": 4}}}
    assert inferer_for(flat) == SliceWise(in_channels=3, multiple=16, batch=SLICE_BATCH)
    # What the trainer writes into a card reads back as the inferer its validation ran.
    assert inferer_for(dict(card, inference=inference_block(3, [48, 64, 64]))) == SlidingWindow(
        roi=(48, 64, 64), fit_multiple=2
    )
    assert inferer_for(dict(flat, inference=inference_block(2, [3, 64, 64]))).batch == SLICE_BATCH


def test_training_validates_with_the_inferer_users_run(tmp_path, monkeypatch):
    """The trainer's validation and the exported package's Segmenter call the same inferer, and the trainer's
    model-space Dice is metrics.py's (the card's validation figures come from the same scoring)."""
    from test_training_trainer import _config

    from AbdomenSegLib.inference.segmenter import Segmenter
    from AbdomenSegLib.io.images import read_image
    from AbdomenSegLib.training.run import train_and_export

    used = []
    real_call = SlidingWindow.__call__

    def recording(self, network, array, device, *args, **kwargs):
        used.append(self)
        return real_call(self, network, array, device, *args, **kwargs)

    monkeypatch.setattr(SlidingWindow, "__call__", recording)
    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=2, val_every=2)
    card = train_and_export(config, out=tmp_path / "run", device="cpu", log=lambda m: None)
    assert used and card["inference"] == {
        "roi_size": [16, 32, 32],
        "overlap": OVERLAP,
        "mode": "gaussian",
        "padding_mode": PADDING,
    }
    trained_with = set(used)
    used.clear()
    Segmenter(card, "cpu", log=lambda m: None).segment(read_image(tmp_path / "data" / "images" / "case0.nii.gz"))
    assert set(used) == trained_with == {inferer_for(card)}
    assert set(card["validation_model_space"]) == set(config["model"]["organs"])


class _FakeGpu:
    """A network that believes it sits on a GPU: its forward runs out of memory `oom` times while it is 'on'
    CUDA, and it records where it is moved and where each forward ran (no GPU is needed)."""

    def __init__(self, network, oom=1):
        self.network, self.where, self.oom, self.forwards = network, "cuda", oom, []
        real_forward = network.forward

        def forward(x):
            import torch

            self.forwards.append(self.where)
            if self.where.startswith("cuda") and self.oom:
                self.oom -= 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_forward(x)

        def to(*args, **kwargs):
            device = args[0] if args else kwargs.get("device")
            if device is not None:
                self.where = str(device)
            return network

        network.forward, network.to = forward, to


def test_cuda_out_of_memory_falls_back_for_that_call_only(tiny_package, monkeypatch):
    """Once fell back, the cached segmenter ran every later GPU request on the CPU (the network moved for good
    while the cache still filed it under 'cuda'). Now the next call is on the GPU again."""
    import torch

    from AbdomenSegLib.models import packages as models

    gpu = {}

    def load_network(card, device):  # the real weights, 'on' a fake GPU
        assert device == "cuda"
        gpu["fake"] = _FakeGpu(models.load_network(card, "cpu"))
        return gpu["fake"].network

    real_as_tensor = torch.as_tensor
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch,
        "as_tensor",
        lambda data, dtype=None, device=None: real_as_tensor(
            data, dtype=dtype, device=None if str(device).startswith("cuda") else device
        ),
    )  # 'GPU' tensors stay here
    monkeypatch.setattr(inference, "load_network", load_network)
    monkeypatch.setattr(predictor, "_CACHE", {})
    messages = []
    ct = make_phantom(size=(40, 36, 20), spacing=(10.0, 10.0, 8.0))[0]

    segmenter = predictor.get_segmenter(tiny_package, "cuda", log=messages.append)
    first = sitk.GetArrayFromImage(segmenter.segment(ct))
    fake = gpu["fake"]
    assert sum("ran out of memory" in m for m in messages) == 1
    assert segmenter.timings.device == "cpu"  # this call finished on the CPU...
    assert segmenter.device == "cuda" and fake.where == "cuda"  # ...but the network never left the GPU
    assert predictor.get_segmenter(tiny_package, "cuda", log=messages.append) is segmenter
    assert predictor._CACHE == {(str(tiny_package.path), "cuda"): segmenter}

    fake.forwards.clear()
    second = sitk.GetArrayFromImage(segmenter.segment(ct))
    assert fake.forwards and set(fake.forwards) == {"cuda"}  # the next call runs on the GPU again
    assert segmenter.timings.device == "cuda" and sum("ran out of memory" in m for m in messages) == 1
    np.testing.assert_array_equal(first, second)  # the CPU fallback computed the same segmentation


def test_slice_inferer_leaves_the_input_untouched_and_sums_to_one(tmp_path):
    import torch

    from AbdomenSegLib.models.networks import build_network

    torch.manual_seed(0)
    arch = {"class": "Unet", "args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}}
    network = build_network(arch, 3, 3).eval()
    array = np.random.default_rng(0).random((5, 40, 36), dtype=np.float32)
    before = array.copy()
    probabilities = SliceWise(in_channels=3, multiple=8, batch=2)(network, array, "cpu")
    assert probabilities.shape == (3, 5, 40, 36) and np.allclose(probabilities.sum(0), 1, atol=1e-5)
    np.testing.assert_array_equal(array, before)


@pytest.mark.parametrize(
    "bad", [{"roi_size": [32, 32]}, {"overlap": 0.95}, {"mode": "median"}, {"padding_mode": "reflect"}]
)
def test_a_card_with_a_bad_inference_block_is_refused_when_read(bad):
    from AbdomenSegLib.models.card_schema import card_problems

    card = {"dimensions": 3, "inference": bad}
    assert any(p.startswith("inference.") for p in card_problems(card))


def test_in_plane_windows_fit_narrow_volumes_and_z_keeps_the_roi():
    """An in-plane axis narrower than the roi gets a window of its size rounded up to the network's multiple; z
    and wider axes keep the roi; the result equals running that window by hand."""
    import torch

    window = SlidingWindow(roi=(16, 64, 64), fit_multiple=16)
    assert window.window_roi((10, 33, 80)) == (16, 48, 64)
    assert window.window_roi((40, 64, 200)) == (16, 64, 64)
    assert SlidingWindow(roi=(16, 64, 64)).window_roi((10, 33, 80)) == (16, 64, 64)  # off unless asked
    torch.manual_seed(0)
    network = torch.nn.Sequential(  # instance norm: its statistics depend on the window, as in the UNet
        torch.nn.Conv3d(1, 3, 3, padding=1),
        torch.nn.InstanceNorm3d(3),
        torch.nn.ReLU(),
        torch.nn.Conv3d(3, 3, 3, padding=1),
    )
    array = np.random.default_rng(0).random((10, 33, 80)).astype(np.float32)
    fitted = window(network, array, "cpu")
    hand = SlidingWindow(roi=(16, 48, 64))
    by_hand = hand(network, array, "cpu")
    assert window.windows(array.shape) == hand.windows(array.shape) == 2
    assert np.array_equal(fitted, by_hand)
    assert not np.allclose(fitted, SlidingWindow(roi=(16, 64, 64))(network, array, "cpu"), atol=1e-4)  # it matters


def test_the_window_multiple_is_the_networks_down_sampling():
    """Fitted windows must stay a multiple the network can take: the product of its strides."""
    from AbdomenSegLib.models.networks import divisor

    assert divisor({"class": "UNet", "args": {"strides": [2, 2, 2, 2]}}) == 16
    assert divisor({"class": "DynUNet", "args": {"strides": [1, 2, 2, 2, 2, 2]}}) == 32
    assert divisor({"class": "DynUNet", "args": {"strides": [1, [2, 2, 1], 2]}}) == 4
