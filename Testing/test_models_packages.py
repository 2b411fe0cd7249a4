"""Model packages can never be loaded silently wrong: every card value checked when the card is read, weights
confined to their package, strict safetensors loading, and one broken package never takes the others down."""

import json
import shutil
from pathlib import Path

import pytest

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.models import packages as models
from AbdomenSegLib.models.card_schema import validate_card
from AbdomenSegLib.models.packages import (
    ModelCard,
    catalog,
    catalog_with_problems,
    default_model_name,
    export_package,
    find_model,
    load_network,
    read_card,
)

DELETE = object()  # a change that removes the key


def _copy(tiny_package, folder: Path, name: str | None = None) -> Path:
    """A copy of the tiny test package in `folder`, optionally renamed (card and folder)."""
    shutil.copytree(tiny_package.path, folder)
    if name is not None:
        _edit(folder, {"name": name})
    return folder


def _edit(folder: Path, changes: dict) -> dict:
    """Apply {"dotted.key": value or DELETE} to the package's card.json; returns the new card."""
    card = json.loads((folder / "card.json").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        block = card
        for parent in parents:
            block = block[parent]
        if value is DELETE:
            del block[key]
        else:
            block[key] = value
    (folder / "card.json").write_text(json.dumps(card))
    return card


def _refuse_opening(monkeypatch):
    """Any attempt to hash or read weights fails the test (the refusal must come first)."""

    def opened(*args, **kwargs):
        raise AssertionError(f"weights were opened: {args}")

    import safetensors.torch

    monkeypatch.setattr(models, "sha256_of", opened)
    monkeypatch.setattr(safetensors.torch, "load_file", opened)


# -- item 6: every card value is judged when the card is read ---------------------------------------
SMP = {"class": "Unet", "args": {"encoder_name": "resnet18", "encoder_depth": 3}}
MALFORMED_CARDS = {
    "name empty": ({"name": ""}, "name"),
    "name with a path": ({"name": "../evil"}, "path separators"),
    "dimensions 4": ({"dimensions": 4}, "dimensions 4"),
    "dimensions as text": ({"dimensions": "3"}, 'dimensions "3"'),
    "unknown architecture": ({"architecture.class": "ResNet"}, "architecture.class"),
    "2D class in a 3D card": ({"architecture.class": "Unet"}, "does not fit dimensions 3"),
    "args not an object": ({"architecture.args": [4, 8]}, "architecture.args must be an object"),
    "negative channels": ({"architecture.args.channels": [4, -8, 16]}, "architecture.args.channels[1] -8"),
    "strides too few": ({"architecture.args.strides": [2]}, "with 3 channels a UNet needs 2"),
    "stride not whole": ({"architecture.args.strides": [2, 2.5]}, "architecture.args.strides[1] 2.5"),
    "in_channels 0": ({"in_channels": 0}, "in_channels 0"),
    "in_channels as text": ({"in_channels": "1"}, 'in_channels "1"'),
    "3D in_channels 3": ({"in_channels": 3}, "in_channels 3 must be 1"),
    "modality PET": ({"modality": "PET"}, "modality"),
    "no labels": ({"labels": {}}, "labels"),
    "label channel 0": ({"labels": {"0": "liver"}}, 'labels key "0"'),
    "label channel as a word": ({"labels": {"one": "liver"}}, 'labels key "one"'),
    "label channel 256": ({"labels": {"256": "liver"}}, 'labels key "256"'),
    "organ twice": ({"labels": {"1": "liver", "2": "liver"}}, "labels name liver more than once"),
    "two spacings": ({"spacing": [4.0, 4.0]}, "spacing"),
    "spacing 0": ({"spacing": [4.0, 4.0, 0]}, "spacing[2] 0 is outside"),
    "spacing 50 mm": ({"spacing": [4.0, 4.0, 50.0]}, "spacing[2] 50.0 is outside"),
    "spacing as text": ({"spacing": [4.0, "4", 5.0]}, 'spacing[1] "4"'),
    "spacing as bool": ({"spacing": [4.0, True, 5.0]}, "spacing[1] true"),
    "spacing NaN": ({"spacing": [4.0, 4.0, float("nan")]}, "spacing[2] NaN"),
    "orientation not a code": ({"orientation": "LPX"}, "orientation"),
    "orientation L twice": ({"orientation": "LLS"}, "orientation"),
    "intensity mode": ({"intensity.mode": "zscore"}, "intensity.mode"),
    "window upside down": ({"intensity.window": [275, -125]}, "intensity.window"),
    "window one number": ({"intensity.window": [-125]}, "intensity.window"),
    "percentiles upside down": (
        {"intensity": {"mode": "mr_percentile", "percentiles": [99.5, 0.5]}},
        "intensity.percentiles",
    ),
    "enhancement": ({"intensity.enhancement": "sharpen"}, "intensity.enhancement"),
    "roi not a stride multiple": ({"inference.roi_size": [30, 32, 32]}, "stride 4"),
    "roi two sizes": ({"inference.roi_size": [32, 32]}, "inference.roi_size"),
    "roi too large": ({"inference.roi_size": [32, 32, 1024]}, "inference.roi_size[2] 1024"),
    "default roi not a multiple": (
        {"inference": DELETE, "architecture.args.strides": [2, 5]},
        "default inference.roi_size",
    ),
    "overlap 0.999": ({"inference.overlap": 0.999}, "inference.overlap 0.999 is outside"),
    "overlap as text": ({"inference.overlap": "0.25"}, "inference.overlap"),
    "window mode": ({"inference.mode": "max"}, "inference.mode"),
    "batch size 0": ({"inference.batch_size": 0}, "inference.batch_size 0"),
    "largest component not segmented": ({"postprocess": {"largest_component": ["gallbladder"]}}, "largest_component"),
    "weights not safetensors": ({"weights": "model.pt"}, "weights"),
    "weights up a folder": ({"weights": "../model.safetensors"}, "weights"),
    "weights absolute": ({"weights": "/etc/passwd.safetensors"}, "weights"),
    "sha256 short": ({"sha256": "abc"}, "sha256"),
    "sha256 capitals": ({"sha256": "A" * 64}, "sha256"),
    "validation dice as text": ({"validation": {"dice": {"liver": "high"}}}, "validation.dice"),
    "timing as text": ({"timing": {"cpu_seconds": "fast"}}, "timing.cpu_seconds"),
    "smp encoder too deep": (
        {"dimensions": 2, "architecture": dict(SMP, args={"encoder_depth": 7}), "inference": DELETE},
        "encoder_depth 7",
    ),
    "smp decoder stages": (
        {
            "dimensions": 2,
            "architecture": dict(SMP, args={"encoder_depth": 3, "decoder_channels": [64, 32]}),
            "inference": DELETE,
        },
        "decoder_channels",
    ),
    "2.5D even slices": (
        {"dimensions": 2, "architecture": SMP, "in_channels": 2, "inference": DELETE},
        "in_channels 2 must be odd",
    ),
}


@pytest.mark.parametrize("changes, field", MALFORMED_CARDS.values(), ids=MALFORMED_CARDS.keys())
def test_a_malformed_card_is_refused_when_read_naming_the_field(tiny_package, tmp_path, changes, field):
    folder = _copy(tiny_package, tmp_path / "pkg")
    _edit(folder, changes)
    with pytest.raises(AbdomenSegError) as info:
        read_card(folder)
    assert "is invalid" in str(info.value) and field in str(info.value)


def test_every_problem_of_a_card_is_listed_in_one_error(tiny_package, tmp_path):
    folder = _copy(tiny_package, tmp_path / "pkg")
    _edit(folder, {"inference.overlap": 0.999, "spacing": [4.0, 4.0, 0], "modality": "PET"})
    with pytest.raises(AbdomenSegError) as info:
        read_card(folder)
    message = str(info.value)
    assert "inference.overlap 0.999" in message and "spacing[2] 0" in message and "modality" in message


def test_the_unchanged_test_card_and_every_shipped_card_pass():
    for path in sorted((models.RESOURCES / "models").glob("*/card.json")):
        validate_card(json.loads(path.read_text()), str(path))  # raises on any problem
    cards, broken = catalog_with_problems()
    assert broken == {} and len(cards) >= 1


def test_export_refuses_a_bad_card_before_writing_anything(tiny_package, tmp_path):
    card = dict(read_card(tiny_package.path).data, inference={"overlap": 0.999})
    network = load_network(tiny_package)
    with pytest.raises(AbdomenSegError, match="inference.overlap"):
        export_package(network, card, tmp_path / "out", register_in=tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "catalog.json").exists()


# -- item 5: weights and packages confined to their folders -------------------------------------------
@pytest.mark.parametrize("how", ["up a folder", "absolute", "symlink"])
def test_weights_outside_the_package_are_refused_before_opening(tiny_package, tmp_path, monkeypatch, how):
    folder = _copy(tiny_package, tmp_path / "pkg")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "model.safetensors", outside)  # same bytes: the sha256 alone would let it through
    data = json.loads((folder / "card.json").read_text())
    if how == "symlink":
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").symlink_to(outside)
        card = read_card(folder)
    else:  # a ModelCard made without read_card: the load itself must still refuse
        data["weights"] = "../outside.safetensors" if how == "up a folder" else str(outside)
        card = ModelCard(folder, data)
    _refuse_opening(monkeypatch)
    with pytest.raises(AbdomenSegError, match="outside"):
        load_network(card)


