"""Train a config on a borrowed GPU machine inside a fixed wall-clock budget.

A GPU session here is short and cannot be extended, and a poly learning-rate schedule needs its step count up
front. So this measures the step rate first (a short run of the same recipe), sizes `train.steps` to fill the
budget, trains, and leaves `best.safetensors`, `last.safetensors` and `history.json` in --out. It stops cleanly
at the deadline if the estimate was wrong (the best weights of the last validation stay). The package is
exported and validated afterwards, on the machine that holds the data (`train --export-only`).

    python bench/train_on_gpu.py Resources/configs/mr_any_3d_gpu.json --minutes 6.5 --out runs/mr-any-gpu
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


class _OutOfTime(Exception):
    pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget for measuring and training")
    p.add_argument("--device", default="cuda")
    p.add_argument("--validations", type=int, default=8, help="validations over the run")
    args = p.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    from AbdomenSegLib.training.config import load_config
    from AbdomenSegLib.training.export import trainer_class

    start = time.time()
    deadline = start + args.minutes * 60
    out = Path(args.out)
    config = load_config(args.config)
    cls = trainer_class(config)

    # 1. the step rate of this recipe on this machine (steps 10..40, after warm-up and loader start)
    probe = copy.deepcopy(config)
    probe["train"].update(steps=40, val_every=10**6)
    marks = {}
    trainer = cls(probe, out / "probe", device=args.device, log=print)
    trainer.run(progress=lambda s, n, loss: marks.setdefault(s, time.time()))
    rate = 30 / (marks[40] - marks[10])
    del trainer
    torch.cuda.empty_cache()
    print(f"step rate {rate:.2f} steps/s ({time.time() - start:.0f} s spent measuring)", flush=True)

    # 2. the run, sized to the time left (set-up, validations and the loader's start taken out)
    left = deadline - time.time() - 45
    steps = max(100, int(rate * left * 0.9))
    val_every = max(50, steps // args.validations)
    config["train"].update(steps=steps, val_every=val_every)
    print(f"training {steps} steps, validating every {val_every}", flush=True)
    trainer = cls(config, out, device=args.device, log=print)
    t0 = time.time()

    def progress(s, n, loss):
        if s % 100 == 0:
            print(f"step {s}/{n} loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)
        if time.time() > deadline:
            raise _OutOfTime

    try:
        trainer.run(progress=progress)
    except _OutOfTime:
        print(f"deadline reached at step {trainer.step}: keeping the last validation's best weights", flush=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in trainer.network.state_dict().items()},
        str(out / "last.safetensors"),
    )
    (out / "history.json").write_text(
        json.dumps(
            {
                "steps_done": trainer.step,
                "steps_planned": steps,
                "step_rate": rate,
                "seconds": round(time.time() - t0, 1),
                "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
                "torch": torch.__version__,
                "config": config,
                "history": trainer.history,
            },
            indent=1,
        )
    )
    print(f"done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
