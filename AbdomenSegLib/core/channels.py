"""Network output channels <-> organ labels of our organ table, in one place.

A model's card names its organs by channel (`"labels": {"1": "liver", ...}`, channel 0 is background).
Training maps the cached organ labels to channels, inference maps the argmax channels back to organ labels;
both read the same `labels` block here, so the two directions cannot drift apart.
"""

from __future__ import annotations

import numpy as np

from AbdomenSegLib.core.organs import BY_NAME


def card_labels(organs: list[str]) -> dict[str, str]:
    """The card's `labels` block for a model trained on `organs` (in that order, from channel 1)."""
    return {str(channel): organ for channel, organ in enumerate(organs, start=1)}


def channel_organs(labels: dict[str, str]) -> dict[int, int]:
    """Output channel -> organ label value, from a card's `labels` block."""
    return {int(channel): BY_NAME[name].label for channel, name in labels.items()}


def channels_to_organs(labels: dict[str, str]) -> np.ndarray:
    """uint8 lookup table: `lut[channel]` is that channel's organ label (0 for background and unused)."""
    lut = np.zeros(256, dtype=np.uint8)
    for channel, organ in channel_organs(labels).items():
        lut[channel] = organ
    return lut


def organs_to_channels(labels: dict[str, str]) -> np.ndarray:
    """uint8 lookup table: `lut[organ label]` is its channel; organs the model does not segment map to 0."""
    lut = np.zeros(256, dtype=np.uint8)
    for channel, organ in channel_organs(labels).items():
        lut[organ] = channel
    return lut
