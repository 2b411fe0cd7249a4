"""Which values a label map holds, and where: one pass over the array, shared by the metrics, the convention
detection and the training cache's label check."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def value_boxes(array: np.ndarray):
    """Bounding box (slices) of every value 1..max of a non-negative integer map, None for values not
    present (scipy's find_objects: one pass in C); None when the map is not of that kind."""
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize <= 4 and array.size):
        return None
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= 1 << 16:
        return None
    return ndimage.find_objects(array, max_label=high) if high > 0 else []


def distinct_values(array: np.ndarray, boxes=None) -> np.ndarray:
    """Every value present (from the value boxes for integer maps: one pass, no sort); other images are
    sampled."""
    array = np.asarray(array)
    boxes = value_boxes(array) if boxes is None else boxes
    if boxes is None:
        return np.unique(array[::2, ::2, ::2])
    present = [value for value, box in enumerate(boxes, start=1) if box is not None]
    if np.count_nonzero(array) < array.size:
        present.insert(0, 0)
    return np.array(present, dtype=np.int64)
