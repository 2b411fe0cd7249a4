"""The first stage alone vs the cascade (first stage, then its fine second stage on the small organs' region) on
the first stage's validation protocol: per-organ Dice (full pipeline, whole scans, input grid) and seconds per case.

    python bench/bench_cascade.py                          # the default model and its installed second stage
    python bench/bench_cascade.py --model runs/btcv-ct-3d-fine-unet/package   # a second stage not installed yet

Run from the repository root (the cards' data folder, ../shared/data/btcv_ct, is relative to it).
"""

from __future__ import annotations

import argparse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help="a first-stage model (its installed second stage runs) or a second "
        "stage's name or package folder (default: the default model)",
    )
    p.add_argument("--precision", default="fp32", help="fp32 (the cards' figures) or bf16")
    args = p.parse_args(argv)

    import numpy as np

    from AbdomenSegLib.evaluation.metrics import summarize
    from AbdomenSegLib.inference.predictor import get_segmenter
    from AbdomenSegLib.models.cascade_card import cascade_stages
    from AbdomenSegLib.models.packages import find_model
    from AbdomenSegLib.training.export import validation_rows

    first, second = cascade_stages(find_model(args.model), "high")
    print(
        f"protocol: {first.name}'s validation cases {first['training']['validation_cases']}, full pipeline, "
        f"precision {args.precision}; second stage {second.name} on {second['cascade']}"
    )
    results = {}
    for label, quality in (("first stage", "standard"), ("cascade", "high")):
        model = first if quality == "standard" else second
        segmenter = get_segmenter(model, "cpu", log=lambda m: None, quality=quality)
        rows, seconds = validation_rows(first, log=lambda m: None, precision=args.precision, segmenter=segmenter)
        results[label] = ({s["organ"]: s["dice_mean"] for s in summarize(rows)}, seconds)
        print(f"{label}: {np.mean(seconds):.1f} s/case ({', '.join(f'{s:.1f}' for s in seconds)})", flush=True)
    (alone, _), (both, _) = results["first stage"], results["cascade"]
    region = set(second["cascade"]["organs"])
    print(f"\n{'organ':22s} {'first':>7s} {'cascade':>8s} {'change':>7s}")
    for organ in alone:
        mark = " *" if organ in region else ""
        after = both.get(organ, float("nan"))
        print(f"{organ:22s} {alone[organ]:7.4f} {after:8.4f} {after - alone[organ]:+7.4f}{mark}")
    nan = float("nan")
    for name, dice in (
        ("mean", lambda d: list(d.values())),
        ("region mean", lambda d: [d.get(o, nan) for o in region]),
    ):
        print(f"{name:22s} {np.mean(dice(alone)):7.4f} {np.mean(dice(both)):8.4f}")
    print("* region organ (re-segmented by the second stage)")


if __name__ == "__main__":
    main()
