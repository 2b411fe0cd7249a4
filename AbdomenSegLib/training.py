"""Training 3D MONAI networks from a JSON config; exports a model package with its metrics.

One run = one output folder: `config.json` (resolved), `checkpoint.pt` (latest, for resume),
`best.safetensors`, TensorBoard logs in `tb/`, and the exported package in `package/`.
Checkpoints hold only tensors and plain values and are read back with `weights_only=True`.
"""
from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path

import numpy as np

from .errors import AbdomenSegError
from .io import write_json
from .organs import BY_NAME

DEFAULT_CONFIG = {
    "name": "my-model",
    "title": "",
    "data": {"root": None, "convention": "btcv", "input_intensity": "native", "val_count": 4, "seed": 0,
             "cache": ".cache/{name}.npz",
             # The files' true direction matrix where their headers are wrong (datasets.read_case); None: trust them.
             "direction": None},
    "model": {
        "dimensions": 3,
        "modality": "CT",
        "architecture": {"class": "UNet", "args": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2],
                                                   "num_res_units": 2}},
        "spacing": [2.0, 2.0, 3.0],
        # Axis order of the network's input grid (the card carries it; inference reorients to it).
        "orientation": "LPS",
        "intensity": {"mode": "ct_window", "window": [-125, 275], "enhancement": "none"},
        "organs": ["liver", "spleen", "kidney_right", "kidney_left", "pancreas"],
        # Organs whose output keeps only its largest connected piece by default (the card carries it, as
        # nnU-Net's models carry their post-processing); users can still choose all organs or none.
        "postprocess": {"largest_component": []},
    },
    "train": {"steps": 2000, "batch_size": 2, "patch": [64, 96, 96], "lr": 2e-3, "optimizer": "adamw",
              "scheduler": "poly", "step_decay": {"every": 1000, "gamma": 0.5}, "weight_decay": 1e-5,
              "loss": "dice_ce", "val_every": 250, "background_ratio": 1.0, "seed": 0, "threads": 2,
              "init_from": None,
              "augment": {"affine_prob": 0.2, "rotate": 0.2, "scale": 0.1, "shear": 0.0, "elastic_prob": 0.0,
                          "intensity_prob": 0.5, "blur_prob": 0.0, "contrast_prob": 0.0, "noise_prob": 0.0,
                          "unenhanced_prob": 0.0, "enlarge_spleen_prob": 0.0, "renal_cyst_prob": 0.0}},
}
CHOICES = {
    ("train", "optimizer"): ("adam", "adamw", "rmsprop", "sgd"),
    ("train", "scheduler"): ("poly", "step", "none"),
    ("train", "loss"): ("dice_ce", "dice", "ce", "weighted_ce_dice"),
    ("model", "modality"): ("CT", "MR"),
}