def _models_dir(tmp_path: Path, tiny_package, entries: list, default: str = "good") -> Path:
    """A models folder with a good package 'good' and a catalog of `entries`."""
    folder = tmp_path / "models"
    _copy(tiny_package, folder / "good", name="good")
    (folder / "catalog.json").write_text(json.dumps({"default": default, "models": entries}))
    return folder


@pytest.mark.parametrize("path", ["../elsewhere", "../..", "ABSOLUTE", "SYMLINK"])
def test_catalog_paths_outside_the_models_folder_are_refused(tiny_package, tmp_path, monkeypatch, path):
    elsewhere = _copy(tiny_package, tmp_path / "elsewhere", name="far")  # a loadable package, just not ours
    folder = _models_dir(tmp_path, tiny_package, [{"name": "good"}, {"name": "far", "path": path}])
    if path == "ABSOLUTE":
        _edit_catalog(folder, "far", str(elsewhere))
    if path == "SYMLINK":
        (folder / "far").symlink_to(elsewhere, target_is_directory=True)
        _edit_catalog(folder, "far", "far")
    _refuse_opening(monkeypatch)
    with pytest.raises(AbdomenSegError, match="outside") as info:
        find_model("far", folder)
    assert "broken" in str(info.value)
    assert list(catalog(folder)) == ["good"]


