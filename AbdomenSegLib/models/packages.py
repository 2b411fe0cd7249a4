"""Model packages: safetensors weights + a JSON card, listed in a catalog under Resources/models.

A package is a folder `<name>/` holding `card.json` and the weights file the card names. The card
records everything needed to reproduce the preprocessing (spacing, orientation, intensity handling),
how the model was trained and how well it did on its validation split. Loading checks the sha256 and
reads tensors with safetensors, which cannot execute code (no pickle).

Cards and catalogs are files anyone can edit or ship, so: a card's values are judged once, when it is read
(card_schema); every path they name must resolve inside its package or the models folder (`inside`); and a
broken package is kept aside with its error instead of taking the whole catalog down (`catalog_with_problems`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.untrusted import load_json
from AbdomenSegLib.models.card import ModelCard, StrPath, inside
from AbdomenSegLib.models.card_schema import catalog_problems, validate_card

if TYPE_CHECKING:
    import torch
    from torch import nn


def _resources() -> Path:
    """The shipped resources: Resources/ beside the package in a checkout and in Slicer (the extension installs
    both into qt-scripted-modules/), or the package data AbdomenSegLib/resources/ of an installed wheel."""
    here = Path(__file__).resolve().parents[1]  # the AbdomenSegLib folder
    for candidate in (here.parent / "Resources", here / "resources"):
        if (candidate / "models").is_dir():
            return candidate
    return here.parent / "Resources"


RESOURCES = _resources()
# The sample scan of the quick start: TotalSegmentator's example CT (Apache-2.0, Resources/Samples/NOTICE).
SAMPLE_CT = RESOURCES / "Samples" / "example_ct.nii.gz"
MODELS_DIR = Path(os.environ.get("ABDOMENSEG_MODELS", RESOURCES / "models"))
CATALOG_FIX = (
    'catalog.json must read {"default": "<name>", "models": [{"name": "<name>", "path": "<folder>"}]}; '
    "fix it, or reinstall AbdomenSeg (or point ABDOMENSEG_MODELS at another models folder)"
)
REEXPORT = "re-export the model with `python -m AbdomenSegLib train <config> --export-only` or reinstall its package"


def _read_json(path: Path, what: str, fix: str) -> Any:
    return load_json(path, what, fix)  # bounded in size and depth (core/untrusted.py)


def read_card(package_dir: StrPath) -> ModelCard:
    """The package's card, its values validated (card_schema): one error lists every bad field."""
    package_dir = Path(package_dir)
    if not (package_dir / "card.json").is_file():
        raise AbdomenSegError(
            f"model package '{package_dir}' has no card.json",
            "a model package is a folder with card.json and its .safetensors weights",
        )
    card_path = inside(package_dir / "card.json", package_dir, "model card")
    data = _read_json(card_path, "model card", REEXPORT)
    validate_card(data, str(package_dir / "card.json"))
    return ModelCard(package_dir, data)


def read_catalog(models_dir: StrPath | None = None) -> dict[str, Any] | None:
    """catalog.json, its structure checked ({"default", "models": [{"name", "path"}]}); None when absent."""
    index = Path(models_dir or MODELS_DIR) / "catalog.json"
    if not index.is_file():
        return None
    entries: dict[str, Any] = _read_json(index, "model catalog", CATALOG_FIX)  # catalog_problems checks it is
    problems = catalog_problems(entries)
    if problems:
        raise AbdomenSegError(f"model catalog '{index}' is invalid: {'; '.join(problems)}", CATALOG_FIX)
    return entries


def catalog_with_problems(models_dir: StrPath | None = None) -> tuple[dict[str, ModelCard], dict[str, AbdomenSegError]]:
    """(name -> ModelCard for every usable package, name -> the error of every broken one), in catalog order.

    One broken package (a hand-edited card, missing files) must not take the other models down with it;
    a malformed catalog.json itself is an AbdomenSegError, as nothing in it can be trusted."""
    models_dir = Path(models_dir or MODELS_DIR)
    index = read_catalog(models_dir)
    cards: dict[str, ModelCard] = {}
    broken: dict[str, AbdomenSegError] = {}
    for entry in (index or {}).get("models", []):
        try:
            cards[entry["name"]] = _read_entry(models_dir, entry)
        except AbdomenSegError as error:
            broken[entry["name"]] = error
    # Ensembles once every single model is read: their members come from this catalog (ensemble_card.py).
    singles = {name: card for name, card in cards.items() if card.get("ensemble") is None}
    for name, card in cards.items():
        if card.get("ensemble") is not None:
            try:
                cards[name] = _resolve_ensemble(card, lambda member: _member(member, singles, broken, cards))
            except AbdomenSegError as error:
                broken[name] = error
    return {n: c for n, c in cards.items() if n not in broken}, broken


