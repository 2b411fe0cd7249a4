"""Issue 31: `evaluate` and `compare` score only where both maps have data. A reference whose grid covers part of the
prediction's (the audit: the upper quarter; right kidney Dice 0.61 for 0.92, exit 0) is compared inside the physical
intersection of the grids; what the prediction holds outside it is counted apart, never as false positives."""

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import BY_NAME, convert_labels
from AbdomenSegLib.evaluation.metrics import evaluate, field_of_view
from AbdomenSegLib.io.phantom import make_phantom
from helpers import shared

BTCV_DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _image(array, like):
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


def _ours(reference: sitk.Image, convention: str) -> sitk.Image:
    return _image(convert_labels(sitk.GetArrayFromImage(reference), convention), reference)


def _upper_quarter(image: sitk.Image) -> tuple:
    """The image's upper (head-most: z grows towards the head in these headers) quarter as its own sub-grid (SimpleITK's
    slicing keeps the physical place: origin moved), and the first z index it keeps."""
    start = image.GetSize()[2] * 3 // 4
    return image[:, :, start:], start


def _dice(p: np.ndarray, r: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r))


def _check_against_numpy(rows, pred_ours: np.ndarray, ref_ours_crop: np.ndarray, start: int, voxel_ml: float):
    """Each organ's Dice equals numpy's on the cropped prediction against the cropped reference, and its outside
    volume and fraction are the predicted voxels below the crop, counted here independently."""
    checked = 0
    for row in rows:
        label = BY_NAME[row["organ"]].label
        p_crop, r_crop = pred_ours[start:] == label, ref_ours_crop == label
        below = int(np.count_nonzero(pred_ours[:start] == label))
        total = int(np.count_nonzero(pred_ours == label))
        assert float(row["outside_reference_ml"]) == pytest.approx(below * voxel_ml, rel=1e-5), row["organ"]
        assert float(row["outside_reference_fraction"]) == pytest.approx(below / total if total else 0.0, rel=1e-5)
        assert float(row["volume_pred_ml"]) == pytest.approx(np.count_nonzero(p_crop) * voxel_ml, rel=1e-5)
        if p_crop.any() and r_crop.any():
            assert row["status"] == "ok" and float(row["dice"]) == pytest.approx(_dice(p_crop, r_crop), abs=1e-6)
            checked += 1
        elif below and not r_crop.any():
            assert row["status"] == "outside_overlap" and row["dice"] in (None, "")
    return checked


def test_totalseg_reference_cropped_to_its_upper_quarter(tmp_path, capsys):
    """TotalSegmentator's example labels against themselves in our numbering, the reference cut to its upper
    quarter: Dice 1.0 for every organ the quarter holds (was: the kidneys' lower parts counted as false positives),
    the outside share reported per organ and per case, exit 0."""
    reference = sitk.ReadImage(str(shared("totalseg_example", "example_seg_fast_force_split.nii.gz")))
    prediction = _ours(reference, "totalseg")
    crop, start = _upper_quarter(reference)
    assert np.allclose(
        crop.TransformIndexToPhysicalPoint((0, 0, 0)), reference.TransformIndexToPhysicalPoint((0, 0, start))
    )
    sitk.WriteImage(prediction, str(tmp_path / "pred.nii.gz"))
    sitk.WriteImage(crop, str(tmp_path / "ref.nii.gz"))
    argv = ["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "--reference-labels", "totalseg"]
    assert main([*argv, "--csv", str(tmp_path / "m.csv")]) == 0
    err = capsys.readouterr().err
    rows = _read_csv(tmp_path / "m.csv")
    pred_ours = sitk.GetArrayFromImage(prediction)
    ref_crop_ours = convert_labels(sitk.GetArrayFromImage(crop), "totalseg")
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    assert _check_against_numpy(rows, pred_ours, ref_crop_ours, start, voxel_ml) >= 8
    by_organ = {r["organ"]: r for r in rows}
    for organ in ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "aorta"):
        row = by_organ[organ]
        assert float(row["dice"]) == 1.0 and float(row["hd95_mm"]) == 0.0 and float(row["surface_dice"]) == 1.0
    assert float(by_organ["kidney_right"]["outside_reference_fraction"]) > 0.3  # the audit's case: half below
    labelled = np.isin(pred_ours, [BY_NAME[r["organ"]].label for r in rows])
    share = 100.0 * np.count_nonzero(labelled[:start]) / np.count_nonzero(labelled)
    assert f"note: pred: {share:.1f}% of the predicted organs" in err
    assert f"note: {share:.1f}% of the predicted organs" in by_organ["liver"]["qc_flags"]

    # A prediction one slice off: its Dice inside the quarter is still the cropped maps' Dice (not lowered by what
    # lies below the reference), and equals what `evaluate` gives on the two cropped files.
    shifted = _image(np.roll(pred_ours, 1, axis=0), prediction)
    moved_rows = evaluate(shifted, crop, reference_convention="totalseg")
    _check_against_numpy(moved_rows, np.roll(pred_ours, 1, axis=0), ref_crop_ours, start, voxel_ml)
    cropped_rows = evaluate(_upper_quarter(shifted)[0], crop, reference_convention="totalseg")
    for moved, cropped in zip(moved_rows, cropped_rows):
        if cropped["status"] == "ok":
            assert moved["dice"] == pytest.approx(cropped["dice"], abs=1e-12), moved["organ"]
            assert moved["dice"] < 1.0


