"""Every model shipped in Resources/models: honest card, intact weights, validation that reproduces.

The default CT model has further checks in test_models_default_model.py; this file holds what all packages owe.
"""

import json

import pytest

from AbdomenSegLib.evaluation.metrics import summarize
from AbdomenSegLib.models.packages import catalog, find_model, sha256_of
from helpers import validation_rows

SHIPPED = sorted(catalog())  # empty when catalog.json is missing
CARD_KEYS = {"name", "architecture", "labels", "modality", "spacing", "intensity", "training", "validation", "sha256"}
# Per-case Dice floors a little under the values measured at export (README, Models); a regression fails here.
FLOORS = {
    # Measured: liver 0.60-0.89, spleen 0.20 (chaosT2_36) / 0.82-0.92; kidneys 0.86-0.91 except chaosT2_36 (0.01 / 0.07).
    "chaos-mr-t2-3d-unet": {"liver": 0.55, "spleen": 0.17},
    # Measured: liver 0.70-0.95, spleen 0.20 (btcv_img0009) / 0.90-0.95, kidneys 0.74-0.91, aorta 0.76-0.92.
    "btcv-ct-2d-unet-r18": {"liver": 0.65, "spleen": 0.17, "kidney_right": 0.70, "kidney_left": 0.70, "aorta": 0.72},
}


def test_a_default_model_is_shipped():
    assert SHIPPED, "Resources/models/catalog.json is missing: the default model must ship with the code"
    assert find_model().name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_card_is_complete_and_weights_match(name):
    card = find_model(name)
    assert CARD_KEYS <= set(card.data), CARD_KEYS - set(card.data)
    assert sha256_of(card.weights_path) == card["sha256"]
    training = card["training"]
    assert set(training["validation_cases"]).isdisjoint(training["train_cases"])
    assert training["command"].startswith("python -m AbdomenSegLib train")
    assert training["hardware"] and training["seconds"] > 0
    assert set(card["validation"]["dice"]) == set(card["labels"].values())
    json.dumps(card.data)  # a card is plain JSON


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_validation_metrics_reproduce(name):
    """Re-run the card's protocol (full pipeline on the untouched validation files) and compare."""
    card = find_model(name)
    rows = validation_rows(name)
    summary = {s["organ"]: s for s in summarize(list(rows))}
    for organ, recorded in card["validation"]["dice"].items():
        assert summary[organ]["dice_mean"] == pytest.approx(recorded, abs=2e-3), organ
    for row in rows:
        floor = FLOORS.get(name, {}).get(row["organ"])
        if floor is not None:
            assert row["dice"] >= floor, (row["case"], row["organ"], row["dice"])
