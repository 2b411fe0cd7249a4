"""The smallest input a model segments right: a card's `input_minimum`, or a default from its window.

A 3D model sees its input through a window `inference.roi_size` voxels long along z; a scan shorter than the
window is padded with its edge slices (inference/inferer.py, PADDING) and the network guesses the rest. Below
some length the guess is wrong, not just less exact: on TotalSegmentator's example CT (3 mm slices) cropped to k
slices around the kidneys, the default model (btcv-ct-3d-unet, window 48 x 3 mm = 144 mm) gave, against its own
result on the whole scan inside the crop (bench/bench_min_extent.py, CPU, fp32):

    k   mm   liver spleen kidney_r kidney_l  mean        (crops around the liver, same model)
    2    6   0.72  0.73   0.01     0.50     0.49        0.45 (right kidney 0.00)
    5   15   0.69  0.85   0.02     0.86     0.61        0.55 (right kidney 0.00)
   12   36   0.90  0.97   0.15     0.46     0.62        0.65 at 30 mm (right kidney 0.13)
   16   48   0.88  0.91   0.46     0.75     0.75
   20   60   0.88  0.98   0.46     0.85     0.79        0.85
   30   90   0.96  0.97   0.86     0.94     0.93        0.95
   40  120   0.97  0.97   0.93     0.96     0.96        0.98

So the default refuses scans shorter than REFUSE_FRACTION of the window's length (0.3 x 144 = 43 mm: at 36 mm a
kidney was 0.15, at 48 mm the worst 0.46) and flags those shorter than FLAG_FRACTION of it (0.6 x 144 = 86 mm: at
90 mm every organ >= 0.86). In-plane the field-of-view check (core/limits.py, 80 mm) holds; 2D models see one slice
and its neighbours at a time and get no default (not measured).

A card may state its own: "input_minimum": {"slices": n, "mm": [x, y, z], "flag_mm": [x, y, z]} (flag_mm
optional); mm along the patient axes (x left-right, y front-back, z head-foot), slices along z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from AbdomenSegLib.core import limits
from AbdomenSegLib.models.footprint import window_roi

REFUSE_FRACTION = 0.3
FLAG_FRACTION = 0.6
MAX_SLICE_MM = 10.0  # the thickest slices of an abdominal CT/MR (core/limits.py): the default's slice count
KEYS = ("slices", "mm", "flag_mm")


@dataclass(frozen=True)
class InputMinimum:
    slices: int  # along z
    mm: tuple[float, float, float]  # refused below, along x, y, z
    flag_mm: tuple[float, float, float]  # flagged below (at least mm)


def input_minimum(data: dict[str, Any]) -> InputMinimum | None:
    """A valid card's minimum input: its `input_minimum`, else the default of a 3D card; None for 2D and ensembles."""
    given = data.get("input_minimum")
    if isinstance(given, dict):
        mm = _triple(given["mm"])
        return InputMinimum(int(given["slices"]), mm, _triple(given.get("flag_mm", mm)))
    if data.get("dimensions") != 3:
        return None
    window_mm = window_roi(data)[0] * float(data["spacing"][2])  # roi is (z, y, x), spacing (x, y, z)
    refuse = round(REFUSE_FRACTION * window_mm)
    return InputMinimum(
        max(3, math.ceil(refuse / MAX_SLICE_MM)),
        (0.0, 0.0, float(refuse)),
        (0.0, 0.0, float(round(FLAG_FRACTION * window_mm))),
    )


def _triple(value: Any) -> tuple[float, float, float]:
    return (float(value[0]), float(value[1]), float(value[2]))


def check_extent_for(card: Any, size: Any, spacing: Any, direction: Any, name: str = "input") -> None:
    """Refuse an input shorter than `card`'s minimum (a ModelCard or a card dict; an ensemble: each member's);
    nothing for a card with none."""
    for member in getattr(card, "members", ()):
        check_extent_for(member, size, spacing, direction, name)
    if getattr(card, "members", ()):
        return
    minimum = input_minimum(_data(card))
    if minimum is not None:
        limits.check_extent(size, spacing, direction, minimum.slices, minimum.mm, str(card.get("name")), name)


def short_of_flag(card: Any, size: Any, spacing: Any, direction: Any) -> list[tuple[int, float, float]]:
    """(axis, the input's mm, the card's flag_mm) for each patient axis along which the input, though not refused,
    is shorter than the model was seen to segment right (an ensemble: its members')."""
    members = getattr(card, "members", ())
    if members:
        return [short for member in members for short in short_of_flag(member, size, spacing, direction)]
    minimum = input_minimum(_data(card))
    if minimum is None:
        return []
    found = limits.extents(size, spacing, direction)
    return [(a, found[a][1], minimum.flag_mm[a]) for a in range(3) if found[a][1] < minimum.flag_mm[a]]


def _data(card: Any) -> dict[str, Any]:
    data = getattr(card, "data", card)
    return data if isinstance(data, dict) else {}


def minimum_problems(value: Any) -> list[str]:
    """Problems of a card's `input_minimum` block, [] when valid."""
    field = "input_minimum"
    if not isinstance(value, dict):
        return [f"{field} must be an object {{\"slices\": n, \"mm\": [x, y, z]}}"]
    problems = [f"{field}.{k} is not a field (use {', '.join(KEYS)})" for k in value if k not in KEYS]
    slices = value.get("slices")
    if not (isinstance(slices, int) and not isinstance(slices, bool) and 1 <= slices <= 2048):
        problems.append(f"{field}.slices {slices!r} must be a whole number of slices, 1 to 2048")
    for key in ("mm", "flag_mm"):
        if key in value or key == "mm":
            problems += _mm_problems(value.get(key), f"{field}.{key}")
    if not problems and "flag_mm" in value and any(f < m for f, m in zip(value["flag_mm"], value["mm"])):
        problems.append(f"{field}.flag_mm {value['flag_mm']} must be at least {field}.mm {value['mm']} on each axis")
    return problems


def _mm_problems(value: Any, field: str) -> list[str]:
    good = (
        isinstance(value, list)
        and len(value) == 3
        and all(
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and 0 <= v <= limits.MAX_EXTENT_MM
            for v in value
        )
    )
    return [] if good else [f"{field} {value!r} must be 3 numbers of mm (x, y, z), 0 to {limits.MAX_EXTENT_MM:g}"]
