"""What the engine accepts, as numbers: checked from the header before any pixel is read or allocated.

These are the documented limits (README, "Limits and guarantees"). They exist so that a corrupt or
absurd header fails in a second with a clear message instead of after minutes, or by exhausting memory:
- voxel spacing outside [MIN_SPACING_MM, MAX_SPACING_MM]: no CT or MR reconstruction is coarser than
  ~10 mm slices, and below 0.1 mm an abdomen would need tens of thousands of voxels per axis, so such a
  spacing is a broken header (a 0.01 mm spacing made the whole body 5 mm wide and the result empty);
- a physical extent over MAX_EXTENT_MM along any axis: longer than any patient (50 mm slices x 200 gave a
  10 m "body" and a 10 GB model grid);
- a field of view under MIN_FIELD_MM left-right or front-back (in its two widest directions where the direction is
  not known): no abdomen is that small (a spacing shrunk tenfold made the body 36 mm wide and the result a few
  stray voxels);
- more than MAX_INPUT_VOXELS voxels (a 2 MB gzip can declare 2 GiB of voxels);
- a model-space grid whose estimated peak memory exceeds `max_memory_bytes()` (default 16 GB,
  ABDOMENSEG_MAX_MEMORY_GB overrides), the model's own needs included (its weights, window and activations:
  models/footprint.py);
- an input shorter than a model's minimum extent (`check_extent`, the minimum from models/extent.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from AbdomenSegLib.core.errors import AbdomenSegError

MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 20.0
MAX_EXTENT_MM = 2500.0
MIN_FIELD_MM = 80.0
MAX_INPUT_VOXELS = 2**29  # 536,870,912: e.g. 512 x 512 x 2048, ~1 GiB of int16
DEFAULT_MAX_MEMORY_GB = 16.0

# Peak bytes per voxel, measured on the pipeline as written (inference.Segmenter): input grid = the
# input pixels, a float32 copy, the reoriented float32 copy, the best-probability float32 and two uint8
# label arrays; model grid = raw and normalised float32 plus, per output channel, the float32
# probabilities and their full-grid copy.
_INPUT_BYTES_PER_VOXEL = 4 + 4 + 4 + 1 + 1
_MODEL_BYTES_PER_VOXEL = 4 + 4
_MODEL_BYTES_PER_VOXEL_PER_CHANNEL = 4 + 4
# The sliding window blends its windows into float32 accumulators over the model grid: one per output channel and
# one of the summed weights (inference/sliding_window.py).
_WINDOW_ACCUMULATOR_BYTES = 4


def max_memory_bytes() -> float:
    value = os.environ.get("ABDOMENSEG_MAX_MEMORY_GB", "")
    try:
        gb = float(value) if value else DEFAULT_MAX_MEMORY_GB
    except ValueError:
        raise AbdomenSegError(
            f"ABDOMENSEG_MAX_MEMORY_GB is '{value}', not a number",
            "set it to the memory in GB the tool may use, e.g. 16",
        ) from None
    if not math.isfinite(gb) or gb <= 0:
        raise AbdomenSegError(f"ABDOMENSEG_MAX_MEMORY_GB is {value}", "set it to a positive number of GB, e.g. 16")
    return gb * 1e9


def check_geometry(size: Sequence[int], spacing: Sequence[float], name: str = "input") -> None:
    """Spacing, extent and voxel count of an image header (size and spacing in x, y, z)."""
    for axis, s in zip("xyz", spacing):
        if not (math.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM):
            raise AbdomenSegError(
                f"{name} has a voxel spacing of {s:g} mm along {axis}, outside the supported "
                f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm",
                "the header's spacing is probably wrong: check it (e.g. in 3D Slicer's Volumes module) and fix it",
            )
    for axis, n, s in zip("xyz", size, spacing):
        if n * s > MAX_EXTENT_MM:
            raise AbdomenSegError(
                f"{name} is {n * s:.0f} mm long along {axis} ({n} voxels x {s:g} mm), longer than any patient "
                f"(limit {MAX_EXTENT_MM:.0f} mm)",
                "the header's spacing or size is probably wrong: check and fix it",
            )
    check_voxel_count(size, name)


def check_field_of_view(
    size: Sequence[int],
    spacing: Sequence[float],
    name: str = "input",
    direction: Sequence[float] | None = None,
) -> None:
    """An image to segment must be at least MIN_FIELD_MM across. With its `direction` (9 cosines, row-major) that is
    across the body, left-right and front-back (a thin head-feet slab is the models' minimum extent's business,
    models/extent.py); without it, in its two widest directions. The two widest alone let a CT shrunk tenfold
    left-right (37 mm wide, 303 front-back, 336 head-feet) through, and its stray labels passed."""
    extents = [n * s for n, s in zip(size, spacing)]
    if direction is not None and len(direction) == 9 and len(extents) == 3:
        # The width of the image's box along patient x (left-right) and y (front-back): exact for an axial scan, the
        # bounding box's for an oblique one (at 45 degrees each image axis adds 0.71 of its length to both).
        across = {
            row: sum(abs(float(direction[3 * row + axis])) * extent for axis, extent in enumerate(extents))
            for row in (0, 1)
        }
        narrow = min(across, key=lambda a: across[a])
        if across[narrow] < MIN_FIELD_MM:
            side = "left-right" if narrow == 0 else "front-back"
            raise AbdomenSegError(
                f"{name} covers only {across[narrow]:.0f} mm {side} (and {across[1 - narrow]:.0f} mm "
                f"{'front-back' if narrow == 0 else 'left-right'}), too narrow for an abdomen (at least "
                f"{MIN_FIELD_MM:.0f} mm across)",
                "the header's spacing is probably wrong, or the image is cropped: check it",
            )
        return
    widths = sorted(extents)[-2:]
    if min(widths) < MIN_FIELD_MM:
        raise AbdomenSegError(
            f"{name} covers only {widths[1]:.0f} x {widths[0]:.0f} mm across, too small for an abdomen (at least "
            f"{MIN_FIELD_MM:.0f} mm)",
            "the header's spacing is probably wrong, or the image is cropped: check it",
        )


def check_voxel_count(size: Sequence[int], name: str = "input") -> None:
    voxels = math.prod(int(n) for n in size)
    if voxels > MAX_INPUT_VOXELS:
        raise AbdomenSegError(
            f"{name} has {voxels:,} voxels ({' x '.join(str(n) for n in size)}), more than the supported "
            f"{MAX_INPUT_VOXELS:,}",
            "crop or downsample the volume first (e.g. 3D Slicer's Crop Volume module)",
        )


def model_grid_size(size: Sequence[int], spacing: Sequence[float], model_spacing: Sequence[float]) -> list[int]:
    """Voxels per axis of the model-space grid covering the input's extent (as preprocess resamples it)."""
    return [max(1, int(round(n * s / t))) for n, s, t in zip(size, spacing, model_spacing)]