def _member(
    name: str, singles: dict[str, ModelCard], broken: dict[str, AbdomenSegError], cards: dict[str, ModelCard]
) -> ModelCard:
    if name in singles:
        return singles[name]
    if name in broken:
        raise AbdomenSegError(f"its member '{name}' is broken: {broken[name].problem}", broken[name].fix)
    if name in cards:
        raise AbdomenSegError(f"its member '{name}' is itself an ensemble", "list single models as members")
    raise AbdomenSegError(f"its member '{name}' is not installed", f"installed models: {', '.join(singles) or 'none'}")


def _resolve_ensemble(card: ModelCard, lookup: Callable[[str], ModelCard]) -> ModelCard:
    """An ensemble package's card with its members (`lookup(name)` -> ModelCard) resolved and checked."""
    from AbdomenSegLib.models.ensemble_card import ensemble_of

    members = []
    for name in card["ensemble"]:
        try:
            members.append(lookup(name))
        except AbdomenSegError as error:
            raise AbdomenSegError(f"ensemble '{card.name}': {error.problem}", error.fix) from None
    return ensemble_of(members, card.name, card.get("title", ""), card.path)


def _read_entry(models_dir: Path, entry: dict[str, Any]) -> ModelCard:
    name = entry["name"]
    folder = models_dir / entry.get("path", name)
    inside(folder, models_dir, f"package of model '{name}'")
    if not folder.exists() and isinstance(entry.get("download"), dict):
        # A package published apart from the extension (model_store.py): installed in the user's model folder?
        from AbdomenSegLib.models.locations import installed_folder

        folder = installed_folder(entry)
        if folder is None:
            raise AbdomenSegError(
                f"model '{name}' is not installed (it is published separately)",
                f"install it with `abdomenseg models install {name}` or from the AbdomenSeg panel",
            )
    card = read_card(folder)
    if card.name != name:  # find_model(name) must return the model of that name, not another
        raise AbdomenSegError(
            f"catalog entry '{name}' points to '{folder}', whose card is named '{card.name}'",
            "give the catalog entry and the card the same name",
        )
    return card


def catalog(models_dir: StrPath | None = None) -> dict[str, ModelCard]:
    """name -> ModelCard for every usable package listed in catalog.json (broken ones left out:
    see catalog_with_problems)."""
    return catalog_with_problems(models_dir)[0]


def default_model_name(models_dir: StrPath | None = None) -> str:
    models_dir = Path(models_dir or MODELS_DIR)
    index = read_catalog(models_dir)
    if index is None:
        raise AbdomenSegError(
            f"no model catalog at '{models_dir / 'catalog.json'}'", "reinstall AbdomenSeg or set ABDOMENSEG_MODELS"
        )
    name: str = index["default"]
    return name


def recommended_model(modality: str, models_dir: StrPath | None = None) -> str:
    """The catalog's recommended model for a modality ("recommended": {"CT": name, "MR": name}); the default
    model for CT or when the catalog names none."""
    index = read_catalog(Path(models_dir or MODELS_DIR)) or {}
    return str((index.get("recommended") or {}).get(modality.upper()) or index.get("default", ""))


def recommended_models(models_dir: StrPath | None = None) -> list[str]:
    """The catalog's recommended models, default first (the `models` listing puts them first)."""
    index = read_catalog(Path(models_dir or MODELS_DIR)) or {}
    names = [index.get("default"), *(index.get("recommended") or {}).values()]
    return [n for i, n in enumerate(names) if n and n not in names[:i]]


def model_purposes(models_dir: StrPath | None = None) -> dict[str, str]:
    """{name: what the model is for}, the catalog entries' "for" lines."""
    index = read_catalog(Path(models_dir or MODELS_DIR)) or {}
    return {e["name"]: e["for"] for e in index.get("models", []) if isinstance(e, dict) and e.get("for")}


