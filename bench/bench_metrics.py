"""Benchmark: `metrics.evaluate` (all 13 BTCV organs) before and after the per-organ-box surface metrics.

    python bench/bench_metrics.py [--case btcv_img0005] [--size 512 512 300] [--repeat 3] [--skip-before]

No 512x512x~300 label map exists in ../shared/data (BTCV is 257x257xN, the TotalSegmentator example
122x101x112), so a real BTCV reference is upsampled with nearest neighbour to `--size` (default
512x512x300, same physical extent). The "prediction" is that reference moved the way a model errs: the
whole map rotated by 2 degrees and shifted by 1.5 mm (nearest neighbour), then per organ a 1-voxel erosion
(liver), a 1-voxel dilation (spleen), a 3-voxel shift (pancreas), and one organ left out (adrenal left:
`missing_pred`), so distances are real and few surface voxels coincide.

"before" is the evaluate of commit 843a1a5 (whole-volume label conversion and masks, then MONAI's
compute_hausdorff_distance / compute_average_surface_distance / compute_surface_dice on the union box),
kept here in `evaluate_before`. Prints wall and CPU seconds (best of `--repeat`; the new code runs on one
thread, so its CPU time is its wall time on an idle machine) and the largest difference of every metric
between the two. Timings on a shared machine are noisy: note the load.
"""

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "btcv_ct" / "labels"
METRICS = ("dice", "iou", "volume_pred_ml", "volume_ref_ml", "hd95_mm", "assd_mm", "surface_dice")


def make_case(name: str, size):
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    from AbdomenSegLib.core.organs import CONVENTIONS

    source = sitk.ReadImage(str(DATA / f"{name}.nii.gz"))
    spacing = [sp * n / m for sp, n, m in zip(source.GetSpacing(), source.GetSize(), size)]
    origin = [o - 0.5 * sp + 0.5 * s for o, sp, s in zip(source.GetOrigin(), source.GetSpacing(), spacing)]
    ref = sitk.Resample(
        source,
        list(size),
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        origin,
        spacing,
        source.GetDirection(),
        0,
        source.GetPixelID(),
    )
    centre = ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])
    moved = sitk.Euler3DTransform(centre, 0.0, 0.0, np.deg2rad(2.0), (1.5, -1.5, 0.0))
    pred = sitk.GetArrayFromImage(sitk.Resample(ref, moved, sitk.sitkNearestNeighbor, 0))
    btcv = {name: value for value, name in CONVENTIONS["btcv"].items()}
    boxes = ndimage.find_objects(pred)
    for organ, change in (
        ("liver", "erode"),
        ("spleen", "dilate"),
        ("pancreas", "shift"),
        ("adrenal_gland_left", "drop"),
    ):
        value = btcv[organ]
        box = tuple(slice(max(0, s.start - 4), s.stop + 4) for s in boxes[value - 1])
        crop = pred[box]
        mask = crop == value
        crop[mask] = 0
        if change == "erode":
            mask = ndimage.binary_erosion(mask)
        elif change == "dilate":
            mask = ndimage.binary_dilation(mask) & (crop == 0)
        elif change == "shift":
            mask = np.roll(mask, 3, axis=2)
        elif change == "drop":
            mask[:] = False
        crop[mask] = value
    pred_image = sitk.GetImageFromArray(pred)
    pred_image.CopyInformation(ref)
    return pred_image, ref