def _phantom(direction=None):
    return make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0), direction=direction)[1]


@pytest.mark.parametrize("direction", [None, BTCV_DIRECTION], ids=["identity", "btcv_reversed_y"])
def test_phantom_reference_cropped_to_its_upper_quarter(tmp_path, capsys, direction):
    """The same without ../shared, on make_phantom's labels, with a prediction that is not the reference (shifted by
    one voxel) and with BTCV's reversed anterior-posterior axis; the reference also given flipped (another
    orientation of the same sub-grid: the physical intersection, not the indices, decides)."""
    labels = _phantom(direction)
    pred_array = np.roll(sitk.GetArrayFromImage(labels), 1, axis=2)
    prediction = _image(pred_array, labels)
    crop, start = _upper_quarter(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    ref_crop = sitk.GetArrayFromImage(crop)
    for reference in (crop, sitk.Flip(crop, [False, True, False])):
        rows = evaluate(prediction, reference)
        assert _check_against_numpy(rows, pred_array, ref_crop, start, voxel_ml) == 4  # liver, spleen, stomach, aorta
        statuses = {r["organ"]: r["status"] for r in rows}
        assert statuses["kidney_right"] == statuses["kidney_left"] == "outside_overlap"
    sitk.WriteImage(prediction, str(tmp_path / "pred.nii.gz"))
    sitk.WriteImage(crop, str(tmp_path / "ref.nii.gz"))
    csv_path = tmp_path / "m.csv"
    argv = ["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "--reference-labels", "abdomenseg"]
    assert main([*argv, "--csv", str(csv_path)]) == 0
    out, err = capsys.readouterr()
    assert "lie outside the reference's field of view and are not scored" in err and "kidney_right 100%" in err
    assert "outside_overlap" in out  # the table on stdout shows the unscored rows as such, with '-' metrics
    summary = {s["organ"]: s for s in _read_csv(tmp_path / "m_summary.csv")}
    assert "kidney_right" not in summary and summary["liver"]["n"] == "1"  # unscored rows are in no mean


def test_covered_region_is_the_physical_intersection():
    """`field_of_view` follows the physical places: a reference grid with BTCV's reversed y axis, made from the same
    voxels, covers the same prediction voxels as the identity one."""
    labels = _phantom()
    crop = labels[:, 10:30, 18:]
    covered = field_of_view(crop, labels)
    expected = np.zeros(sitk.GetArrayViewFromImage(labels).shape, bool)
    expected[18:, 10:30, :] = True
    assert np.array_equal(covered, expected)
    flipped = sitk.Flip(crop, [False, True, False])  # same voxels, y axis reversed in the header
    assert flipped.GetDirection()[4] == -1.0
    assert np.array_equal(field_of_view(flipped, labels), expected)
    assert field_of_view(labels, labels) is None


def test_a_reference_that_covers_none_of_the_prediction_is_refused(tmp_path, capsys):
    """The kidneys predicted low, a reference grid over the upper quarter where neither map holds anything: nothing
    to score, so the case is refused (it used to read as every organ absent, Dice 1)."""
    labels = _phantom()
    kidneys = np.where(np.isin(sitk.GetArrayFromImage(labels), [3, 4]), sitk.GetArrayFromImage(labels), 0)
    prediction = _image(kidneys.astype(np.uint8), labels)
    blank = _upper_quarter(_image(np.zeros_like(kidneys, dtype=np.uint8), labels))[0]
    with pytest.raises(AbdomenSegError, match="covers none of the prediction's organs"):
        evaluate(prediction, blank)
    sitk.WriteImage(prediction, str(tmp_path / "pred.nii.gz"))
    sitk.WriteImage(blank, str(tmp_path / "ref.nii.gz"))
    argv = ["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "--reference-labels", "abdomenseg"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the reference's field of view covers none of the prediction's organs")
    # A grid that shares no voxel with the prediction's (next to it, not overlapping): refused too.
    beside = sitk.Image(labels)
    beside.SetOrigin(labels.TransformIndexToPhysicalPoint((0, 0, labels.GetSize()[2])))
    with pytest.raises(AbdomenSegError, match="do not overlap|covers none"):
        evaluate(labels, beside)


def test_compare_scores_a_partial_reference_as_evaluate_does(tmp_path, capsys):
    """`compare --predictions ... --reference ...` gives the same rows as `evaluate`, and says the outside share."""
    labels = _phantom()
    prediction = _image(np.roll(sitk.GetArrayFromImage(labels), 1, axis=2), labels)
    crop = _upper_quarter(labels)[0]
    (tmp_path / "refs").mkdir(), (tmp_path / "preds").mkdir()
    sitk.WriteImage(crop, str(tmp_path / "refs" / "case0.nii.gz"))
    sitk.WriteImage(prediction, str(tmp_path / "preds" / "case0.nii.gz"))
    out = tmp_path / "cmp"
    args = ["compare", "--reference", f"{tmp_path / 'refs'}:abdomenseg", "--out", str(out)]
    assert main([*args, "--predictions", f"shifted={tmp_path / 'preds'}:abdomenseg"]) == 0
    err = capsys.readouterr().err
    assert "note: case0:" in err and "outside the reference's field of view" in err
    compared = {r["organ"]: r for r in _read_csv(out / "metrics.csv")}
    expected = {r["organ"]: r for r in evaluate(prediction, crop, organs=list(compared))}
    for organ, row in expected.items():
        assert compared[organ]["status"] == row["status"], organ
        assert float(compared[organ]["outside_reference_ml"]) == pytest.approx(row["outside_reference_ml"], rel=1e-5)
        if row["status"] == "ok":
            assert float(compared[organ]["dice"]) == pytest.approx(row["dice"], rel=1e-5)
    assert "reaching past the reference's field of view" in (out / "comparison.md").read_text()


def test_faces_at_the_cut_are_no_surface():
    """A prediction 2 mm larger than a reference ball, the reference cut through the ball's middle: with the cut
    faces left out, HD95, ASSD and surface Dice (1 mm) are those of the whole balls (the halves are alike); counted
    as surfaces (what scoring the two cropped files gives, the cut being their border), the coinciding cut discs
    read as agreement: surface Dice 0.40 instead of 0.00."""
    n = 48
    z, y, x = np.mgrid[:n, :n, :n]
    distance = np.sqrt((z - 23.5) ** 2 + (y - 24) ** 2 + (x - 24) ** 2)

    def image(mask):
        out = sitk.GetImageFromArray(mask.astype(np.uint8))
        out.SetSpacing((1.0, 1.0, 1.0))
        return out

    reference, prediction = image(distance <= 10), image(distance <= 12)
    settings = {"organs": ["liver"], "tolerance_mm": 1.0}
    whole = evaluate(prediction, reference, **settings)[0]
    cut = evaluate(prediction, reference[:, :, 24:], **settings)[0]
    both_cropped = evaluate(prediction[:, :, 24:], reference[:, :, 24:], **settings)[0]
    assert cut["outside_reference_fraction"] == pytest.approx(0.5)
    assert cut["dice"] == pytest.approx(whole["dice"])
    for key in ("hd95_mm", "assd_mm", "surface_dice"):
        assert cut[key] == pytest.approx(whole[key], abs=1e-9), key
    assert whole["surface_dice"] == 0.0 and both_cropped["surface_dice"] > 0.3
    assert both_cropped["assd_mm"] < whole["assd_mm"] - 0.5


def test_reference_organs_beyond_the_prediction_grid_are_counted_apart(capsys):
    """The other way round: a prediction made on the upper quarter of the scan (a cropped input) against the full
    reference. The reference's organs below cannot be predicted: no misses, counted in `outside_prediction_ml`
    (numpy's count of the reference voxels below), said in the note; inside, Dice 1."""
    labels = _phantom(BTCV_DIRECTION)
    crop, start = _upper_quarter(labels)
    rows = {r["organ"]: r for r in evaluate(crop, labels)}
    array = sitk.GetArrayFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    for organ, row in rows.items():
        below = np.count_nonzero(array[:start] == BY_NAME[organ].label) * voxel_ml
        assert row["outside_prediction_ml"] == pytest.approx(below), organ
        assert row["outside_reference_ml"] == 0.0
        if row["status"] == "ok":
            assert row["dice"] == 1.0
    assert rows["kidney_right"]["status"] == "outside_overlap" and rows["liver"]["status"] == "ok"
    from AbdomenSegLib.evaluation.metrics import outside_note

    assert "of the reference's organs" in outside_note(list(rows.values()))
    kidneys_only = _image(np.where(np.isin(array, [3, 4]), array, 0).astype(np.uint8), labels)
    with pytest.raises(AbdomenSegError, match="the prediction's grid holds none of the reference's organs"):
        evaluate(_image(np.zeros_like(sitk.GetArrayFromImage(crop)), crop), kidneys_only)