def partners_dir(package: StrPath, models_dir: StrPath | None = None) -> StrPath | None:
    """Where a package's partner models (an ensemble's members, a cascade's other stage) are looked up: the catalog
    of the folder holding it, else the models folder."""
    around = Path(package).resolve().parent
    return around if (around / "catalog.json").is_file() else models_dir


def find_model(name_or_path: StrPath | None = None, models_dir: StrPath | None = None) -> ModelCard:
    """A model by catalog name, or by the path of a package folder; None -> the default model. `a+b` (names or
    folders joined by '+') is an ensemble of those models (ensemble_card.py)."""
    if name_or_path and Path(name_or_path).is_dir():
        card = read_card(name_or_path)
        if card.get("ensemble") is None:
            return card
        catalog_dir = partners_dir(name_or_path, models_dir)
        return _resolve_ensemble(card, lambda member: find_model(member, catalog_dir))
    if name_or_path and "+" in str(name_or_path):
        from AbdomenSegLib.models.ensemble_card import ensemble_of

        parts = [p.strip() for p in str(name_or_path).split("+")]
        if not all(parts):
            raise AbdomenSegError(f"model '{name_or_path}' has an empty member", "join model names with '+': a+b")
        members = [find_model(part, models_dir) for part in parts]
        return ensemble_of(members, "+".join(m.name for m in members))
    name = name_or_path or default_model_name(models_dir)
    cards, broken = catalog_with_problems(models_dir)
    if name in broken:  # then a catalog name, a str: a path that is no package folder is no key
        error = broken[str(name)]
        raise AbdomenSegError(f"model '{name}' is installed but broken: {error.problem}", error.fix)
    if name not in cards:
        raise AbdomenSegError(
            f"model '{name}' is not installed",
            f"installed models: {', '.join(cards) or 'none'} (see `python -m AbdomenSegLib models`); "
            "or give the path of a model package folder",
        )
    return cards[str(name)]  # a catalog name, as above


def sha256_of(path: StrPath) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_network(card: ModelCard, device: str = "cpu") -> nn.Module:
    """Build the card's network and load its weights after checking the sha256."""
    path = card.weights_path  # refuses weights outside the package before anything is opened
    if not path.is_file():
        raise AbdomenSegError(f"weights '{path}' are missing", "reinstall the model package")
    actual = sha256_of(path)
    if actual != card["sha256"]:
        raise AbdomenSegError(
            f"weights of model '{card.name}' fail the integrity check (sha256 {actual[:12]}… ≠ card {card['sha256'][:12]}…)",
            "the file is corrupt or was replaced; reinstall the model package",
        )
    _check_weights_fit(card, path)  # before the network is built: a card's channels may ask for many GB
    network = _build(card)
    _load_weights(network, _read_tensors(path, card), card)
    return network.to(device).eval()


# The smallest a weights file may be for a network of n parameters: n half-precision numbers (exported float32 is 4).
_MIN_BYTES_PER_PARAMETER = 2


def _check_weights_fit(card: ModelCard, path: Path) -> None:
    """The network the card describes (parameter count from its architecture: footprint.py) must fit the weights
    file's size and, loaded twice (file and network), the memory limit; else refused without building it."""
    from AbdomenSegLib.core.limits import max_memory_bytes
    from AbdomenSegLib.models.footprint import FLOAT_BYTES, parameter_count

    params = parameter_count(card["architecture"], card.in_channels, card.out_channels)
    if params is None:  # not estimated for this architecture: the strict load judges it
        return
    field = f"architecture.args.channels {card['architecture']['args']['channels']}"
    size, limit = path.stat().st_size, max_memory_bytes()
    if 2 * params * FLOAT_BYTES > limit:
        raise AbdomenSegError(
            f"model '{card.name}': its {field} make a network of {params / 1e6:,.0f} M parameters "
            f"({2 * params * FLOAT_BYTES / 1e9:.1f} GB to load), over the memory limit of {limit / 1e9:.1f} GB",
            "fix the card's architecture, or raise ABDOMENSEG_MAX_MEMORY_GB if this machine has the memory",
        )
    if size < params * _MIN_BYTES_PER_PARAMETER:
        raise AbdomenSegError(
            f"weights of model '{card.name}' do not fit the {card['architecture']['class']} its card describes: "
            f"its {field} make {params:,} parameters (at least {params * _MIN_BYTES_PER_PARAMETER / 1e6:,.1f} MB), "
            f"the file holds {size / 1e6:,.1f} MB",
            "the card and the weights come from different models; " + REEXPORT,
        )


