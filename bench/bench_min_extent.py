"""How few slices a model needs: Dice of a k-slice crop's result against the intact scan's result inside the crop.

The scan (default: TotalSegmentator's example CT, 3 mm slices) is segmented whole, then cropped to k axial slices
centred on an organ (default: the kidneys, as found in the whole scan's result) and each crop is segmented alone,
its own input checks bypassed (a crop under the model's minimum would be refused). The intact result inside the
crop is the reference, so the table measures what cutting the scan short costs, not the model's accuracy. It fed
the default minimum extent (models/extent.py).

    python bench/bench_min_extent.py                       # the default model, k = 2 5 10 15 20 30
    python bench/bench_min_extent.py --slices 3 8 --centre liver --model mr-any-3d-unet --image scan.nii.gz

Run from the repository root; needs ../shared/data (or --image). CPU, fp32.
"""

from __future__ import annotations

import argparse

DEFAULT_IMAGE = "../shared/data/totalseg_example/example_ct.nii.gz"
ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"the scan (default {DEFAULT_IMAGE})")
    p.add_argument("--model", default=None, help="model name or package folder (default: the default model)")
    p.add_argument("--slices", type=int, nargs="+", default=[2, 5, 10, 15, 20, 30], help="crop lengths k")
    p.add_argument("--centre", default="kidneys", choices=("kidneys", "liver"), help="what the crops centre on")
    p.add_argument("--organs", nargs="+", default=list(ORGANS), help="organs in the table")
    args = p.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk

    from AbdomenSegLib.core.organs import BY_NAME
    from AbdomenSegLib.inference.predictor import get_segmenter
    from AbdomenSegLib.inference.segmenter import Options, prepare_input
    from AbdomenSegLib.io.images import read_image
    from AbdomenSegLib.models.packages import find_model

    card = find_model(args.model)
    image = read_image(args.image)
    segmenter = get_segmenter(card, "cpu", log=lambda m: None)
    options = Options(precision="fp32")
    whole = sitk.GetArrayFromImage(segmenter.segment(image, options))  # (z, y, x)
    centre_labels = [
        BY_NAME[o].label for o in (("kidney_right", "kidney_left") if args.centre == "kidneys" else ("liver",))
    ]
    rows = np.flatnonzero(np.isin(whole, centre_labels).any(axis=(1, 2)))
    centre = int(rows.mean()) if rows.size else whole.shape[0] // 2
    z_mm = image.GetSpacing()[2]
    print(
        f"model {card.name}; {args.image}: {image.GetSize()} voxels, {z_mm:g} mm slices; crops centred on slice {centre} ({args.centre})"
    )
    print(f"{'k':>4s} {'mm':>6s} " + " ".join(f"{o:>13s}" for o in args.organs) + f" {'mean':>6s}")
    for k in args.slices:
        first = max(0, min(centre - k // 2, whole.shape[0] - k))
        crop = image[:, :, first : first + k]
        prepared = prepare_input(card, crop, options.input_intensity, check=False)  # measure, do not refuse
        labels = sitk.GetArrayFromImage(segmenter.segment(crop, options, prepared=prepared))
        reference = whole[first : first + k]
        dice = [_dice(labels == BY_NAME[o].label, reference == BY_NAME[o].label) for o in args.organs]
        shown = " ".join(f"{d:13.3f}" for d in dice)
        present = [d for d in dice if not np.isnan(d)]
        print(f"{k:4d} {k * z_mm:6.1f} {shown} {np.mean(present) if present else float('nan'):6.3f}", flush=True)
    print("Dice of the crop's result against the whole scan's result inside the crop; nan: organ not in the crop")


def _dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    if int(b.sum()) == 0:
        return float("nan")
    return 2.0 * int((a & b).sum()) / total


if __name__ == "__main__":
    main()
