"""The training recipe's parts by name: losses, optimizers, learning-rate schedules and the augmentation chain.

A config names its loss, optimizer and schedule; the names are the keys of the tables here, which the config
check (training/config.py) accepts and the trainer's `build_*` seams look up, so a new loss is one entry here.
torch and MONAI are imported only when a part is built, so checking a config stays light.
"""

from __future__ import annotations

import numpy as np


# -- losses: (channels, device, train_labels) -> loss(logits, labels) -----------------------------------------
# train_labels: the training cases' label arrays (network channels), for losses that weigh the classes.
def _dice_ce(channels, device, train_labels):
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def _dice(channels, device, train_labels):
    from monai.losses import DiceLoss

    return DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def _ce(channels, device, train_labels):
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0)


def _weighted_ce_dice(channels, device, train_labels):
    """CE + Dice with organs up-weighted by inverse frequency over the training set (every 97th voxel)."""
    import torch
    from monai.losses import DiceCELoss

    counts = (
        np.bincount(np.concatenate([labels.ravel()[::97] for labels in train_labels]), minlength=channels).astype(
            np.float64
        )
        + 1
    )
    weights = torch.tensor((counts.sum() / counts) ** 0.5, dtype=torch.float32)
    return DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=False,
        batch=True,
        weight=(weights / weights.mean()).to(device),
    )


LOSSES = {"dice_ce": _dice_ce, "dice": _dice, "ce": _ce, "weighted_ce_dice": _weighted_ce_dice}


# -- optimizers: (parameters, train section) -> optimizer -------------------------------------------------------
def _optimizer(name):
    def build(params, t):
        import torch

        return getattr(torch.optim, name)(params, lr=t["lr"], weight_decay=t["weight_decay"])

    return build


def _sgd(params, t):
    import torch

    return torch.optim.SGD(params, lr=t["lr"], momentum=0.99, nesterov=True, weight_decay=t["weight_decay"])


OPTIMIZERS = {"adam": _optimizer("Adam"), "adamw": _optimizer("AdamW"), "rmsprop": _optimizer("RMSprop"), "sgd": _sgd}


# -- learning-rate schedules: (optimizer, train section) -> scheduler, stepped once per training step -----------
def _poly(optimizer, t):
    import torch

    steps = t["steps"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - min(s, steps) / steps) ** 0.9)


def _step(optimizer, t):
    import torch

    return torch.optim.lr_scheduler.StepLR(optimizer, t["step_decay"]["every"], t["step_decay"]["gamma"])


def _constant(optimizer, t):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


SCHEDULERS = {"poly": _poly, "step": _step, "none": _constant}


# -- augmentation -----------------------------------------------------------------------------------------------
def transforms(config: dict):
    """The augmentation chain of `config` (checked by config.check_config, which refuses options the
    model cannot use, e.g. a renal cyst for a model without kidneys): crops around every class, then the
    augmentations whose probability is above 0."""
    from monai import transforms as T

    return T.Compose(
        sampling_and_spatial(config)
        + project_augmentations(config)
        + intensity_augmentations(config["train"]["augment"])
    )


