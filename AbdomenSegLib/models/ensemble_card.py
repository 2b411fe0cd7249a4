"""Ensemble cards: several installed models run as one, their probabilities averaged (ensemble.py runs them).

An ensemble is a package folder whose card.json names its members instead of weights:

    {"name": "ct-pair", "title": "both CT models", "ensemble": ["btcv-ct-3d", "btcv-ct-2d"]}

listed in catalog.json like any model; or, on the command line, `--model a+b` (names or package folders). Members
are single models of the catalog that lists the ensemble (not ensembles themselves). They must share the modality
(an MR model on a CT scan is wrong however it is averaged) and segment the same organs: channels are matched by
organ name, and averaging an organ over only the members that have it would set it against a background those
members do not share. The ensemble's card holds what users and the panel read of any card (name, modality,
labels, spacing...), taken from its finest member (smallest voxel), in whose grid the average is taken.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.models.card import ModelCard, finest

# What an ensemble's card takes from its finest member: the grid, labels and post-processing the output has.
FROM_FINEST = ("dimensions", "modality", "labels", "spacing", "orientation", "postprocess", "sequence")


def ensemble_of(members: Sequence[ModelCard], name: str, title: str = "", path: Path | None = None) -> ModelCard:
    """The ensemble card of resolved member cards (models.ModelCard); `path`: its package folder, or None for
    `a+b` given on the command line (then its path joins the members' folders with '+', which find_model reads
    back)."""
    _check_members(name, members)
    best = members[finest(members)]
    data = {key: best.data[key] for key in FROM_FINEST if key in best.data}
    sums = {k: [m.get("timing", {}).get(k) for m in members] for k in ("cpu_seconds", "gpu_seconds")}
    data.update(
        name=name,
        title=title or f"ensemble of {', '.join(m.name for m in members)}",
        ensemble=[m.name for m in members],
        # Not a weights file's hash: a fingerprint of the members' weights, for manifests and comparisons.
        sha256=hashlib.sha256("\n".join(m["sha256"] for m in members).encode()).hexdigest(),
        timing={k: (None if None in v else round(sum(v), 1)) for k, v in sums.items()},
    )
    if all((m.get("inference") or {}).get("bf16_validated") for m in members):
        data["inference"] = {"bf16_validated": True}
    if path is None:
        path = Path("+".join(str(Path(m.path).resolve()) for m in members))
    return ModelCard(Path(path), data, members=tuple(members))


def _check_members(name: str, members: Sequence[ModelCard]) -> None:
    if not members:
        raise AbdomenSegError(f"ensemble '{name}' has no members", "name at least one model")
    nested = [m.name for m in members if m.get("ensemble") is not None]
    if nested:
        raise AbdomenSegError(
            f"ensemble '{name}' has ensembles among its members ({', '.join(nested)})",
            "list their single models instead",
        )
    fine = [m.name for m in members if m.get("cascade")]
    if fine:  # trained on crops around the small organs: it would run on whole scans here
        raise AbdomenSegError(
            f"ensemble '{name}' has fine second-stage models among its members ({', '.join(fine)})",
            "run a second stage behind its first stage (--quality high) instead",
        )
    paths = [Path(m.path).resolve() for m in members]
    if len(set(paths)) != len(paths):
        raise AbdomenSegError(f"ensemble '{name}' lists a model twice", "list each member once")
    modalities = sorted({m["modality"] for m in members})
    if len(modalities) > 1:
        each = ", ".join(f"{m.name}: {m['modality']}" for m in members)
        raise AbdomenSegError(
            f"ensemble '{name}' mixes {' and '.join(modalities)} models ({each})",
            "an ensemble's members must all be models of one modality",
        )
    sequences = sorted({m.get("sequence") for m in members} - {None, "any"})
    if len(sequences) > 1:
        raise AbdomenSegError(
            f"ensemble '{name}' mixes models for the MR sequences {', '.join(sequences)}",
            "combine models for one sequence (or sequence-agnostic ones)",
        )
    organs = [set(m["labels"].values()) for m in members]
    for member, own in zip(members[1:], organs[1:]):
        if own != organs[0]:
            raise AbdomenSegError(
                f"ensemble '{name}': {member.name} and {members[0].name} segment different organs "
                f"(only in {member.name}: {sorted(own - organs[0]) or 'none'}; only in {members[0].name}: "
                f"{sorted(organs[0] - own) or 'none'})",
                "combine models that segment the same organs (channels are matched by organ name)",
            )
