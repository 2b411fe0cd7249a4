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