def _edit_catalog(folder: Path, name: str, path: str) -> None:
    index = json.loads((folder / "catalog.json").read_text())
    for entry in index["models"]:
        if entry["name"] == name:
            entry["path"] = path
    (folder / "catalog.json").write_text(json.dumps(index))


# -- item 6, at load time: weights that are not safetensors or not this architecture ------------------
def _rehash(folder: Path) -> None:
    """Make the card's sha256 match the (replaced) weights, so loading gets past the integrity check."""
    _edit(folder, {"sha256": models.sha256_of(folder / "model.safetensors")})


def test_pickled_weights_renamed_safetensors_are_refused(tiny_package, tmp_path):
    import torch

    folder = _copy(tiny_package, tmp_path / "pkg")
    torch.save(load_network(tiny_package).state_dict(), folder / "model.safetensors")
    _rehash(folder)
    with pytest.raises(AbdomenSegError, match="not a valid safetensors file") as info:
        load_network(read_card(folder))
    assert "pickled" in str(info.value)


@pytest.mark.parametrize(
    "changes, detail",
    [
        # a network larger than the file holds: refused from the file's size, before it is built (issue 31)
        (
            {"architecture.args.channels": [8, 16, 32]},
            r"architecture.args.channels \[8, 16, 32\] make 30,530 parameters",
        ),
        ({"architecture.args.num_res_units": 1}, "missing from the file"),
        ({"labels.6": "gallbladder"}, "differ in shape"),
        ({"architecture.args.bogus": 1}, "cannot be built"),
    ],
    ids=["channels", "residual units", "one more organ", "unknown argument"],
)
def test_weights_of_another_architecture_are_refused(tiny_package, tmp_path, changes, detail):
    folder = _copy(tiny_package, tmp_path / "pkg")
    _edit(folder, changes)  # the weights and their sha256 are untouched: only the card disagrees
    with pytest.raises(AbdomenSegError, match=detail) as info:
        load_network(read_card(folder))
    assert "tiny-test" in str(info.value)


