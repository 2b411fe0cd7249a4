"""Training batches made on the training device (train.pipeline "device"): the cache moved there once, every
step's crops and spatial augmentation one warp of the whole batch.

The MONAI chain (recipe.transforms) builds each crop with NumPy in loader processes; on a GPU those
processes, not the network, set the step rate (3.4 steps/s with 14 workers on an H100). Here the cached cases
live on the device as uint8, and a step is a handful of batched tensor operations:

- crop centres as RandCropByLabelClasses draws them: one case per step, `batch_size` crops of it, each centred on
  a class drawn by (background_ratio, organ_ratios) among the classes present in that case, on a voxel drawn
  uniformly among that class's voxels, the centre then moved so that the crop stays inside the (padded) volume;
- mirroring, rotation, scaling, shear and elastic deformation as one sampling grid: output offset o maps to
  source voxel centre + F.A.o (+ a smooth displacement), the image sampled by one `grid_sample` (bilinear,
  zeros outside, as RandAffined's padding), the label by the nearest voxel of the same grid;
- then the project's augmentations and the intensity ones (device_augment.py), in the MONAI chain's order.

Differences from the MONAI chain, on purpose: a rotated or scaled patch is sampled from the whole volume, so it
has no zero corners where the volume goes on (MONAI warps the already cut patch); rotation acts in millimetres
(the in-plane angle, the large one, is the same since y and x share their spacing); the elastic field is a
coarse random grid (13-voxel spacing, MONAI's 5-8 voxel smoothing) upsampled, its size as MONAI's magnitude and
sigma give it. Every random number comes from a generator seeded by (seed, step, rank), so step s draws the same
batch after a resume.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

BACKGROUND_TRIES = 32  # background voxels by rejection: P(all 32 draws hit an organ) < 0.5 ** 32 in a CT volume
ELASTIC_SPACING = 13  # voxels between the elastic field's random control points (about 2 x MONAI's sigma)


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """The generator of one step's batch: a function of (seed, step, rank) only (resume draws the same)."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + int(rank)) % (2**63 - 1))
    return g


def _uniform(shape, low, high, g, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, device=device)


class DeviceCase:
    """One cached case on the device: uint8 image and label (z, y, x) and, per class, its voxels for crop draws
    (organ voxels' flat indices sorted by class; background drawn by rejection, the bulk of the volume)."""

    def __init__(self, image: np.ndarray, label: np.ndarray, channels: int, device):
        flat = np.asarray(label).reshape(-1)
        organ = np.flatnonzero(flat)
        order = organ[np.argsort(flat[organ], kind="stable")]
        counts = np.bincount(flat, minlength=channels)[:channels].astype(np.int64)
        starts = np.concatenate([[0, 0], np.cumsum(counts[1:])[:-1]])  # class c's voxels: order[starts[c]:...]
        self.shape = tuple(int(s) for s in label.shape)
        self.image = torch.as_tensor(np.ascontiguousarray(image)).to(device)
        self.label = torch.as_tensor(np.ascontiguousarray(label).astype(np.uint8)).to(device)
        self.order = torch.as_tensor(np.concatenate([order, [0]])).long().to(device)  # [0]: never empty
        self.counts = torch.as_tensor(counts).to(device)
        self.starts = torch.as_tensor(starts).long().to(device)


