"""The model card's schema: every value the engine takes from card.json, checked once when the card is read.

A card is data from disk, possibly hand-edited or from someone else's package, and its values reach network
construction, resampling and file paths. Unchecked, a bad value is a traceback deep inside inference or,
worse, a silently wrong segmentation (an overlap of 0.999, a window upside down, an axis code with two L's).
Here every field is judged at once and all problems come back together, so one error lists everything to fix.

ModelCard keeps the plain dict (much code reads it); this module only judges it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

from AbdomenSegLib.core import limits
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import BY_NAME
from AbdomenSegLib.models.extent import minimum_problems
from AbdomenSegLib.models.footprint import DEFAULT_ROI_SIZE, card_footprint
from AbdomenSegLib.models.networks import MONAI_3D, SMP_2D, divisor

REQUIRED_KEYS = (
    "name",
    "dimensions",
    "architecture",
    "modality",
    "labels",
    "spacing",
    "intensity",
    "weights",
    "sha256",
)
# DEFAULT_ROI_SIZE (footprint.py): the sliding window of 3D cards that name no inference.roi_size.
SPACING_MM = (0.1, 20.0)
MAX_ROI = 512
MAX_LEVELS = 10  # a UNet's channels list: 2^9 down-sampling already exceeds any window (MAX_ROI)
MAX_OVERLAP = 0.9  # beyond, the window count explodes (0.99: some 700 000 windows for an abdominal CT)
MAX_LABEL = 255  # output label maps are uint8
ENHANCEMENTS = ("none", "histeq", "clahe")
WINDOW_MODES = ("gaussian", "constant")
# How a window pads axes the volume is shorter along: zeros, or the edge slices repeated (MONAI's padding_mode).
PADDING_MODES = ("constant", "replicate")
AXIS_PAIRS = ("LR", "AP", "SI")
SHA256 = re.compile(r"[0-9a-f]{64}")
VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+([.+-][0-9A-Za-z.+-]*)?")  # 0.1.0, 1.2.3.dev4, 1.0.0+local
LABEL_KEY = re.compile(r"[1-9][0-9]*")  # decimal, no sign, no leading zero: "01" and "1" would be one channel

Problems = list[str]  # one clear sentence per problem


def validate_card(data: Any, where: str, *, pending: tuple[str, ...] = ()) -> None:
    """Raise one AbdomenSegError listing every problem of the card `data`; `where` names it in the message.

    `pending`: required keys not filled in yet (export checks a card before its weights' sha256 exists)."""
    problems = card_problems(data, pending=pending)
    if problems:
        raise AbdomenSegError(
            f"model card '{where}' is invalid: {'; '.join(problems)}",
            "fix these fields (the cards in Resources/models show the format) or re-export "
            "the model with `python -m AbdomenSegLib train`",
        )


def card_problems(data: Any, *, pending: tuple[str, ...] = ()) -> Problems:
    """Every problem of a card's values, [] when it is valid."""
    if not isinstance(data, dict):
        return [f"the card must be a JSON object, not {_kind(data)}"]
    if "ensemble" in data:
        return _ensemble_card(data)
    missing = [k for k in REQUIRED_KEYS if k not in data and k not in pending]
    problems = [f"lacks {', '.join(missing)}"] if missing else []
    dims = data.get("dimensions")
    labels = data.get("labels")
    checks: dict[str, Callable[[Any], Problems]] = {
        "name": _name,
        "dimensions": _dimensions,
        "architecture": lambda v: _architecture(v, dims),
        "in_channels": lambda v: _in_channels(v, dims),
        "modality": lambda v: _one_of(v, "modality", ("CT", "MR")),
        "labels": _labels,
        "spacing": lambda v: _numbers(v, "spacing", 3, SPACING_MM, "mm"),
        "orientation": _orientation,
        "intensity": _intensity,
        "inference": lambda v: _inference(v, data),
        "postprocess": lambda v: _postprocess(v, labels),
        "weights": _weights,
        "sha256": _sha256,
        "title": lambda v: [] if isinstance(v, str) else [f"title {_show(v)} must be text"],
        # The engine that exported the package (AbdomenSegLib.__version__); optional: older cards lack it.
        "abdomenseg_version": _abdomenseg_version,
        "validation": _validation,
        "timing": _timing,
        "cascade": lambda v: _cascade(v, labels),
        "input_minimum": minimum_problems,
    }
    for key, check in checks.items():
        if key in data:
            problems += check(data[key])
    if dims == 3:
        problems += _roi_fits_network(data)
        if not problems:  # every value valid: what they cost together
            problems += _fits_memory(data)
    return problems


def _cascade(value: Any, labels: Any) -> Problems:
    """A second-stage model's block (cascade_card.py): its first stage and the region it re-segments."""
    problems = region_problems(value, "cascade")
    if not problems:
        problems += [f"cascade.first_stage: {p}" for p in _name(value.get("first_stage"))]
        names = labels.values() if isinstance(labels, dict) else []
        stray = [o for o in value["organs"] if o not in names]
        if stray:
            problems.append(f"cascade.organs {stray} are not among the model's labels")
    return problems


def _ensemble_card(data: dict[str, Any]) -> Problems:
    """An ensemble's card (ensemble_card.py): a name, a title and its members' names; every model value comes
    from the members, so a card that states one would say something the ensemble does not do."""
    problems = _name(data["name"]) if "name" in data else ["lacks name"]
    if "title" in data and not isinstance(data["title"], str):
        problems.append(f"title {_show(data['title'])} must be text")
    members = data["ensemble"]
    if not isinstance(members, list) or not members or any(not isinstance(m, str) or _name(m) for m in members):
        problems.append(f"ensemble {_show(members)} must be a list of installed models' names")
    elif len(set(members)) != len(members):
        problems.append(f"ensemble {_show(members)} names a model more than once")
    own = [k for k in REQUIRED_KEYS if k != "name" and k in data]
    if own:
        problems.append(f"an ensemble card takes {', '.join(own)} from its members; remove them")
    return problems


# -- primitive values ------------------------------------------------------------------------------
def _show(value: Any) -> str:
    """A value as it reads in the JSON file (so "3" and 3 look different in the message)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", tuple: "a list", str: "text", bool: "true/false", type(None): "null"}
    return kinds.get(type(value), "a number")


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; `true` in a card is a typo, not the number 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_real(value) and math.isfinite(value)


def _int(value: Any, field: str, low: int, high: int) -> Problems:
    if not _is_int(value):
        return [f"{field} {_show(value)} must be a whole number"]
    if not low <= value <= high:
        return [f"{field} {value} is outside [{low}, {high}]"]
    return []


def _number(value: Any, field: str, bounds: tuple[float, float], unit: str = "") -> Problems:
    if not _is_number(value):
        return [f"{field} {_show(value)} must be a finite number"]
    low, high = bounds
    if not low <= value <= high:
        return [f"{field} {value} is outside [{low:g}, {high:g}]{' ' + unit if unit else ''}"]
    return []


def _numbers(value: Any, field: str, length: int, bounds: tuple[float, float], unit: str = "") -> Problems:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        return [f"{field} {_show(value)} must be a list of {length} numbers"]
    return [p for i, v in enumerate(value) for p in _number(v, f"{field}[{i}]", bounds, unit)]


def _ints(value: Any, field: str, low: int, high: int, length: int | None = None) -> Problems:
    if not isinstance(value, (list, tuple)) or not value or (length is not None and len(value) != length):
        size = f"{length} " if length is not None else ""
        return [f"{field} {_show(value)} must be a list of {size}whole numbers"]
    return [p for i, v in enumerate(value) for p in _int(v, f"{field}[{i}]", low, high)]


def _one_of(value: Any, field: str, allowed: tuple[Any, ...]) -> Problems:
    if isinstance(value, str) and value in allowed:
        return []
    return [f"{field} {_show(value)} must be one of {', '.join(allowed)}"]


def _section(value: Any, field: str, check: Callable[[dict[str, Any]], Problems]) -> Problems:
    """`check` the block when it is an object; otherwise say it must be one."""
    return check(value) if isinstance(value, dict) else [f"{field} must be an object, not {_kind(value)}"]


# -- fields ----------------------------------------------------------------------------------------
def _name(value: Any) -> Problems:
    # The name keys the catalog, names the package folder on export and appears in file names.
    if not isinstance(value, str) or not value.strip():
        return [f"name {_show(value)} must be non-empty text"]
    if any(c in value for c in "/\\:") or value in (".", ".."):
        return [f"name {_show(value)} must not contain path separators (/ \\ :) or be . or .."]
    return []


def _dimensions(value: Any) -> Problems:
    return [] if _is_int(value) and value in (2, 3) else [f"dimensions {_show(value)} must be 2 or 3"]


def _architecture(value: Any, dims: Any) -> Problems:
    return _section(value, "architecture", lambda arch: _architecture_block(arch, dims))


def _architecture_block(arch: dict[str, Any], dims: Any) -> Problems:
    name = arch.get("class")
    if name not in MONAI_3D + SMP_2D:
        return [f"architecture.class {_show(name)} must be one of {', '.join(MONAI_3D + SMP_2D)}"]
    problems = []
    if dims in (2, 3) and name not in (MONAI_3D if dims == 3 else SMP_2D):
        family = "3D (MONAI): " + ", ".join(MONAI_3D) if dims == 3 else "2D (smp): " + ", ".join(SMP_2D)
        problems.append(f"architecture.class '{name}' does not fit dimensions {dims}; use {family}")
    args = arch.get("args", {})
    if not isinstance(args, dict):
        return problems + [f"architecture.args must be an object, not {_kind(args)}"]
    if name == "UNet":
        problems += _monai_unet_args(args)
    elif name == "SegResNet" and "blocks_down" in args:
        problems += _ints(args["blocks_down"], "architecture.args.blocks_down", 1, 64)
    elif name in SMP_2D:
        problems += _smp_args(args)
    return problems


def _monai_unet_args(args: dict[str, Any]) -> Problems:
    field = "architecture.args"
    if "channels" not in args or "strides" not in args:
        return [f"{field} must give channels and strides for a UNet"]
    problems = _ints(args["channels"], f"{field}.channels", 1, 4096)
    if isinstance(args["channels"], (list, tuple)) and len(args["channels"]) > MAX_LEVELS:
        problems.append(f"{field}.channels has {len(args['channels'])} levels; a UNet takes at most {MAX_LEVELS}")
    strides = args["strides"]
    if not isinstance(strides, (list, tuple)) or not strides:
        return problems + [f"{field}.strides {_show(strides)} must be a list"]
    for i, s in enumerate(strides):  # MONAI takes one stride per level, or one per axis
        problems += (
            _ints(s, f"{field}.strides[{i}]", 1, 8, 3)
            if isinstance(s, list)
            else _int(s, f"{field}.strides[{i}]", 1, 8)
        )
    if isinstance(args["channels"], (list, tuple)) and len(strides) != len(args["channels"]) - 1:
        problems.append(
            f"{field}.strides has {len(strides)} entries; with {len(args['channels'])} channels a UNet "
            f"needs {len(args['channels']) - 1} (one per down-sampling)"
        )
    if "num_res_units" in args:
        problems += _int(args["num_res_units"], f"{field}.num_res_units", 0, 16)
    return problems


def _smp_args(args: dict[str, Any]) -> Problems:
    field = "architecture.args"
    problems = []
    if "encoder_name" in args and not (isinstance(args["encoder_name"], str) and args["encoder_name"]):
        problems.append(f"{field}.encoder_name {_show(args['encoder_name'])} must be text, e.g. resnet18")
    depth = args.get("encoder_depth", 5)  # smp's default
    problems += _int(depth, f"{field}.encoder_depth", 3, 5)
    if "decoder_channels" in args:
        # smp builds one decoder stage per encoder stage
        length = depth if _is_int(depth) else None
        problems += _ints(args["decoder_channels"], f"{field}.decoder_channels", 1, 4096, length)
    return problems


def _in_channels(value: Any, dims: Any) -> Problems:
    problems = _int(value, "in_channels", 1, 9)
    if problems:
        return problems
    if dims == 3 and value != 1:  # the 3D sliding window feeds the one image channel
        return [f"in_channels {value} must be 1 for a 3D model"]
    if dims == 2 and value % 2 == 0:  # 2.5D input: the slice and the same number of neighbours either side
        return [f"in_channels {value} must be odd for a 2D model (1, 3, 5...: neighbouring slices either side)"]
    return []


def _labels(value: Any) -> Problems:
    if not isinstance(value, dict) or not value:
        return [f"labels {_show(value)} must be an object of channel -> organ name, e.g. {{\"1\": \"liver\"}}"]
    problems = []
    for key in value:
        if not (isinstance(key, str) and LABEL_KEY.fullmatch(key) and int(key) <= MAX_LABEL):
            problems.append(f"labels key {_show(key)} must be a channel number 1-{MAX_LABEL} written as text")
    names = list(value.values())
    unknown = [n for n in names if not (isinstance(n, str) and n in BY_NAME)]
    if unknown:
        problems.append(f"labels name unknown organs {unknown} (known: {', '.join(BY_NAME)})")
    twice = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if twice:
        problems.append(f"labels name {', '.join(twice)} more than once")
    return problems


def _orientation(value: Any) -> Problems:
    valid = (
        isinstance(value, str) and len(value) == 3 and all(sum(c in pair for c in value) == 1 for pair in AXIS_PAIRS)
    )
    return (
        []
        if valid
        else [f"orientation {_show(value)} must be three capitals, one of R/L, A/P and S/I each, " "e.g. LPS"]
    )


def _intensity(value: Any) -> Problems:
    return _section(value, "intensity", _intensity_block)


def _intensity_block(block: dict[str, Any]) -> Problems:
    mode = block.get("mode")
    problems = _one_of(mode, "intensity.mode", ("ct_window", "mr_percentile"))
    if mode == "ct_window":
        problems += _ordered_pair(block.get("window"), "intensity.window", (-1e5, 1e5))
    if mode == "mr_percentile" and "percentiles" in block:
        problems += _ordered_pair(block["percentiles"], "intensity.percentiles", (0.0, 100.0))
    if "body_threshold" in block:
        problems += _number(block["body_threshold"], "intensity.body_threshold", (-1e5, 1e5))
    if "body_fraction" in block:
        problems += _number(block["body_fraction"], "intensity.body_fraction", (0.0, 1.0))
    if "enhancement" in block:
        problems += _one_of(block["enhancement"], "intensity.enhancement", ENHANCEMENTS)
    return problems


def _ordered_pair(value: Any, field: str, bounds: tuple[float, float]) -> Problems:
    problems = _numbers(value, field, 2, bounds)
    if not problems and value[0] >= value[1]:
        problems.append(f"{field} {_show(value)} must be [low, high] with low < high")
    return problems


def _inference(value: Any, data: dict[str, Any]) -> Problems:
    return _section(value, "inference", lambda block: _inference_block(block, data))


def _inference_block(block: dict[str, Any], data: dict[str, Any]) -> Problems:
    problems = _mirror_axes(block["tta_mirror_axes"], data) if "tta_mirror_axes" in block else []
    if "roi_size" in block:
        problems += _ints(block["roi_size"], "inference.roi_size", 1, MAX_ROI, 3)
    if "overlap" in block:
        problems += _number(block["overlap"], "inference.overlap", (0.0, MAX_OVERLAP))
    if "mode" in block:
        problems += _one_of(block["mode"], "inference.mode", WINDOW_MODES)
    if "padding_mode" in block:
        problems += _one_of(block["padding_mode"], "inference.padding_mode", PADDING_MODES)
    if "batch_size" in block:
        problems += _int(block["batch_size"], "inference.batch_size", 1, 256)
    return problems


def _mirror_axes(axes: Any, data: dict[str, Any]) -> Problems:
    """inference.tta_mirror_axes: model axes; the left-right one only with both sides of each paired organ, whose
    channels test-time augmentation trades back (models/mirroring.py). Sides judged once orientation and labels are valid."""
    from AbdomenSegLib.models.mirroring import AXES, mirror_axes_problems

    orientation, labels = data.get("orientation", "LPS"), data.get("labels")
    if not isinstance(axes, list) or any(a not in AXES for a in axes):
        return [f"inference.tta_mirror_axes {_show(axes)} must be a list of the model axes z, y, x"]
    if _orientation(orientation) or not isinstance(labels, dict) or _labels(labels):
        return []
    return [f"inference.tta_mirror_axes: {p}" for p in mirror_axes_problems(axes, orientation, labels.values())]


def _roi_fits_network(data: dict[str, Any]) -> Problems:
    """A 3D window must be a multiple of the network's total down-sampling, or the U-Net's skip connections
    do not line up. Judged only when the window and the architecture are themselves valid."""
    inference = data.get("inference", {})
    given = isinstance(inference, dict) and "roi_size" in inference
    roi = inference["roi_size"] if given else list(DEFAULT_ROI_SIZE)
    arch = data.get("architecture")
    if _ints(roi, "", 1, MAX_ROI, 3) or _architecture(arch, 3):
        return []
    assert isinstance(arch, dict)  # _architecture found it valid
    stride = divisor(arch)
    if not any(r % stride for r in roi):
        return []
    field = "inference.roi_size" if given else "the default inference.roi_size"
    return [
        f"{field} {_show(roi)} is not a multiple of the network's stride {stride} (give inference.roi_size "
        f"as multiples of {stride})"
    ]


def _fits_memory(data: dict[str, Any]) -> Problems:
    """What a valid 3D card costs whatever the input (footprint.py: the weights, one batch of windows, the
    network's activations) must fit the memory limit, or the card is refused before any network is built."""
    footprint = card_footprint(data, max(int(c) for c in data["labels"]) + 1)
    try:
        limit = limits.max_memory_bytes()
    except AbdomenSegError:  # a malformed ABDOMENSEG_MAX_MEMORY_GB is refused, clearly, by the input check
        return []
    if footprint is None or footprint.fixed <= limit:
        return []
    where = (
        f"the memory limit of {limit / 1e9:.1f} GB (ABDOMENSEG_MAX_MEMORY_GB: raise it if this machine has the memory)"
    )
    if 2 * (footprint.weights or 0.0) > limit / 2:  # the network alone takes most of it: name the channels
        params = (footprint.weights or 0.0) / 4
        return [
            f"architecture.args.channels {_show(data['architecture']['args']['channels'])} make a network of "
            f"{params / 1e6:,.0f} M parameters ({_gb(footprint.weights)} GB of float32, held twice while loading), "
            f"over {where}"
        ]
    roi = data.get("inference", {}).get("roi_size", list(DEFAULT_ROI_SIZE))
    channels = data["architecture"].get("args", {}).get("channels")
    network = f" with architecture.args.channels {_show(channels)}" if channels is not None else ""
    return [
        f"inference.roi_size {_show(roi)}{network} needs about {_gb(footprint.fixed)} GB for one batch of windows "
        f"({_gb(footprint.activations)} GB of network activations, {_gb(footprint.window)} GB of windows, "
        f"{_gb(2 * (footprint.weights or 0.0))} GB of weights), over {where}; give a smaller window or fewer channels"
    ]


def _gb(value: float | None) -> str:
    return "?" if value is None else f"{value / 1e9:.1f}"


def _postprocess(value: Any, labels: Any) -> Problems:
    return _section(value, "postprocess", lambda block: _postprocess_block(block, labels))


def _postprocess_block(block: dict[str, Any], labels: Any) -> Problems:
    islands = block.get("remove_islands_ml", 0)
    if isinstance(islands, bool) or not isinstance(islands, (int, float)) or not 0 <= islands < 1e6:
        return [f"postprocess.remove_islands_ml {_show(islands)} must be a size in mL, 0 or more"]
    kept = block.get("keep_islands", [])
    if not isinstance(kept, list) or not all(isinstance(o, str) for o in kept):
        return [f"postprocess.keep_islands {_show(kept)} must be a list of organ names"]
    if "largest_component" not in block:
        return []
    organs = block["largest_component"]
    field = "postprocess.largest_component"
    if not isinstance(organs, list) or not all(isinstance(o, str) for o in organs):
        return [f"{field} {_show(organs)} must be a list of organ names"]
    segmented = set(labels.values()) if isinstance(labels, dict) else set()
    stray = [o for o in organs if o not in segmented]
    return [f"{field} names {stray}, which the card's labels do not segment"] if stray else []


def _weights(value: Any) -> Problems:
    # A bare file name: the weights live in the package folder, never elsewhere (see models.inside).
    if (
        isinstance(value, str)
        and value.endswith(".safetensors")
        and value != ".safetensors"
        and not value.startswith(".")
        and not any(c in value for c in "/\\:")
    ):
        return []
    return [
        f"weights {_show(value)} must be the file name of a .safetensors file in the package folder "
        "(no folders, no absolute path)"
    ]


def _abdomenseg_version(value: Any) -> Problems:
    if isinstance(value, str) and VERSION.fullmatch(value):
        return []
    return [f"abdomenseg_version {_show(value)} must be a version number such as \"0.1.0\""]


def _sha256(value: Any) -> Problems:
    if isinstance(value, str) and SHA256.fullmatch(value):
        return []
    return [f"sha256 {_show(value)} must be 64 lowercase hexadecimal characters"]


def _validation(value: Any) -> Problems:
    return _section(value, "validation", _validation_block)


def _validation_block(block: dict[str, Any]) -> Problems:
    # The `models` listing prints these; NaN is allowed (an organ absent from every validation case).
    dice = block.get("dice", {})
    if not isinstance(dice, dict) or not all(_is_real(v) for v in dice.values()):
        return [f"validation.dice {_show(dice)} must map organ names to numbers"]
    return []


def _timing(value: Any) -> Problems:
    return _section(value, "timing", _timing_block)


def _timing_block(block: dict[str, Any]) -> Problems:
    bad = [k for k in ("cpu_seconds", "gpu_seconds") if not (block.get(k) is None or _is_real(block[k]))]
    return [f"timing.{k} {_show(block[k])} must be a number of seconds or null" for k in bad]


# -- the catalog (Resources/models/catalog.json) ---------------------------------------------------
def catalog_problems(index: Any) -> Problems:
    """Problems of catalog.json's structure: {"default": name, "models": [{"name": ..., "path": ...}, ...]}.

    Only the file's own structure: a package it lists that is broken is that package's problem, not the
    catalog's (models.catalog_with_problems keeps it aside and serves the others)."""
    if not isinstance(index, dict):
        return [f"it must be a JSON object, not {_kind(index)}"]
    models = index.get("models")
    if not isinstance(models, list):
        return [f"\"models\" must be a list of {{\"name\": ..., \"path\": ...}} entries, not {_kind(models)}"]
    problems = [p for i, entry in enumerate(models) for p in _catalog_entry(entry, f"models[{i}]")]
    names = [e.get("name") for e in models if isinstance(e, dict)]
    twice = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if twice:
        problems.append(f"models lists {', '.join(twice)} more than once")
    default = index.get("default")
    if not isinstance(default, str):
        problems.append(f"\"default\" {_show(default)} must name the default model")
    elif default not in names:
        problems.append(f"\"default\" '{default}' is not one of the listed models")
    return problems


def _catalog_entry(entry: Any, field: str) -> Problems:
    if not isinstance(entry, dict):
        return [f"{field} must be an object, not {_kind(entry)}"]
    problems = [f"{field}.{p}" for p in _name(entry.get("name"))]
    if "path" in entry and not (isinstance(entry["path"], str) and entry["path"]):
        problems.append(f"{field}.path {_show(entry['path'])} must be a folder name")
    return problems


def region_problems(region: Any, field: str = "region") -> Problems:
    """Every problem of a region block ({"organs", "margin_mm"}, optionally "take": the region organs whose
    labels the second stage gives, default all; for a card's cascade block also "first_stage"), [] when valid."""
    if not isinstance(region, dict):
        return [f"{field} must be an object with organs and margin_mm"]
    problems = []
    organs = region.get("organs")
    if not isinstance(organs, list) or not organs or not all(isinstance(o, str) and o in BY_NAME for o in organs):
        problems.append(f"{field}.organs {organs!r} must be a non-empty list of organ names")
    margin = region.get("margin_mm")
    if (
        not isinstance(margin, list)
        or len(margin) != 3
        or not all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m <= 200 for m in margin)
    ):
        problems.append(f"{field}.margin_mm {margin!r} must be 3 numbers of mm (x, y, z), 0 to 200")
    if "take" in region:
        take = region["take"]
        if not isinstance(take, list) or not take or not all(isinstance(o, str) for o in take):
            problems.append(f"{field}.take {take!r} must be a non-empty list of organ names")
        else:
            stray = [o for o in take if not isinstance(organs, list) or o not in organs]
            if stray:
                problems.append(f"{field}.take {stray} are not among {field}.organs")
    return problems
