"""Models and ensembles on one model's validation protocol: per-organ Dice (full pipeline, input grid) and seconds
per case, so that an ensemble (`a+b`) is compared with its members on the same cases.

    python bench/bench_ensemble.py --protocol btcv-ct-3d-unet btcv-ct-3d-unet btcv-ct-3d-unet+btcv-ct-2d-unet-r18
"""

from __future__ import annotations

import argparse
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model names, folders or a+b ensembles")
    p.add_argument("--protocol", default=None, help="the model whose validation cases and data are used")
    p.add_argument("--precision", default="auto")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap instead of the card's (3D)")
    args = p.parse_args(argv)

    import numpy as np

    from AbdomenSegLib.datasets import find_cases, read_case
    from AbdomenSegLib.inference import Options, get_segmenter
    from AbdomenSegLib.metrics import evaluate, summarize
    from AbdomenSegLib.models import find_model
    from AbdomenSegLib.train_config import validation_data

    protocol = find_model(args.protocol)
    data = validation_data(protocol["training"]["config"]["data"])
    names = set(protocol["training"]["validation_cases"])
    cases = [c for c in find_cases(data["root"]) if data["prefix"] + c[0] in names]
    print(
        f"protocol: {protocol.name}'s {len(cases)} validation cases, full pipeline, precision {args.precision}, "
        f"overlap {args.overlap if args.overlap is not None else 'of the card'}"
    )
    for spec in args.models:
        card = find_model(spec)
        segmenter = get_segmenter(card, "cpu", log=lambda m: None)
        rows, seconds = [], []
        for name, image_path, label_path in cases:
            image, label = read_case(image_path, label_path, data.get("direction"))
            start = time.time()
            options = Options(input_intensity=data["input_intensity"], precision=args.precision, overlap=args.overlap)
            prediction = segmenter.segment(image, options)
            seconds.append(time.time() - start)
            organs = list(protocol["labels"].values())
            rows += evaluate(prediction, label, reference_convention=data["convention"], organs=organs, case=name)
        dice = {s["organ"]: s["dice_mean"] for s in summarize(rows)}
        print(
            f"{spec}: mean {np.mean(list(dice.values())):.4f}, {np.mean(seconds):.1f} s/case | "
            + " ".join(f"{o} {v:.3f}" for o, v in dice.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
