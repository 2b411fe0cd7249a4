"""Optional clean-up of label maps: largest connected component per organ, hole filling.

Each organ is processed inside its own bounding box, which keeps this cheap on 512x512x300 maps.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .preprocess import bounding_box


def _boxes(labels: np.ndarray) -> list:
    """Every label value's bounding box in one pass (find_objects), instead of one full pass per organ."""
    return ndimage.find_objects(labels)


def keep_largest_component(labels: np.ndarray, organs=None) -> np.ndarray:
    organs = organs if organs is not None else [int(v) for v in np.unique(labels) if v]
    boxes = _boxes(labels)  # removing pieces of one organ never moves another organ's box
    for organ in organs:
        box = boxes[organ - 1] if 0 < organ <= len(boxes) else None
        if box is None:
            continue  # organ absent
        sub = labels[box]
        mask = sub == organ
        components, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            sub[mask & (components != sizes.argmax())] = 0
    return labels


def fill_holes(labels: np.ndarray, organs=None) -> np.ndarray:
    """Fill enclosed background inside each organ (never overwrites another organ)."""
    organs = organs if organs is not None else [int(v) for v in np.unique(labels) if v]
    for organ in organs:
        box = bounding_box(labels == organ, margin=1)
        sub = labels[box]
        filled = ndimage.binary_fill_holes(sub == organ)
        sub[filled & (sub == 0)] = organ
    return labels
