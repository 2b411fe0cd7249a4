"""Command line: `python -m AbdomenSegLib {segment,evaluate,models,phantom,train}`."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import AbdomenSegError, Cancelled


def _train(args) -> int:
    from .training import Trainer, load_config
    config = load_config(args.config)
    out = args.out or f"runs/{config['name']}"
    trainer = Trainer(config, out, device=_pick_device(args.device), log=lambda m: print(m, flush=True))
    start = time.time()

    def progress(step, total, loss):
        if step % 20 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.4f} ({time.time() - start:.0f} s)", flush=True)
    trainer.run(resume=args.resume, progress=progress)
    print(f"finished; run folder {out}")
    return 0


def _pick_device(name: str) -> str:
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        print("warning: CUDA is not available here; running on the CPU instead", file=sys.stderr)
        return "cpu"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m AbdomenSegLib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model from a JSON config and export a model package")
    p.add_argument("config", help="training config (JSON), e.g. Resources/configs/btcv_ct_3d.json")
    p.add_argument("--out", help="run folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=_train)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AbdomenSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
