"""Thin slabs: Dice on slabs cut from a model's validation cases, with windows padded by zeros or by edge slices.

    python experiments/bench_thin_slabs.py mr-any-3d-unet chaos-mr-t2-3d-unet btcv-ct-3d-unet --slab-mm 60

A scan that covers only part of the abdomen (a 6 cm MR slab, a few CT slices) is shorter than the 3D models'
window along z, so the window is padded. Each validation case of each model is cut into consecutive slabs of
`--slab-mm` over the extent of the model's organs in its reference (a last, shorter remainder is dropped), and
every slab is segmented with the card's window padded both ways (inference.padding_mode, card_schema.PADDING_MODES).
It prints, per organ, the mean Dice over the slabs whose reference holds that organ, the mean over all
(slab, organ) pairs, and the volume drawn of organs a slab's reference does not hold (false positives). Slabs are cut in each case's own grid, so the output and the reference share it.
"""

from __future__ import annotations

import argparse


def slabs(label, organ_values, slab_mm: float) -> list:
    """(first, stop) slice ranges of consecutive `slab_mm` slabs over the slices holding any of `organ_values`."""
    import numpy as np
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(label)
    held = np.flatnonzero(np.isin(array, organ_values).any(axis=(1, 2)))
    if not held.size:
        return []
    count = max(1, int(round(slab_mm / label.GetSpacing()[2])))
    return [(z, z + count) for z in range(int(held[0]), int(held[-1]) + 1 - count + 1, count)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model names or folders (3D)")
    p.add_argument("--slab-mm", type=float, default=60.0, help="slab thickness (default 60 mm)")
    p.add_argument("--root", default=None, help="data folder instead of the card's (give one model with it)")
    args = p.parse_args(argv)
    if args.root and len(args.models) > 1:
        raise SystemExit("error: --root replaces every model's data folder. Give one model with --root")

    import numpy as np

    from AbdomenSegLib.core.organs import CONVENTIONS
    from AbdomenSegLib.evaluation.metrics import evaluate
    from AbdomenSegLib.inference.segmenter import Options, Segmenter
    from AbdomenSegLib.models.card_schema import PADDING_MODES
    from AbdomenSegLib.models.packages import find_model
    from AbdomenSegLib.preprocessing.datasets import validation_data
    from AbdomenSegLib.training.export import validation_cases

    for spec in args.models:
        card = find_model(spec)
        if card["dimensions"] != 3:
            raise SystemExit(f"error: {card.name} is a 2D model, which pads no window. Give 3D models")
        data = validation_data(card["training"]["config"]["data"])
        organs = list(card["labels"].values())
        values = [v for v, name in CONVENTIONS[data["convention"]].items() if name in organs]
        segmenter = Segmenter(card, "cpu", log=lambda message: None)
        dice = {mode: {o: [] for o in organs} for mode in PADDING_MODES}
        false_ml = {mode: 0.0 for mode in PADDING_MODES}
        count = 0
        for _, image, label in validation_cases(card, args.root):
            for first, stop in slabs(label, values, args.slab_mm):
                count += 1
                for mode in PADDING_MODES:
                    options = Options(input_intensity=data["input_intensity"], precision="fp32", padding=mode)
                    prediction = segmenter.segment(image[:, :, first:stop], options)
                    rows = evaluate(
                        prediction, label[:, :, first:stop], reference_convention=data["convention"], organs=organs
                    )
                    for row in rows:
                        if row["volume_ref_ml"] > 0:
                            dice[mode][row["organ"]].append(row["dice"])
                        else:
                            false_ml[mode] += row["volume_pred_ml"]
        if not count:
            print(f"\n{card.name}: no validation case holds its organs over {args.slab_mm:g} mm; nothing to show")
            continue
        cases = len(card["training"]["validation_cases"])
        print(f"\n{card.name}: {count} {args.slab_mm:g} mm slabs from {cases} validation cases, full pipeline, fp32")
        print(f"{'organ':24s} {'slabs':>5s} " + " ".join(f"{m:>10s}" for m in PADDING_MODES))
        for organ in organs:
            n = len(dice[PADDING_MODES[0]][organ])
            if n:
                print(f"{organ:24s} {n:5d} " + " ".join(f"{np.mean(dice[m][organ]):10.3f}" for m in PADDING_MODES))
        pairs = {m: [d for o in organs for d in dice[m][o]] for m in PADDING_MODES}
        print(
            f"{'all (slab, organ) pairs':24s} {len(pairs[PADDING_MODES[0]]):5d} "
            + " ".join(f"{np.mean(pairs[m]):10.3f}" for m in PADDING_MODES)
        )
        print(
            f"{'false positives, mL/slab':24s} {'':5s} "
            + " ".join(f"{false_ml[m] / count:10.1f}" for m in PADDING_MODES)
        )


if __name__ == "__main__":
    main()