def _merge(base: dict, override: dict, path="", strict=True) -> dict:
    """`override` over `base`, section by section; the architecture, its args and the intensity block are
    replaced whole. strict: every key must exist in `base` (defaults); otherwise new keys are added (extends)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if strict and key not in base:
            raise AbdomenSegError(f"unknown config key '{path}{key}'", f"known keys here: {', '.join(base)}")
        below = base.get(key)
        if isinstance(below, dict) and key not in ("args", "intensity", "architecture") and isinstance(value, dict) and below:
            out[key] = _merge(below, value, f"{path}{key}.", strict)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config(path: Path, seen=()) -> dict:
    """A JSON config file; `"extends": "other.json"` (relative to this file) starts from that config, so a
    continuation stage only states what it changes."""
    if not path.is_file():
        raise AbdomenSegError(f"config '{path}' does not exist", "give the path of a JSON training config")
    if path.resolve() in seen:
        raise AbdomenSegError(f"config '{path}' extends itself (through {', '.join(p.name for p in seen)})",
                              "remove the circular 'extends'")
    try:
        source = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AbdomenSegError(f"config '{path}' is not valid JSON ({exc})", "fix the JSON syntax") from None
    parent = source.pop("extends", None)
    if parent is None:
        return source
    return _merge(read_config(path.parent / parent, seen + (path.resolve(),)), source, strict=False)


def load_config(source) -> dict:
    """Config from a JSON file or dict, merged over defaults and validated (clear errors)."""
    if not isinstance(source, dict):
        source = read_config(Path(source))
    config = _merge(DEFAULT_CONFIG, source)
    for (section, key), allowed in CHOICES.items():
        if config[section][key] not in allowed:
            raise AbdomenSegError(f"config {section}.{key} = '{config[section][key]}' is not supported",
                                  f"use one of: {', '.join(allowed)}")
    if not config["data"]["root"] or not Path(config["data"]["root"]).is_dir():
        raise AbdomenSegError(f"config data.root '{config['data']['root']}' is not a folder",
                              "set data.root to a dataset with images/ and labels/")
    dims, arch = config["model"]["dimensions"], config["model"]["architecture"]["class"]
    from .networks import MONAI_3D, SMP_2D
    if dims not in (2, 3) or arch not in (MONAI_3D if dims == 3 else SMP_2D):
        raise AbdomenSegError(f"model.dimensions {dims} does not fit architecture '{arch}'",
                              f"3D: {', '.join(MONAI_3D)} (MONAI); 2D: {', '.join(SMP_2D)} (segmentation-models-pytorch)")
    unknown = [o for o in config["model"]["organs"] if o not in BY_NAME]
    if unknown:
        raise AbdomenSegError(f"config model.organs names unknown organs {unknown}", f"use: {', '.join(BY_NAME)}")
    orientation = str(config["model"]["orientation"]).upper()
    if len(orientation) != 3 or not all(sum(c in pair for c in orientation) == 1 for pair in ("LR", "PA", "IS")):
        raise AbdomenSegError(f"config model.orientation '{config['model']['orientation']}' is not an axis code",
                              "use three letters, one of L/R, P/A, I/S each, e.g. LPS")
    stray = [o for o in config["model"]["postprocess"]["largest_component"] if o not in config["model"]["organs"]]
    if stray:
        raise AbdomenSegError(f"config model.postprocess.largest_component names {stray}, not in model.organs",
                              "list only organs the model segments")
    patch = config["train"]["patch"]
    if dims == 3 and (len(patch) != 3 or any(p % 16 for p in patch)):
        raise AbdomenSegError(f"config train.patch {patch} must be 3 sizes, each a multiple of 16",
                              "e.g. [64, 96, 96] (z, y, x voxels)")
    if dims == 2 and (len(patch) != 3 or patch[0] % 2 == 0 or any(p % 32 for p in patch[1:])):
        raise AbdomenSegError(f"config train.patch {patch} for a 2D model must be [slices, height, width]",
                              "slices odd (1 = 2D, 3 or 5 = 2.5D input channels), height and width multiples of 32")
    return config


def _channel_lut(organs: list) -> np.ndarray:
    """Our organ label -> network channel (organs not trained map to background)."""
    lut = np.zeros(256, dtype=np.uint8)
    for channel, name in enumerate(organs, start=1):
        lut[BY_NAME[name].label] = channel
    return lut


def dice_per_channel(pred: np.ndarray, ref: np.ndarray, channels: int) -> list:
    out = []
    for c in range(1, channels):
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        out.append(float(2 * (p & r).sum() / denom) if denom else float("nan"))
    return out


class Trainer:
    def __init__(self, config: dict, out_dir, device: str = "cpu", log=print):
        import torch
        from monai.utils import set_determinism

        self.config, self.out_dir = config, Path(out_dir)
        self.device = torch.device(device)
        self._init_distributed()
        self.log = log if self.rank == 0 else (lambda message: None)
        t = config["train"]
        torch.set_num_threads(int(t["threads"]))
        set_determinism(seed=t["seed"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(config, self.out_dir / "config.json")
        self.organs = config["model"]["organs"]
        self.channels = len(self.organs) + 1
        self._load_data()
        self._build()

    def _init_distributed(self):
        """Under torchrun (WORLD_SIZE > 1): one process per device, gradients averaged by DDP."""
        import os
        import torch
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)

    def _barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def _load_data(self):
        from .datasets import build_cache, split_cases
        d, m = self.config["data"], self.config["model"]
        cache_path = Path(d["cache"].format(name=self.config["name"]))
        if self.rank != 0:
            self._barrier()  # rank 0 builds the cache file first; the others then read it
        arrays = build_cache(d["root"], cache_path, spacing=m["spacing"], intensity=m["intensity"],
                             convention=d["convention"], input_intensity=d["input_intensity"],
                             orientation=m["orientation"], direction=d["direction"], log=self.log)
        if self.rank == 0:
            self._barrier()
        names = sorted(k.split("/", 1)[1] for k in arrays if k.startswith("image/"))
        self.train_names, self.val_names = split_cases(names, d["val_count"], d["seed"])
        lut = _channel_lut(self.organs)
        self.cases = {n: (arrays[f"image/{n}"], lut[arrays[f"label/{n}"]]) for n in names}
        self.log(f"train {len(self.train_names)} cases, validation {self.val_names}")

    def _build(self):
        import torch
        from monai.losses import DiceCELoss, DiceLoss
        from .networks import build_network

        t, m = self.config["train"], self.config["model"]
        self.dimensions = m["dimensions"]
        self.in_channels = t["patch"][0] if self.dimensions == 2 else 1
        self.network = build_network(m["architecture"], self.in_channels, self.channels).to(self.device)
        self.initialised_from = None
        if t.get("init_from"):
            self._init_from(t["init_from"])
        self.trainable = self.network
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.trainable = DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = self.network.parameters()
        opt = t["optimizer"]
        if opt == "adam":
            self.optimizer = torch.optim.Adam(params, lr=t["lr"], weight_decay=t["weight_decay"])
        elif opt == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        elif opt == "rmsprop":
            self.optimizer = torch.optim.RMSprop(params, lr=t["lr"], weight_decay=t["weight_decay"])
        else:
            self.optimizer = torch.optim.SGD(params, lr=t["lr"], momentum=0.99, nesterov=True,
                                             weight_decay=t["weight_decay"])
        steps = t["steps"]
        if t["scheduler"] == "poly":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: (1 - min(s, steps) / steps) ** 0.9)
        elif t["scheduler"] == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, t["step_decay"]["every"], t["step_decay"]["gamma"])
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        if t["loss"] == "dice_ce":
            self.loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        elif t["loss"] == "dice":
            self.loss = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        elif t["loss"] == "ce":
            self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0)
        else:  # weighted CE + Dice: organs up-weighted by inverse frequency over the training set
            counts = np.bincount(np.concatenate([self.cases[n][1].ravel()[::97] for n in self.train_names]),
                                 minlength=self.channels).astype(np.float64) + 1
            weights = torch.tensor((counts.sum() / counts) ** 0.5, dtype=torch.float32)
            self.loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                                   weight=(weights / weights.mean()).to(self.device))
        self.transform = self._transforms()
        self.step, self.best = 0, -1.0
        self.history = []
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def _init_from(self, package_dir):
        """Start from an exported package's weights (same architecture and organs), sha256-checked."""
        from .models import load_network, read_card
        card = read_card(package_dir)
        if card["architecture"] != self.config["model"]["architecture"] or list(card["labels"].values()) != self.organs:
            raise AbdomenSegError(f"train.init_from '{package_dir}' has another architecture or organ list",
                                  "initialise only from a package trained with the same model settings")
        self.network.load_state_dict(load_network(card, "cpu").state_dict())
        # The package directory may later be overwritten by this run's export: the card keeps the lineage.
        self.initialised_from = {"name": card["name"], "sha256": card["sha256"],
                                 "steps": card.get("training", {}).get("steps"),
                                 "initialised_from": card.get("training", {}).get("initialised_from")}
        self.log(f"initialised from {card.name}")

    def _transforms(self):
        from monai import transforms as T
        t = self.config["train"]
        a = t["augment"]
        ratios = [t["background_ratio"]] + [1.0] * (self.channels - 1)
        keys = ["image", "label"]
        chain = [
            T.SpatialPadd(keys, spatial_size=t["patch"]),
            T.RandCropByLabelClassesd(keys, label_key="label", spatial_size=t["patch"], ratios=ratios,
                                      num_classes=self.channels, num_samples=t["batch_size"],
                                      indices_key="label_cls_indices", allow_smaller=True),
        ]
        if a["affine_prob"] > 0:
            r, s = a["rotate"], a["scale"]
            chain.append(T.RandAffined(keys, prob=a["affine_prob"], rotate_range=(r, 0.05, 0.05),
                                       scale_range=(s, s, s), shear_range=a["shear"] or None,
                                       mode=("bilinear", "nearest"), padding_mode="zeros"))
        if a["elastic_prob"] > 0:
            chain.append(T.Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(50, 150), prob=a["elastic_prob"],
                                          mode=("bilinear", "nearest")))
        # Project-made augmentations (augment.py); they work on the windowed CT image and the model-space grid.
        intensity = self.config["model"]["intensity"]
        window = intensity["window"] if intensity["mode"] == "ct_window" else None
        spacing = self.config["model"]["spacing"][::-1]  # (z, y, x) like the arrays
        if a["unenhanced_prob"] > 0:
            if window is None:
                raise AbdomenSegError("augment.unenhanced_prob needs a CT model with intensity mode ct_window",
                                      "set augment.unenhanced_prob to 0 for this model")
            from .augment import RandUnenhancedd
            chain.append(RandUnenhancedd(organs=self.organs, window=window, prob=a["unenhanced_prob"]))
        if a["enlarge_spleen_prob"] > 0:
            if "spleen" not in self.organs:
                raise AbdomenSegError("augment.enlarge_spleen_prob needs a model that segments the spleen",
                                      "set augment.enlarge_spleen_prob to 0 or add spleen to model.organs")
            from .augment import RandOrganEnlarged
            chain.append(RandOrganEnlarged(channel=self.organs.index("spleen") + 1, spacing=spacing,
                                           prob=a["enlarge_spleen_prob"]))
        if a["renal_cyst_prob"] > 0:
            kidneys = [self.organs.index(o) + 1 for o in ("kidney_right", "kidney_left") if o in self.organs]
            if window is None or not kidneys:
                raise AbdomenSegError("augment.renal_cyst_prob needs a CT model (intensity mode ct_window) that "
                                      "segments a kidney", "set augment.renal_cyst_prob to 0 for this model")
            from .augment import RandRenalCystd
            chain.append(RandRenalCystd(channels=kidneys, window=window, spacing=spacing, prob=a["renal_cyst_prob"]))
        if a["intensity_prob"] > 0:
            chain += [T.RandScaleIntensityd("image", factors=0.1, prob=a["intensity_prob"]),
                      T.RandShiftIntensityd("image", offsets=0.05, prob=a["intensity_prob"])]
        # Scanner variety the 20 training scans do not show: coarser reconstructions (blur), other contrast
        # phases and kernels (gamma), quantum noise. Off by default; the shipped CT configs turn them on.
        if a["blur_prob"] > 0:
            chain.append(T.RandGaussianSmoothd("image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0),
                                               sigma_z=(0.25, 1.0), prob=a["blur_prob"]))
        if a["contrast_prob"] > 0:
            chain.append(T.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=a["contrast_prob"]))
        if a["noise_prob"] > 0:
            chain.append(T.RandGaussianNoised("image", std=0.03, prob=a["noise_prob"]))
        return T.Compose(chain)

    def _indices(self, name):
        if not hasattr(self, "_index_cache"):
            self._index_cache = {}
        if name not in self._index_cache:
            from monai.transforms import map_classes_to_indices
            label = self.cases[name][1]
            self._index_cache[name] = map_classes_to_indices(label[None], num_classes=self.channels)
        return self._index_cache[name]

    def _batch(self, rng):
        import torch
        name = self.train_names[rng.integers(len(self.train_names))]
        image, label = self.cases[name]
        item = {"image": image[None].astype(np.float32) / 255.0, "label": label[None].astype(np.int64),
                "label_cls_indices": self._indices(name)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = self.transform(item)
        x = torch.stack([torch.as_tensor(s["image"]).float() for s in samples])
        y = torch.stack([torch.as_tensor(s["label"]).long() for s in samples])
        if self.dimensions == 2:  # (B, 1, slices, H, W): slices become channels, the centre slice the target
            centre = self.in_channels // 2
            x, y = x[:, 0], y[:, :, centre]
        return x.to(self.device), y.to(self.device)

    def validate(self) -> dict:
        import torch
        from monai.inferers import sliding_window_inference
        self.network.eval()
        scores = []
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.use_amp):
            for name in self.val_names:
                image, label = self.cases[name]
                if self.dimensions == 2:
                    from .inference import slice_probabilities
                    from .networks import divisor
                    pred = slice_probabilities(self.network, image.astype(np.float32) / 255.0, self.in_channels,
                                               divisor(self.config["model"]["architecture"]), 16,
                                               self.device.type).argmax(0)
                    self.network = self.network.to(memory_format=torch.contiguous_format)
                else:
                    x = torch.as_tensor(image[None, None].astype(np.float32) / 255.0, device=self.device)
                    logits = sliding_window_inference(x, self.config["train"]["patch"], 2, self.network,
                                                      overlap=0.25, mode="gaussian")
                    pred = logits.argmax(1)[0].cpu().numpy()
                scores.append(dice_per_channel(pred, label, self.channels))
        self.network.train()
        mean = np.nanmean(np.array(scores, dtype=np.float64), axis=0)
        return {organ: float(v) for organ, v in zip(self.organs, mean)}

    def save_checkpoint(self):
        import torch
        state = {"model": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step, "best": self.best,
                 "history": json.dumps(self.history), "rng": self.rng_state}
        tmp = self.out_dir / "checkpoint.pt.part"
        torch.save(state, tmp)
        tmp.replace(self.out_dir / "checkpoint.pt")

    def load_checkpoint(self):
        import torch
        state = torch.load(self.out_dir / "checkpoint.pt", map_location=self.device, weights_only=True)
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best = int(state["step"]), float(state["best"])
        self.history = json.loads(state["history"])
        self.rng_state = state["rng"]
        self.log(f"resumed at step {self.step} (best mean Dice {self.best:.3f})")

    def run(self, resume: bool = False, progress=None, stop_at: int | None = None):
        """Train to config steps (or stop early at `stop_at`, as an interruption would; resume continues)."""
        import torch
        from safetensors.torch import save_file
        from monai.utils import set_determinism
        from torch.utils.tensorboard import SummaryWriter

        t = self.config["train"]
        self.rng_state = int(t["seed"])
        if resume and (self.out_dir / "checkpoint.pt").is_file():
            self.load_checkpoint()
        writer = SummaryWriter(str(self.out_dir / "tb")) if self.rank == 0 else None
        self.network.train()
        start = time.time()
        while self.step < min(t["steps"], stop_at or t["steps"]):
            # A fresh generator per step, seeded by (seed, step): a resumed run draws the same
            # cases as an uninterrupted one.
            rng = np.random.default_rng([self.rng_state, self.step, self.rank])  # each rank its own samples
            step_seed = (int(t["seed"]) * 100003 + self.step * 97 + self.rank) % (2 ** 31)
            set_determinism(seed=step_seed)
            self.transform.set_random_state(seed=step_seed)  # MONAI transforms keep their own RNGs
            x, y = self._batch(rng)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=self.use_amp):
                loss = self.loss(self.trainable(x), y)
            self.scaler.scale(loss).backward()
            loss = loss.detach()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            if self.rank != 0:
                continue  # validation, logs and checkpoints are rank 0's
            writer.add_scalar("loss/train", float(loss), self.step)
            if progress:
                progress(self.step, t["steps"], float(loss))
            if self.step % t["val_every"] == 0 or self.step == t["steps"]:
                dice = self.validate()
                mean = float(np.nanmean(list(dice.values())))
                for organ, v in dice.items():
                    writer.add_scalar(f"val_dice/{organ}", v, self.step)
                writer.add_scalar("val_dice/mean", mean, self.step)
                self.history.append({"step": self.step, "loss": float(loss), "seconds": round(time.time() - start, 1),
                                     "dice": dice})
                self.log(f"step {self.step}: loss {float(loss):.4f}, val Dice mean {mean:.3f} "
                         + " ".join(f"{k} {v:.3f}" for k, v in dice.items()))
                if mean > self.best:
                    self.best = mean
                    save_file({k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()},
                              str(self.out_dir / "best.safetensors"))
                self.save_checkpoint()
        if self.rank == 0:
            if self.step % t["val_every"]:
                self.save_checkpoint()
            writer.close()
        self._barrier()
        return self.history

    def card(self, extra: dict | None = None) -> dict:
        c, m = self.config, self.config["model"]
        best = max(self.history, key=lambda h: np.nanmean(list(h["dice"].values()))) if self.history else {}
        card = {
            "name": c["name"], "title": c["title"] or c["name"], "version": "1.0.0",
            "dimensions": m["dimensions"], "framework": "monai" if m["dimensions"] == 3 else "segmentation-models-pytorch",
            "architecture": m["architecture"], "in_channels": self.in_channels, "modality": m["modality"],
            "labels": {str(i): organ for i, organ in enumerate(self.organs, start=1)},
            "spacing": m["spacing"], "orientation": m["orientation"], "intensity": m["intensity"],
            "inference": ({"roi_size": c["train"]["patch"], "overlap": 0.25, "mode": "gaussian"} if m["dimensions"] == 3
                          else {"batch_size": 8}),
            "training": {"data": str(c["data"]["root"]), "convention": c["data"]["convention"],
                         "train_cases": self.train_names, "validation_cases": self.val_names,
                         "config": c, "best_step": best.get("step"), "steps": self.step,
                         "initialised_from": self.initialised_from},
            "postprocess": m["postprocess"],
            "validation_model_space": best.get("dice", {}),
        }
        card.update(extra or {})
        return card

    def best_network(self):
        from safetensors.torch import load_file
        if (self.out_dir / "best.safetensors").is_file():
            self.network.load_state_dict(load_file(str(self.out_dir / "best.safetensors")))
        return self.network.eval()


