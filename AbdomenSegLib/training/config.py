"""Training configs: their schema (the defaults), reading (with `extends`), and the check of the whole config.

`check_config` judges every section before any work starts: the data cache takes minutes to build and a
run hours, so an option the run cannot use (an unknown loss, an augmentation the model cannot take, a model
whose exported card would be refused) must fail here, not after the caching or at export.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import BY_NAME
from AbdomenSegLib.core.untrusted import load_json

DEFAULT_CONFIG = {
    "name": "my-model",
    "title": "",
    "data": {
        "root": None,
        # The label files' numbering, named, never assumed (conventions.training_labels): a convention of
        # organs.CONVENTIONS, or data.labels {value: organ name}, or an nnU-Net dataset.json in data.root. A label
        # value it does not map is refused when the cache is built (datasets.cache_case).
        "convention": None,
        "labels": None,
        "input_intensity": "native",
        "val_count": 4,
        "seed": 0,
        # Cross-validation: {"index": k, "of": n} validates on the k-th of n folds instead of val_count cases
        # (datasets.split_cases; experiments/cross_validate.py runs all n).
        "fold": None,
        "cache": ".cache/{name}.npz",
        # The files' true direction matrix where their headers are wrong (datasets.read_case); None: trust them.
        "direction": None,
        # A fine second-stage model (cascade.py): {"first_stage": model name, "organs": [...], "margin_mm": [x, y,
        # z]}; the cache holds only the box around those organs of each reference (preprocessing/region.py); checked as the
        # card's "cascade" block (_check_card).
        "region": None,
        # train.trainer "synth" (training/synth_trainer.py): several datasets, each {"name", "root", "kind": "ct"|"mr",
        # "convention", "direction"}, and the one whose real images validate (split by val_count and seed).
        "sources": None,
        # synth trainer: CT tissue maps get perirenal fat and renal fascia classes (tissue_labels.py)
        "perirenal": False,
        "val_source": None,
    },
    "model": {
        "dimensions": 3,
        "modality": "CT",
        "architecture": {
            "class": "UNet",
            "args": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2},
        },
        "spacing": [2.0, 2.0, 3.0],
        # Axis order of the network's input grid (the card carries it; inference reorients to it).
        "orientation": "LPS",
        "intensity": {"mode": "ct_window", "window": [-125, 275], "enhancement": "none"},
        "organs": ["liver", "spleen", "kidney_right", "kidney_left", "pancreas"],
        # Organs whose output keeps only its largest connected piece by default (the card carries it, as
        # nnU-Net's models carry their post-processing); users can still choose all organs or none.
        "postprocess": {"largest_component": []},
        # MR: the sequence the model is for ("T2-SPIR", ...), or "any" for a contrast-agnostic (synth) model; the
        # card carries it so that users and the panel can tell the MR models apart.
        "sequence": None,
    },
    "train": {
        "steps": 2000,
        "batch_size": 2,
        "patch": [64, 96, 96],
        "lr": 2e-3,
        "optimizer": "adamw",
        "scheduler": "poly",
        "step_decay": {"every": 1000, "gamma": 0.5},
        "weight_decay": 1e-5,
        "loss": "dice_ce",
        "val_every": 250,
        "background_ratio": 1.0,
        # organ name -> how often crops centre on it relative to the others (default 1 each): more crops of the
        # organs the model gets wrong most, as RandCropByLabelClasses' ratios
        "organ_ratios": {},
        "seed": 0,
        "threads": 2,
        # Processes that make the batches ahead of the network (a torch DataLoader); 0 = in the training
        # process. Batch s is the same either way (seeded by the step), so a resumed run still matches.
        "loader_workers": 0,
        # "monai": batches from the MONAI chain on the CPU (recipe.transforms); "device": the cache moved to
        # the training device once and each batch built there with batched tensor ops (device_batches.py)
        "pipeline": "monai",
        # device pipeline: the network and its input in channels_last_3d (faster convolutions where measured so)
        "channels_last": False,
        "init_from": None,
        # "standard": the cached images as they are; "synth": contrast-agnostic, images painted from tissue
        # maps (training/synth_trainer.py), real images of "mr" sources kept with probability 1 - synth.prob.
        "trainer": "standard",
        # slab_prob: how often a crop is cut to a thin slab padded as a short volume is (synth.SlabTransform);
        # ink_prob: how often a synthetic image gets opposed-phase dark fat/water edges (synth.synthesize)
        # dark_prob: how often a tissue class is drawn as dark as air (synth.SynthParams.dark_prob)
        # min_contrast: organs hidden from most of their surface (means closer than this) are redrawn
        # (synth.SynthParams.min_contrast); 0 = plain SynthSeg draws
        # perirenal_as_fat: how often the perirenal fat takes the other fat's intensity (synth.SynthParams)
        "synth": {
            "prob": 0.6,
            "slab_prob": 0.0,
            "ink_prob": 0.0,
            "dark_prob": 0.0,
            "min_contrast": 0.0,
            "perirenal_as_fat": 0.0,
        },
        "augment": {
            "affine_prob": 0.2,
            "rotate": 0.2,
            "scale": 0.1,
            "shear": 0.0,
            "elastic_prob": 0.0,
            "intensity_prob": 0.5,
            "blur_prob": 0.0,
            "contrast_prob": 0.0,
            "noise_prob": 0.0,
            "unenhanced_prob": 0.0,
            "enlarge_spleen_prob": 0.0,
            "renal_cyst_prob": 0.0,
            # Model axes ("z", "y", "x") to mirror along, each with probability 0.5; the left-right one trades
            # the paired organs' labels (models/mirroring.py). The card records them: the only axes --tta may mirror.
            "flip_axes": [],
        },
    },
}


def choices() -> dict:
    """(section, key) -> the values a config may give; the recipe's tables are the source of the names."""
    from AbdomenSegLib.training.recipe import LOSSES, OPTIMIZERS, SCHEDULERS

    return {
        ("train", "optimizer"): tuple(OPTIMIZERS),
        ("train", "scheduler"): tuple(SCHEDULERS),
        ("train", "loss"): tuple(LOSSES),
        ("model", "modality"): ("CT", "MR"),
        ("train", "trainer"): ("standard", "synth"),
        ("train", "pipeline"): ("monai", "device"),
    }


