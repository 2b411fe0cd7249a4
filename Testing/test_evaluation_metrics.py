"""Metrics checked against MONAI (the implementation they replace) and SimpleITK on real BTCV labels."""

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import BY_NAME, CONVENTIONS, convert_labels
from AbdomenSegLib.evaluation.metrics import evaluate, summarize, surface_distances, write_csv
from AbdomenSegLib.io.phantom import make_phantom
from helpers import shared

BTCV_VALUE = {name: value for value, name in CONVENTIONS["btcv"].items()}


def _sitk_surface_distances(a: sitk.Image, b: sitk.Image):
    """Distances (mm) from a's surface voxels to b's, via SimpleITK: face-connected contours
    (BinaryContour, fullyConnected off: the voxels with a face neighbour outside, MONAI's edges) of the
    images padded by one voxel (outside the image counts as outside, as in MONAI), and a Maurer distance
    map of b's contour (0 on the contour itself)."""
    a, b = (sitk.ConstantPad(sitk.Cast(i, sitk.sitkUInt8), [1] * 3, [1] * 3, 0) for i in (a, b))
    contour_b = sitk.BinaryContour(b, fullyConnected=False)
    dist_b = sitk.SignedMaurerDistanceMap(
        contour_b, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    contour_a = sitk.GetArrayFromImage(sitk.BinaryContour(a, fullyConnected=False)) > 0  # a copy: no view
    return np.maximum(sitk.GetArrayFromImage(dist_b)[contour_a], 0.0)  # of a freed temporary


@pytest.fixture(scope="module")
def btcv_pair():
    """A real BTCV reference and a realistic 'prediction': the reference eroded/dilated/shifted per organ."""
    ref = sitk.ReadImage(str(shared("btcv_ct", "labels", "btcv_img0005.nii.gz")))
    ref_ours = convert_labels(sitk.GetArrayFromImage(ref), "btcv")
    pred = np.zeros_like(ref_ours)
    for organ in ("liver", "spleen", "kidney_left", "pancreas"):
        mask = ref_ours == BY_NAME[organ].label
        if organ == "liver":
            mask = ndimage.binary_erosion(mask, iterations=2)
        elif organ == "spleen":
            mask = ndimage.binary_dilation(mask, iterations=1)
        elif organ == "pancreas":
            mask = np.roll(mask, 3, axis=2)
        pred[mask & (pred == 0)] = BY_NAME[organ].label
    pred_img = sitk.GetImageFromArray(pred)
    pred_img.CopyInformation(ref)
    return pred_img, ref, ref_ours


def test_matches_simpleitk_on_real_labels(btcv_pair):
    pred_img, ref, ref_ours = btcv_pair
    rows = {r["organ"]: r for r in evaluate(pred_img, ref, reference_convention="btcv")}
    ref_ours_img = sitk.GetImageFromArray(ref_ours)
    ref_ours_img.CopyInformation(ref)
    pred_arr = sitk.GetArrayFromImage(pred_img)
    for organ in ("liver", "spleen", "kidney_left", "pancreas"):
        label = BY_NAME[organ].label
        p = sitk.Cast(pred_img == label, sitk.sitkUInt8)
        r = sitk.Cast(ref_ours_img == label, sitk.sitkUInt8)
        overlap = sitk.LabelOverlapMeasuresImageFilter()
        overlap.Execute(r, p)
        row = rows[organ]
        assert row["status"] == "ok"
        assert row["dice"] == pytest.approx(overlap.GetDiceCoefficient(), abs=1e-9)
        assert row["iou"] == pytest.approx(overlap.GetJaccardCoefficient(), abs=1e-9)
        # Surfaces in the union's tight box (outside it both masks are empty: SimpleITK pads it with 0).
        box = ndimage.find_objects(((pred_arr == label) | (ref_ours == label)).astype(np.uint8))[0]
        p_box, r_box = (i[box[2], box[1], box[0]] for i in (p, r))
        d_pr, d_rp = _sitk_surface_distances(p_box, r_box), _sitk_surface_distances(r_box, p_box)
        hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
        assd = np.concatenate([d_pr, d_rp]).mean()
        nsd = (np.sum(d_pr <= 2.0) + np.sum(d_rp <= 2.0)) / (len(d_pr) + len(d_rp))
        # Same surface voxels, same distances: only ITK's float32 distance maps (and its percentile rank
        # taken at exactly 0.95, MONAI's at float32(0.95)) separate the two.
        assert row["hd95_mm"] == pytest.approx(hd95, abs=1e-4)
        assert row["assd_mm"] == pytest.approx(assd, abs=1e-4)
        assert row["surface_dice"] == pytest.approx(nsd, abs=1e-4)
        hausdorff = sitk.HausdorffDistanceImageFilter()
        hausdorff.Execute(
            *(
                sitk.BinaryContour(sitk.ConstantPad(i, [1] * 3, [1] * 3, 0), fullyConnected=False)
                for i in (p_box, r_box)
            )
        )
        ours = surface_distances(pred_arr[box] == label, ref_ours[box] == label, ref.GetSpacing()[::-1])
        assert sorted(map(len, ours)) == sorted([len(d_pr), len(d_rp)])
        assert max(d.max() for d in ours) == pytest.approx(hausdorff.GetHausdorffDistance(), abs=1e-4)
        voxel_ml = np.prod(ref.GetSpacing()) / 1000
        assert row["volume_ref_ml"] == pytest.approx(sitk.GetArrayViewFromImage(r).sum() * voxel_ml)
        assert row["volume_diff_ml"] == pytest.approx(row["volume_pred_ml"] - row["volume_ref_ml"])
    # The perturbations are visible where they should be.
    assert rows["liver"]["volume_diff_ml"] < 0 < rows["spleen"]["volume_diff_ml"]
    assert rows["pancreas"]["hd95_mm"] > 2 * ref.GetSpacing()[0] > rows["spleen"]["hd95_mm"]
    assert rows["spleen"]["surface_dice"] > max(
        0.5, rows["pancreas"]["surface_dice"]
    )  # 1-voxel dilation: in-plane faces within 2 mm
    assert rows["liver"]["surface_dice"] < 0.05  # eroded by 2 voxels (>= 3 mm), beyond the 2 mm tolerance


def test_absent_organs_get_documented_values(btcv_pair):
    pred_img, ref, _ = btcv_pair
    rows = {r["organ"]: r for r in evaluate(pred_img, ref, reference_convention="btcv")}
    missing = rows["kidney_right"]  # in the reference, not predicted
    diagonal = np.linalg.norm(np.array(ref.GetSize()) * np.array(ref.GetSpacing()))
    assert missing["status"] == "missing_pred" and missing["dice"] == 0 and missing["surface_dice"] == 0
    assert missing["hd95_mm"] == pytest.approx(diagonal)
    empty = sitk.Image(ref.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ref)
    both = {r["organ"]: r for r in evaluate(empty, empty)}["liver"]
    assert both["status"] == "absent_both" and both["dice"] == 1 and both["hd95_mm"] == 0
    assert "urinary_bladder" not in rows  # BTCV cannot label a bladder: not reported
    assert all(not np.isnan(v) for r in rows.values() for v in r.values() if isinstance(v, float))
    summary = {
        s["organ"]: s for s in summarize(list(rows.values()) + [dict(both, organ="liver", status="absent_both")])
    }
    assert summary["liver"]["cases"] == 1


def test_reference_on_another_grid_is_resampled():
    ct, labels = make_phantom(size=(48, 40, 24), spacing=(4.0, 4.0, 6.0))
    fine = sitk.Resample(
        labels,
        [96, 80, 48],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        labels.GetOrigin(),
        [2.0, 2.0, 3.0],
        labels.GetDirection(),
        0,
        labels.GetPixelID(),
    )
    fine = sitk.Flip(fine, [True, False, False])  # also a different orientation
    rows = {r["organ"]: r for r in evaluate(labels, fine)}
    assert rows["liver"]["dice"] > 0.97 and rows["kidney_left"]["dice"] > 0.9


def test_mismatched_reference_is_refused():
    _, labels = make_phantom(size=(20, 20, 10))
    far = sitk.Image(labels)
    far.SetOrigin((5000.0, 0.0, 0.0))
    with pytest.raises(AbdomenSegError, match="do not overlap"):
        evaluate(labels, far)
    ct, _ = make_phantom(size=(20, 20, 10))
    with pytest.raises(AbdomenSegError, match="not a label map"):
        evaluate(labels, sitk.Cast(ct, sitk.sitkFloat32) * 0.5)


def test_csv_is_written_atomically(tmp_path):
    _, labels = make_phantom(size=(20, 20, 10))
    rows = evaluate(labels, labels, case="c1")
    path = write_csv(rows, tmp_path / "m.csv")
    text = path.read_text().splitlines()
    assert text[0].startswith("case,model,organ") and len(text) == len(rows) + 1
    assert not list(tmp_path.glob(".part-*"))


@pytest.fixture(scope="module")
def moved_case():
    """A real BTCV reference (btcv convention), cut so that organs touch the image's borders, and a
    'prediction' in our convention that errs like a model: the whole map rotated by 3 degrees and shifted by
    2 mm, then one organ eroded, one dilated, one shifted, one left out, and a bladder the reference has not."""
    ref = sitk.ReadImage(str(shared("btcv_ct", "labels", "btcv_img0005.nii.gz")))
    values = sitk.GetArrayViewFromImage(ref)
    liver = ndimage.find_objects(values)[BTCV_VALUE["liver"] - 1]
    kidney = ndimage.find_objects(values)[BTCV_VALUE["kidney_right"] - 1]
    # x starts inside the liver, z inside the right kidney (and aorta, vena cava): all 13 organs are left
    ref = ref[liver[2].start + 6 :, :, kidney[0].start + 4 :]
    centre = ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ref.GetSize()])
    moved = sitk.Euler3DTransform(centre, 0.0, 0.0, math.radians(3.0), (2.0, -1.0, 0.0))
    pred = convert_labels(sitk.GetArrayFromImage(sitk.Resample(ref, moved, sitk.sitkNearestNeighbor, 0)), "btcv")
    for organ, change in (
        ("spleen", ndimage.binary_erosion),
        ("pancreas", ndimage.binary_dilation),
        ("stomach", lambda m: np.roll(m, -3, axis=1)),
        ("adrenal_gland_left", np.zeros_like),
    ):
        label = BY_NAME[organ].label
        mask = change(pred == label)
        pred[pred == label] = 0
        pred[mask & (pred == 0)] = label
    pred[60:64, 150:160, 100:112] = BY_NAME["urinary_bladder"].label
    pred_img = sitk.GetImageFromArray(pred)
    pred_img.CopyInformation(ref)
    return pred_img, ref