def validation_rows(card, root=None, log=print, precision="fp32") -> tuple[list, list]:
    """The card's validation protocol: segment each validation case from its original file, in its own grid,
    and score it. Returns (metric rows, seconds per case). `root` overrides the card's data folder. The card's
    figures are fp32; `precision="bf16"` re-validates the model in bfloat16 (bench/validate_bf16.py)."""
    from .datasets import find_cases, read_case
    from .inference import Options, Segmenter
    from .metrics import evaluate

    data = card["training"]["config"]["data"]
    val_names = set(card["training"]["validation_cases"])
    segmenter = Segmenter(card, "cpu", log=log)
    rows, seconds = [], []
    for name, image_path, label_path in find_cases(root or data["root"]):
        if name not in val_names:
            continue
        image, label = read_case(image_path, label_path, data.get("direction"))
        start = time.time()
        prediction = segmenter.segment(image, Options(input_intensity=data["input_intensity"], precision=precision))
        seconds.append(time.time() - start)
        rows += evaluate(prediction, label, reference_convention=data["convention"],
                         organs=list(card["labels"].values()), case=name, model=card.name)
        log(f"validated {name} ({seconds[-1]:.1f} s)")
    return rows, seconds


def validate_package(card, log=print) -> dict:
    """Full-pipeline validation summary for the card (per-organ means over the validation cases)."""
    from .metrics import summarize

    rows, seconds = validation_rows(card, log=log)
    summary = {s["organ"]: s for s in summarize(rows)}
    return {
        "protocol": "full pipeline on the original validation files (input grid), never trained on; "
                    "mean over cases where the organ is present in prediction or reference",
        "cases": sorted(card["training"]["validation_cases"]),
        **{metric: {o: round(s[f"{metric}_mean"], 4) for o, s in summary.items()}
           for metric in ("dice", "iou", "hd95_mm", "assd_mm", "surface_dice")},
        "dice_std": {o: round(s["dice_std"], 4) for o, s in summary.items()},
        "cpu_seconds_per_case": round(float(np.mean(seconds)), 1) if seconds else None,
    }