def estimate_memory(
    size: Sequence[int],
    spacing: Sequence[float],
    model_spacing: Sequence[float],
    channels: int,
    fixed_bytes: float = 0.0,
) -> float:
    """Peak bytes for segmenting an image of `size`/`spacing` with a model at `model_spacing`; `fixed_bytes`: what
    the model needs whatever the input (models/footprint.py: its weights, one batch of windows, its activations)."""
    model_voxels = math.prod(model_grid_size(size, spacing, model_spacing))
    input_voxels = math.prod(int(n) for n in size)
    return (
        input_voxels * _INPUT_BYTES_PER_VOXEL
        + model_voxels * _MODEL_BYTES_PER_VOXEL
        + model_voxels * channels * _MODEL_BYTES_PER_VOXEL_PER_CHANNEL
        + model_voxels * (channels + 1) * _WINDOW_ACCUMULATOR_BYTES
        + fixed_bytes
    )


def check_memory(
    size: Sequence[int],
    spacing: Sequence[float],
    model_spacing: Sequence[float],
    channels: int,
    name: str = "input",
    fixed_bytes: float = 0.0,
) -> None:
    need, limit = estimate_memory(size, spacing, model_spacing, channels, fixed_bytes), max_memory_bytes()
    if need > limit:
        grid = model_grid_size(size, spacing, model_spacing)
        model = f", {fixed_bytes / 1e9:.1f} GB of it the model and its window" if fixed_bytes >= 0.05e9 else ""
        raise AbdomenSegError(
            f"segmenting {name} would need about {need / 1e9:.1f} GB of memory (model grid "
            f"{' x '.join(map(str, grid))} voxels{model}), over the limit of {limit / 1e9:.1f} GB",
            "crop the volume to the abdomen first, or raise the limit with ABDOMENSEG_MAX_MEMORY_GB if this machine "
            "has the memory",
        )


# -- the input's extent, against a model's minimum (models/extent.py gives the minimum) -------------------------
AXIS_NAMES = ("x (left-right)", "y (front-back)", "z (head-foot)")


def extents(size: Sequence[int], spacing: Sequence[float], direction: Sequence[float]) -> list[tuple[int, float]]:
    """(voxels, mm) of an image along each patient axis x, y, z: each image axis counted along the patient axis
    its direction is nearest to (an axial series' slices lie along z, a coronal one's along y)."""
    found = [(1, 0.0)] * 3
    for axis in range(3):
        column = [abs(float(direction[row * 3 + axis])) for row in range(3)]
        nearest = column.index(max(column))
        found[nearest] = (int(size[axis]), int(size[axis]) * float(spacing[axis]))
    return found


def check_extent(
    size: Sequence[int],
    spacing: Sequence[float],
    direction: Sequence[float],
    slices: int,
    mm: Sequence[float],
    model: str,
    name: str = "input",
) -> None:
    """Refuse an image shorter along z than `slices` voxels, or along any axis than `mm` (x, y, z): what `model`
    segments wrong for lack of context (models/extent.py says how the minimum was measured)."""
    found = extents(size, spacing, direction)
    voxels, length = found[2]
    short = [a for a in range(3) if found[a][1] < mm[a]]
    if voxels >= slices and not short:
        return
    axis = short[0] if short else 2
    count, extent = found[axis]
    unit = "slices" if axis == 2 else "voxels"
    need = f"{slices} slices and {mm[2]:g} mm" if axis == 2 else f"{mm[axis]:g} mm"
    where = f"of at least {need} along z" if axis == 2 else f"covering at least {need} along {AXIS_NAMES[axis][0]}"
    raise AbdomenSegError(
        f"{name} has {count} {unit} ({extent:.0f} mm) along {AXIS_NAMES[axis]}; model '{model}' needs at least "
        f"{need} there: on shorter scans organs come out wrong for lack of context, not with a lower score",
        f"give a scan {where} (e.g. the whole abdomen), not a few slices of it",
    )
