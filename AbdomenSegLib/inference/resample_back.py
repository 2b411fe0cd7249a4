"""Model-space probabilities -> labels on the input grid, interpolating only where it can matter.

The reference is the per-organ-box resampling `Segmenter._smooth_back` (kept, and chosen with
`segmenter.resample_back = "boxes"`): with A = argmax of the model-space probabilities, present = the
channels that win somewhere, box_c = bounding box of A == c grown by 2 voxels and U = that of A > 0,
every input voxel v whose model continuous index m(v) lies in U's sampling buffer gets

    V_0 = linear interpolation of channel 0 over U,   V_c = that of channel c over box_c (0 outside box_c),

each computed as ITK's linear interpolator does it (corner indices clamped into the box, double
arithmetic, rounded to float32), and the first channel of [0, *present] with the largest V; voxels
outside U are background. `labels_on_input_grid` returns exactly that, without resampling any channel
over any box:

1. On the model grid, per cell (the 8 corners that interpolation at m uses, clamped as above) and per
   channel: hi_c = the max of its corner values, lo_c = their min where the whole cell is inside box_c's
   buffer (else 0: V_c = 0 on part of it), and L = max_c lo_c. Every m in the cell has V_c <= hi_c, and
   the channel giving L has V >= L. (Rounding to float32 keeps this: the bounds are float32 values and a
   lerp of values in [lo, hi] stays in it.) So a channel with hi_c < L never wins there; a channel whose
   box does not reach the cell has V_c = 0 and never wins either (channel 0, first, has V_0 >= 0). A cell
   where exactly one channel may win is settled: its label is the argmax at every point of the cell.
2. Input voxels look up their cell's label (nearest lookup of the per-cell label image). Only voxels of
   unsettled cells are interpolated, and only for the channels that may win in their cell, with the
   reference's arithmetic, defaults and tie order.

No full-grid float array is made: the output is one uint8 array of the input's size; the rest is
model-sized (per-box crops) or proportional to the unsettled voxels.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

MARGIN = 2  # voxels added around each organ's bounding box (the reference's boxes)
MIXED = 255  # cell label: unsettled, interpolate its voxels
SEPARABLE_TOLERANCE = 1e-3  # model voxels the other input axes may add to m on the axis-by-axis path
CHUNK_VOXELS = 1 << 18  # input voxels interpolated (or, on the general path, looked up) at a time


def labels_on_input_grid(probabilities, box, model_image: sitk.Image, reference: sitk.Image, lut=None):
    """uint8 (z, y, x) labels in `reference`'s grid: the channel (or `lut[channel]`) that linear
    resampling of each channel inside its box, then argmax, picks (see the module docstring).

    probabilities: (C, z, y, x) softmax over `box` (slices of `model_image`'s array); outside `box` the
    model grid counts as certain background (channel 0 = 1, the others 0).
    """
    probabilities = np.asarray(probabilities)
    if probabilities.dtype != np.float32:  # the reference holds them as float32
        probabilities = probabilities.astype(np.float32)
    shape = tuple(model_image.GetSize()[::-1])
    box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, shape))
    out = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)

    boxes = _organ_boxes(probabilities, box, shape)
    if not boxes:
        return out
    cells = _Cells(probabilities, box, boxes)
    lut = np.arange(256, dtype=np.uint8) if lut is None else np.asarray(lut, dtype=np.uint8)
    table = cells.labels.copy()
    settled = table != MIXED
    table[settled] = lut[table[settled]]
    if np.any(lut[cells.channels] == MIXED):  # an output value that collides with the marker
        table, lut_after = cells.labels, lut
    else:
        lut_after = None

    A, b = _index_map(model_image, reference)
    region = _input_region(A, b, (cells.start, cells.end), out.shape)
    if region is None:
        return out
    offset = np.array([r.start for r in region])
    size = tuple(r.stop - r.start for r in region)
    axes = _separable_axes(A, region)
    if axes is not None:
        block = _lookup_separable(table, cells.origin, A, b, offset, size, axes)
        flat = block.reshape(-1)
        mixed = np.flatnonzero(flat == MIXED)
        for first in range(0, len(mixed), CHUNK_VOXELS):
            part = mixed[first : first + CHUNK_VOXELS]
            v = [i + o for i, o in zip(np.unravel_index(part, size), offset)]
            m = [A[a, 0] * v[0] + A[a, 1] * v[1] + A[a, 2] * v[2] + b[a] for a in range(3)]
            flat[part] = lut[cells.evaluate(m)] if lut_after is None else cells.evaluate(m)
    else:
        block = _lookup_general(table, cells, A, b, offset, size, lut if lut_after is None else None)
    if lut_after is not None:
        block = lut_after[block]
    out[region] = block
    return out


# -- model grid --------------------------------------------------------------------------------------
def _organ_boxes(probabilities, box, shape):
    """{channel: (start, end)} (z, y, x; end inclusive) of each channel that wins somewhere (argmax ties
    to the lower channel, as numpy's), grown by MARGIN and clipped to the model grid."""
    from scipy import ndimage

    best = probabilities[0].copy()
    argmax = np.zeros(best.shape, dtype=np.uint8)
    for c in range(1, probabilities.shape[0]):  # ~5x faster than argmax(0) over the channel axis
        wins = probabilities[c] > best
        argmax[wins] = c
        np.maximum(best, probabilities[c], out=best)
    del best
    offset = np.array([s.start for s in box])
    boxes = {}
    for c, found in enumerate(ndimage.find_objects(argmax), 1):
        if found is not None:
            start = np.maximum(np.array([s.start for s in found]) + offset - MARGIN, 0)
            end = np.minimum(np.array([s.stop - 1 for s in found]) + offset + MARGIN, np.array(shape) - 1)
            boxes[c] = (start, end)
    return boxes


def _crop(array, box, start, end, fill):
    """`array` (given over `box` of the model grid) over [start, end] (inclusive), `fill` outside `box`."""
    out = np.full(tuple(end - start + 1), fill, dtype=np.float32)
    src, dst = [], []
    for lo, hi, b in zip(start, end + 1, box):
        a, z = max(lo, b.start), min(hi, b.stop)
        if z <= a:
            return out
        src.append(slice(a - b.start, z - b.start))
        dst.append(slice(a - lo, z - lo))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _window(a, op):
    """op (np.minimum / np.maximum) over every 2x2x2 window: (n+1)^3 -> n^3."""
    a = op(a[:-1], a[1:])
    a = op(a[:, :-1], a[:, 1:])
    return op(a[:, :, :-1], a[:, :, 1:])


class _Cells:
    """Per-cell bounds and labels on U's cell grid, and the reference's interpolation where unsettled.

    Cell f (per axis) holds the continuous indices [f, f + 1]; the cells that meet U's sampling buffer
    [start - 0.5, end + 0.5) are f = start - 1 .. end ("core", core index f - start + 1). Each channel
    is kept over its box plus a ring of edge copies (`values`): interpolating that array at m equals
    ITK's interpolation with corner indices clamped into the box, for every m in the box's buffer.
    `labels` adds one layer of background cells around the core so that lookups can clip to its edge.
    """

    def __init__(self, probabilities, box, boxes):
        self.start = np.min([s for s, _ in boxes.values()], axis=0)
        self.end = np.max([e for _, e in boxes.values()], axis=0)
        self.channels = [0] + sorted(boxes)
        self.boxes = {0: (self.start, self.end), **boxes}
        core = tuple(self.end - self.start + 2)
        self.values, hi = {}, {}
        low = np.zeros(core, dtype=np.float32)  # L: a value some channel surely reaches (V >= 0 always)
        for c in self.channels:
            start, end = self.boxes[c]
            values = np.pad(_crop(probabilities[c], box, start, end, 1.0 if c == 0 else 0.0), 1, mode="edge")
            self.values[c] = values
            hi[c] = _window(values, np.maximum)
            lo = _window(values, np.minimum)
            # lo bounds V_c only in cells wholly inside box_c's buffer where they meet U's: f = start_c ..
            # end_c - 1, plus the outer cell on a side where box_c reaches U's edge (V_c = 0 elsewhere).
            inner = tuple(
                slice(0 if start[a] == self.start[a] else 1, lo.shape[a] - (0 if end[a] == self.end[a] else 1))
                for a in range(3)
            )
            where = self._core(c)
            into = tuple(slice(w.start + i.start, w.start + i.stop) for w, i in zip(where, inner))
            np.maximum(low[into], lo[inner], out=low[into])
        self.low = low
        # The channels whose hi reaches L may win in the cell (bit i of `alive`: channels[i]); the cell is
        # settled where only one may. If that one, c, is an organ, channel 0 may not (hi_0 < L), so L > 0 came
        # from some lo_j, j may win, j = c: V_c >= L > hi_k >= V_k for the others in their region, and V_k = 0
        # < V_c outside it. If it is 0: the same, or L = 0 and no organ's region holds the cell (V_k = 0 <= V_0,
        # and ties go to channel 0). Unsettled cells evaluate the channels that may win there only: channel 0
        # (V_0 >= 0, first) or the channel giving L > 0 is among them, so the others can neither win nor tie.
        count = np.zeros(core, dtype=np.uint8)
        winner = np.zeros(core, dtype=np.uint8)
        self.alive = np.zeros(((len(self.channels) + 63) // 64,) + core, dtype=np.uint64)
        for i, c in enumerate(self.channels):
            where = self._core(c)
            alive = hi[c] >= low[where]
            count[where] += alive
            winner[where][alive] = c
            self.alive[(i // 64,) + where] |= alive.astype(np.uint64) << np.uint64(i % 64)
        labels = np.where(count == 1, winner, np.uint8(MIXED)).astype(np.uint8)
        # Cells on U's edge are partly outside U (background there): settle only background ones.
        for axis in range(3):
            for edge in (0, -1):
                face = [slice(None)] * 3
                face[axis] = edge
                face = labels[tuple(face)]
                face[face != 0] = MIXED
        self.labels = np.pad(labels, 1)  # background all around
        self.origin = self.start - 2  # cell index of labels[0, 0, 0]

    def _core(self, c):
        """Where channel c's cells (f = start_c - 1 .. end_c) sit in the core."""
        start, end = self.boxes[c]
        return tuple(
            slice(int(s - self.start[a]), int(e - self.start[a] + 2)) for a, (s, e) in enumerate(zip(start, end))
        )

    def evaluate(self, m):
        """The reference's channel at model continuous indices m = (mz, my, mx) (arrays): 0 outside U's
        buffer; else, among the channels that may win in m's cell and whose box buffer holds m, the first
        with the largest interpolated value (the others have a smaller one, or 0 outside their box)."""
        m = [np.asarray(a, dtype=np.float64) for a in m]
        result = np.zeros(m[0].shape, dtype=np.uint8)
        inside = np.ones(m[0].shape, dtype=bool)
        for a in range(3):
            inside &= (m[a] >= self.start[a] - 0.5) & (m[a] < self.end[a] + 0.5)
        where = np.flatnonzero(inside)
        if not len(where):
            return result
        m = [a[where] for a in m]
        floor = [np.floor(a) for a in m]
        dist = [a - f for a, f in zip(m, floor)]
        q = [(f - (s - 1)).astype(np.intp) for f, s in zip(floor, self.start)]  # core index = U's values index
        alive = self.alive[(slice(None),) + tuple(q)]
        best = np.full(len(where), -np.inf, dtype=np.float32)
        label = np.zeros(len(where), dtype=np.uint8)
        for i, c in enumerate(self.channels):
            pick = np.flatnonzero(alive[i // 64] & np.uint64(1 << (i % 64)))
            start, end = self.boxes[c]
            if c and len(pick):  # m must be in box_c's buffer (U's holds them all)
                keep = np.ones(len(pick), dtype=bool)
                for a in range(3):
                    keep &= (m[a][pick] >= start[a] - 0.5) & (m[a][pick] < end[a] + 0.5)
                pick = pick[keep]
            if not len(pick):
                continue
            values = self.values[c]
            index = [q[a][pick] - (start[a] - self.start[a]) for a in range(3)]
            value = _linear(values, index, [d[pick] for d in dist])
            better = value > best[pick]
            best[pick[better]] = value[better]
            label[pick[better]] = c
        result[where] = label
        return result


_CORNERS = [(z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1)]


def _linear(values, base, dist):
    """Trilinear interpolation from corner `base` (z, y, x index arrays) at distances `dist` in [0, 1],
    as ITK's LinearInterpolateImageFunction does it: lerp along x, then y, then z, in double, rounded to
    float32. (ITK's clamping at the box's edge reads the same value twice: the edge ring does that.)"""
    ny, nx = values.shape[1], values.shape[2]
    index = (base[0] * ny + base[1]) * nx + base[2]
    offsets = np.array([(z * ny + y) * nx + x for z, y, x in _CORNERS])
    corner = values.ravel()[index[None, :] + offsets[:, None]].astype(np.float64)  # (8, n)
    x = corner[0::2] + (corner[1::2] - corner[0::2]) * dist[2]  # (z, y) = 00, 01, 10, 11
    y = x[0::2] + (x[1::2] - x[0::2]) * dist[1]
    return (y[0] + (y[1] - y[0]) * dist[0]).astype(np.float32)


# -- geometry ------------------------------------------------------------------------------------------
def _index_map(model_image, reference):
    """(A, b) with m = A @ v + b: input voxel index v -> model continuous index m, both (z, y, x)."""

    def matrix(image):
        return np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(image.GetSpacing())

    to_model = np.linalg.inv(matrix(model_image))
    A = to_model @ matrix(reference)
    b = to_model @ (np.array(reference.GetOrigin()) - np.array(model_image.GetOrigin()))
    return A[::-1, ::-1].copy(), b[::-1].copy()


def _input_region(A, b, union, size):
    """Slices of the input grid holding every voxel whose m is in U's buffer (one voxel to spare)."""
    start, end = union
    corners = np.array(
        [
            [z, y, x]
            for z in (start[0] - 0.5, end[0] + 0.5)
            for y in (start[1] - 0.5, end[1] + 0.5)
            for x in (start[2] - 0.5, end[2] + 0.5)
        ]
    )
    v = np.linalg.solve(A, (corners - b).T).T
    low = np.maximum(np.floor(v.min(0)).astype(int) - 1, 0)
    high = np.minimum(np.ceil(v.max(0)).astype(int) + 2, size)
    if np.any(high <= low):
        return None
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))


def _separable_axes(A, region):
    """For each model axis the one input axis it follows, when the other input axes move m by at most
    SEPARABLE_TOLERANCE over `region` from its centre (the Segmenter's model grid is the input's grid
    reoriented: permuted and flipped axes, so only rounding in the direction matrices is left); else None."""
    axes = [int(np.abs(A[a]).argmax()) for a in range(3)]
    if sorted(axes) != [0, 1, 2]:
        return None
    half = np.array([(r.stop - r.start - 1) / 2.0 for r in region])
    for a in range(3):
        if sum(abs(A[a, k]) * half[k] for k in range(3) if k != axes[a]) > SEPARABLE_TOLERANCE:
            return None
    return axes


def _lookup_separable(table, origin, A, b, offset, size, axes):
    """Each model axis follows one input axis: the cell label image is gathered axis by axis. Where the
    other axes' (tiny) share of m could move a voxel across a cell face, it is left unsettled (MIXED)."""
    follow = [axes.index(k) for k in range(3)]  # input axis k follows model axis follow[k]
    labels = np.pad(table, [(0, 1)] * 3, constant_values=MIXED).transpose(follow)  # + a MIXED layer
    for k in range(3):
        a = follow[k]
        v = np.arange(size[k], dtype=np.float64) + offset[k]
        centre = [offset[j] + (size[j] - 1) / 2.0 for j in range(3)]
        m = A[a, k] * v + (b[a] + sum(A[a, j] * centre[j] for j in range(3) if j != k))
        error = sum(abs(A[a, j]) * (size[j] - 1) / 2.0 for j in range(3) if j != k)
        cell = np.clip(np.floor(m) - origin[a], 0, labels.shape[k] - 2)
        if error > 0:
            near = np.floor(m - error - 1e-9) != np.floor(m + error + 1e-9)
            cell[near] = labels.shape[k] - 1
        labels = labels.take(cell.astype(np.intp), axis=k)
    return np.ascontiguousarray(labels)


def _lookup_general(table, cells, A, b, offset, size, lut):
    """Any affine mapping: slabs of input slices, m per voxel, cell lookup, then the unsettled voxels."""
    flat_table = table.ravel()
    shape = np.array(table.shape)
    block = np.empty(size, dtype=np.uint8)
    step = max(1, CHUNK_VOXELS // max(size[1] * size[2], 1))
    v1 = np.arange(size[1], dtype=np.float64)[None, :, None] + offset[1]
    v2 = np.arange(size[2], dtype=np.float64)[None, None, :] + offset[2]
    for z in range(0, size[0], step):
        v0 = np.arange(z, min(z + step, size[0]), dtype=np.float64)[:, None, None] + offset[0]
        m = [A[a, 0] * v0 + A[a, 1] * v1 + A[a, 2] * v2 + b[a] for a in range(3)]
        flat = None
        for a in range(3):
            cell = np.floor(m[a])
            cell -= cells.origin[a]
            np.clip(cell, 0, shape[a] - 1, out=cell)
            flat = cell if flat is None else flat * shape[a] + cell
        chunk = flat_table[flat.astype(np.intp)]
        mixed = np.nonzero(chunk == MIXED)
        if len(mixed[0]):
            channel = cells.evaluate([a[mixed] for a in m])
            chunk[mixed] = channel if lut is None else lut[channel]
        block[z : z + len(chunk)] = chunk
    return block