# -- item 7: one broken package does not take the catalog down -------------------------------------------
def _break_card_json(folder):
    (folder / "card.json").unlink()


def _break_json(folder):
    (folder / "card.json").write_text("{")


def _break_overlap(folder):
    _edit(folder, {"inference.overlap": 0.999})


def _break_name(folder):
    _edit(folder, {"name": "someone-else"})


BROKEN_PACKAGES = {
    "no card.json": (_break_card_json, "no card.json"),
    "card not JSON": (_break_json, "not valid JSON"),
    "card value": (_break_overlap, "inference.overlap 0.999"),
    "card of another model": (_break_name, "named 'someone-else'"),
}


@pytest.mark.parametrize("breakage, problem", BROKEN_PACKAGES.values(), ids=BROKEN_PACKAGES.keys())
def test_a_broken_package_is_kept_aside_and_the_others_served(tiny_package, tmp_path, breakage, problem):
    folder = _models_dir(tmp_path, tiny_package, [{"name": "good"}, {"name": "bad", "path": "bad"}], default="bad")
    breakage(_copy(tiny_package, folder / "bad", name="bad"))
    cards, broken = catalog_with_problems(folder)
    assert list(cards) == ["good"] and list(broken) == ["bad"] and problem in str(broken["bad"])
    assert list(catalog(folder)) == ["good"]
    assert find_model("good", folder).name == "good"
    assert default_model_name(folder) == "bad"
    for name in ("bad", None):  # by name, and as the catalog's default
        with pytest.raises(AbdomenSegError, match="broken") as info:
            find_model(name, folder)
        assert problem in str(info.value)


MALFORMED_CATALOGS = {
    "not JSON": "{not json",
    "not UTF-8": b"\xff\xfe{",
    "a list": "[]",
    "no default": {"models": [{"name": "good"}]},
    "default a number": {"default": 3, "models": [{"name": "good"}]},
    "default not listed": {"default": "other", "models": [{"name": "good"}]},
    "models an object": {"default": "good", "models": {"good": "good"}},
    "entry a string": {"default": "good", "models": ["good"]},
    "entry without name": {"default": "good", "models": [{"path": "good"}]},
    "path a number": {"default": "good", "models": [{"name": "good", "path": 5}]},
    "name twice": {"default": "good", "models": [{"name": "good"}, {"name": "good"}]},
    "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,  # was a RecursionError
}


@pytest.mark.parametrize("content", MALFORMED_CATALOGS.values(), ids=MALFORMED_CATALOGS.keys())
def test_a_malformed_catalog_is_one_clear_error(tiny_package, tmp_path, content):
    folder = _models_dir(tmp_path, tiny_package, [{"name": "good"}])
    index = folder / "catalog.json"
    if isinstance(content, bytes):
        index.write_bytes(content)
    else:
        index.write_text(content if isinstance(content, str) else json.dumps(content))
    for call in (
        catalog,
        catalog_with_problems,
        default_model_name,
        lambda d: find_model(None, d),
        lambda d: find_model("good", d),
    ):
        with pytest.raises(AbdomenSegError, match="catalog") as info:
            call(folder)
        assert "catalog.json must read" in str(info.value)  # the fix
