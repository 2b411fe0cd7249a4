"""Training a network from a checked config: one run = one output folder.

The folder holds `config.json` (resolved), `checkpoint.pt` (latest, for resume), `best.safetensors` and
TensorBoard logs in `tb/`; training/export.py exports and validates the best weights. Checkpoints hold only
tensors and plain values and are read back with `weights_only=True`.

The recipe's parts come from `build_network`, `build_optimizer`, `build_scheduler`, `build_loss` and
`build_transforms` (by default the tables of training/recipe.py), which a subclass can override. Validation runs
the card's own inferer (inferer.py), the one `Segmenter` runs for users, and scores with metrics.py.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.io.files import write_json
from AbdomenSegLib.training.config import check_config, draft_card


class Trainer:
    def __init__(self, config: dict, out_dir, device: str = "cpu", log=print):
        import torch
        from monai.utils import set_determinism

        check_config(config)  # everything the run will use, before minutes of caching (training/config.py)
        self.config, self.out_dir = config, Path(out_dir)
        self.device = torch.device(device)
        self._init_distributed()
        self.log = log if self.rank == 0 else (lambda message: None)
        t, m = config["train"], config["model"]
        torch.set_num_threads(int(t["threads"]))
        set_determinism(seed=t["seed"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(config, self.out_dir / "config.json")
        self.organs = m["organs"]
        self.channels = len(self.organs) + 1
        self.dimensions = m["dimensions"]
        self.in_channels = t["patch"][0] if self.dimensions == 2 else 1
        # The network (and a train.init_from package, checked here) before the data: no part of the recipe
        # that can be refused waits for the cache.
        self.network = self.build_network().to(self.device)
        self.initialised_from = None
        if t.get("init_from"):
            self._init_from(t["init_from"])
        self.trainable = self.network
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.trainable = DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_scheduler()
        self.transform = self.build_transforms()
        self._load_data()
        self.loss = self.build_loss()
        self.step, self.best = 0, -1.0
        self.history: list[dict] = []
        self.use_amp = self.device.type == "cuda"
        self.amp_dtype: torch.dtype | None = torch.float16
        if t["pipeline"] == "device":
            from AbdomenSegLib.training.device_batches import autocast_dtype

            self.amp_dtype = autocast_dtype(self.device)
            self.use_amp = self.amp_dtype is not None
            if t["channels_last"]:
                self.network.to(memory_format=torch.channels_last_3d)
        # float16 needs loss scaling (its range is narrow); bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    # -- the recipe's seams ----------------------------------------------------------------------------------
    def build_network(self):
        from AbdomenSegLib.models.networks import build_network

        return build_network(self.config["model"]["architecture"], self.in_channels, self.channels)

    def build_optimizer(self):
        from AbdomenSegLib.training.recipe import OPTIMIZERS

        t = self.config["train"]
        return OPTIMIZERS[t["optimizer"]](self.network.parameters(), t)

    def build_scheduler(self):
        from AbdomenSegLib.training.recipe import SCHEDULERS

        t = self.config["train"]
        return SCHEDULERS[t["scheduler"]](self.optimizer, t)

    def build_loss(self):
        from AbdomenSegLib.training.recipe import LOSSES

        return LOSSES[self.config["train"]["loss"]](
            self.channels, self.device, [self.cases[n][1] for n in self.train_names]
        )

    def build_transforms(self):
        from AbdomenSegLib.training.recipe import transforms

        return transforms(self.config)

    # -- set-up ------------------------------------------------------------------------------------------------
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
        """The cached cases, labels as network channels (self.cases: name -> (uint8 image, channel labels))."""
        from AbdomenSegLib.core.channels import organs_to_channels
        from AbdomenSegLib.preprocessing.datasets import cached_cases, config_cache, split_cases

        d = self.config["data"]
        if self.rank != 0:
            self._barrier()  # rank 0 builds the cache file first; the others then read it
        arrays = config_cache(self.config, log=self.log)
        if self.rank == 0:
            self._barrier()
        cases = cached_cases(arrays)
        self.train_names, self.val_names = split_cases(list(cases), d["val_count"], d["seed"], d["fold"])
        lut = organs_to_channels(self.labels)
        self.cases = {n: (image, lut[organs]) for n, (image, organs) in cases.items()}
        self.log(f"train {len(self.train_names)} cases, validation {self.val_names}")

    @property
    def labels(self) -> dict:
        """The card's channel -> organ block."""
        from AbdomenSegLib.core.channels import card_labels

        return card_labels(self.organs)

    def _init_from(self, package_dir):
        """Start from an exported package's weights (same architecture and organs), sha256-checked."""
        from AbdomenSegLib.models.packages import load_network, read_card

        card = read_card(package_dir)
        if card["architecture"] != self.config["model"]["architecture"] or list(card["labels"].values()) != self.organs:
            raise AbdomenSegError(
                f"train.init_from '{package_dir}' has another architecture or organ list",
                "initialise only from a package trained with the same model settings",
            )
        self.network.load_state_dict(load_network(card, "cpu").state_dict())
        # The package directory may later be overwritten by this run's export: the card keeps the lineage.
        self.initialised_from = {
            "name": card["name"],
            "sha256": card["sha256"],
            "steps": card.get("training", {}).get("steps"),
            "initialised_from": card.get("training", {}).get("initialised_from"),
        }
        self.log(f"initialised from {card.name}")

    # -- batches -----------------------------------------------------------------------------------------------
    def _indices(self, name):
        if not hasattr(self, "_index_cache"):
            self._index_cache = {}
        if name not in self._index_cache:
            from AbdomenSegLib.training.recipe import crop_indices

            label = self.cases[name][1]
            self._index_cache[name] = crop_indices(label, self.config["train"]["patch"], self.channels)
        return self._index_cache[name]

    def item(self, name) -> dict:
        """One training case as the augmentation chain takes it: a seam like the build_* methods
        (training/synth_trainer.py hands over a tissue map instead of the organ channels)."""
        from AbdomenSegLib.preprocessing.datasets import decode_image

        image, label = self.cases[name]
        return {
            "image": decode_image(image)[None],
            "label": label[None].astype(np.int64),
            "label_cls_indices": self._indices(name),
        }

    def batch(self, rng):
        """The next training batch (x, y) on the CPU: a case drawn with `rng`, through the augmentation chain."""
        import torch

        item = self.item(self.train_names[rng.integers(len(self.train_names))])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = self.transform(item)
        x = torch.stack([torch.as_tensor(s["image"]).float() for s in samples])
        y = torch.stack([torch.as_tensor(s["label"]).long() for s in samples])
        if self.dimensions == 2:  # (B, 1, slices, H, W): slices become channels, the centre slice the target
            centre = self.in_channels // 2
            x, y = x[:, 0], y[:, :, centre]
        return x, y

    def step_batch(self, step: int):
        """Step `step`'s batch: a generator and MONAI's transform RNGs seeded by (seed, step, rank), so a resumed
        run, or one whose batches come from loader workers, draws the same batches as an uninterrupted serial one."""
        from monai.utils import set_determinism

        rng = np.random.default_rng([self.rng_state, step, self.rank])  # each rank its own samples
        step_seed = (int(self.config["train"]["seed"]) * 100003 + step * 97 + self.rank) % (2**31)
        set_determinism(seed=step_seed)
        self.transform.set_random_state(seed=step_seed)  # MONAI transforms keep their own RNGs
        return self.batch(rng)

    def _batches(self, first: int, last: int):
        """(x, y) for steps first..last-1 in order: made here, or by `train.loader_workers` processes (worker w
        makes the steps w, w + W, ...; the DataLoader hands them back in step order), or on the device."""
        import torch

        t = self.config["train"]
        if t["pipeline"] == "device":  # the cache moves to the device once, each batch is made there
            if getattr(self, "device_pipeline", None) is None:
                from AbdomenSegLib.training.device_batches import DevicePipeline

                self.device_pipeline = DevicePipeline(self.config, self.cases, self.train_names, self.device, self.rank)
            for step in range(first, last):
                x, y = self.device_pipeline.batch(step)
                yield (x.contiguous(memory_format=torch.channels_last_3d) if t["channels_last"] else x), y
            return
        workers = int(t.get("loader_workers", 0))
        if workers == 0:
            for step in range(first, last):
                yield self.step_batch(step)
            return
        from torch.utils.data import DataLoader

        for name in self.train_names:  # filled once here, shared by the forked workers (not once per worker)
            self._indices(name)
        loader = DataLoader(
            _step_batches(self, first, last),
            batch_size=None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2,
            timeout=600,  # a worker that hangs fails the run instead of stalling it
            # fork: the workers share the cached cases instead of pickling them; they never touch CUDA
            multiprocessing_context="fork",
        )
        yield from loader

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self) -> dict:
        """Mean Dice per organ over the validation cases in model space: the card's inferer (as users run it)
        on each cached case, scored by metrics.evaluate/summarize (as the exported card's validation is)."""
        import SimpleITK as sitk
        import torch

        from AbdomenSegLib.core.channels import channels_to_organs
        from AbdomenSegLib.evaluation.metrics import evaluate, summarize
        from AbdomenSegLib.inference.inferer import inferer_for
        from AbdomenSegLib.preprocessing.datasets import decode_image

        inferer = inferer_for(self.card())
        to_organs = channels_to_organs(self.labels)
        spacing = [float(s) for s in self.config["model"]["spacing"]]
        self.network.eval()
        rows = []
        for name in self.val_names:
            image, label = self.cases[name]
            probabilities = inferer(self.network, decode_image(image), str(self.device))
            maps = []
            for channels in (probabilities.argmax(0), label):
                labels = sitk.GetImageFromArray(to_organs[channels])
                labels.SetSpacing(spacing)
                maps.append(labels)
            rows += evaluate(*maps, organs=self.organs, case=name)
        if self.dimensions == 2:  # the slice inferer leaves a CPU network channels_last; train in the default
            self.network.to(memory_format=torch.contiguous_format)
        self.network.train()
        dice = {s["organ"]: s["dice_mean"] for s in summarize(rows)}
        return {organ: float(dice.get(organ, float("nan"))) for organ in self.organs}  # NaN: absent in every case

    # -- checkpoints and the loop ------------------------------------------------------------------------------
    def save_checkpoint(self):
        import torch

        state = {
            "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "best": self.best,
            "history": json.dumps(self.history),
            "rng": self.rng_state,
        }
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
        from torch.utils.tensorboard import SummaryWriter

        t = self.config["train"]
        self.rng_state = int(t["seed"])
        if resume and (self.out_dir / "checkpoint.pt").is_file():
            self.load_checkpoint()
        writer = SummaryWriter(str(self.out_dir / "tb")) if self.rank == 0 else None
        self.network.train()
        start = time.time()
        last = min(t["steps"], stop_at or t["steps"])
        for x, y in self._batches(self.step, last):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True).long()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                logits = self.trainable(x)
            loss = self.loss(logits.float(), y)  # softmax, log and Dice sums in float32
            self.scaler.scale(loss).backward()
            loss = loss.detach()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            if self.rank != 0:
                continue  # validation, logs and checkpoints are rank 0's
            assert writer is not None  # rank 0 has one
            writer.add_scalar("loss/train", float(loss), self.step)
            if progress:
                progress(self.step, t["steps"], float(loss))
            if self.step % t["val_every"] == 0 or self.step == t["steps"]:
                dice = self.validate()
                mean = float(np.nanmean(list(dice.values())))
                for organ, v in dice.items():
                    writer.add_scalar(f"val_dice/{organ}", v, self.step)
                writer.add_scalar("val_dice/mean", mean, self.step)
                self.history.append(
                    {"step": self.step, "loss": float(loss), "seconds": round(time.time() - start, 1), "dice": dice}
                )
                self.log(
                    f"step {self.step}: loss {float(loss):.4f}, val Dice mean {mean:.3f} "
                    + " ".join(f"{k} {v:.3f}" for k, v in dice.items())
                )
                if mean > self.best:
                    self.best = mean
                    save_file(
                        {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()},
                        str(self.out_dir / "best.safetensors"),
                    )
                self.save_checkpoint()
        if self.rank == 0:
            if self.step % t["val_every"]:
                self.save_checkpoint()
            assert writer is not None  # rank 0 has one
            writer.close()
        self._barrier()
        return self.history

    # -- what the export needs ---------------------------------------------------------------------------------
    def card(self, extra: dict | None = None) -> dict:
        """The card of this run's best weights: the config's part (config.draft_card, with the inference
        block validation ran) plus the training record and the model-space validation."""
        from AbdomenSegLib.core.version import __version__

        c = self.config
        best = max(self.history, key=lambda h: np.nanmean(list(h["dice"].values()))) if self.history else {}
        draft = draft_card(c)
        card = {
            "name": draft["name"],
            "title": draft["title"],
            # The model's own version, and the engine's that exported it (one number: AbdomenSegLib.__version__).
            "version": "1.0.0",
            "abdomenseg_version": __version__,
            **draft,
            "training": {
                "data": (
                    str(c["data"]["root"])
                    if not c["data"].get("sources")
                    else [f"{s['name']}: {s['root']} ({s['kind']})" for s in c["data"]["sources"]]
                ),
                "convention": c["data"]["convention"],
                "train_cases": self.train_names,
                "validation_cases": self.val_names,
                "config": c,
                "best_step": best.get("step"),
                "steps": self.step,
                "initialised_from": self.initialised_from,
            },
            "validation_model_space": best.get("dice", {}),
        }
        card.update(extra or {})
        return card

    def best_network(self):
        from safetensors.torch import load_file

        if (self.out_dir / "best.safetensors").is_file():
            self.network.load_state_dict(load_file(str(self.out_dir / "best.safetensors")))
        return self.network.eval()


def _step_batches(trainer: Trainer, first: int, last: int):
    """The batches of steps first..last-1 as an iterable dataset for a DataLoader: worker w of W makes steps
    first + w, first + w + W, ..., each seeded by its step (Trainer.step_batch)."""
    import torch
    from torch.utils.data import IterableDataset, get_worker_info

    class StepBatches(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            w, n = (info.id, info.num_workers) if info else (0, 1)
            for step in range(first + w, last, n):
                x, y = trainer.step_batch(step)
                yield x, y.to(torch.uint8)  # 8x less shared memory between processes; channels < 256

    return StepBatches()
