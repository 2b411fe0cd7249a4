"""Training augmentations MONAI does not ship.

`RandUnenhancedd` makes a contrast-enhanced CT patch look like an unenhanced (non-contrast) scan. All BTCV
training scans are portal-venous, so a model trained on them alone misses the spleen and kidneys of a
non-contrast scan (measured on the real-HU TotalSegmentator example: aorta 41 HU, kidneys 12-17 HU,
spleen 35 HU, against 130-190 HU in BTCV). Each labelled organ whose median is above its typical
unenhanced attenuation is pulled towards it, and its internal spread (cortex/medulla, vessels) is
compressed. The per-voxel change is blurred (sigma one voxel): no intensity step sits exactly on a label
edge, which the network could otherwise learn as a shortcut, and the compression acts on structure larger
than a voxel (cortex against medulla) while the voxel-scale noise, which is the scanner's, stays.

`RandOrganEnlarged` warps an organ larger (splenomegaly); `RandRenalCystd` paints a fluid-density cyst into
a kidney and labels it kidney, as BTCV's annotators do.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

# Typical unenhanced attenuation (HU) of each organ in adults; organs without enhancement (bile) or whose
# label is mostly content (stomach) are left alone because their median is already at or below these.
# Real scans spread around these (the TotalSegmentator example: kidneys 12-17, spleen 35, liver 46 HU),
# hence the +-20 HU jitter by default.
UNENHANCED_HU = {
    "liver": 55.0,
    "spleen": 45.0,
    "kidney_right": 30.0,
    "kidney_left": 30.0,
    "pancreas": 40.0,
    "gallbladder": 10.0,
    "stomach": 30.0,
    "aorta": 42.0,
    "inferior_vena_cava": 42.0,
    "esophagus": 40.0,
    "portal_splenic_vein": 42.0,
    "adrenal_gland_right": 25.0,
    "adrenal_gland_left": 25.0,
    "urinary_bladder": 10.0,
}


def window_scale(window) -> tuple:
    """(low, width) of a CT window in HU: a value maps to image units as (hu - low) / width, a difference as
    hu / width (the cached image is [0, 1] over the window)."""
    low, high = float(window[0]), float(window[1])
    return low, high - low


def mm_grid(shape, spacing) -> np.ndarray:
    """Voxel centres in mm, (3, z, y, x), for `spacing` given (z, y, x)."""
    return np.indices(shape, dtype=np.float32) * np.asarray(spacing, dtype=np.float32)[:, None, None, None]


class _ImageLabelTransform(RandomizableTransform, MapTransform):
    """A random transform of an (image, label) pair, drawn once per call with probability `prob`."""

    def __init__(self, image_key, label_key, prob):
        MapTransform.__init__(self, [image_key])
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        return self.apply(d, np.asarray(d[self.image_key], dtype=np.float32), np.asarray(d[self.label_key]))

    def apply(self, d: dict, image: np.ndarray, label: np.ndarray) -> dict:
        raise NotImplementedError


class RandUnenhancedd(_ImageLabelTransform):
    """With probability `prob`, wash the contrast out of labelled organs (image in window units [0, 1]).

    organs: the organ name of each label channel 1..C-1 (channel 0 is background).
    window: the CT window (HU) the image was scaled from, so targets in HU map to image units.
    strength: range of the washout fraction (1 = fully unenhanced); jitter_hu: per-organ random offset.
    """

    def __init__(
        self,
        image_key="image",
        label_key="label",
        *,
        organs,
        window,
        prob=0.3,
        strength=(0.6, 1.0),
        spread=(0.4, 1.0),
        jitter_hu=20.0,
        sigma=1.0,
    ):
        super().__init__(image_key, label_key, prob)
        low, width = window_scale(window)
        self.targets = [(c + 1, (UNENHANCED_HU[o] - low) / width) for c, o in enumerate(organs) if o in UNENHANCED_HU]
        self.strength, self.spread, self.jitter, self.sigma = strength, spread, jitter_hu / width, sigma

    def apply(self, d, image, label):
        alpha = self.R.uniform(*self.strength)
        delta = np.zeros(image.shape, dtype=np.float32)
        for channel, target in self.targets:
            mask = label == channel
            if not mask.any():
                continue
            values = image[mask]
            median = float(np.median(values))
            goal = target + self.R.uniform(-self.jitter, self.jitter)
            if median <= goal:
                continue  # not enhanced here (or already unenhanced): nothing to wash out
            squeeze = self.R.uniform(*self.spread)
            # new = (1 - alpha) * old + alpha * (goal + squeeze * (old - median))
            delta[mask] = alpha * ((goal - median) + (squeeze - 1.0) * (values - median))
        if not delta.any():
            return d
        spatial_sigma = (0,) + (self.sigma,) * (delta.ndim - 1)  # no blur across the channel axis
        delta = ndimage.gaussian_filter(delta, spatial_sigma)
        out = np.clip(image + delta, 0.0, 1.0)
        d[self.image_key] = out
        return d


class RandOrganEnlarged(_ImageLabelTransform):
    """With probability `prob`, enlarge one organ (e.g. the spleen: splenomegaly) inside the patch.

    The 20 BTCV training spleens hold 60-420 mL; a validation case's holds 3 L and the model calls it liver.
    A radial warp centred on the organ magnifies it by `scale` (linear) and pushes its neighbours outwards,
    fading back to no displacement at `reach` times the enlarged organ's radius, as an enlarged organ
    displaces the colon and kidney. Image: linear interpolation; label: nearest. `spacing` (z, y, x) in mm keeps
    the warp round in millimetres on anisotropic grids.
    """

    def __init__(
        self, image_key="image", label_key="label", *, channel, spacing, prob=0.2, scale=(1.2, 1.9), reach=1.6
    ):
        super().__init__(image_key, label_key, prob)
        self.channel = channel
        self.spacing = np.asarray(spacing, dtype=np.float32)
        self.scale, self.reach = scale, reach

    def apply(self, d, image, label):
        organ = np.argwhere(label[0] == self.channel)
        if len(organ) < 50:
            return d  # organ (almost) absent from this patch
        s = self.R.uniform(*self.scale)
        centre = organ.mean(0) * self.spacing
        radius = float(np.percentile(np.linalg.norm(organ * self.spacing - centre, axis=1), 95))
        inner, outer = radius * s, radius * s * self.reach
        offset = mm_grid(label.shape[1:], self.spacing) - centre[:, None, None, None]
        distance = np.sqrt((offset**2).sum(0)) + 1e-6
        # Radial source distance: d / s inside the enlarged organ, then linear up to no displacement at `outer`
        # (monotonic, so the warp never folds).
        source = np.where(
            distance <= inner, distance / s, radius + (distance - inner) * (outer - radius) / (outer - inner)
        )
        source = np.where(distance >= outer, distance, source)
        coords = (centre[:, None, None, None] + offset * (source / distance)) / self.spacing[:, None, None, None]
        d[self.image_key] = ndimage.map_coordinates(image[0], coords, order=1, mode="nearest")[None]
        d[self.label_key] = ndimage.map_coordinates(label[0], coords, order=0, mode="nearest")[None]
        return d


class RandRenalCystd(_ImageLabelTransform):
    """With probability `prob`, put a simple renal cyst (fluid, 0-20 HU) into one kidney of the patch.

    Simple cysts are found in a quarter to a half of adults over 50 and BTCV labels them kidney; the training
    kidneys show few, and a validation kidney whose lower pole is a ~60 mL cyst came out as a rim of
    parenchyma. An ellipsoid of `radius_mm` (each semi-axis drawn in that range) is centred on a random voxel
    of the kidney, so it may lie inside or bulge out of it (exophytic); it takes fluid attenuation plus noise
    over the kidney and background voxels it covers (other organs keep theirs), and those voxels become
    kidney. The image is blended over a one-voxel blur of the ellipsoid: a partial-volume rim, not a step
    exactly on the label edge. `spacing` (z, y, x) in mm; `window` (HU) maps fluid HU to image units.
    """

    def __init__(
        self,
        image_key="image",
        label_key="label",
        *,
        channels,
        window,
        spacing,
        prob=0.2,
        radius_mm=(8.0, 25.0),
        hu=(0.0, 20.0),
        noise_hu=8.0,
    ):
        super().__init__(image_key, label_key, prob)
        self.channels = list(channels)
        low, width = window_scale(window)
        self.fluid, self.noise = ((hu[0] - low) / width, (hu[1] - low) / width), noise_hu / width
        self.spacing = np.asarray(spacing, dtype=np.float32)
        self.radius = radius_mm

    def apply(self, d, image, label):
        present = [c for c in self.channels if (label[0] == c).sum() >= 50]
        if not present:
            return d  # no kidney (or only a sliver) in this patch
        channel = present[self.R.randint(len(present))]
        kidney = np.argwhere(label[0] == channel)
        centre = kidney[self.R.randint(len(kidney))] * self.spacing
        radii = self.R.uniform(*self.radius, size=3)
        offset = mm_grid(label.shape[1:], self.spacing) - centre[:, None, None, None]
        inside = ((offset / radii[:, None, None, None]) ** 2).sum(0) <= 1.0
        cyst = inside & ((label[0] == channel) | (label[0] == 0))
        if not cyst.any():
            return d
        fluid = self.R.uniform(*self.fluid) + self.R.normal(0.0, self.noise, size=image.shape[1:]).astype(np.float32)
        weight = ndimage.gaussian_filter(cyst.astype(np.float32), 1.0)
        weight[cyst] = np.maximum(weight[cyst], 0.5)  # at least half fluid on every labelled cyst voxel
        out = image.copy()
        out[0] = np.clip(image[0] * (1.0 - weight) + fluid * weight, 0.0, 1.0)
        new_label = label.copy()
        new_label[0][cyst] = channel
        d[self.image_key], d[self.label_key] = out, new_label
        return d


class RandSideFlipd(_ImageLabelTransform):
    """With probability `prob`, mirror image and label along the left-right array axis `axis` (0 = z of the
    spatial axes) and trade the paired organs' label values (`pairs`, mirror.value_pairs): the mirrored right
    kidney lies where a left kidney does and must be labelled so. The other axes mirror with MONAI's RandFlipd."""

    def __init__(self, image_key="image", label_key="label", *, axis, pairs, prob=0.5):
        super().__init__(image_key, label_key, prob)
        self.axis, self.pairs = axis + 1, list(pairs)  # + 1: the channel axis comes first

    def apply(self, d, image, label):
        from AbdomenSegLib.models.mirroring import swap_values

        d[self.image_key] = np.ascontiguousarray(np.flip(image, self.axis))
        d[self.label_key] = swap_values(np.ascontiguousarray(np.flip(label, self.axis)), self.pairs)
        return d