def _monai_full_volume(p: np.ndarray, r: np.ndarray, spacing, tolerance_mm: float) -> dict:
    """The surface metrics as metrics.py computed them before (MONAI), given the whole volume."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    pt, rt = (torch.as_tensor(m)[None, None] for m in (p, r))
    spacing = list(spacing)
    return {
        "hd95_mm": float(compute_hausdorff_distance(pt, rt, include_background=True, percentile=95, spacing=spacing)),
        "assd_mm": float(
            compute_average_surface_distance(pt, rt, include_background=True, symmetric=True, spacing=spacing)
        ),
        "surface_dice": float(
            compute_surface_dice(pt, rt, class_thresholds=[tolerance_mm], include_background=True, spacing=spacing)
        ),
    }


def test_equals_monai_on_the_full_volume(moved_case):
    """Every organ of a real case, against MONAI on the whole volume (which the box must not change), with
    anisotropic spacing and organs cut by the image border."""
    pred_img, ref = moved_case
    organs = [name for name in BY_NAME]  # the bladder too: in the prediction only
    rows = evaluate(pred_img, ref, reference_convention="btcv", organs=organs, tolerance_mm=1.5)
    pred = sitk.GetArrayFromImage(pred_img)
    ref_ours = convert_labels(sitk.GetArrayFromImage(ref), "btcv")
    spacing = ref.GetSpacing()[::-1]
    assert len(set(spacing)) == 2  # anisotropic
    voxel_ml = float(np.prod(spacing)) / 1000.0
    diagonal = float(np.linalg.norm(np.array(pred.shape) * np.array(spacing)))
    at_border = set()
    worst = 0.0
    for row in rows:
        label = BY_NAME[row["organ"]].label
        p, r = pred == label, ref_ours == label
        if any(m[0].any() or m[-1].any() or m[:, :, 0].any() or m[:, :, -1].any() for m in (p, r)):
            at_border.add(row["organ"])
        assert row["volume_pred_ml"] == float(p.sum()) * voxel_ml and row["volume_ref_ml"] == float(r.sum()) * voxel_ml
        if not p.any() or not r.any():
            assert row["status"] == ("missing_pred" if not p.any() else "missing_ref")
            assert row["dice"] == row["iou"] == row["surface_dice"] == 0.0
            assert row["hd95_mm"] == row["assd_mm"] == pytest.approx(diagonal)
            continue
        inter = float((p & r).sum())
        assert row["status"] == "ok"
        assert row["dice"] == 2 * inter / (p.sum() + r.sum()) and row["iou"] == inter / float((p | r).sum())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            before = _monai_full_volume(p, r, spacing, 1.5)
        for key, value in before.items():
            worst = max(worst, abs(row[key] - value))
            # MONAI's own numbers are float32 (its distances, percentile and mean): equal to that precision
            assert abs(row[key] - value) <= 1e-6 * max(1.0, abs(value)), (row["organ"], key, row[key], value)
    statuses = {r["organ"]: r["status"] for r in rows}
    assert statuses["adrenal_gland_left"] == "missing_pred" and statuses["urinary_bladder"] == "missing_ref"
    assert sum(s == "ok" for s in statuses.values()) == 12
    assert {"liver", "kidney_right"} <= at_border
    assert worst < 1e-6
    # the perturbations are not trivial: distances of several voxels
    assert max(r["hd95_mm"] for r in rows if r["status"] == "ok") > 2 * max(spacing)


def test_box_gives_the_full_volume_surface_distances(moved_case):
    """surface_distances on the organ's box (grown by one voxel, clipped at the border) equals the same
    function, and MONAI's edge distances, on the whole volume: to the last bit."""
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    pred_img, ref = moved_case
    pred = sitk.GetArrayFromImage(pred_img)
    ref_ours = convert_labels(sitk.GetArrayFromImage(ref), "btcv")
    spacing = ref.GetSpacing()[::-1]
    for organ in ("liver", "kidney_right", "adrenal_gland_right"):
        label = BY_NAME[organ].label
        p, r = pred == label, ref_ours == label
        union = ndimage.find_objects((p | r).astype(np.uint8))[0]
        box = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(union, p.shape))
        in_box = surface_distances(p[box], r[box], spacing)
        whole = surface_distances(p, r, spacing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, monai, _ = get_edge_surface_distance(
                torch.as_tensor(p), torch.as_tensor(r), spacing=list(spacing), symmetric=True
            )
        for a, b, c in zip(in_box, whole, monai):
            assert len(a) == len(b) == len(c) > 0
            assert np.array_equal(np.sort(a), np.sort(c.numpy())) and np.array_equal(np.sort(b), np.sort(a))


def test_float_and_other_integer_maps_give_the_same_rows(moved_case):
    pred_img, ref = moved_case
    rows = evaluate(pred_img, ref, reference_convention="btcv")
    for kind in (sitk.sitkFloat32, sitk.sitkInt32, sitk.sitkUInt16):
        again = evaluate(sitk.Cast(pred_img, kind), sitk.Cast(ref, kind), reference_convention="btcv")
        assert again == rows
