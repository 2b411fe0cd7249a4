"""Model packages: catalog, sha256 check, safetensors only, 2D smp packages in the same catalog."""

import json
import shutil

import pytest

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.models.packages import catalog, export_package, find_model, load_network, read_card


def test_catalog_lists_and_finds_by_name_or_folder(tiny_package):
    models_dir = tiny_package.path.parent
    cards = catalog(models_dir)
    assert "tiny-test" in cards
    assert find_model("tiny-test", models_dir).name == "tiny-test"
    assert find_model(str(tiny_package.path)).name == "tiny-test"
    with pytest.raises(AbdomenSegError, match="not installed") as info:
        find_model("liver-9000", models_dir)
    assert "tiny-test" in str(info.value)


def test_tampered_weights_are_refused(tiny_package, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(tiny_package.path, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(AbdomenSegError, match="integrity check"):
        load_network(read_card(copy))


def test_cards_missing_fields_or_naming_unknown_organs_are_clear_errors(tiny_package, tmp_path):
    copy = tmp_path / "bad"
    shutil.copytree(tiny_package.path, copy)
    card = json.loads((copy / "card.json").read_text())
    del card["spacing"]
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(AbdomenSegError, match="lacks spacing"):
        read_card(copy)
    card["spacing"] = [1, 1, 1]
    card["labels"]["1"] = "appendix"
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(AbdomenSegError, match="unknown organs"):
        read_card(copy)


def test_a_2d_smp_package_lives_in_the_catalog(tmp_path):
    import torch

    from AbdomenSegLib.models.networks import build_network

    arch = {"class": "Unet", "args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [64, 32, 16]}}
    net = build_network(arch, in_channels=3, out_channels=5)  # 2.5D: 3 neighbouring slices in
    card = {
        "name": "ct-2d-test",
        "dimensions": 2,
        "architecture": arch,
        "in_channels": 3,
        "modality": "CT",
        "labels": {"1": "liver", "2": "spleen", "3": "kidney_right", "4": "kidney_left"},
        "spacing": [1.0, 1.0, 3.0],
        "intensity": {"mode": "ct_window", "window": [-125, 275], "enhancement": "clahe"},
    }
    exported = export_package(net, card, tmp_path / "ct-2d-test", register_in=tmp_path)
    assert "ct-2d-test" in catalog(tmp_path)
    loaded = load_network(exported)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net.eval()(x))


# -- issue 31 round two: cards the schema accepts can run within the memory limit ------------------------
def _default_card() -> dict:
    from helpers import ROOT

    return json.loads((ROOT / "Resources" / "models" / "btcv-ct-3d-unet" / "card.json").read_text())


@pytest.mark.parametrize(
    "channels, strides, units",
    [([16, 32, 64, 128, 256], [2, 2, 2, 2], 2), ([4, 8, 16], [2, 2], 0), ([8, 16, 32, 64], [2, [1, 2, 2], 2], 3)],
)
def test_the_parameter_count_is_known_from_the_card_exactly(channels, strides, units):
    from AbdomenSegLib.models.footprint import parameter_count
    from AbdomenSegLib.models.networks import build_network

    arch = {"class": "UNet", "args": {"channels": channels, "strides": strides, "num_res_units": units}}
    built = build_network(arch, 1, 14, for_inference=True)
    assert parameter_count(arch, 1, 14) == sum(p.numel() for p in built.parameters())


def test_a_window_or_network_too_large_for_the_memory_limit_is_refused_naming_the_field(monkeypatch):
    from AbdomenSegLib.models.card_schema import card_problems

    card = _default_card()
    assert card_problems(card) == []  # the shipped card: about 0.9 GB whatever the input
    card["inference"]["roi_size"] = [512, 512, 512]
    (problem,) = card_problems(card)
    assert problem.startswith("inference.roi_size [512, 512, 512]") and "memory limit of 16.0 GB" in problem
    card = _default_card()
    card["architecture"]["args"]["channels"] = [4096] * 5
    (problem,) = card_problems(card)
    assert problem.startswith("architecture.args.channels [4096, 4096, 4096, 4096, 4096] make a network of 9,516 M")
    monkeypatch.setenv("ABDOMENSEG_MAX_MEMORY_GB", "0.5")  # the limit is the engine's: the shipped window needs more
    assert "inference.roi_size [48, 160, 160]" in card_problems(_default_card())[0]


def test_a_network_larger_than_its_weights_file_is_refused_before_it_is_built(tiny_package, tmp_path, monkeypatch):
    from AbdomenSegLib.models import networks

    copy = tmp_path / "wide"
    shutil.copytree(tiny_package.path, copy)
    card = json.loads((copy / "card.json").read_text())
    card["architecture"]["args"]["channels"] = [512, 1024, 1024]  # ~57 M parameters, within the memory limit
    (copy / "card.json").write_text(json.dumps(card))

    def never(*args, **kwargs):
        raise AssertionError("the network was built")

    monkeypatch.setattr(networks, "build_network", never)
    with pytest.raises(AbdomenSegError, match=r"architecture.args.channels \[512, 1024, 1024\] make [\d,]+ parameters"):
        load_network(read_card(copy))


def test_the_memory_estimate_counts_the_models_window_and_network(tiny_package):
    from AbdomenSegLib.core import limits
    from AbdomenSegLib.models.footprint import card_footprint, model_bytes

    card = find_model("btcv-ct-3d-unet")
    footprint = card_footprint(card.data, card.out_channels)
    assert footprint is not None and footprint.weights == 4 * 4_822_057
    # one batch of two 48x160x160 windows, 1 channel in and 14 out, and the importance map
    assert footprint.window == 48 * 160 * 160 * 4 * (2 * 15 + 1)
    grid_only = limits.estimate_memory((122, 101, 112), (3.0, 3.0, 3.0), card["spacing"], 14)
    with_model = limits.estimate_memory((122, 101, 112), (3.0, 3.0, 3.0), card["spacing"], 14, model_bytes(card))
    assert with_model - grid_only == pytest.approx(footprint.fixed) and 0.5e9 < footprint.fixed < 2e9


# -- issue 31 round two: the minimum input extent ------------------------------------------------------
def test_the_default_minimum_comes_from_the_window_and_a_card_may_state_its_own():
    from AbdomenSegLib.models.card_schema import card_problems
    from AbdomenSegLib.models.extent import InputMinimum, input_minimum

    card = _default_card()  # window 48 slices of 3 mm = 144 mm: refused under 0.3 of it, flagged under 0.6
    assert input_minimum(card) == InputMinimum(5, (0.0, 0.0, 43.0), (0.0, 0.0, 86.0))
    card["input_minimum"] = {"slices": 12, "mm": [100, 0, 40]}
    assert card_problems(card) == []
    assert input_minimum(card) == InputMinimum(12, (100.0, 0.0, 40.0), (100.0, 0.0, 40.0))
    card["input_minimum"] = {"slices": 0, "mm": [0, 0, -1], "flag_mm": [0, 0], "cm": 3}
    problems = " | ".join(card_problems(card))
    for part in ("input_minimum.cm is not a field", "input_minimum.slices 0", "input_minimum.mm [0, 0, -1]", "flag_mm"):
        assert part in problems
    card["input_minimum"] = {"slices": 4, "mm": [0, 0, 60], "flag_mm": [0, 0, 30]}
    assert "must be at least input_minimum.mm" in card_problems(card)[0]


def test_slices_are_counted_along_the_axis_nearest_head_foot():
    from AbdomenSegLib.core import limits

    coronal = (1, 0, 0, 0, 0, 1, 0, -1, 0)  # the image's third axis runs front-back, its second head-foot
    limits.check_extent((200, 60, 5), (2.0, 3.0, 3.0), coronal, 5, (0, 0, 43), "m")  # 60 slices, 180 mm along z
    with pytest.raises(AbdomenSegError, match=r"has 5 voxels \(15 mm\) along y \(front-back\)"):
        limits.check_extent((200, 60, 5), (2.0, 3.0, 3.0), coronal, 5, (0, 40, 43), "m")
    with pytest.raises(AbdomenSegError, match=r"has 4 slices \(60 mm\) along z.*needs at least 5 slices and 43 mm"):
        limits.check_extent((200, 200, 4), (2.0, 2.0, 15.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 5, (0, 0, 43), "m")
