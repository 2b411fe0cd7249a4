"""The device pipeline's intensity and project augmentations (device_batches.py): batched torch ports of the
MONAI intensity transforms the recipe names (recipe.intensity_augmentations) and of augment.py's own.

Each sample draws its parameters from the step's generator, all of them every step (so a step's draws do not
depend on which augmentations fired), with the probabilities and ranges of the MONAI chain:
RandScaleIntensity (x 1 + U(+-0.1)) and RandShiftIntensity (+ U(+-0.05)), each with intensity_prob;
RandGaussianSmooth (sigma U(0.25, 1) per axis); RandAdjustContrast (gamma U(0.7, 1.5) between the sample's min
and max); RandGaussianNoise (std U(0, 0.03)). The project's three are ported whole, with two approximations that
change no parameter range: an organ's median (RandUnenhancedd) is read from a 256-bin histogram (the cache holds
1/255 steps anyway), the enlarged organ's 95th-percentile radius (RandOrganEnlarged) from 0.5 mm bins.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from AbdomenSegLib.training.augment import UNENHANCED_HU, window_scale

BLUR_RADIUS = 4  # taps each side: MONAI truncates its Gaussian at 4 sigma, and sigma is at most 1 voxel here
RADIUS_BIN_MM = 0.5


def _u(shape, low, high, g, device):
    return low + (high - low) * torch.rand(shape, generator=g, device=device)


def _coin(batch, prob, g, device):
    return torch.rand(batch, generator=g, device=device) < prob


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x (B, 1, z, y, x) blurred by a separable Gaussian of per-sample, per-axis `sigma` (B, 3) voxels, zeros
    outside (MONAI's GaussianFilter pads so)."""
    batch = x.shape[0]
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=x.device, dtype=torch.float32)
    out = x.reshape(1, batch, *x.shape[2:])
    for axis in range(3):
        kernel = torch.exp(-0.5 * (taps[None] / sigma[:, axis, None]) ** 2)
        kernel = (kernel / kernel.sum(1, keepdim=True)).to(out.dtype)
        shape = [batch, 1, 1, 1, 1]
        shape[2 + axis] = taps.numel()
        padding = [0, 0, 0]
        padding[axis] = BLUR_RADIUS
        out = F.conv3d(out, kernel.reshape(shape), padding=tuple(padding), groups=batch)
    return out.reshape(x.shape)


def draw_intensity(augment: dict, batch: int, g: torch.Generator, device) -> dict:
    """Each sample's intensity augmentation parameters (see the module docstring for the ranges)."""
    a = augment
    return {
        "blur_prob": a["blur_prob"],
        "scale_on": _coin(batch, a["intensity_prob"], g, device),
        "scale": _u(batch, -0.1, 0.1, g, device),
        "shift_on": _coin(batch, a["intensity_prob"], g, device),
        "shift": _u(batch, -0.05, 0.05, g, device),
        "blur_on": _coin(batch, a["blur_prob"], g, device),
        "blur_sigma": _u((batch, 3), 0.25, 1.0, g, device),
        "contrast_on": _coin(batch, a["contrast_prob"], g, device),
        "gamma": _u(batch, 0.7, 1.5, g, device),
        "noise_on": _coin(batch, a["noise_prob"], g, device),
        "noise_std": _u(batch, 0.0, 0.03, g, device),
    }


def apply_intensity(image: torch.Tensor, p: dict, g: torch.Generator) -> torch.Tensor:
    """image (B, 1, ...) through scale, shift, blur, contrast and noise, in the MONAI chain's order."""

    def per_sample(v):
        return v.reshape(-1, 1, 1, 1, 1)

    image = torch.where(per_sample(p["scale_on"]), image * per_sample(1.0 + p["scale"]), image)
    image = torch.where(per_sample(p["shift_on"]), image + per_sample(p["shift"]), image)
    if p["blur_prob"] > 0 and image.device.type == "cpu":  # the drawn samples alone (see ProjectAugmentations)
        chosen = p["blur_on"].nonzero()[:, 0]
        if chosen.numel():
            image = image.index_copy(0, chosen, blur(image[chosen], p["blur_sigma"][chosen]))
    elif p["blur_prob"] > 0:  # the config's probability: reading the draws back would wait for the GPU
        image = torch.where(per_sample(p["blur_on"]), blur(image, p["blur_sigma"]), image)
    low = image.amin((1, 2, 3, 4), keepdim=True)
    span = image.amax((1, 2, 3, 4), keepdim=True) - low
    contrasted = ((image - low) / (span + 1e-7)).clamp(min=0) ** per_sample(p["gamma"]) * span + low
    image = torch.where(per_sample(p["contrast_on"]), contrasted, image)
    noise = torch.randn(image.shape, generator=g, device=image.device) * per_sample(p["noise_std"])
    return torch.where(per_sample(p["noise_on"]), image + noise, image)