def _merge(base: dict, override: dict, path="", strict=True) -> dict:
    """`override` over `base`, section by section; the architecture, its args and the intensity block are
    replaced whole. strict: every key must exist in `base` (defaults); otherwise new keys are added (extends)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if strict and key not in base:
            raise AbdomenSegError(f"unknown config key '{path}{key}'", f"known keys here: {', '.join(base)}")
        below = base.get(key)
        if (
            isinstance(below, dict)
            and key not in ("args", "intensity", "architecture")
            and isinstance(value, dict)
            and below
        ):
            out[key] = _merge(below, value, f"{path}{key}.", strict)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config(path: Path, seen=()) -> dict:
    """A JSON config file; `"extends": "other.json"` (relative to this file) starts from that config, so a
    continuation stage only states what it changes."""
    if not path.exists():  # a folder or FIFO: the loader says what it is
        raise AbdomenSegError(f"config '{path}' does not exist", "give the path of a JSON training config")
    if path.resolve() in seen:
        raise AbdomenSegError(
            f"config '{path}' extends itself (through {', '.join(p.name for p in seen)})",
            "remove the circular 'extends'",
        )
    source = load_json(path, "config", "fix the JSON syntax")
    if not isinstance(source, dict):
        raise AbdomenSegError(f"config '{path}' is not a JSON object", 'write it as {"data": ..., ...}')
    parent = source.pop("extends", None)
    if parent is None:
        return source
    return _merge(read_config(path.parent / parent, seen + (path.resolve(),)), source, strict=False)


def load_config(source) -> dict:
    """Config from a JSON file or dict, merged over defaults and checked whole (check_config)."""
    if not isinstance(source, dict):
        source = read_config(Path(source))
    config = _merge(DEFAULT_CONFIG, source)
    check_config(config)
    return config


def check_config(config: dict) -> None:
    """Raise AbdomenSegError ('<problem>. <fix>') for the first problem of a merged config; cheap (no data
    read), so the trainer runs it again on the config it is given before it builds the data cache."""
    _check_choices(config)
    _check_data(config)
    _check_model(config)
    _check_train(config["train"], config["model"]["dimensions"])
    _check_organ_ratios(config["train"], config["model"]["organs"])
    _check_augment(config["train"]["augment"], config["model"])
    _check_card(config)


def _check_choices(config):
    for (section, key), allowed in choices().items():
        if config[section][key] not in allowed:
            raise AbdomenSegError(
                f"config {section}.{key} = '{config[section][key]}' is not supported",
                f"use one of: {', '.join(allowed)}",
            )


def _check_data(config):
    from AbdomenSegLib.core.organs import CONVENTIONS
    from AbdomenSegLib.preprocessing.datasets import check_direction
    from AbdomenSegLib.preprocessing.pipeline import INPUT_INTENSITIES

    d = config["data"]
    if not isinstance(d["perirenal"], bool):
        raise AbdomenSegError(f"config data.perirenal is {d['perirenal']!r}", "set it to true or false")
    synth = config["train"]["trainer"] == "synth"
    if d["perirenal"] and not synth:  # only tissue maps have a perirenal class
        raise AbdomenSegError("config data.perirenal is set for a standard trainer", 'use train.trainer "synth"')
    if d["region"] and synth:  # the synth trainer caches whole tissue maps: a card would claim crops it never saw
        raise AbdomenSegError("config data.region (a second stage) is set for a synth trainer", "leave one out")
    if synth:
        _check_sources(config)
    elif not d["root"] or not Path(d["root"]).is_dir():
        raise AbdomenSegError(
            f"config data.root '{d['root']}' is not a folder", "set data.root to a dataset with images/ and labels/"
        )
    if not synth and isinstance(d["convention"], str) and d["convention"] not in CONVENTIONS:
        raise AbdomenSegError(
            f"config data.convention '{d['convention']}' is not a known label convention",
            f"use one of: {', '.join(sorted(CONVENTIONS))}",
        )
    if d["input_intensity"] not in INPUT_INTENSITIES:
        raise AbdomenSegError(
            f"config data.input_intensity '{d['input_intensity']}' is not supported",
            f"use one of: {', '.join(INPUT_INTENSITIES)}",
        )
    _whole(d["val_count"], "data.val_count", 1)
    _whole(d["seed"], "data.seed", 0)
    _check_fold(d["fold"])
    try:
        cache = d["cache"].format(name=config["name"])
    except (AttributeError, KeyError, IndexError, ValueError):
        cache = ""
    if not cache:
        raise AbdomenSegError(
            f"config data.cache {d['cache']!r} is not a file path",
            "give a path such as .cache/{name}.npz ({name} is the config's name)",
        )
    if d["direction"] is not None:
        check_direction(d["direction"])
    if not synth:  # data.labels or a dataset.json become the convention every reader of the data uses (a mapping)
        from AbdomenSegLib.evaluation.conventions import training_labels

        d["convention"], d["labels"] = training_labels(d), None


def _check_fold(fold):
    if fold is None:
        return
    if not isinstance(fold, dict) or set(fold) != {"index", "of"}:
        raise AbdomenSegError(
            f"config data.fold {fold!r} is not a fold", 'give data.fold as {"index": 0, "of": 4}, or null for none'
        )
    _whole(fold["of"], "data.fold.of", 2)
    _whole(fold["index"], "data.fold.index", 0)
    if fold["index"] >= fold["of"]:
        raise AbdomenSegError(
            f"config data.fold index {fold['index']} is not one of {fold['of']} folds",
            f"give an index from 0 to {fold['of'] - 1}",
        )


def _check_sources(config):
    """data.sources and data.val_source of a synth run (training/synth_trainer.py, synth_data.py)."""
    from AbdomenSegLib.core.organs import CONVENTIONS
    from AbdomenSegLib.preprocessing.datasets import check_direction
    from AbdomenSegLib.training.synth_data import KINDS

    d = config["data"]
    sources = d["sources"]
    fix = 'give data.sources as [{"name": "btcv", "root": "...", "kind": "ct", "convention": "btcv"}, ...]'
    if not isinstance(sources, list) or not sources:
        raise AbdomenSegError("config train.trainer 'synth' needs data.sources (a list of datasets)", fix)
    names = []
    for source in sources:
        if not isinstance(source, dict) or not {"name", "root", "kind", "convention"} <= set(source):
            raise AbdomenSegError(f"config data.sources entry {source!r} lacks name, root, kind or convention", fix)
        if not Path(source["root"]).is_dir():
            raise AbdomenSegError(
                f"config data.sources '{source['name']}' root '{source['root']}' is not a folder",
                "point it at a dataset with images/ and labels/",
            )
        if source["kind"] not in KINDS:
            raise AbdomenSegError(
                f"config data.sources '{source['name']}' kind '{source['kind']}' is not known",
                f"use one of: {', '.join(KINDS)}",
            )
        if source["convention"] not in CONVENTIONS:
            raise AbdomenSegError(
                f"config data.sources '{source['name']}' convention '{source['convention']}' is "
                "not a known label convention",
                f"use one of: {', '.join(sorted(CONVENTIONS))}",
            )
        if source.get("direction") is not None:
            check_direction(source["direction"])
        names.append(source["name"])
    real = [s["name"] for s in sources if s["kind"] == "mr"]
    if d["val_source"] not in real:
        raise AbdomenSegError(
            f"config data.val_source {d['val_source']!r} is not one of the MR sources {real}",
            "validate on the real images of an MR source: name it in data.val_source",
        )
    _real(config["train"]["synth"]["prob"], "train.synth.prob", 0.0, 1.0)
    _real(config["train"]["synth"]["slab_prob"], "train.synth.slab_prob", 0.0, 1.0)
    _real(config["train"]["synth"]["ink_prob"], "train.synth.ink_prob", 0.0, 1.0)
    _real(config["train"]["synth"]["dark_prob"], "train.synth.dark_prob", 0.0, 1.0)
    _real(config["train"]["synth"]["min_contrast"], "train.synth.min_contrast", 0.0, 0.5)
    _real(config["train"]["synth"]["perirenal_as_fat"], "train.synth.perirenal_as_fat", 0.0, 1.0)


def _check_model(config):
    m = config["model"]
    dims, arch = m["dimensions"], m["architecture"].get("class")
    from AbdomenSegLib.models.networks import MONAI_3D, SMP_2D

    if dims not in (2, 3) or arch not in (MONAI_3D if dims == 3 else SMP_2D):
        raise AbdomenSegError(
            f"model.dimensions {dims} does not fit architecture '{arch}'",
            f"3D: {', '.join(MONAI_3D)} (MONAI); 2D: {', '.join(SMP_2D)} (segmentation-models-pytorch)",
        )
    unknown = [o for o in m["organs"] if o not in BY_NAME]
    if unknown:
        raise AbdomenSegError(f"config model.organs names unknown organs {unknown}", f"use: {', '.join(BY_NAME)}")
    orientation = str(m["orientation"]).upper()
    if len(orientation) != 3 or not all(sum(c in pair for c in orientation) == 1 for pair in ("LR", "PA", "IS")):
        raise AbdomenSegError(
            f"config model.orientation '{m['orientation']}' is not an axis code",
            "use three letters, one of L/R, P/A, I/S each, e.g. LPS",
        )
    stray = [o for o in m["postprocess"]["largest_component"] if o not in m["organs"]]
    if stray:
        raise AbdomenSegError(
            f"config model.postprocess.largest_component names {stray}, not in model.organs",
            "list only organs the model segments",
        )


def _check_train(t, dims):
    patch = t["patch"]
    if dims == 3 and (len(patch) != 3 or any(p % 16 for p in patch)):
        raise AbdomenSegError(
            f"config train.patch {patch} must be 3 sizes, each a multiple of 16", "e.g. [64, 96, 96] (z, y, x voxels)"
        )
    if dims == 2 and (len(patch) != 3 or patch[0] % 2 == 0 or any(p % 32 for p in patch[1:])):
        raise AbdomenSegError(
            f"config train.patch {patch} for a 2D model must be [slices, height, width]",
            "slices odd (1 = 2D, 3 or 5 = 2.5D input channels), height and width multiples of 32",
        )
    for key, low in (
        ("steps", 1),
        ("batch_size", 1),
        ("val_every", 1),
        ("seed", 0),
        ("threads", 1),
        ("loader_workers", 0),
    ):
        _whole(t[key], f"train.{key}", low)
    if t["loader_workers"]:
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():  # e.g. Windows: workers share the cases by fork
            raise AbdomenSegError(
                "config train.loader_workers needs processes started by fork, which this system lacks",
                "set train.loader_workers to 0 (batches made in the training process)",
            )
    _whole(t["step_decay"]["every"], "train.step_decay.every", 1)
    _real(t["lr"], "train.lr", 0.0, math.inf, open_low=True)
    _real(t["weight_decay"], "train.weight_decay", 0.0, math.inf)
    _real(t["background_ratio"], "train.background_ratio", 0.0, math.inf)
    _real(t["step_decay"]["gamma"], "train.step_decay.gamma", 0.0, 1.0, open_low=True)
    if t["pipeline"] == "device" and (dims != 3 or t["trainer"] != "standard"):
        raise AbdomenSegError(
            'config train.pipeline "device" builds 3D crops of cached real images only',
            'use train.pipeline "monai" for a 2D model or the synth trainer',
        )
    if t["pipeline"] == "device" and t["loader_workers"]:
        raise AbdomenSegError(
            'config train.loader_workers is set for train.pipeline "device", which makes its batches on the device',
            "set train.loader_workers to 0",
        )
    if not isinstance(t["channels_last"], bool):
        raise AbdomenSegError(f"config train.channels_last is {t['channels_last']!r}", "set it to true or false")
    if t["init_from"] is not None and not isinstance(t["init_from"], str):
        raise AbdomenSegError(
            f"config train.init_from {t['init_from']!r} is not a folder path",
            "give the folder of an exported package, or null",
        )


def _check_organ_ratios(t, organs):
    ratios = t["organ_ratios"]
    if not isinstance(ratios, dict):
        raise AbdomenSegError(
            f"config train.organ_ratios {ratios!r} is not a mapping", 'give e.g. {"pancreas": 2.0}, or {}'
        )
    for organ, ratio in ratios.items():
        if organ not in organs:
            raise AbdomenSegError(
                f"config train.organ_ratios names '{organ}', which is not one of the model's organs",
                f"use names from model.organs: {', '.join(organs)}",
            )
        _real(ratio, f"train.organ_ratios.{organ}", 0.0, math.inf)
    if t["background_ratio"] == 0 and all(ratios.get(o, 1.0) == 0 for o in organs):
        raise AbdomenSegError(
            "config train.background_ratio and train.organ_ratios are all 0, so no crop can be drawn",
            "give the organs to train on a ratio above 0",
        )


def _check_augment(a, m):
    """Numbers in range, and only augmentations the model can take: each project-made one needs the organs or
    the CT window it works on (augment.py)."""
    from AbdomenSegLib.models.mirroring import mirror_axes_problems

    for key, value in a.items():
        if key != "flip_axes":
            _real(value, f"train.augment.{key}", 0.0, 1.0 if key.endswith("_prob") else math.inf)
    problems = mirror_axes_problems(a["flip_axes"], m["orientation"], m["organs"])
    if problems:
        raise AbdomenSegError(
            f"config train.augment.flip_axes: {problems[0]}",
            'give a list of "z", "y", "x"; to mirror left-right, segment both sides of each paired organ',
        )
    ct = m["intensity"].get("mode") == "ct_window"
    organs = m["organs"]
    if a["unenhanced_prob"] > 0 and not ct:
        raise AbdomenSegError(
            "augment.unenhanced_prob needs a CT model with intensity mode ct_window",
            "set augment.unenhanced_prob to 0 for this model",
        )
    if a["enlarge_spleen_prob"] > 0 and "spleen" not in organs:
        raise AbdomenSegError(
            "augment.enlarge_spleen_prob needs a model that segments the spleen",
            "set augment.enlarge_spleen_prob to 0 or add spleen to model.organs",
        )
    if a["renal_cyst_prob"] > 0 and not (ct and {"kidney_right", "kidney_left"} & set(organs)):
        raise AbdomenSegError(
            "augment.renal_cyst_prob needs a CT model (intensity mode ct_window) that " "segments a kidney",
            "set augment.renal_cyst_prob to 0 for this model",
        )


def _check_card(config):
    """The model section judged as the card the run will export (card_schema), so that an architecture, an
    intensity block or a name the card would refuse fails now rather than after training."""
    from AbdomenSegLib.models.card_schema import card_problems

    problems = card_problems(draft_card(config), pending=("weights", "sha256"))
    if problems:
        raise AbdomenSegError(
            f"config describes a model whose card would be refused: {'; '.join(problems)}",
            "fix these values (under model. in the config; name at the top)",
        )


def draft_card(config: dict) -> dict:
    """The part of the exported card that the config alone decides (the trainer adds the training record)."""
    from AbdomenSegLib.core.channels import card_labels
    from AbdomenSegLib.inference.inferer import inference_block

    m, t = config["model"], config["train"]
    return {
        "name": config["name"],
        "title": config["title"] or config["name"],
        "dimensions": m["dimensions"],
        "framework": "monai" if m["dimensions"] == 3 else "segmentation-models-pytorch",
        "architecture": m["architecture"],
        "in_channels": t["patch"][0] if m["dimensions"] == 2 else 1,
        "modality": m["modality"],
        "labels": card_labels(m["organs"]),
        "spacing": m["spacing"],
        "orientation": m["orientation"],
        "intensity": m["intensity"],
        "inference": inference_block(m["dimensions"], t["patch"], t["augment"]["flip_axes"]),
        "postprocess": m["postprocess"],
        **({"sequence": m["sequence"]} if m["sequence"] else {}),
        **({"cascade": config["data"]["region"]} if config["data"]["region"] else {}),
    }


def _whole(value, field, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise AbdomenSegError(f"config {field} {value!r} must be a whole number >= {low}", f"fix {field}")


def _real(value, field, low, high, open_low=False):
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if open_low else value >= low)
        and value <= high
    )
    if not ok:
        bounds = f"{'above' if open_low else 'at least'} {low:g}" + (
            f" and at most {high:g}" if high < math.inf else ""
        )
        raise AbdomenSegError(f"config {field} {value!r} must be a number {bounds}", f"fix {field}")
