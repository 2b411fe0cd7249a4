"""Metrics checked against independent SimpleITK computations on real BTCV labels."""
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from AbdomenSegLib.errors import AbdomenSegError
from AbdomenSegLib.metrics import evaluate, summarize, write_csv
from AbdomenSegLib.organs import BY_NAME, convert_labels
from AbdomenSegLib.phantom import make_phantom

from conftest import shared


def _sitk_surface_distances(a: sitk.Image, b: sitk.Image):
    """Distances (mm) from a's boundary voxels to b's boundary voxels, via Maurer distance maps."""
    contour_b = sitk.LabelContour(b, fullyConnected=True)
    dist_b = sitk.Abs(sitk.SignedMaurerDistanceMap(contour_b, insideIsPositive=False, squaredDistance=False,
                                                   useImageSpacing=True))
    contour_a = sitk.GetArrayViewFromImage(sitk.LabelContour(a, fullyConnected=True)) > 0
    return sitk.GetArrayViewFromImage(dist_b)[contour_a]


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
    spacing = max(ref.GetSpacing())
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
        d_pr, d_rp = _sitk_surface_distances(p, r), _sitk_surface_distances(r, p)
        hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
        assd = np.concatenate([d_pr, d_rp]).mean()
        # Boundary definitions differ by up to a voxel between implementations.
        assert row["hd95_mm"] == pytest.approx(hd95, abs=spacing)
        assert row["assd_mm"] == pytest.approx(assd, abs=spacing / 2)
        voxel_ml = np.prod(ref.GetSpacing()) / 1000
        assert row["volume_ref_ml"] == pytest.approx(sitk.GetArrayViewFromImage(r).sum() * voxel_ml)
        assert row["volume_diff_ml"] == pytest.approx(row["volume_pred_ml"] - row["volume_ref_ml"])
    # The perturbations are visible where they should be.
    assert rows["liver"]["volume_diff_ml"] < 0 < rows["spleen"]["volume_diff_ml"]
    assert rows["pancreas"]["hd95_mm"] > 2 * ref.GetSpacing()[0] > rows["spleen"]["hd95_mm"]
    assert rows["spleen"]["surface_dice"] > max(0.5, rows["pancreas"]["surface_dice"])  # 1-voxel dilation: in-plane faces within 2 mm
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
    summary = {s["organ"]: s for s in summarize(list(rows.values()) + [dict(both, organ="liver", status="absent_both")])}
    assert summary["liver"]["cases"] == 1


def test_reference_on_another_grid_is_resampled():
    ct, labels = make_phantom(size=(48, 40, 24), spacing=(4.0, 4.0, 6.0))
    fine = sitk.Resample(labels, [96, 80, 48], sitk.Transform(), sitk.sitkNearestNeighbor, labels.GetOrigin(),
                         [2.0, 2.0, 3.0], labels.GetDirection(), 0, labels.GetPixelID())
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
