"""Contrast-agnostic training images synthesised from label maps, in the spirit of SynthSeg (Billot et al.,
Med Image Anal 2023): every sample draws a new intensity distribution for every class, then a new
acquisition (partial-volume blur, thick slices along a random axis, bias field, noise, gamma), so the network
cannot learn any sequence's contrast and has to use shape and context. Written for this project from the
paper's description; no SynthSeg code.

The label maps are whole-image tissue maps (tissue_labels.py): organs in our numbering plus extra tissue
classes (air, fat, fluid, soft tissue, bone, bowel contrast; MR pseudo-tissues) from FIRST_TISSUE up. Those
extra classes only shape the image; `to_target` maps them to background for the loss.

Per sample (`SynthParams` holds the ranges):
- class intensities: mean ~ U(0, 1) and std ~ U(0.01, 0.12) for every class, Gaussian per voxel; label 0
  (padding) and the air classes get mean ~ U(0, 0.08), std ~ U(0, 0.03): air gives no MR signal on any
  sequence, and the inference pipeline's body-percentile normalisation relies on a dark background;
- thick slices (probability 0.7): along z (70 %) or y / x, a slice thickness drawn up to 9 mm (at most 3x the
  grid spacing): Gaussian slice profile (FWHM = thickness) along that axis, sampled every thickness and
  linearly interpolated back onto the grid;
- partial-volume blur: Gaussian sigma ~ U(0, 0.8) voxel per axis;
- bias field: a 4x4x4 grid of N(0, s), s ~ U(0, 0.35), trilinearly upsampled, exp, multiplied in;
- noise: Gaussian, std ~ U(0, 0.05) of the image's 99th percentile;
- gamma: x ** exp(N(0, 0.4)) on the image scaled to [0, 1];
- normalisation as the MR inference pipeline (pipeline.to_model_space, intensity mode "mr_percentile"):
  clip to the (0.5, 99.5) percentiles of the body (labels other than 0 and AIR_OUTSIDE), scale to [0, 1].
  It works on the patch, where the pipeline works on the whole volume: the percentiles differ a little.

Arrays are (z, y, x) and `spacing` is (z, y, x) mm, like augment.py. Pure NumPy/SciPy; a 32x96x96 patch takes
12-18 ms of CPU time on one core (bench/bench_synth.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from AbdomenSegLib.inference.inferer import PADDING
from AbdomenSegLib.models.card_schema import PADDING_MODES
from AbdomenSegLib.training.augment import _ImageLabelTransform
from AbdomenSegLib.training.tissue_labels import (
    AIR_INSIDE,
    AIR_OUTSIDE,
    BONE,
    DARK_CLASSES,
    FAT,
    FIRST_TISSUE,
    MR_BRIGHT,
    PERIRENAL_FAT,
    RENAL_FASCIA,
)


@dataclass(frozen=True)
class SynthParams:
    mean: tuple[float, float] = (0.0, 1.0)
    std: tuple[float, float] = (0.01, 0.12)
    dark_mean: tuple[float, float] = (0.0, 0.08)
    dark_std: tuple[float, float] = (0.0, 0.03)
    dark_classes: tuple = (0,) + tuple(DARK_CLASSES)
    thick_prob: float = 0.7
    thick_axis_p: tuple = (0.7, 0.15, 0.15)  # z, y, x
    thick_max_mm: float = 9.0
    thick_max_factor: float = 3.0
    blur_sigma: tuple[float, float] = (0.0, 0.8)  # voxels, per axis
    bias_grid: tuple = (4, 4, 4)
    bias_std: tuple = (0.0, 0.35)
    noise_std: tuple = (0.0, 0.05)
    gamma_log_std: float = 0.4
    percentiles: tuple = (0.5, 99.5)
    background_classes: tuple = (0, AIR_OUTSIDE)  # outside the body for the normalisation percentiles
    ink_prob: float = 0.0  # opposed-phase "India ink" edges (below); 0 = never, as the first models trained
    # Each non-air class, with this probability, gets an air-dark mean (dark_mean): organs can give almost no
    # signal (kidneys and spleen on T1 opposed-phase, iron-laden liver on T2*), and a network that only ever saw
    # air that dark takes such an organ for gas and labels the bright fat around it instead. 0 = never.
    dark_prob: float = 0.0
    ink_factor: tuple[float, float] = (0.0, 0.3)
    # Visible organs: an organ whose mean lies within `min_contrast` of the classes that hold more than
    # `max_hidden` of its surface is redrawn (up to `redraws` times). Plain SynthSeg draws let, say, a kidney
    # and its perirenal fat share one intensity in ~20 % of samples; the loss then rewards painting a kidney
    # where the prior puts one with no edge in the image, and on a real MR the network draws kidneys into
    # uniform fat. No real sequence hides an organ from most of its surroundings. 0 = off (no draw).
    min_contrast: float = 0.0
    max_hidden: float = 0.5
    redraws: int = 8
    # Perirenal fat is fat: with this probability it takes the FAT class's mean (else its own draw), so the
    # compartment is usually told apart from other fat only by its fascia, as on real images. 0 = no draw.
    perirenal_as_fat: float = 0.0


DEFAULT = SynthParams()
# Every draw covers at least the classes of the first tissue maps (tissue-v1: up to MR_BRIGHT), so maps without
# the later classes give the same random stream as before they existed.
_V1_CLASSES = MR_BRIGHT + 1


def _interp_matrix(n_out: int, positions: np.ndarray, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights sampling a length-n_in axis at `positions`."""
    positions = np.clip(positions, 0, n_in - 1)
    low = np.floor(positions).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    w = (positions - low).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), low] += 1.0 - w
    m[np.arange(n_out), high] += w
    return m


