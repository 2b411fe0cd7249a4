"""Model packages: safetensors weights + a JSON card, listed in a catalog under Resources/models.

A package is a folder `<name>/` holding `card.json` and the weights file the card names. The card
records everything needed to reproduce the preprocessing (spacing, orientation, intensity handling),
how the model was trained and how well it did on its validation split. Loading checks the sha256 and
reads tensors with safetensors, which cannot execute code (no pickle).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AbdomenSegError
from .organs import BY_NAME

RESOURCES = Path(__file__).resolve().parent.parent / "Resources"
MODELS_DIR = Path(os.environ.get("ABDOMENSEG_MODELS", RESOURCES / "models"))
REQUIRED_CARD_KEYS = ("name", "dimensions", "architecture", "modality", "labels", "spacing",
                      "intensity", "weights", "sha256")


@dataclass
class ModelCard:
    path: Path  # the package folder
    data: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def weights_path(self) -> Path:
        return self.path / self.data["weights"]

    @property
    def channel_organs(self) -> dict:
        """Output channel -> our organ label value (channel 0 is background)."""
        return {int(ch): BY_NAME[name].label for ch, name in self.data["labels"].items()}

    @property
    def out_channels(self) -> int:
        return max(int(c) for c in self.data["labels"]) + 1

    @property
    def in_channels(self) -> int:
        return int(self.data.get("in_channels", 1))

    def summary(self) -> str:
        val = self.data.get("validation", {}).get("dice", {})
        dice = ", ".join(f"{k} {v:.3f}" for k, v in val.items()) if val else "n/a"
        t = self.data.get("timing", {})
        return (f"{self.name}: {self.data.get('title', '')}\n"
                f"  {self.data['dimensions']}D {self.data['architecture']['class']}, {self.data['modality']}, "
                f"spacing {self.data['spacing']} mm\n"
                f"  organs: {', '.join(self.data['labels'].values())}\n"
                f"  validation Dice: {dice}\n"
                f"  expected time: CPU {_seconds(t.get('cpu_seconds'))}, GPU {_seconds(t.get('gpu_seconds'))}")


def _seconds(value) -> str:
    return "not measured" if value is None else f"{value} s"


def read_card(package_dir) -> ModelCard:
    package_dir = Path(package_dir)
    card_path = package_dir / "card.json"
    if not card_path.is_file():
        raise AbdomenSegError(f"model package '{package_dir}' has no card.json",
                              "a model package is a folder with card.json and its .safetensors weights")
    try:
        data = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise AbdomenSegError(f"model card '{card_path}' is not valid JSON ({exc})", "fix or re-export the card") from None
    missing = [k for k in REQUIRED_CARD_KEYS if k not in data]
    if missing:
        raise AbdomenSegError(f"model card '{card_path}' lacks {', '.join(missing)}",
                              "re-export the model with `python -m AbdomenSegLib train` or add the fields")
    unknown = [n for n in data["labels"].values() if n not in BY_NAME]
    if unknown:
        raise AbdomenSegError(f"model card '{card_path}' names unknown organs {unknown}",
                              f"use names from the organ table: {', '.join(BY_NAME)}")
    return ModelCard(package_dir, data)


def catalog(models_dir=None) -> dict:
    """name -> ModelCard for every package listed in catalog.json (default model first)."""
    models_dir = Path(models_dir or MODELS_DIR)
    index = models_dir / "catalog.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    cards = {}
    for entry in entries.get("models", []):
        cards[entry["name"]] = read_card(models_dir / entry.get("path", entry["name"]))
    return cards


def default_model_name(models_dir=None) -> str:
    models_dir = Path(models_dir or MODELS_DIR)
    index = models_dir / "catalog.json"
    if not index.is_file():
        raise AbdomenSegError(f"no model catalog at '{index}'", "reinstall AbdomenSeg or set ABDOMENSEG_MODELS")
    return json.loads(index.read_text())["default"]


def find_model(name_or_path=None, models_dir=None) -> ModelCard:
    """A model by catalog name, or by the path of a package folder; None -> the default model."""
    if name_or_path and Path(name_or_path).is_dir():
        return read_card(name_or_path)
    name = name_or_path or default_model_name(models_dir)
    cards = catalog(models_dir)
    if name not in cards:
        raise AbdomenSegError(
            f"model '{name}' is not installed",
            f"installed models: {', '.join(cards) or 'none'} (see `python -m AbdomenSegLib models`); "
            "or give the path of a model package folder",
        )
    return cards[name]


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_network(card: ModelCard, device: str = "cpu"):
    """Build the card's network and load its weights after checking the sha256."""
    from safetensors.torch import load_file
    from .networks import build_network

    if not card.weights_path.is_file():
        raise AbdomenSegError(f"weights '{card.weights_path}' are missing", "reinstall the model package")
    actual = sha256_of(card.weights_path)
    if actual != card["sha256"]:
        raise AbdomenSegError(
            f"weights of model '{card.name}' fail the integrity check (sha256 {actual[:12]}… ≠ card {card['sha256'][:12]}…)",
            "the file is corrupt or was replaced; reinstall the model package",
        )
    network = build_network(card["architecture"], card.in_channels, card.out_channels)
    network.load_state_dict(load_file(str(card.weights_path), device="cpu"))
    return network.to(device).eval()


def export_package(network, card_data: dict, out_dir, *, register_in=None, make_default=False) -> ModelCard:
    """Write weights (safetensors) + card with sha256; optionally list it in a catalog."""
    from safetensors.torch import save_file
    from .io import atomic_output, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    # Re-exporting over an installed package: each file is swapped whole, never left half-written.
    with atomic_output(weights, ".safetensors") as tmp:
        save_file(state, tmp)
    card_data = dict(card_data, weights=weights.name, sha256=sha256_of(weights))
    write_json(card_data, out_dir / "card.json")
    if register_in is not None:
        index = Path(register_in) / "catalog.json"
        entries = json.loads(index.read_text()) if index.is_file() else {"default": card_data["name"], "models": []}
        entry = {"name": card_data["name"], "path": os.path.relpath(out_dir, register_in)}
        names = [e["name"] for e in entries["models"]]
        if entry["name"] in names:  # re-export keeps the model's place in the list
            entries["models"][names.index(entry["name"])] = entry
        else:
            entries["models"].append(entry)
        if make_default:
            entries["default"] = card_data["name"]
        write_json(entries, index)
    return read_card(out_dir)