def cpu_copy(card: ModelCard, network: nn.Module) -> nn.Module:
    """A CPU twin of `network` (the card's architecture, `network`'s current weights), for finishing one call
    on the CPU after the GPU ran out of memory: `network` itself stays where it is (inference.Segmenter)."""
    twin = _build(card)
    twin.load_state_dict(network.state_dict())  # copied from the device, no new device memory
    return twin.eval()


def _build(card: ModelCard) -> nn.Module:
    from AbdomenSegLib.models.networks import build_network

    try:
        # Loaded packages are for inference (and for reading their state_dict, whose keys are the same): the
        # 3D UNet is then built without MONAI, whose import alone cost ~2.8 s of every run (networks.py).
        return build_network(card["architecture"], card.in_channels, card.out_channels, for_inference=True)
    except (TypeError, ValueError) as exc:  # an argument MONAI/smp do not take, or a value they refuse
        raise AbdomenSegError(
            f"model '{card.name}': architecture {card['architecture']['class']} cannot be built "
            f"from the card's args ({exc})",
            "fix architecture.args in the card",
        ) from None


def _read_tensors(path: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise AbdomenSegError(
            f"weights '{path}' of model '{card.name}' are not a valid safetensors file ({exc})",
            "pickled checkpoints (.pt/.pth) are refused, as loading them can run code; " + REEXPORT,
        ) from None


def _load_weights(network: nn.Module, state: dict[str, torch.Tensor], card: ModelCard) -> None:
    """Strict loading: every tensor the card's network has, with its shape, and no others."""
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = _mismatch(network.state_dict(), state) or str(exc).splitlines()[0]
        raise AbdomenSegError(
            f"weights of model '{card.name}' do not fit the {card['architecture']['class']} "
            f"its card describes: {detail}",
            "the card and the weights come from different models; " + REEXPORT,
        ) from None


def _mismatch(expected: dict[str, Any], found: dict[str, Any]) -> str:
    """The difference between two state dicts in a sentence (torch's message lists every tensor)."""
    reshaped = [k for k in expected if k in found and expected[k].shape != found[k].shape]
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    parts = []
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} tensors differ in shape (e.g. {k}: file {list(found[k].shape)}, "
            f"card {list(expected[k].shape)})"
        )
    if missing:
        parts.append(f"{len(missing)} tensors are missing from the file (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} tensors in the file are not in the card's network (e.g. {extra[0]})")
    return "; ".join(parts)


def export_package(
    network: nn.Module,
    card_data: dict[str, Any],
    out_dir: StrPath,
    *,
    register_in: StrPath | None = None,
    make_default: bool = False,
) -> ModelCard:
    """Write weights (safetensors) + card with sha256; optionally list it in a catalog."""
    from safetensors.torch import save_file

    from AbdomenSegLib.io.files import atomic_output, write_json

    out_dir = Path(out_dir)
    weights = out_dir / "model.safetensors"
    # Judge the card before anything is written: re-exporting over an installed package must not replace its
    # weights and then fail on the card, leaving a package whose card and weights do not belong together.
    validate_card(dict(card_data, weights=weights.name), str(out_dir / "card.json"), pending=("sha256",))
    index = read_catalog(register_in) if register_in is not None else None  # a malformed one refused here too
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    # Re-exporting over an installed package: each file is swapped whole, never left half-written.
    with atomic_output(weights, ".safetensors") as tmp:
        save_file(state, tmp)
    card_data = dict(card_data, weights=weights.name, sha256=sha256_of(weights))
    write_json(card_data, out_dir / "card.json")
    if register_in is not None:
        entries = index or {"default": card_data["name"], "models": []}
        entry = {"name": card_data["name"], "path": os.path.relpath(out_dir, register_in)}
        names = [e["name"] for e in entries["models"]]
        if entry["name"] in names:  # re-export keeps the model's place in the list, and its terms
            old = entries["models"][names.index(entry["name"])]
            # ... but not its download block: the published zip holds the weights exported before (model_store.py)
            entries["models"][names.index(entry["name"])] = dict(
                {k: v for k, v in old.items() if k != "download"}, **entry
            )
        else:
            entries["models"].append(entry)
        if make_default:
            entries["default"] = card_data["name"]
        write_json(entries, Path(register_in) / "catalog.json")
    return read_card(out_dir)