def train_and_export(config_source, *, out=None, device="auto", resume=False, export_only=False, export_to=None,
                     make_default=False, log=print):
    """Train (or resume), export the best weights as a package, validate it, fill in its card."""
    import platform
    import sys

    import torch
    from .inference import resolve_device
    from .models import export_package

    config = load_config(config_source)
    out = Path(out or f"runs/{config['name']}")
    device = resolve_device(device, log)
    trainer = Trainer(config, out, device=device, log=log)
    start = time.time()
    if export_only:
        trainer.load_checkpoint()
    else:
        trainer.run(resume=resume, progress=lambda s, n, l: (s % 20 == 0 or s == n) and log(
            f"step {s}/{n} loss {l:.4f} ({time.time() - start:.0f} s)"))
    if trainer.world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
        if trainer.rank != 0:
            return None  # rank 0 exports and validates
    network = trainer.best_network()
    history = trainer.history
    hardware = (torch.cuda.get_device_name(0) if device == "cuda"
                else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    card_data = trainer.card()
    card_data["training"].update({
        "command": f"python -m AbdomenSegLib train {config_source} --out {out}",
        "export_command": "python -m AbdomenSegLib " + " ".join(sys.argv[1:]) if sys.argv[1:] else "",
        "hardware": hardware, "torch": torch.__version__,
        "seconds": history[-1]["seconds"] if history else None, "history": history,
    })
    target = Path(export_to) / config["name"] if export_to else out / "package"
    card = export_package(network, card_data, target, register_in=export_to, make_default=make_default)
    log(f"exported {target}; validating on {card['training']['validation_cases']}")
    card.data["validation"] = validate_package(card, log=log)
    card.data["timing"] = {"cpu_seconds": card.data["validation"]["cpu_seconds_per_case"],
                           "cpu_note": f"mean seconds per validation case, full pipeline, CPU with {torch.get_num_threads()} threads",
                           "gpu_seconds": None}
    write_json(card.data, target / "card.json")
    log("validation Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in card.data["validation"]["dice"].items()))
    return card