def draw_centres(case: DeviceCase, ratios: torch.Tensor, count: int, g: torch.Generator) -> tuple:
    """(classes (count,), centre voxels (count, 3)) as RandCropByLabelClasses draws them: a class by `ratios`
    among those present in the case, then a voxel of that class uniformly."""
    device = case.label.device
    weights = ratios * (case.counts > 0)
    classes = torch.multinomial(weights, count, replacement=True, generator=g)
    u = torch.rand(count, generator=g, device=device)
    n = case.counts[classes]
    offset = torch.minimum((u * n).long(), (n - 1).clamp(min=0))
    organ = case.order[(case.starts[classes] + offset).clamp(max=case.order.numel() - 1)]  # class 0: unused
    flat = case.label.reshape(-1)
    tries = torch.randint(0, flat.numel(), (count, BACKGROUND_TRIES), generator=g, device=device)
    first = (flat[tries] == 0).float().argmax(1, keepdim=True)
    background = tries.gather(1, first)[:, 0]
    index = torch.where(classes == 0, background, organ)
    d, h, w = case.shape
    return classes, torch.stack([index // (h * w), (index // w) % h, index % w], 1)


def crop_starts(centres: torch.Tensor, shape, patch) -> torch.Tensor:
    """First voxel of each crop (may be negative: padding) as SpatialPad + correct_crop_centers place it: a volume
    smaller than the patch padded evenly, otherwise the crop moved inside the volume."""
    size = torch.as_tensor(shape, device=centres.device)
    p = torch.as_tensor(patch, device=centres.device)
    inside = (centres - p // 2).clamp(min=0).minimum((size - p).clamp(min=0))
    return torch.where(size >= p, inside, -((p - size) // 2))


def rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotations in (z, y, x) array axes: angles[:, 0] turns within the y-x plane (about the array's
    first axis, as MONAI's first rotate_range), then [:, 1] in z-x and [:, 2] in z-y."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def matrix(rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    r0 = matrix([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    r1 = matrix([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    r2 = matrix([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return r0 @ r1 @ r2


def draw_spatial(augment: dict, flip_axes: list, batch: int, g: torch.Generator, device) -> dict:
    """Each sample's spatial parameters as the MONAI chain draws them (recipe.sampling_and_spatial):
    RandFlip p 0.5 per axis in `flip_axes` (array axes); RandAffine with affine_prob, angles U(+-rotate) in-plane
    and U(+-0.05) out of plane, scale 1 + U(+-scale) per axis, shear U(+-shear); Rand3DElastic with elastic_prob,
    sigma U(5, 8) voxels, magnitude U(50, 150)."""
    a = augment
    flips = torch.zeros(batch, 3, dtype=torch.bool, device=device)
    coins = torch.rand(batch, 3, generator=g, device=device) < 0.5
    for axis in flip_axes:
        flips[:, axis] = coins[:, axis]
    affine = torch.rand(batch, generator=g, device=device) < a["affine_prob"]
    bounds = torch.tensor([a["rotate"], 0.05, 0.05], device=device)
    angles = _uniform((batch, 3), -1.0, 1.0, g, device) * bounds * affine[:, None]
    scales = 1.0 + _uniform((batch, 3), -a["scale"], a["scale"], g, device) * affine[:, None]
    shear = _uniform((batch, 6), -a["shear"], a["shear"], g, device) * affine[:, None]
    elastic = torch.rand(batch, generator=g, device=device) < a["elastic_prob"]
    sigma = _uniform(batch, 5.0, 8.0, g, device)
    magnitude = _uniform(batch, 50.0, 150.0, g, device)
    return {
        "elastic_prob": a["elastic_prob"],
        "flips": flips,
        "affine": affine,
        "angles": angles,
        "scales": scales,
        "shear": shear,
        "elastic": elastic,
        "sigma": sigma,
        "magnitude": magnitude,
    }


def elastic_std(sigma: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Standard deviation (voxels) of MONAI's elastic offsets: U(-1, 1) noise (variance 1/3) smoothed by a 3D
    Gaussian of `sigma` (sum of squared weights 1 / (2 sqrt(pi) sigma)^3), times `magnitude`."""
    return magnitude * torch.sqrt((1.0 / 3.0) / (2.0 * math.sqrt(math.pi) * sigma) ** 3)


def source_points(params: dict, starts: torch.Tensor, patch, spacing, g: torch.Generator) -> torch.Tensor:
    """(B, pz, py, px, 3) source voxel coordinates (z, y, x) of every patch voxel: offset o from the patch centre
    goes to centre + F.A.o (+ elastic), A = rotation x scale x shear acting in millimetres."""
    device = starts.device
    batch = starts.shape[0]
    axes = [torch.arange(p, device=device, dtype=torch.float32) - (p - 1) / 2 for p in patch]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (pz, py, px, 3)
    mm = torch.as_tensor(spacing, dtype=torch.float32, device=device)
    shear = torch.eye(3, device=device).repeat(batch, 1, 1)
    rows = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    cols = torch.tensor([1, 2, 0, 2, 0, 1], device=device)
    shear[:, rows, cols] = params["shear"]
    a = rotation(params["angles"]) @ torch.diag_embed(params["scales"]) @ shear
    a = a * mm[None, :, None].reciprocal() * mm[None, None, :]  # millimetres in, voxels out
    signs = 1.0 - 2.0 * params["flips"].float()
    points = torch.einsum("bij,zyxj->bzyxi", a, offsets) * signs[:, None, None, None, :]
    if params["elastic_prob"] > 0:  # the config's probability, not the draws: reading those would wait for the GPU
        coarse = [max(2, math.ceil(p / ELASTIC_SPACING) + 1) for p in patch]
        field = torch.randn(batch, 3, *coarse, generator=g, device=device)
        std = elastic_std(params["sigma"], params["magnitude"]) * params["elastic"]
        field = F.interpolate(field, size=tuple(patch), mode="trilinear", align_corners=True)
        points = points + field.permute(0, 2, 3, 4, 1) * std[:, None, None, None, None]
    centres = starts.float() + torch.as_tensor([(p - 1) / 2 for p in patch], device=device)
    return points + centres[:, None, None, None, :]


def sample(case: DeviceCase, points: torch.Tensor) -> tuple:
    """(image (B, 1, ...) float32 in [0, 1], label (B, ...) long) of `case` at `points`: image bilinear, zeros
    outside; label the nearest voxel, background outside. One grid_sample for the whole batch (the crops stacked
    along z, all from the one case)."""
    batch, pz, py, px, _ = points.shape
    size = torch.as_tensor(case.shape, dtype=torch.float32, device=points.device)
    grid = (2.0 * points / (size - 1).clamp(min=1) - 1.0).flip(-1)  # (x, y, z), align_corners=True
    volume = case.image[None, None].float() / 255.0
    image = F.grid_sample(volume, grid.reshape(1, batch * pz, py, px, 3), mode="bilinear", align_corners=True)
    nearest = torch.round(points).long()
    inside = ((nearest >= 0) & (nearest < size.long())).all(-1)
    d, h, w = case.shape
    index = (nearest[..., 0].clamp(0, d - 1) * h + nearest[..., 1].clamp(0, h - 1)) * w + nearest[..., 2].clamp(
        0, w - 1
    )
    label = torch.where(inside, case.label.reshape(-1)[index].long(), 0)
    return image.reshape(batch, 1, pz, py, px), label


def swap_sides(label: torch.Tensor, mirrored: torch.Tensor, pairs: list, channels: int) -> torch.Tensor:
    """`label` with the paired organs' values traded in the samples `mirrored` along the left-right axis."""
    if not pairs:
        return label
    lut = torch.arange(channels, device=label.device).repeat(label.shape[0], 1)
    swapped = lut[0].clone()
    for a, b in pairs:
        swapped[a], swapped[b] = b, a
    lut[mirrored] = swapped
    return lut.gather(1, label.reshape(label.shape[0], -1)).reshape(label.shape)


def autocast_dtype(device) -> torch.dtype | None:
    """bf16 autocast on CUDA, and on a CPU only where precision.py finds native bf16 (elsewhere it is emulated
    and 40-100x slower); None: float32. bf16 keeps float32's range, so no loss scaling is needed."""
    from AbdomenSegLib.core.precision import cpu_has_native_bf16

    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


class DevicePipeline:
    """Step s's batch (x (B, 1, z, y, x) float32, y (B, 1, z, y, x) long) of a training config, made on `device`
    from the cached training cases (name -> (uint8 image, label channels)), which move there once."""

    def __init__(self, config: dict, cases: dict, names: list, device, rank: int = 0):
        from AbdomenSegLib.models.mirroring import array_axis, lateral_axis, value_pairs
        from AbdomenSegLib.training.device_augment import ProjectAugmentations

        t, m = config["train"], config["model"]
        self.device, self.rank, self.seed = torch.device(device), rank, int(t["seed"])
        self.augment, self.patch, self.batch_size = t["augment"], list(t["patch"]), int(t["batch_size"])
        organs = m["organs"]
        self.channels = len(organs) + 1
        self.spacing = [float(s) for s in m["spacing"][::-1]]  # (z, y, x) like the arrays
        self.cases = [DeviceCase(cases[n][0], cases[n][1], self.channels, self.device) for n in names]
        ratios = [t["background_ratio"]] + [float(t["organ_ratios"].get(o, 1.0)) for o in organs]
        self.ratios = torch.tensor(ratios, dtype=torch.float32, device=self.device)
        self.flip_axes = [array_axis(a) for a in self.augment["flip_axes"]]
        lateral = array_axis(lateral_axis(m["orientation"]))
        self.lateral = lateral if lateral in self.flip_axes else None
        self.pairs = value_pairs({organ: c for c, organ in enumerate(organs, start=1)})
        self.project = ProjectAugmentations(config, self.device)

    def batch(self, step: int) -> tuple:
        from AbdomenSegLib.training.device_augment import apply_intensity, draw_intensity

        g = step_generator(self.seed, step, self.rank, self.device)
        b, d = self.batch_size, self.device
        # the case on the CPU (a draw on the GPU read back would make the CPU wait for the GPU every step)
        case = self.cases[int(np.random.default_rng([self.seed, step, self.rank]).integers(len(self.cases)))]
        _, centres = draw_centres(case, self.ratios, b, g)
        spatial = draw_spatial(self.augment, self.flip_axes, b, g, d)
        intensity = draw_intensity(self.augment, b, g, d)
        project = self.project.draw(b, g)
        points = source_points(spatial, crop_starts(centres, case.shape, self.patch), self.patch, self.spacing, g)
        image, label = sample(case, points)
        if self.lateral is not None:
            label = swap_sides(label, spatial["flips"][:, self.lateral], self.pairs, self.channels)
        image, label = self.project(image, label, project, g)
        self.drawn = {"centres": centres, "spatial": spatial, "intensity": intensity, "project": project}  # tests
        return apply_intensity(image, intensity, g), label[:, None]