def evaluate_before(
    prediction,
    reference,
    *,
    reference_convention="abdomenseg",
    prediction_convention="abdomenseg",
    organs=None,
    tolerance_mm=2.0,
):
    """metrics.evaluate as of commit 843a1a5 (the label checks left out: they are timed separately)."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    from AbdomenSegLib.core.organs import BY_NAME, CONVENTIONS, convert_labels
    from AbdomenSegLib.evaluation.metrics import align_reference
    from AbdomenSegLib.preprocessing.preprocess import bounding_box

    reference = align_reference(reference, prediction)
    pred = convert_labels(sitk.GetArrayViewFromImage(prediction), prediction_convention)
    ref = convert_labels(sitk.GetArrayViewFromImage(reference), reference_convention)
    spacing_zyx = tuple(float(s) for s in prediction.GetSpacing()[::-1])
    if organs is None:
        organs = [name for name in BY_NAME if name in CONVENTIONS[reference_convention].values()]
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    diagonal = float(np.linalg.norm(np.array(pred.shape) * np.array(spacing_zyx)))
    rows = []
    for name in organs:
        organ = BY_NAME[name]
        p, r = pred == organ.label, ref == organ.label
        row = {"organ": name, "volume_pred_ml": float(p.sum()) * voxel_ml, "volume_ref_ml": float(r.sum()) * voxel_ml}
        if not p.any() and not r.any():
            row.update(status="absent_both", dice=1.0, iou=1.0, hd95_mm=0.0, assd_mm=0.0, surface_dice=1.0)
        elif not p.any() or not r.any():
            row.update(
                status="missing_pred" if not p.any() else "missing_ref",
                dice=0.0,
                iou=0.0,
                hd95_mm=diagonal,
                assd_mm=diagonal,
                surface_dice=0.0,
            )
        else:
            inter, union = float((p & r).sum()), float((p | r).sum())
            row.update(status="ok", dice=2 * inter / (p.sum() + r.sum()), iou=inter / union)
            box = bounding_box(p | r, margin=2)
            pt = torch.as_tensor(np.ascontiguousarray(p[box]))[None, None]
            rt = torch.as_tensor(np.ascontiguousarray(r[box]))[None, None]
            spacing = list(spacing_zyx)
            row["hd95_mm"] = float(
                compute_hausdorff_distance(pt, rt, include_background=True, percentile=95, spacing=spacing)
            )
            row["assd_mm"] = float(
                compute_average_surface_distance(pt, rt, include_background=True, symmetric=True, spacing=spacing)
            )
            row["surface_dice"] = float(
                compute_surface_dice(pt, rt, class_thresholds=[tolerance_mm], include_background=True, spacing=spacing)
            )
        rows.append(row)
    return rows


def best_of(repeat, function):
    """(wall seconds, CPU seconds) of the fastest of `repeat` runs, and the result."""
    times, result = [], None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="btcv_img0005")
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-before", action="store_true", help="time only the new evaluate")
    args = parser.parse_args()
    import warnings

    import torch

    from AbdomenSegLib.evaluation import metrics

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")  # MONAI's "prediction is all 0" for the dropped organ

    pred, ref = make_case(args.case, args.size)
    print(
        f"case {args.case} upsampled (nearest neighbour) to {'x'.join(map(str, pred.GetSize()))} "
        f"at {', '.join(f'{s:.3f}' for s in pred.GetSpacing())} mm; load average {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs"
    )
    kwargs = dict(reference_convention="btcv", prediction_convention="btcv")
    t_check, _ = best_of(
        args.repeat,
        lambda: (
            metrics._check_label_map(pred, "prediction", "btcv"),
            metrics._check_label_map(ref, "reference", "btcv"),
        ),
    )
    t_new, rows = best_of(args.repeat, lambda: metrics.evaluate(pred, ref, **kwargs))
    print(f"{'':28s} {'wall s':>7s} {'CPU s':>7s}")
    print(f"{'label checks (both maps)':28s} {t_check[0]:7.2f} {t_check[1]:7.2f}")
    print(f"{'evaluate, after':28s} {t_new[0]:7.2f} {t_new[1]:7.2f}   ({len(rows)} organs, label checks included)")
    if not args.skip_before:
        t_old, old = best_of(1, lambda: evaluate_before(pred, ref, **kwargs))
        t_old = (t_old[0] + t_check[0], t_old[1] + t_check[1])
        print(
            f"{'evaluate, before (843a1a5)':28s} {t_old[0]:7.2f} {t_old[1]:7.2f}   (1 run; label checks "
            "counted as the new ones; torch on 2 threads)"
        )
        print(f"speed-up x{t_old[0] / t_new[0]:.1f} (wall)")
        print(f"\n{'organ':22s} {'status':12s} " + " ".join(f"{m:>14s}" for m in METRICS))
        worst = {m: 0.0 for m in METRICS}
        for new, before in zip(rows, old):
            assert new["organ"] == before["organ"] and new["status"] == before["status"]
            diffs = {m: abs(float(new[m]) - float(before[m])) for m in METRICS}
            for m in METRICS:
                worst[m] = max(worst[m], diffs[m])
            print(f"{new['organ']:22s} {new['status']:12s} " + " ".join(f"{new[m]:14.6f}" for m in METRICS))
        print(f"{'max |after - before|':35s} " + " ".join(f"{worst[m]:14.2e}" for m in METRICS))
    print(
        f"\n{sum(r['status'] == 'ok' for r in rows)} organs in both maps, "
        f"{sum(r['volume_ref_ml'] > 0 for r in rows)} in the reference"
    )


if __name__ == "__main__":
    main()
