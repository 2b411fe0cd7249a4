"""A model package's card as the engine holds it (`ModelCard`), and the path rule every package file obeys.

packages.py reads cards and catalogs from disk; this module is what the rest of the engine and the ensemble cards
(ensemble_card.py) build on, so it imports neither.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from AbdomenSegLib.core.channels import channel_organs
from AbdomenSegLib.core.errors import AbdomenSegError

StrPath = Union[str, "os.PathLike[str]"]  # a file or folder given as text or as a path


@dataclass
class ModelCard:
    path: Path  # the package folder
    data: dict[str, Any] = field(default_factory=dict)
    members: tuple[ModelCard, ...] = ()  # an ensemble's member cards (ensemble_card.py); () for a single model

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def name(self) -> str:
        name: str = self.data["name"]
        return name

    @property
    def weights_path(self) -> Path:
        """The weights file, resolved; refused when it lies outside the package (see `inside`)."""
        return inside(self.path / self.data["weights"], self.path, f"weights of model '{self.name}'")

    @property
    def channel_organs(self) -> dict[int, int]:
        """Output channel -> our organ label value (channel 0 is background)."""
        return channel_organs(self.data["labels"])

    @property
    def out_channels(self) -> int:
        return max(int(c) for c in self.data["labels"]) + 1

    @property
    def in_channels(self) -> int:
        return int(self.data.get("in_channels", 1))

    def summary(self) -> str:
        if self.members:
            return _ensemble_summary(self)
        val = self.data.get("validation", {}).get("dice", {})
        dice = ", ".join(f"{k} {v:.3f}" for k, v in val.items()) if val else "n/a"
        t = self.data.get("timing", {})
        return (
            f"{self.name}: {self.data.get('title', '')}\n"
            f"  {self.data['dimensions']}D {self.data['architecture']['class']}, {self.data['modality']}, "
            f"spacing {self.data['spacing']} mm\n"
            f"  organs: {', '.join(self.data['labels'].values())}\n"
            f"  validation Dice: {dice}\n"
            f"  expected time: CPU {_seconds(t.get('cpu_seconds'))}, GPU {_seconds(t.get('gpu_seconds'))}"
        )


def _seconds(value: object) -> str:
    return "not measured" if value is None else f"{value} s"


def inside(path: Path, folder: Path, what: str) -> Path:
    """`path` resolved (symlinks followed), refused unless it lies strictly inside `folder` (resolved too).

    Card and catalog paths come from files anyone can edit or ship: without this check `../`, an absolute
    path or a symlink would have the engine hash and open any file on the machine. Call it before opening."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if root not in resolved.parents:
        raise AbdomenSegError(
            f"{what} '{path}' lies outside '{root}' (it resolves to '{resolved}')",
            "a model package must hold its own files; reinstall the package from a trusted source",
        )
    return resolved


def finest(members: Sequence[ModelCard]) -> int:
    """Index of the member with the smallest voxel volume (the first of equals): the grid of the average."""
    volumes = [math.prod(float(s) for s in m["spacing"]) for m in members]
    return volumes.index(min(volumes))


def _ensemble_summary(card: ModelCard) -> str:
    """The `models` listing's text of an ensemble card."""
    members = card.members
    best = members[finest(members)]
    t = card.get("timing", {})
    return (
        f"{card.name}: {card.get('title', '')}\n"
        f"  ensemble of {', '.join(m.name for m in members)}, {card['modality']}, averaged in {best.name}'s grid "
        f"(spacing {card['spacing']} mm)\n"
        f"  organs: {', '.join(card['labels'].values())}\n"
        f"  expected time: CPU {_seconds(t.get('cpu_seconds'))}, GPU {_seconds(t.get('gpu_seconds'))}"
    )
