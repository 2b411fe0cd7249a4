"""Sliding-window inference in plain torch, giving the same result as MONAI's `sliding_window_inference`.

Written so that 3D inference does not `import monai` (which loads all of MONAI, ~3 s). It reproduces,
for what inference/segmenter.py asks of it (N volumes x C channels x 3D, the network's output the size of its input,
overlap in [0, 1), "gaussian" or "constant" blending), MONAI 1.x (Apache-2.0) as read in:
  monai/inferers/utils.py  sliding_window_inference (padding of small inputs, window order, batching,
                           weighted sum divided by the summed weights) and _get_scan_interval;
  monai/data/utils.py      dense_patch_slices (window positions) and compute_importance_map (weights).
Testing/test_inference_fast.py compares it with MONAI on several shapes.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from AbdomenSegLib.models.card_schema import PADDING_MODES


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start of each window along one axis (MONAI's _get_scan_interval + dense_patch_slices).

    Windows step by int(roi * (1 - overlap)) (at least 1) from 0; the last one is moved back to end at
    the border. An axis no longer than the window holds one window."""
    if size <= roi:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    count = math.ceil((size - roi) / step) + 1
    return [min(i * step, size - roi) for i in range(count)]


def importance_map(roi, mode: str = "gaussian", sigma_scale: float = 0.125, device=None) -> torch.Tensor:
    """Weight of each voxel of a window's prediction (MONAI's compute_importance_map), float32.

    gaussian: the product over axes of exp(-d^2 / (2 sigma^2)), d the distance to the window centre and
    sigma = sigma_scale * the window's length along that axis; every weight is then raised to at least
    max(smallest weight, 1e-3), so that window corners still count and no voxel is divided by ~0."""
    if mode == "constant":
        weights = torch.ones(tuple(roi), dtype=torch.float32, device=device)
    elif mode == "gaussian":
        weights = None
        for axis, n in enumerate(roi):
            sigma = n * sigma_scale
            d = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float32, device=device)
            g = torch.exp(d**2 / (-2 * sigma**2))
            # Outer product built up one axis at a time, as MONAI does (same float32 rounding).
            weights = g if weights is None else weights.unsqueeze(-1) * g[(None,) * axis]
    else:
        raise ValueError(f"unknown blending mode '{mode}' (use gaussian or constant)")
    assert weights is not None  # gaussian: the roi has at least one axis
    floor = max(weights.min().item(), 1e-3)
    return weights.clamp_(min=floor)


def sliding_window(
    x: torch.Tensor,
    roi,
    sw_batch: int,
    predictor,
    overlap: float = 0.25,
    mode: str = "gaussian",
    padding_mode: str = "constant",
) -> torch.Tensor:
    """`predictor` run over roi-sized windows of `x` (N, C, *spatial), blended into one (N, C_out, *spatial).

    Axes shorter than the window are first padded, half before and the rest after, with zeros
    (`padding_mode="constant"`) or by repeating the edge voxels ("replicate"), as MONAI's `padding_mode` does,
    and the padding is cut off the result. Windows go to `predictor` `sw_batch` at a
    time in MONAI's order (last axis fastest, then the next volume); each prediction is multiplied by the
    importance map and added into the output, which is divided by the summed weights at the end.
    The result has x's dtype and device, like MONAI's."""
    roi = [int(r) for r in roi]
    spatial = list(x.shape[2:])
    if len(roi) != len(spatial):
        raise ValueError(f"roi {roi} does not match the input's {len(spatial)} spatial axes")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
    before = [max(r - n, 0) // 2 for n, r in zip(spatial, roi)]
    after = [max(r - n, 0) - b for n, r, b in zip(spatial, roi, before)]
    if any(before) or any(after):
        # F.pad takes (before, after) pairs starting from the last axis.
        pads = [p for b, a in zip(reversed(before), reversed(after)) for p in (b, a)]
        x = F.pad(x, pads, mode=padding_mode)  # "constant" pads with 0
    size = list(x.shape[2:])

    windows = [
        tuple(slice(s, s + r) for s, r in zip(starts, roi))
        for starts in itertools.product(*(window_starts(n, r, overlap) for n, r in zip(size, roi)))
    ]
    jobs = [(n, w) for n in range(x.shape[0]) for w in windows]
    weights = importance_map(roi, mode, device=x.device).to(x.dtype)[None, None]

    out, total = None, torch.zeros([1, 1] + size, dtype=x.dtype, device=x.device)
    for w in windows:
        total[(slice(None), slice(None)) + w] += weights
    for first in range(0, len(jobs), sw_batch):
        batch = jobs[first : first + sw_batch]
        pred = predictor(torch.cat([x[(slice(n, n + 1), slice(None)) + w] for n, w in batch]))
        if list(pred.shape[2:]) != roi:
            raise ValueError(f"the predictor returned windows of {list(pred.shape[2:])}, not the roi {roi}")
        if out is None:
            out = torch.zeros([x.shape[0], pred.shape[1]] + size, dtype=x.dtype, device=x.device)
        pred *= weights  # in place, keeping the prediction's dtype (float16 under autocast) as MONAI does
        for p, (n, w) in zip(pred, batch):
            out[(n, slice(None)) + w] += p
    assert out is not None  # at least one window
    out /= total
    crop = tuple(slice(b, b + n) for b, n in zip(before, spatial))
    return out[(slice(None), slice(None)) + crop]
