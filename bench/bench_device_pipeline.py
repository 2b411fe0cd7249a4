"""Step rates of the device pipeline (train.pipeline "device") and the MONAI chain for one recipe on one device.

For each pipeline: the time to build a batch (the device pipeline on --device, the MONAI chain in this process on
the CPU, as one loader worker makes it) and the network step (forward, float32 loss, backward, optimizer step)
with the autocast the trainer uses for that pipeline (device: bf16 on CUDA and on CPUs with native bf16;
MONAI: float16 on CUDA, float32 on the CPU). Steps/s: one step's batch + network time when the batches are made
in the training process; for the MONAI chain also the ceiling with --workers loader processes, min(W / build,
1 / network), which is what a GPU run with loader workers can reach at best.

    python bench/bench_device_pipeline.py Resources/configs/btcv_ct_3d_gpu.json --device cuda --steps 20
    python bench/bench_device_pipeline.py Resources/configs/btcv_ct_3d.json --steps 4   # CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device, fn):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def network_step(trainer, x, y, dtype, channels_last: bool) -> float:
    """Seconds of one training step of trainer's network on (x, y), autocast to `dtype` (None: float32)."""
    import torch

    def step():
        if channels_last:
            inputs = x.contiguous(memory_format=torch.channels_last_3d)
        else:
            inputs = x
        trainer.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(trainer.device.type, dtype=dtype, enabled=dtype is not None):
            logits = trainer.network(inputs)
        loss = trainer.loss(logits.float(), y)
        loss.backward()
        trainer.optimizer.step()

    return _timed(trainer.device, step)[1]


def measure(
    config: dict, device: str, steps: int, warmup: int, workers: int, channels_last: bool, batch_only: bool = False
) -> dict:
    import torch

    from AbdomenSegLib.training.device_batches import DevicePipeline, autocast_dtype
    from AbdomenSegLib.training.trainer import Trainer

    trainer = Trainer(config, "runs/bench-device-pipeline", device=device, log=lambda m: None)
    trainer.rng_state = int(config["train"]["seed"])  # as Trainer.run sets it
    dev = trainer.device
    if channels_last:
        trainer.network.to(memory_format=torch.channels_last_3d)
    pipeline, _ = _timed(dev, lambda: DevicePipeline(config, trainer.cases, trainer.train_names, dev))
    rows = {}
    for name, build, dtype in (
        ("device", lambda s: pipeline.batch(s), autocast_dtype(dev)),
        ("monai", lambda s: [t.to(dev) for t in trainer.step_batch(s)], torch.float16 if dev.type == "cuda" else None),
    ):
        builds, nets = [], []
        for s in range(warmup + steps):
            (x, y), seconds = _timed(dev, lambda s=s, build=build: build(s))
            net = 0.0 if batch_only else network_step(trainer, x, y.long(), dtype, channels_last)
            if s >= warmup:
                builds.append(seconds)
                nets.append(net)
        b, n = sum(builds) / len(builds), sum(nets) / len(nets)
        rows[name] = {"batch_ms": round(1000 * b, 1)}
        if batch_only:
            continue
        rows[name] |= {
            "network_ms": round(1000 * n, 1),
            "autocast": str(dtype).replace("torch.", "") if dtype else "float32",
            "steps_per_s_in_process": round(1 / (b + n), 3),
        }
        if name == "monai":
            rows[name][f"steps_per_s_ceiling_{workers}_workers"] = round(min(workers / b, 1 / n), 3)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=4, help="timed steps per pipeline (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workers", type=int, default=14, help="loader processes for the MONAI chain's ceiling")
    p.add_argument("--batch-size", type=int, help="override train.batch_size")
    p.add_argument("--patch", type=int, nargs=3, help="override train.patch (z y x)")
    p.add_argument("--channels-last", action="store_true", help="network and input in channels_last_3d")
    p.add_argument("--batch-only", action="store_true", help="time the batches alone (no network step)")
    args = p.parse_args(argv)

    import torch

    from AbdomenSegLib.training.config import load_config

    config = copy.deepcopy(load_config(args.config))
    config["train"].update(init_from=None, loader_workers=0, pipeline="device")
    if args.batch_size:
        config["train"]["batch_size"] = args.batch_size
    if args.patch:
        config["train"]["patch"] = args.patch
    torch.set_num_threads(int(config["train"]["threads"]))
    rows = measure(config, args.device, args.steps, args.warmup, args.workers, args.channels_last, args.batch_only)
    hardware = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    print(
        json.dumps(
            {
                "config": args.config,
                "device": args.device,
                "hardware": hardware,
                "threads": torch.get_num_threads(),
                "batch_size": config["train"]["batch_size"],
                "patch": config["train"]["patch"],
                "channels_last": args.channels_last,
                "augment": config["train"]["augment"],
                **rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