def crop_indices(label: np.ndarray, patch, channels: int) -> list:
    """Each class's voxel indices for RandCropByLabelClasses' `indices_key`, in the volume as the chain hands it
    over: padded to the patch first (SpatialPad, evenly), since the crop unravels these indices in the padded
    shape. Indices of the unpadded volume put the crops of a case smaller than the patch elsewhere (the crop of
    an organ near the far end of a 100 x 60 x 60 volume, padded to 80 in y and x, missed it 50 times in 50)."""
    from monai.transforms import map_classes_to_indices

    short = [max(0, int(p) - s) for p, s in zip(patch, label.shape)]
    if any(short):
        label = np.pad(label, [(d // 2, d - d // 2) for d in short])
    return map_classes_to_indices(label[None], num_classes=channels)


def sampling_and_spatial(config: dict, label_values: dict | None = None) -> list:
    """Padding to the patch, patches centred on each class in turn, and the spatial augmentations (image bilinear,
    label nearest). `label_values`: organ name -> its value in the label (default: the model's channels), for the
    left-right mirror, which trades paired organs."""
    from monai import transforms as T

    t = config["train"]
    a = t["augment"]
    channels = len(config["model"]["organs"]) + 1
    ratios = [t["background_ratio"]] + [float(t["organ_ratios"].get(o, 1.0)) for o in config["model"]["organs"]]
    keys = ["image", "label"]
    chain = [
        T.SpatialPadd(keys, spatial_size=t["patch"]),
        T.RandCropByLabelClassesd(
            keys,
            label_key="label",
            spatial_size=t["patch"],
            ratios=ratios,
            num_classes=channels,
            num_samples=t["batch_size"],
            indices_key="label_cls_indices",
            allow_smaller=True,
        ),
    ] + _mirrors(config, label_values)
    if a["affine_prob"] > 0:
        r, s = a["rotate"], a["scale"]
        chain.append(
            T.RandAffined(
                keys,
                prob=a["affine_prob"],
                rotate_range=(r, 0.05, 0.05),
                scale_range=(s, s, s),
                shear_range=a["shear"] or None,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
    if a["elastic_prob"] > 0:
        chain.append(
            T.Rand3DElasticd(
                keys,
                sigma_range=(5, 8),
                magnitude_range=(50, 150),
                prob=a["elastic_prob"],
                mode=("bilinear", "nearest"),
            )
        )
    return chain


def _mirrors(config: dict, label_values: dict | None) -> list:
    """train.augment.flip_axes: each axis mirrored with probability 0.5, image and label together."""
    from monai import transforms as T

    from AbdomenSegLib.models.mirroring import array_axis, lateral_axis, value_pairs
    from AbdomenSegLib.training.augment import RandSideFlipd

    m = config["model"]
    if label_values is None:
        label_values = {organ: channel for channel, organ in enumerate(m["organs"], start=1)}
    lateral = lateral_axis(m["orientation"])
    return [
        RandSideFlipd(axis=array_axis(axis), pairs=value_pairs(label_values), prob=0.5)
        if axis == lateral
        else T.RandFlipd(["image", "label"], prob=0.5, spatial_axis=array_axis(axis))
        for axis in config["train"]["augment"]["flip_axes"]
    ]


def project_augmentations(config: dict) -> list:
    """Project-made augmentations (augment.py); they work on the windowed CT image and the model-space grid."""
    m, a = config["model"], config["train"]["augment"]
    organs = m["organs"]
    window = m["intensity"]["window"] if m["intensity"]["mode"] == "ct_window" else None
    spacing = m["spacing"][::-1]  # (z, y, x) like the arrays
    chain: list = []
    if a["unenhanced_prob"] > 0:
        from AbdomenSegLib.training.augment import RandUnenhancedd

        chain.append(RandUnenhancedd(organs=organs, window=window, prob=a["unenhanced_prob"]))
    if a["enlarge_spleen_prob"] > 0:
        from AbdomenSegLib.training.augment import RandOrganEnlarged

        chain.append(
            RandOrganEnlarged(channel=organs.index("spleen") + 1, spacing=spacing, prob=a["enlarge_spleen_prob"])
        )
    if a["renal_cyst_prob"] > 0:
        from AbdomenSegLib.training.augment import RandRenalCystd

        kidneys = [organs.index(o) + 1 for o in ("kidney_right", "kidney_left") if o in organs]
        chain.append(RandRenalCystd(channels=kidneys, window=window, spacing=spacing, prob=a["renal_cyst_prob"]))
    return chain


def intensity_augmentations(a: dict) -> list:
    """Intensity scale and shift, and scanner variety the 20 training scans do not show: coarser
    reconstructions (blur), other contrast phases and kernels (gamma), quantum noise. Off by default; the shipped
    CT configs turn them on."""
    from monai import transforms as T

    chain = []
    if a["intensity_prob"] > 0:
        chain += [
            T.RandScaleIntensityd("image", factors=0.1, prob=a["intensity_prob"]),
            T.RandShiftIntensityd("image", offsets=0.05, prob=a["intensity_prob"]),
        ]
    if a["blur_prob"] > 0:
        chain.append(
            T.RandGaussianSmoothd(
                "image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0), prob=a["blur_prob"]
            )
        )
    if a["contrast_prob"] > 0:
        chain.append(T.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=a["contrast_prob"]))
    if a["noise_prob"] > 0:
        chain.append(T.RandGaussianNoised("image", std=0.03, prob=a["noise_prob"]))
    return chain
