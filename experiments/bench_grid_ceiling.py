"""How much Dice the model grid itself costs: each validation case's reference, made into per-organ fractions on a
model grid (linear resampling of each organ's mask) and brought back to the input grid by the pipeline's own
resampling (resample_back.labels_on_input_grid: linear per organ box, then argmax), scored against itself.

A network that were perfect on that grid would score these figures; the gap between them and the model's
validation Dice is what the network gets wrong, not what the grid loses.

    python experiments/bench_grid_ceiling.py                          # the default model's grid and two finer ones
    python experiments/bench_grid_ceiling.py --spacing 2 2 3 --spacing 1 1 1.5
"""

from __future__ import annotations

import argparse


def model_space_fractions(label, values, spacing):
    """(C, z, y, x) float32 on the pipeline's grid of `spacing` over the label's extent
    (preprocess.resample_to_spacing), and that grid: channel 0 the background, channel k the fraction of label
    value values[k-1] (linear resampling of its mask)."""
    import numpy as np
    import SimpleITK as sitk

    from AbdomenSegLib.preprocessing.preprocess import resample_to_spacing

    masks = [resample_to_spacing(sitk.Cast(label == v, sitk.sitkFloat32), spacing) for v in values]
    organs = [sitk.GetArrayFromImage(m) for m in masks]
    background = np.clip(1.0 - np.sum(organs, axis=0), 0.0, 1.0)
    return np.stack([background, *organs]).astype(np.float32), masks[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="the model whose validation cases are used (default: the default)")
    p.add_argument(
        "--spacing", nargs=3, type=float, action="append", help="a model grid in mm (x y z); repeat for several"
    )
    args = p.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk

    from AbdomenSegLib.core.organs import CONVENTIONS
    from AbdomenSegLib.inference.resample_back import labels_on_input_grid
    from AbdomenSegLib.models.packages import find_model
    from AbdomenSegLib.preprocessing.datasets import validation_data
    from AbdomenSegLib.training.export import validation_cases

    card = find_model(args.model)
    spacings = [tuple(s) for s in args.spacing or [card["spacing"], (1.5, 1.5, 2.0), (1.0, 1.0, 1.5)]]
    convention = CONVENTIONS[validation_data(card["training"]["config"]["data"])["convention"]]
    values, organs = zip(*[(v, o) for v, o in convention.items() if o in card["labels"].values()])
    print(f"protocol: {card.name}'s validation cases {card['training']['validation_cases']}; spacings {spacings}")
    dice = {s: {o: [] for o in organs} for s in spacings}
    for name, _image, label in validation_cases(card):
        reference = sitk.GetArrayFromImage(label)
        for spacing in spacings:
            fractions, grid = model_space_fractions(label, values, spacing)
            box = tuple(slice(0, n) for n in fractions.shape[1:])
            back = labels_on_input_grid(fractions, box, grid, label)
            for k, (organ, value) in enumerate(zip(organs, values), start=1):
                truth, drawn = reference == value, back == k
                if truth.any():
                    dice[spacing][organ].append(2 * np.sum(truth & drawn) / (truth.sum() + drawn.sum()))
        print(f"  {name} done", flush=True)
    print(f"\n{'organ':22s}" + "".join(f"{'x'.join(f'{v:g}' for v in s):>12s}" for s in spacings))
    for organ in organs:
        print(f"{organ:22s}" + "".join(f"{np.mean(dice[s][organ]):12.4f}" for s in spacings))
    print(f"{'mean':22s}" + "".join(f"{np.mean([np.mean(v) for v in dice[s].values()]):12.4f}" for s in spacings))


if __name__ == "__main__":
    main()
