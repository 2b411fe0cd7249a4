"""Which two models a cascade run (cascade.py) uses, checked before any work.

A second-stage model's card carries `"cascade": {"first_stage": name, "organs": [...], "margin_mm": [x, y, z]}`
and optionally `"take": [...]` (the region organs whose labels it gives; default all): it was trained on the box
around those organs (plus the margin) at a finer spacing, and re-segments that box of the first stage's result.
A run is a cascade when its model is such a second stage (its first stage is found by name), or when quality
"high" is asked of a first-stage model (its second stage is the installed model whose card names it). Cards are
JSON: nothing here loads a network.
"""

from __future__ import annotations

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.options import QUALITIES
from AbdomenSegLib.models.card import ModelCard, StrPath
from AbdomenSegLib.models.packages import catalog, find_model, partners_dir

TRAIN_FIX = (
    "train one with `python -m AbdomenSegLib train Resources/configs/btcv_ct_3d_fine.json --export <models folder>`, "
    "or leave out --quality high"
)


def cascade_stages(
    card: ModelCard, quality: str = "standard", models_dir: StrPath | None = None
) -> tuple[ModelCard, ModelCard] | None:
    """(first-stage card, second-stage card) of a run of `card` at `quality`; None for a single-model run.
    Raises AbdomenSegError ('<problem>. <fix>') for a cascade that cannot run."""
    if quality not in QUALITIES:
        raise AbdomenSegError(f"unknown quality '{quality}'", f"use one of {', '.join(QUALITIES)}")
    if card.get("cascade"):
        pair = (_first_stage_of(card, models_dir), card)
    elif quality == "standard":
        return None
    elif card.members:
        raise AbdomenSegError(
            f"--quality high runs one first-stage model, not the ensemble '{card.name}'",
            "choose a single model, or leave out --quality high",
        )
    else:
        pair = (card, _second_stage_for(card, models_dir))
    _check_pair(*pair)
    return pair


def _first_stage_of(second: ModelCard, models_dir: StrPath | None) -> ModelCard:
    name = second["cascade"]["first_stage"]
    try:
        return find_model(name, partners_dir(second.path, models_dir))
    except AbdomenSegError as error:
        raise AbdomenSegError(
            f"the second-stage model '{second.name}' needs its first stage '{name}', which cannot be used "
            f"({error.problem})",
            f"install '{name}' (the model it was trained behind), or choose another model",
        ) from None


def _second_stage_for(first: ModelCard, models_dir: StrPath | None) -> ModelCard:
    found = [
        card
        for card in catalog(partners_dir(first.path, models_dir)).values()
        if (card.get("cascade") or {}).get("first_stage") == first.name
    ]
    if not found:
        raise AbdomenSegError(f"no fine second-stage model is installed for '{first.name}'", TRAIN_FIX)
    return found[0]  # catalog order: the first listed


def _check_pair(first: ModelCard, second: ModelCard) -> None:
    problems = []
    if first.members or first.get("cascade"):
        problems.append(f"its first stage '{first.name}' is itself an ensemble or a second stage")
    if first["modality"] != second["modality"]:
        problems.append(f"it is for {second['modality']} but its first stage '{first.name}' is {first['modality']}")
    organs = second["cascade"]["organs"]
    for card in (first, second):
        missing = [o for o in organs if o not in card["labels"].values()]
        if missing:
            problems.append(f"'{card.name}' does not segment the region organs {missing}")
    if problems:
        raise AbdomenSegError(
            f"the second-stage model '{second.name}' cannot run behind '{first.name}': {'; '.join(problems)}",
            "use a second stage trained behind this first stage (its card's cascade.first_stage names it)",
        )
