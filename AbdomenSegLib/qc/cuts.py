"""What a cut by the image border leaves known about where an organ lies, for the result check (qc/check.py).

An organ the border cuts shows only a part; the centroid of that part is not the organ's. What is still known,
in patient coordinates (LPS mm) through the image's direction matrix, so for any voxel order or obliquity:
- along a patient axis the cutting face's outward normal is aligned with (|cosine| >= ALIGNED): the rest of the
  organ lies beyond the face, so the whole organ's centroid lies further that way. The visible centroid is a
  one-sided bound, and a relation it already satisfies holds for the whole organ too (a liver cut at the top of
  the field still lies above the kidneys).
- along a patient axis an oblique face leans towards (LEANING <= |cosine| < ALIGNED): nothing.
- along the other axes: a head-feet face (the field's top or bottom) takes off the top or the bottom of an organ
  that stands upright (liver, spleen, kidneys, the vessels), which moves its centroid across little: kept. A
  side, front or back face cuts through an organ's cross-section, and one that lies across the abdomen
  (LYING_ACROSS) loses a part that lies to the side whichever face cuts it (BTCV label maps cropped to the body's
  right half keep the pancreas's head only, in front of the aorta; cropped at the kidneys, the stomach's
  antrum only, 100 mm right of the stomach's centre): nothing known there for the position check. (The
  mirror checks keep them: a cut stomach's centroid still lies behind or in front of the kidney as it should,
  and without it an anterior-posterior flip of TotalSegmentator's example, whose stomach the field cuts at the
  top, goes unflagged.)
Measured on the 24 BTCV reference label maps and TotalSegmentator's example, each cropped to 35, 50 and 65 % of
its extent from each of its six faces and resampled onto grids rotated 30 and 45 degrees (Testing/test_qc_cuts.py).
"""

from __future__ import annotations

import numpy as np

from AbdomenSegLib.qc.anatomy import ANCHORS, OFFSETS_MM

ALIGNED = 0.9  # cosine: a face this close to a patient axis cuts along it
LEANING = 0.3  # cosine: a face leaning this far towards an axis (but not aligned) leaves it unknown

# Organs whose long axis runs across the body (pancreas head to tail, the stomach from fundus to pylorus, the
# splenic vein), so that any cut moves their centroid sideways.
LYING_ACROSS = ("pancreas", "stomach", "portal_splenic_vein")

Face = tuple  # (array axis 0/1/2 = image z/y/x, -1 for the first slice or +1 for the last)
Bounds = dict  # {organ: (low, high)}: per LPS axis the interval the whole organ's centroid lies in


def cut_faces(box: tuple, shape: tuple) -> list:
    """The image faces an organ's array box (slices along z, y, x) touches."""
    faces = []
    for axis, part in enumerate(box):
        if part.start == 0:
            faces.append((axis, -1))
        if part.stop == shape[axis]:
            faces.append((axis, +1))
    return faces


def face_normal(face: Face, direction: np.ndarray) -> np.ndarray:
    """The outward normal (LPS) of an image face, for an image with this 3x3 direction matrix."""
    axis, side = face
    return side * direction[:, 2 - axis]  # array axis 0 is image axis z


def is_head_feet(face: Face, direction: np.ndarray) -> bool:
    return bool(abs(face_normal(face, direction)[2]) >= ALIGNED)


def centroid_bounds(
    direction: np.ndarray, shape: tuple, centroids: dict, boxes: dict, lying_across: tuple = ()
) -> Bounds:
    """{organ: (low, high)} for the organs of `centroids` (visible centroids, LPS mm), their array `boxes` in an
    image of array `shape` and 3x3 `direction`; low == high where the border cuts nothing that matters.
    `lying_across`: organs known nothing about across any face that cuts them (LYING_ACROSS)."""
    bounds = {}
    for name, centre in centroids.items():
        low, high = np.array(centre, dtype=float), np.array(centre, dtype=float)
        for face in cut_faces(boxes[name], shape):
            normal = face_normal(face, direction)
            across_known = is_head_feet(face, direction) and name not in lying_across
            for k in range(3):
                if normal[k] >= ALIGNED:
                    high[k] = np.inf
                elif normal[k] <= -ALIGNED:
                    low[k] = -np.inf
                elif abs(normal[k]) >= LEANING or not across_known:
                    low[k], high[k] = -np.inf, np.inf
        bounds[name] = (low, high)
    return bounds


def exact(bounds: Bounds) -> dict:
    """{organ: centroid, NaN along the axes where the border's cuts leave it uncertain}."""
    return {name: np.where(low == high, low, np.nan) for name, (low, high) in bounds.items()}


def verdict(bounds: Bounds, a: str, b: str, dim: int, sign: int) -> bool | None:
    """Does a's centroid lie on `sign`'s side of b's along LPS axis `dim` for certain (True), on the other side for
    certain (False), or could the parts the border cut off decide it either way (None)?"""
    low = bounds[a][0][dim] - bounds[b][1][dim]
    high = bounds[a][1][dim] - bounds[b][0][dim]
    if sign < 0:
        low, high = -high, -low
    if low > 0:
        return True
    if high < 0:
        return False
    return None


def _offsets(name: str, anchors) -> list:
    """[(anchor, mean offset, SD)] of the atlas offsets of `name` from the `anchors` present."""
    table = OFFSETS_MM.get(name, {})
    return [
        (a, np.array(table[a][0], float), np.array(table[a][1], float)) for a in ANCHORS if a in anchors and a in table
    ]


def expected_position(name: str, bounds: Bounds) -> tuple | None:
    """Atlas position of `name` from the other anchors (mean point, per-axis SD) in LPS mm, each axis averaged
    over the anchors whose centroid is sure along it; NaN along an axis none is sure of; None without anchors."""
    known = exact({a: b for a, b in bounds.items() if a != name})
    offsets = _offsets(name, known)
    if not offsets:
        return None
    points = np.array([known[a] + mean for a, mean, _ in offsets])
    sds = np.array([sd for _, _, sd in offsets])
    sure = np.isfinite(points)
    count = sure.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(sure, points, 0.0).sum(axis=0) / count
        sd = np.where(sure, sds, 0.0).sum(axis=0) / count
    return np.where(count > 0, mean, np.nan), np.where(count > 0, sd, np.nan)


def expected_region(name: str, bounds: Bounds, spread: float) -> tuple | None:
    """(low, high) LPS corners of where the atlas puts `name`, `spread` SDs either way: along an axis some anchor is
    sure of, around their mean; along the others, around every place the anchors' bounds allow (infinite where
    a bound is open). None without anchors."""
    guess = expected_position(name, bounds)
    offsets = _offsets(name, {a for a in bounds if a != name})
    if guess is None or not offsets:
        return None
    mean, sd = guess
    low = np.min([bounds[a][0] + off - spread * s for a, off, s in offsets], axis=0)
    high = np.max([bounds[a][1] + off + spread * s for a, off, s in offsets], axis=0)
    sure = np.isfinite(mean)
    return np.where(sure, mean - spread * sd, low), np.where(sure, mean + spread * sd, high)