def _apply_along(image: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    out = np.tensordot(matrix, np.moveaxis(image, axis, 0), axes=(1, 0))
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def _thick_slices(image: np.ndarray, axis: int, factor: float, offset: float) -> np.ndarray:
    """Simulate slices `factor` voxels thick along `axis`: slice profile, coarse sampling, linear back."""
    sigma = [0.0] * 3
    sigma[axis] = factor / 2.355  # FWHM = slice thickness
    image = ndimage.gaussian_filter1d(image, sigma[axis], axis=axis, truncate=2.5)
    n = image.shape[axis]
    coarse = np.arange(offset * factor, n - 1 + 1e-6, factor)
    if coarse.size < 2:
        return image
    down = _apply_along(image, _interp_matrix(coarse.size, coarse, n), axis)
    back = np.interp(np.arange(n), coarse, np.arange(coarse.size))  # fine voxel -> coarse index
    return _apply_along(down, _interp_matrix(n, back, coarse.size), axis)


def _bias_field(shape, grid, std, rng) -> np.ndarray:
    coarse = rng.normal(0.0, std, size=grid).astype(np.float32)
    field = coarse
    for axis, (n, g) in enumerate(zip(shape, grid)):
        field = _apply_along(field, _interp_matrix(n, np.linspace(0, g - 1, n), g), axis)
    return np.exp(field)


def surface_contacts(index: np.ndarray, count: int) -> np.ndarray:
    """(count, count) matrix: how many voxel faces class i shares with class j (symmetric, zero diagonal)."""
    contacts = np.zeros(count * count, dtype=np.int64)
    for axis in range(index.ndim):
        a = np.moveaxis(index, axis, 0)
        lo, hi = a[:-1], a[1:]
        differ = lo != hi
        pairs = lo[differ] * count + hi[differ]
        contacts += np.bincount(pairs, minlength=count * count)
    matrix = contacts.reshape(count, count)
    return matrix + matrix.T


def _make_organs_visible(index: np.ndarray, means: np.ndarray, rng: np.random.Generator, p) -> list:
    """Redraw (in place) the mean of every organ (label 1 .. FIRST_TISSUE - 1) hidden from more than
    `p.max_hidden` of its surface: neighbours weighted by shared faces. Returns the organs redrawn."""
    contacts = surface_contacts(index, means.size)
    redrawn = []
    for organ in range(1, min(FIRST_TISSUE, means.size)):
        surface = contacts[organ]
        total = surface.sum()
        if total == 0:
            continue
        for _ in range(p.redraws):
            hidden = surface[np.abs(means - means[organ]) < p.min_contrast].sum() / total
            if hidden <= p.max_hidden:
                break
            means[organ] = rng.uniform(*p.mean)
            redrawn.append(organ)
    return redrawn


def synthesize(
    label_map: np.ndarray, spacing, rng: np.random.Generator, params: SynthParams = DEFAULT, return_info: bool = False
):
    """A synthetic image (float32, [0, 1], shape of `label_map`) for a 3D tissue label map (z, y, x).

    `label_map` is read, never written. `spacing` (z, y, x) mm; `rng` a numpy Generator (a fixed seed gives
    the same image). With `return_info`, also a dict of the drawn parameters."""
    labels = np.asarray(label_map)
    if labels.ndim != 3:
        raise ValueError(f"synthesize needs a 3D (z, y, x) label map, got shape {labels.shape}")
    p = params
    count = max(int(labels.max()) + 1, _V1_CLASSES)
    means = rng.uniform(*p.mean, size=count).astype(np.float32)
    stds = rng.uniform(*p.std, size=count).astype(np.float32)
    dark = np.array([c for c in p.dark_classes if c < count], dtype=np.int64)
    means[dark] = rng.uniform(*p.dark_mean, size=dark.size)
    stds[dark] = rng.uniform(*p.dark_std, size=dark.size)
    darkened = np.zeros(0, dtype=np.int64)
    if p.dark_prob > 0:  # no draw when off: older configs keep their random stream
        darkened = np.flatnonzero(rng.uniform(size=count) < p.dark_prob)
        darkened = darkened[~np.isin(darkened, dark)]
        means[darkened] = rng.uniform(*p.dark_mean, size=darkened.size)
    if p.perirenal_as_fat > 0 and rng.uniform() < p.perirenal_as_fat and count > PERIRENAL_FAT:  # off: no draw
        means[PERIRENAL_FAT] = means[FAT]
    index = labels.astype(np.intp, copy=False)
    redrawn = _make_organs_visible(index, means, rng, p) if p.min_contrast > 0 else []  # off: no draw
    image = means[index] + stds[index] * rng.standard_normal(labels.shape, dtype=np.float32)
    info = {"means": means, "stds": stds, "darkened": darkened, "redrawn": redrawn}
    if p.ink_prob > 0 and rng.uniform() < p.ink_prob:  # no draw when off: older configs keep their stream
        # Opposed-phase (out-of-phase Dixon / GRE) images cancel fat and water signal in voxels holding both:
        # a black line around every organ that borders fat, e.g. the kidneys in their perirenal fat. Darken
        # the fat-side voxel of each fat/water interface; the organ's own voxels and its label stay as they are.
        fat = np.isin(labels, (FAT, PERIRENAL_FAT))
        water = ~fat & ~np.isin(labels, (0, AIR_OUTSIDE, AIR_INSIDE, BONE, RENAL_FASCIA))
        edge = fat & ndimage.binary_dilation(water)
        image[edge] *= rng.uniform(*p.ink_factor)
        info["ink"] = int(edge.sum())

    spacing = np.asarray(spacing, dtype=np.float64)
    if rng.uniform() < p.thick_prob:
        axis = int(rng.choice(3, p=p.thick_axis_p))
        top = min(p.thick_max_mm / spacing[axis], p.thick_max_factor)
        factor = rng.uniform(1.0, max(top, 1.0))
        if factor > 1.2 and labels.shape[axis] > 2:
            image = _thick_slices(image, axis, factor, rng.uniform())
        info["thick"] = (axis, float(factor * spacing[axis]))
    sigma = rng.uniform(*p.blur_sigma, size=3)
    sigma[sigma < 0.25] = 0.0  # a kernel narrower than this barely changes a voxel: skip the pass
    if sigma.any():
        image = ndimage.gaussian_filter(image, sigma, truncate=2.5)
    info["blur"] = sigma
    bias_std = rng.uniform(*p.bias_std)
    image *= _bias_field(labels.shape, p.bias_grid, bias_std, rng)
    info["bias_std"] = bias_std
    np.maximum(image, 0.0, out=image)
    scale = float(np.percentile(image[::2, ::2, ::2], 99)) or 1.0
    noise = rng.uniform(*p.noise_std) * scale
    image += noise * rng.standard_normal(labels.shape, dtype=np.float32)
    np.maximum(image, 0.0, out=image)
    high = float(image.max()) or 1.0
    gamma = float(np.exp(rng.normal(0.0, p.gamma_log_std)))
    image = (image / high) ** gamma
    info.update(noise=noise / scale, gamma=gamma)

    body = ~np.isin(labels, p.background_classes)
    values = image[body] if body.sum() > 100 else image.ravel()
    low, high = np.percentile(values[:: max(1, values.size // 65536)], p.percentiles)
    if high <= low:
        high = low + 1e-3
    image = np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32, copy=False)
    return (image, info) if return_info else image


def to_target(label: np.ndarray, first_tissue: int = FIRST_TISSUE) -> np.ndarray:
    """The training target of a tissue label map: every extra tissue class (>= first_tissue) -> 0 (background),
    organs kept. Returns a new array of the same dtype."""
    label = np.asarray(label)
    return np.where(label >= first_tissue, np.zeros((), dtype=label.dtype), label)


class SynthTransform(_ImageLabelTransform):
    """MONAI-style dict transform (augment.py's convention: image and label (1, z, y, x)).

    With probability `prob` the image is replaced by `synthesize(label)`; otherwise it is kept (real CHAOS T2
    images mixed in, with their ordinary augmentation). Items whose `force_key` entry is true (e.g. BTCV: a CT
    image must never reach an MR model) are always synthesised. The label's organ values are never changed; with
    `tissue_to_background` the extra tissue classes become 0 in the returned label in every case (the loss
    must not see them), so put this transform after every spatial transform and before the loss.
    `spacing` (z, y, x) mm of the model grid."""

    def __init__(
        self,
        image_key="image",
        label_key="label",
        *,
        spacing,
        prob=0.8,
        force_key="synth_only",
        tissue_to_background=True,
        first_tissue=FIRST_TISSUE,
        params: SynthParams = DEFAULT,
    ):
        super().__init__(image_key, label_key, prob)
        self.spacing = tuple(float(s) for s in spacing)
        self.force_key, self.tissue_to_background = force_key, tissue_to_background
        self.first_tissue, self.params = first_tissue, params

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        seed = int(self.R.randint(0, 2**31 - 1))  # drawn every call: the stream does not depend on prob
        label = np.asarray(d[self.label_key])
        if self._do_transform or bool(d.get(self.force_key, False)):
            image = synthesize(label[0], self.spacing, np.random.default_rng(seed), self.params)
            d[self.image_key] = image[None]
        if self.tissue_to_background:
            d[self.label_key] = to_target(label, self.first_tissue)
        return d


class SlabTransform(_ImageLabelTransform):
    """With probability `prob`, keep only a slab of `min_slices`.. (z - 1) slices of the patch, at a random
    position, and fill the rest as the sliding window pads a volume shorter than itself (inferer.PADDING):
    "replicate" repeats the slab's edge slices, image and label alike; "constant" sets image 0 and background.

    Why: MR series often cover only a few centimetres (a 20-slice, 60 mm T1 slab is common), and such a volume is
    padded to the window (sliding_window.py). A network that only ever saw full-height crops meets that padding,
    and the cut-off anatomy, for the first time in use. Place it last in the chain, after the intensity
    augmentation, so that the padding is exactly what inference makes of the slab."""

    def __init__(self, image_key="image", label_key="label", *, prob=0.3, min_slices=4, padding=None):
        super().__init__(image_key, label_key, prob)
        self.min_slices = int(min_slices)
        self.padding = padding or PADDING
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {', '.join(PADDING_MODES)}, got {self.padding!r}")

    def apply(self, d: dict, image: np.ndarray, label: np.ndarray) -> dict:
        depth = image.shape[1]
        if depth <= self.min_slices:
            return d
        keep = int(self.R.randint(self.min_slices, depth))  # at most depth - 1 slices: some padding always
        start = int(self.R.randint(0, depth - keep + 1))
        if self.padding == "replicate":
            # Each slice outside the slab takes the nearest slab slice, as edge padding does.
            nearest = np.clip(np.arange(depth), start, start + keep - 1)
            d[self.image_key] = np.ascontiguousarray(image[:, nearest])
            d[self.label_key] = np.ascontiguousarray(np.asarray(label)[:, nearest])
            return d
        outside = np.ones(depth, dtype=bool)
        outside[start : start + keep] = False
        image, label = image.copy(), np.array(label, copy=True)
        image[:, outside] = 0.0
        label[:, outside] = 0
        d[self.image_key], d[self.label_key] = image, label
        return d
