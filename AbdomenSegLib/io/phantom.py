"""A synthetic abdominal CT phantom with known organ labels (clearly synthetic, not anatomy).

Used where no scan is at hand: the README's main-job command and the test suite without
../shared/data. Organs are smooth ellipsoids at plausible positions in patient coordinates (LPS mm,
x = patient left, y = posterior, z = superior) with plausible HU, so any geometry (flipped, oblique,
anisotropic) can be generated and the same labels are known exactly.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.organs import BY_NAME

# name: (centre LPS mm, semi-axes mm, HU); body centred at the origin.
ORGAN_SHAPES = {
    "liver": ((-70, 0, 60), (75, 60, 70), 60),
    "spleen": ((85, 40, 70), (30, 45, 45), 50),
    "kidney_right": ((-65, 55, -10), (25, 22, 45), 30),
    "kidney_left": ((65, 55, 0), (25, 22, 45), 30),
    "pancreas": ((10, 10, 20), (50, 12, 12), 45),
    "gallbladder": ((-55, -45, 20), (15, 15, 25), 5),
    "stomach": ((45, -25, 70), (40, 25, 40), 20),
    "aorta": ((10, 35, 0), (11, 11, 140), 180),
}
SPINE = ((0, 75, 0), (22, 22, 200), 450)
BODY = ((0, 0, 0), (160, 120, 400), -20)


def _ellipsoid(points, centre, axes):
    return (((points - np.array(centre)) / np.array(axes)) ** 2).sum(-1) <= 1.0


def make_phantom(size=(96, 80, 64), spacing=(4.0, 4.0, 5.0), direction=None, origin=None, noise=15.0, seed=0):
    """(CT image in HU, label map) sharing one grid; `size`/`spacing` in (x, y, z)."""
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    size, spacing = np.array(size), np.array(spacing, dtype=float)
    if origin is None:  # centre the volume on the phantom
        origin = -direction @ ((size - 1) * spacing / 2.0)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    index = np.stack([xx, yy, zz], -1).astype(np.float32)
    points = (index * spacing) @ direction.T + np.asarray(origin)
    image = np.full(zz.shape, -1000.0, dtype=np.float32)
    labels = np.zeros(zz.shape, dtype=np.uint8)
    image[_ellipsoid(points, BODY[0], BODY[1])] = BODY[2]
    image[_ellipsoid(points, SPINE[0], SPINE[1])] = SPINE[2]
    for name, (centre, axes, hu) in ORGAN_SHAPES.items():
        inside = _ellipsoid(points, centre, axes) & (labels == 0)
        image[inside] = hu
        labels[inside] = BY_NAME[name].label
    rng = np.random.default_rng(seed)
    image += rng.normal(0, noise, image.shape).astype(np.float32)
    ct = sitk.GetImageFromArray(np.round(image).astype(np.int16))
    lab = sitk.GetImageFromArray(labels)
    for img in (ct, lab):
        img.SetSpacing(spacing.tolist())
        img.SetOrigin([float(v) for v in origin])
        img.SetDirection(direction.ravel().tolist())
    return ct, lab


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]
