"""Mirroring a model-space volume and its labels: which axis is left-right, which organs trade places.

Training (train.augment.flip_axes) and test-time augmentation (tta.py) mirror along the same named axes of the
model-space array (z, y, x). Mirroring along the left-right axis puts a right kidney where a left one lies: the
label must trade the paired organs' names, or a model learns (and TTA averages in) the wrong side. The pairs come
from the organ table (same SNOMED type, one Right and one Left modifier), so a new paired organ needs no change here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import ORGANS

if TYPE_CHECKING:
    from AbdomenSegLib.models.card import ModelCard

AXES = ("z", "y", "x")  # model-space array axes, in array order


def array_axis(name: str) -> int:
    return AXES.index(name)


def lateral_axis(orientation: str) -> str:
    """The model-space axis that runs left-right: orientation letters name the x, y, z axes in turn (e.g. LPS)."""
    letter = next(i for i, c in enumerate(str(orientation).upper()) if c in "LR")
    return "xyz"[letter]


def side_pairs() -> list[tuple[str, str]]:
    """[(right organ name, left organ name)] of the organ table's paired organs."""
    right = {o.snomed_type: o.name for o in ORGANS if o.snomed_modifier[2] == "Right"}
    left = {o.snomed_type: o.name for o in ORGANS if o.snomed_modifier[2] == "Left"}
    return [(right[t], left[t]) for t in right if t in left]


def unpaired_sides(organs: Iterable[str]) -> list[str]:
    """Organs of `organs` whose other side is not among them: a left-right mirror cannot label those."""
    organs = list(organs)
    return [a for pair in side_pairs() for a, b in (pair, pair[::-1]) if a in organs and b not in organs]


def value_pairs(value_of: dict[str, int]) -> list[tuple[int, int]]:
    """[(value, value)] to trade on a left-right mirror, for labels whose values are `value_of[organ name]`."""
    return [(value_of[a], value_of[b]) for a, b in side_pairs() if a in value_of and b in value_of]


def channel_pairs(labels: dict[str, str]) -> list[tuple[int, int]]:
    """Channel pairs to trade for a card's `labels` block ({"1": "liver", ...})."""
    return value_pairs({name: int(channel) for channel, name in labels.items()})


def swap_values(label: Any, pairs: Iterable[tuple[int, int]]) -> Any:
    """`label` (NumPy array or torch tensor) with the values of each pair traded."""
    out = label.clone() if hasattr(label, "clone") else np.array(label, copy=True)
    for a, b in pairs:
        out[label == a] = b
        out[label == b] = a
    return out


def mirror_axes_problems(axes: object, orientation: str, organs: Iterable[str]) -> list[str]:
    """Problems of a list of mirror axes for a model with `orientation` and `organs` ([] when fine)."""
    if not isinstance(axes, (list, tuple)) or any(a not in AXES for a in axes):
        return [f"mirror axes {axes!r} must be a list of the model axes z, y, x"]
    if len(set(axes)) != len(axes):
        return [f"mirror axes {list(axes)} name an axis twice"]
    lone = unpaired_sides(organs) if lateral_axis(orientation) in axes else []
    if lone:
        return [
            f"mirroring along the left-right axis ({lateral_axis(orientation)}) needs both sides of "
            f"{', '.join(lone)}: the mirrored one would have no label"
        ]
    return []


def mirror_axes(card: ModelCard) -> list[str]:
    return list((card.get("inference") or {}).get("tta_mirror_axes") or [])


def check_tta(card: ModelCard) -> None:
    """Refuse test-time mirroring for a model (or an ensemble member) trained without mirroring."""
    for model in getattr(card, "members", None) or [card]:
        if not mirror_axes(model):
            raise AbdomenSegError(
                f"model '{model['name']}' was not trained with mirroring (its card names no "
                "inference.tta_mirror_axes), so mirrored inputs would be unlike anything it learnt from",
                "leave out --tta for this model, or use a model trained with train.augment.flip_axes",
            )
