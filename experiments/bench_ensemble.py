"""Models and ensembles on one model's validation protocol: per-organ Dice (full pipeline, input grid) and seconds
per case, so that an ensemble (`a+b`) is compared with its members on the same cases.

    python experiments/bench_ensemble.py --protocol btcv-ct-3d-unet btcv-ct-3d-unet btcv-ct-3d-unet+btcv-ct-2d-unet-r18

A model written `name:tta` runs with test-time mirroring (--tta), so a model is compared with and without it.
"""

from __future__ import annotations

import argparse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model names, folders or a+b ensembles")
    p.add_argument("--protocol", default=None, help="the model whose validation cases and data are used")
    p.add_argument("--precision", default="auto")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap instead of the card's (3D)")
    args = p.parse_args(argv)

    import numpy as np

    from AbdomenSegLib.evaluation.metrics import summarize
    from AbdomenSegLib.inference.predictor import get_segmenter
    from AbdomenSegLib.models.choice import resolve
    from AbdomenSegLib.models.packages import find_model
    from AbdomenSegLib.training.export import validation_rows

    protocol = find_model(args.protocol)
    print(
        f"protocol: {protocol.name}'s {len(protocol['training']['validation_cases'])} validation cases, full "
        f"pipeline, precision {args.precision}, overlap {args.overlap if args.overlap is not None else 'of the card'}"
    )
    for spec in args.models:
        model, sep, mode = spec.rpartition(":")
        if not sep or any(c in mode for c in "/\\"):  # no suffix (a Windows path's drive colon is none)
            model, mode = spec, ""
        elif mode != "tta":
            raise SystemExit(f"error: '{spec}' has an unknown suffix ':{mode}'. Write a model as NAME or NAME:tta")
        segmenter = get_segmenter(resolve(model, tta=mode == "tta"), "cpu", log=lambda m: None)
        rows, seconds = validation_rows(
            protocol,
            log=lambda m: None,
            precision=args.precision,
            segmenter=segmenter,
            overlap=args.overlap,
            tta=mode == "tta",
        )
        dice = {s["organ"]: s["dice_mean"] for s in summarize(rows)}
        print(
            f"{spec}: mean {np.mean(list(dice.values())):.4f}, {np.mean(seconds):.1f} s/case | "
            + " ".join(f"{o} {v:.3f}" for o, v in dice.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