def mm_offsets(shape, spacing, device) -> torch.Tensor:
    """(3, z, y, x) voxel centres in mm (augment.mm_grid on the device)."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) * float(s) for n, s in zip(shape, spacing)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


class ProjectAugmentations:
    """augment.py's RandUnenhancedd, RandOrganEnlarged (spleen) and RandRenalCystd for a batch, with the
    recipe's probabilities and the classes' default ranges (recipe.project_augmentations builds them so)."""

    def __init__(self, config: dict, device):
        from AbdomenSegLib.training.augment import RandOrganEnlarged, RandRenalCystd, RandUnenhancedd

        m, a = config["model"], config["train"]["augment"]
        organs, self.device = m["organs"], torch.device(device)
        self.channels = len(organs) + 1
        self.spacing = [float(s) for s in m["spacing"][::-1]]  # (z, y, x) like the arrays
        self.prob = {k: a[f"{k}_prob"] for k in ("unenhanced", "enlarge_spleen", "renal_cyst")}
        window = m["intensity"]["window"] if m["intensity"]["mode"] == "ct_window" else [0, 1]
        low, width = window_scale(window)
        self.unenhanced = RandUnenhancedd(organs=organs, window=window)  # its default ranges, not its RNG
        targets = torch.full((self.channels,), float("nan"))
        for c, organ in enumerate(organs, start=1):
            if organ in UNENHANCED_HU:
                targets[c] = (UNENHANCED_HU[organ] - low) / width
        self.targets = targets.to(self.device)
        self.spleen = organs.index("spleen") + 1 if "spleen" in organs else None
        self.enlarge = RandOrganEnlarged(channel=0, spacing=self.spacing)
        self.kidneys = [organs.index(o) + 1 for o in ("kidney_right", "kidney_left") if o in organs]
        self.cyst = RandRenalCystd(channels=self.kidneys or [0], window=window, spacing=self.spacing)

    def draw(self, batch: int, g: torch.Generator) -> dict:
        d, u = self.device, self.unenhanced
        return {
            "unenhanced_on": _coin(batch, self.prob["unenhanced"], g, d),
            "alpha": _u(batch, u.strength[0], u.strength[1], g, d),
            "goal_jitter": _u((batch, self.channels), -u.jitter, u.jitter, g, d),
            "squeeze": _u((batch, self.channels), u.spread[0], u.spread[1], g, d),
            "enlarge_on": _coin(batch, self.prob["enlarge_spleen"], g, d),
            "enlarge_scale": _u(batch, self.enlarge.scale[0], self.enlarge.scale[1], g, d),
            "cyst_on": _coin(batch, self.prob["renal_cyst"], g, d),
            "cyst_kidney": torch.rand((batch, max(1, len(self.kidneys))), generator=g, device=d),
            "cyst_radii": _u((batch, 3), self.cyst.radius[0], self.cyst.radius[1], g, d),
            "cyst_fluid": _u(batch, self.cyst.fluid[0], self.cyst.fluid[1], g, d),
        }

    def __call__(self, image: torch.Tensor, label: torch.Tensor, p: dict, g: torch.Generator) -> tuple:
        for switch, prob, augmentation in (
            ("unenhanced_on", self.prob["unenhanced"], self._unenhance),
            ("enlarge_on", self.prob["enlarge_spleen"] if self.spleen is not None else 0.0, self._enlarge),
            ("cyst_on", self.prob["renal_cyst"] if self.kidneys else 0.0, self._cyst),
        ):
            if prob <= 0:
                continue
            if image.device.type != "cpu":  # every sample, masked: choosing some would read the draws back
                image, label = augmentation(image, label, p, g)
                continue
            # on the CPU the drawn samples alone: the arithmetic, not a GPU wait, is what costs there
            chosen = p[switch].nonzero()[:, 0]
            if chosen.numel():
                batch = image.shape[0]
                some = {
                    k: v[chosen] if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v for k, v in p.items()
                }
                done, moved = augmentation(image[chosen], label[chosen], some, g)
                image, label = image.index_copy(0, chosen, done), label.index_copy(0, chosen, moved)
        return image, label

    def _unenhance(self, image, label, p, g):
        """RandUnenhancedd: each enhanced organ pulled towards its unenhanced HU, its spread compressed, the
        change blurred by one voxel."""
        batch, c = label.shape[0], self.channels
        flat_label = label.reshape(batch, -1)
        bins = (image.reshape(batch, -1) * 255).round().clamp(0, 255).long()
        key = (torch.arange(batch, device=label.device)[:, None] * c + flat_label) * 256 + bins
        hist = torch.zeros(batch * c * 256, device=label.device).index_add_(
            0, key.reshape(-1), torch.ones(key.numel(), device=label.device)
        )
        cum = hist.reshape(batch, c, 256).cumsum(-1)
        count = cum[..., -1]
        median = (cum < count[..., None] / 2).sum(-1).float() / 255.0
        goal = self.targets[None] + p["goal_jitter"]
        active = p["unenhanced_on"][:, None] & (count > 0) & ~torch.isnan(goal) & (median > goal)
        alpha = p["alpha"][:, None] * active
        goal = torch.nan_to_num(goal)

        def at(table):
            return table.gather(1, flat_label).reshape(label.shape)[:, None]

        delta = at(alpha) * ((at(goal) - at(median)) + (at(p["squeeze"]) - 1.0) * (image - at(median)))
        delta = blur(delta, torch.ones(batch, 3, device=image.device))
        changed = (alpha > 0).any(1).reshape(-1, 1, 1, 1, 1)
        return torch.where(changed, (image + delta).clamp(0.0, 1.0), image), label

    def _enlarge(self, image, label, p, g):
        """RandOrganEnlarged: a radial warp that magnifies the spleen by U(1.2, 1.9), fading out at `reach`."""
        batch, shape = label.shape[0], label.shape[1:]
        mm = mm_offsets(shape, self.spacing, label.device)
        organ = (label == self.spleen).float()
        n = organ.sum((1, 2, 3))
        centre = (organ[:, None] * mm[None]).sum((2, 3, 4)) / n.clamp(min=1)[:, None]
        offset = mm[None] - centre[:, :, None, None, None]
        distance = (offset**2).sum(1).sqrt() + 1e-6
        bins = (
            int(math.dist((0, 0, 0), [n * s for n, s in zip(shape, self.spacing)]) / RADIUS_BIN_MM) + 2
        )  # no GPU read
        index = (distance / RADIUS_BIN_MM).long().reshape(batch, -1)
        hist = torch.zeros(batch, bins, device=label.device).scatter_add_(1, index, organ.reshape(batch, -1))
        radius = ((hist.cumsum(1) < 0.95 * n[:, None]).sum(1).float() + 0.5) * RADIUS_BIN_MM
        s = p["enlarge_scale"]
        inner, outer = (radius * s)[:, None, None, None], (radius * s * self.enlarge.reach)[:, None, None, None]
        r, s = radius[:, None, None, None], s[:, None, None, None]
        source = torch.where(distance <= inner, distance / s, r + (distance - inner) * (outer - r) / (outer - inner))
        source = torch.where(distance >= outer, distance, source)
        spacing = torch.as_tensor(self.spacing, device=label.device)[None, :, None, None, None]
        points = ((centre[:, :, None, None, None] + offset * (source / distance)[:, None]) / spacing).permute(
            0, 2, 3, 4, 1
        )
        size = torch.as_tensor(shape, dtype=torch.float32, device=label.device)
        grid = (2.0 * points / (size - 1) - 1.0).flip(-1)
        warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
        nearest = torch.round(points).long()
        nearest = torch.minimum(nearest.clamp(min=0), size.long() - 1)
        d, h, w = shape
        flat = (nearest[..., 0] * h + nearest[..., 1]) * w + nearest[..., 2]
        moved = label.reshape(batch, -1).gather(1, flat.reshape(batch, -1)).reshape(label.shape)
        active = p["enlarge_on"] & (n >= 50)  # organ (almost) absent from the patch: left alone
        return (
            torch.where(active.reshape(-1, 1, 1, 1, 1), warped, image),
            torch.where(active.reshape(-1, 1, 1, 1), moved, label),
        )

    def _cyst(self, image, label, p, g):
        """RandRenalCystd: a fluid ellipsoid of radii U(8, 25) mm around a random voxel of a random kidney
        (one with >= 50 voxels in the patch), labelled kidney over that kidney and background."""
        batch, shape = label.shape[0], label.shape[1:]
        kidneys = torch.as_tensor(self.kidneys, device=label.device)
        present = torch.stack([(label == k).sum((1, 2, 3)) >= 50 for k in self.kidneys], 1)
        score = torch.where(present, p["cyst_kidney"][:, : len(self.kidneys)], -1.0)
        channel = kidneys[score.argmax(1)]
        active = p["cyst_on"] & present.any(1)
        mask = (label == channel[:, None, None, None]).reshape(batch, -1)
        pick = (torch.rand(mask.shape, generator=g, device=label.device) * mask).argmax(1)
        mm = mm_offsets(shape, self.spacing, label.device)
        centre = mm.reshape(3, -1)[:, pick].T  # (B, 3)
        offset = mm[None] - centre[:, :, None, None, None]
        inside = ((offset / p["cyst_radii"][:, :, None, None, None]) ** 2).sum(1) <= 1.0
        cyst = inside & ((label == channel[:, None, None, None]) | (label == 0)) & active[:, None, None, None]
        noise = torch.randn(image.shape, generator=g, device=image.device) * self.cyst.noise
        fluid = p["cyst_fluid"].reshape(-1, 1, 1, 1, 1) + noise
        weight = blur(cyst[:, None].float(), torch.ones(batch, 3, device=image.device))
        weight = torch.where(cyst[:, None], weight.clamp(min=0.5), weight)
        painted = (image * (1.0 - weight) + fluid * weight).clamp(0.0, 1.0)
        image = torch.where(active.reshape(-1, 1, 1, 1, 1), painted, image)
        return image, torch.where(cyst, channel[:, None, None, None], label)
