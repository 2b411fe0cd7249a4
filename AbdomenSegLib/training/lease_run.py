"""One GPU lease's training run, on the device machine (bench/gpu_lease.py run): from the carried compact cache
and starting weights, sized to the time left, with the device pipeline, validated in model space.

The machine has PyTorch but neither SimpleITK nor MONAI (MONAI travels as a wheel), so this is a lean loop of
its own rather than Trainer (whose data loading and validation read images with SimpleITK): the same network,
loss, optimizer and batches (device_batches.DevicePipeline), and the card's own inferer for validation, scored
per organ as metrics.evaluate does (Dice, mean over the cases where the organ is in the prediction or the
reference). The schedule is one warm restart per lease: a linear warm-up from the best weights so far (the
optimizer's moments start afresh), then a cosine decay to zero at the step count that fills the time left, so
every lease ends on a finished schedule whatever its length. The warm-up's steps also measure the step rate, on
CUDA once in each memory layout, and the faster one trains.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from AbdomenSegLib.training.lease import atomic_json, plan_steps, read_compact_cache, split_file

WARMUP = 30  # steps; the first 5 of each half are not timed (cuDNN picks its kernels then)
RESERVE_S = 25.0  # the last validation's result, the weights' parts, history and curve written


def lease_lr(step: int, warmup: int, total: int, peak: float) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine to 0 at `total` (a warm restart per lease)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def organ_dice(prediction: np.ndarray, label: np.ndarray, organs: list) -> dict:
    """Dice per organ (channel c = organs[c - 1]) of one case; NaN where neither prediction nor reference has it."""
    out = {}
    for channel, organ in enumerate(organs, start=1):
        p, r = prediction == channel, label == channel
        total = int(p.sum()) + int(r.sum())
        out[organ] = 2.0 * int((p & r).sum()) / total if total else float("nan")
    return out


def validate(network, inferer, cases: dict, names: list, organs: list, device: str) -> dict:
    """Mean Dice per organ over the validation cases in model space (NaN: absent from every case)."""
    network.eval()
    rows = []
    with torch.no_grad():
        for name in names:
            image, label = cases[name]
            probabilities = inferer(network, image.astype(np.float32) / 255.0, device)
            rows.append(organ_dice(probabilities.argmax(0), label, organs))
    network.train()
    return {
        o: float(np.nanmean([r[o] for r in rows])) if any(not math.isnan(r[o]) for r in rows) else float("nan")
        for o in organs
    }


def load_lease(lease_dir) -> tuple:
    """(plan, cases {name: (uint8 image, label channels)}) of a prepared lease folder."""
    from AbdomenSegLib.core.channels import card_labels, organs_to_channels

    lease_dir = Path(lease_dir)
    plan = json.loads((lease_dir / "plan.json").read_text())
    arrays = read_compact_cache(lease_dir / plan["cache"])
    lut = organs_to_channels(card_labels(plan["config"]["model"]["organs"]))
    names = sorted(k.split("/", 1)[1] for k in arrays if k.startswith("image/"))
    return plan, {n: (arrays[f"image/{n}"], lut[arrays[f"label/{n}"]]) for n in names}


class LeaseRun:
    """The run's state: network, optimizer, loss, batches and the record that goes back."""

    def __init__(self, lease_dir, device: str, log=print):
        from safetensors.torch import load_file

        from AbdomenSegLib.inference.inferer import inferer_for
        from AbdomenSegLib.models.networks import build_network
        from AbdomenSegLib.training.config import draft_card
        from AbdomenSegLib.training.device_batches import DevicePipeline, autocast_dtype
        from AbdomenSegLib.training.recipe import LOSSES, OPTIMIZERS

        self.plan, self.cases = load_lease(lease_dir)
        self.config, self.log, self.device = self.plan["config"], log, torch.device(device)
        t, m = self.config["train"], self.config["model"]
        torch.manual_seed(int(t["seed"]))
        self.organs = m["organs"]
        self.network = build_network(m["architecture"], 1, len(self.organs) + 1).to(self.device)
        start = load_file(str(Path(lease_dir) / self.plan["weights"]))
        self.network.load_state_dict({k: v.float() for k, v in start.items()})
        self.optimizer = OPTIMIZERS[t["optimizer"]](self.network.parameters(), t)
        train_labels = [self.cases[n][1] for n in self.plan["train_names"]]  # for losses that weigh the classes
        self.loss = LOSSES[t["loss"]](len(self.organs) + 1, self.device, train_labels)
        self.pipeline = DevicePipeline(self.config, self.cases, self.plan["train_names"], self.device)
        self.inferer = inferer_for(draft_card(self.config))
        self.dtype = autocast_dtype(self.device)
        self.channels_last = False

    def step(self, step: int, lr: float) -> torch.Tensor:
        x, y = self.pipeline.batch(step)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.network(x)
        loss = self.loss(logits.float(), y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def validate(self) -> dict:
        return validate(self.network, self.inferer, self.cases, self.plan["val_names"], self.organs, str(self.device))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _timed_steps(run: LeaseRun, first: int, count: int, warmup: int, peak: float) -> tuple:
    """(losses, steps/s over all but the first 5) of warm-up steps first..first+count-1."""
    untimed = min(5, count - 1)
    losses = [run.step(s, lease_lr(s, warmup, 10**9, peak)) for s in range(first, first + untimed)]
    run.sync()
    start = time.perf_counter()
    losses += [run.step(s, lease_lr(s, warmup, 10**9, peak)) for s in range(first + untimed, first + count)]
    run.sync()
    return losses, (count - untimed) / (time.perf_counter() - start)


def run_lease(
    lease_dir,
    out_dir,
    budget_s: float,
    device: str = "cuda",
    max_steps: int | None = None,
    validations: int = 4,
    warmup: int = WARMUP,
    log=print,
) -> dict:
    """Train inside `budget_s` seconds from now and write the best weights (float32, in parts with a sha256
    manifest), history.json and curve.png into `out_dir`; returns the history."""
    from safetensors.torch import load_file, save_file

    began = time.time()
    deadline = began + budget_s
    run = LeaseRun(lease_dir, device, log)
    peak = float(run.config["train"]["lr"])
    t0 = time.time()
    first = run.validate()  # the starting weights' figures: the curve's first point, and one validation's time
    validation_s = time.time() - t0
    history = [{"step": 0, "seconds": round(time.time() - began, 1), "loss": None, "dice": first}]
    best_mean, best_state, best_step = float(np.nanmean(list(first.values()))), None, 0
    log(f"start: model-space Dice mean {best_mean:.4f} ({validation_s:.1f} s per validation)")
    train_s = 0.0
    t0 = time.time()
    half = warmup // 2
    losses, rate = _timed_steps(run, 0, half, warmup, peak)
    probe = {"contiguous": round(rate, 3)}
    if run.device.type == "cuda":
        run.network.to(memory_format=torch.channels_last_3d)
        run.channels_last = True
        more, rate_cl = _timed_steps(run, half, warmup - half, warmup, peak)
        losses += more
        probe["channels_last_3d"] = round(rate_cl, 3)
        if rate_cl < rate:
            run.network.to(memory_format=torch.contiguous_format)
            run.channels_last = False
        rate = max(rate, rate_cl)
    else:
        more, rate = _timed_steps(run, half, warmup - half, warmup, peak)
        losses += more
    train_s += time.time() - t0
    total = warmup + plan_steps(deadline - time.time(), rate, validations, validation_s, RESERVE_S)
    if max_steps:
        total = min(total, max_steps)
    total = max(total, warmup)
    val_every = max(1, (total - warmup) // validations)
    log(f"step rate {probe} steps/s; training {total} steps, validating every {val_every}")
    step, loss_log = warmup, [[s, float(v)] for s, v in enumerate(losses) if s % 10 == 0]
    while step < total and time.time() < deadline - RESERVE_S - validation_s:
        t0 = time.time()
        end = min(total, step + val_every)
        window = []
        while step < end and time.time() < deadline - RESERVE_S - validation_s:
            window.append(run.step(step, lease_lr(step, warmup, total, peak)))
            step += 1
            if step % 10 == 0:
                loss_log.append([step, float(window[-1])])
        run.sync()
        train_s += time.time() - t0
        dice = run.validate()
        mean = float(np.nanmean(list(dice.values())))
        loss = float(torch.stack(window).mean()) if window else None
        history.append({"step": step, "seconds": round(time.time() - began, 1), "loss": loss, "dice": dice})
        log(f"step {step}/{total}: loss {loss}, model-space Dice mean {mean:.4f}")
        if mean > best_mean:
            best_mean, best_step = mean, step
            best_state = {k: v.detach().float().cpu().contiguous().clone() for k, v in run.network.state_dict().items()}
    if best_state is None:  # never beat the starting weights: those go back (best_step 0 says so)
        best_state = {k: v.float() for k, v in load_file(str(Path(lease_dir) / run.plan["weights"])).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = Path(lease_dir) / "best.safetensors"
    save_file(best_state, str(weights))
    manifest = split_file(weights, out_dir)
    weights.unlink()
    record = {
        "device": torch.cuda.get_device_name(0) if run.device.type == "cuda" else f"cpu ({device})",
        "torch": torch.__version__,
        "budget_s": budget_s,
        "seconds": round(time.time() - began, 1),
        "train_seconds": round(train_s, 1),
        "steps": step,
        "steps_planned": total,
        "step_rate": round(step / train_s, 3) if train_s else None,
        "probe_steps_per_s": probe,
        "channels_last": run.channels_last,
        "autocast": str(run.dtype).replace("torch.", "") if run.dtype else "float32",
        "best_step": best_step,
        "best_model_space_mean": round(best_mean, 4),
        "weights_sha256": manifest["sha256"],
        "started_from": run.plan["init"],
        "history": history,
        "losses": loss_log,
        "config": run.config,
    }
    atomic_json(out_dir / "history.json", record)
    curve(record, out_dir / "curve.png")
    return record


def curve(record: dict, path) -> None:
    """Training loss and model-space validation Dice (mean over organs) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*record["losses"]) if record["losses"] else ((), ())
    left.plot(steps, losses, color="tab:gray", lw=0.8, label="training loss")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    right = left.twinx()
    points = [(h["step"], np.nanmean(list(h["dice"].values()))) for h in record["history"]]
    right.plot(*zip(*points), "o-", color="tab:blue", label="validation Dice (model space, mean)")
    right.set_ylabel("mean Dice")
    fig.suptitle(f"{record['device']}: {record['steps']} steps, {record['step_rate']} steps/s")
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".part.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
