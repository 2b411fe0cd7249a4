"""Issue 27: `evaluate` and `compare` never give a silently wrong number (label conventions detected or named,
missed/extra organs counted apart, the result check beside every case)."""

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.core.organs import convert_labels
from AbdomenSegLib.evaluation.conventions import detect_convention, split_source
from helpers import shared

TRUE_BTCV_DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _ours(reference: sitk.Image, convention: str) -> sitk.Image:
    """A reference re-numbered into our organ table: a perfect 'prediction' in our convention."""
    out = sitk.GetImageFromArray(convert_labels(sitk.GetArrayFromImage(reference), convention))
    out.CopyInformation(reference)
    return out


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_every_shared_reference_shows_its_own_convention():
    """All 24 BTCV (raw headers, AP reversed), all 16 CHAOS and TotalSegmentator's CT and MR maps: detected as
    their dataset's numbering, and our own numbering as ours."""
    expected = {"btcv_ct": "btcv", "chaos_mr_t2": "chaos"}
    for folder, convention in expected.items():
        for path in sorted(shared(folder, "labels").iterdir()):
            image = sitk.ReadImage(str(path))
            assert detect_convention(image)[0] == convention, path.name
            if folder == "btcv_ct" and path.name < "btcv_img0005":
                assert detect_convention(_ours(image, "btcv"))[0] == "abdomenseg", path.name
    assert detect_convention(sitk.ReadImage(str(shared("totalseg_example", "example_seg_fast_force_split.nii.gz"))))[
        0
    ] == ("totalseg")
    assert detect_convention(sitk.ReadImage(str(shared("totalseg_example", "example_seg_mr.nii.gz"))))[0] == (
        "totalseg_mr"
    )


def test_btcv_reference_without_its_convention_is_not_scored_as_ours(tmp_path, capsys):
    """The issue: `evaluate out/ ref/` on BTCV references gave liver, spleen, kidneys 0.000 with exit 0. Now the
    references' numbering is detected (and said), so a perfect prediction scores 1."""
    ref = shared("btcv_ct", "labels", "btcv_img0001.nii.gz")
    reference = sitk.ReadImage(str(ref))
    (tmp_path / "ref").mkdir(), (tmp_path / "out").mkdir()
    sitk.WriteImage(reference, str(tmp_path / "ref" / "btcv_img0001.nii.gz"))
    sitk.WriteImage(_ours(reference, "btcv"), str(tmp_path / "out" / "btcv_img0001.nii.gz"))
    code = main(["evaluate", str(tmp_path / "out"), str(tmp_path / "ref"), "--csv", str(tmp_path / "y.csv")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "reference label convention: btcv" in err
    rows = {r["organ"]: r for r in _read_csv(tmp_path / "y.csv")}
    for organ in ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "stomach"):
        assert float(rows[organ]["dice"]) == pytest.approx(1.0), organ


def test_a_reference_that_fits_several_conventions_is_refused_before_work(tmp_path, capsys):
    """dcmqi's one-organ liver map (value 1): liver in ours and CHAOS's, spleen in BTCV's and TotalSegmentator's:
    refused with the candidates, unless named."""
    ref = shared("dcmqi_ct3slice", "liver_seg.nrrd")
    code = main(["evaluate", str(ref), str(ref)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: the reference's label convention cannot be told")
    assert "abdomenseg and btcv and chaos" in err and "--reference-labels" in err
    assert main(["evaluate", str(ref), str(ref), "--reference-labels", "abdomenseg"]) == 0


def test_prediction_source_and_convention_parse():
    assert split_source("/data/ts_out:totalseg") == ("/data/ts_out", "totalseg")
    assert split_source("/data/with:colon") == ("/data/with:colon", None)
    assert split_source("refs") == ("refs", None)


def test_flipped_btcv_prediction_is_flagged_in_the_tables(tmp_path, capsys):
    """A prediction whose header reverses the AP axis (BTCV's stored header) is marked by the result check in the
    metrics CSV, not averaged in silently."""
    ref = shared("btcv_ct", "labels", "btcv_img0001.nii.gz")
    reference = sitk.ReadImage(str(ref))
    (tmp_path / "ref").mkdir(), (tmp_path / "out").mkdir()
    sitk.WriteImage(reference, str(tmp_path / "ref" / "a.nii.gz"))
    sitk.WriteImage(_ours(reference, "btcv"), str(tmp_path / "out" / "a.nii.gz"))
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "ref"), "--csv", str(tmp_path / "y.csv")]) == 0
    rows = _read_csv(tmp_path / "y.csv")
    assert all(int(r["qc_warnings"]) > 0 for r in rows) and "anterior" in rows[0]["qc_flags"]
    summary = _read_csv(tmp_path / "y_summary.csv")
    assert all(int(s["flagged"]) == 1 for s in summary)
    assert "FLAGGED (" in capsys.readouterr().err
    # With the true direction, nothing is flagged.
    for folder in ("ref", "out"):
        image = sitk.ReadImage(str(tmp_path / folder / "a.nii.gz"))
        image.SetDirection(TRUE_BTCV_DIRECTION)
        sitk.WriteImage(image, str(tmp_path / folder / "a.nii.gz"))
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "ref"), "--csv", str(tmp_path / "z.csv")]) == 0
    assert all(r["qc_warnings"] == "0" for r in _read_csv(tmp_path / "z.csv"))


def test_missed_and_extra_organs_are_counted_apart(tmp_path, capsys):
    """One missed gallbladder made a cohort's HD95 mean 267.6 mm: now the gallbladder's mean is over the cases
    that hold it in both maps, the miss is counted, and the missed row has no distance."""
    names = ["btcv_img0001", "btcv_img0002", "btcv_img0003"]
    (tmp_path / "ref").mkdir(), (tmp_path / "out").mkdir()
    for i, name in enumerate(names):
        reference = sitk.ReadImage(str(shared("btcv_ct", "labels", f"{name}.nii.gz")))
        reference.SetDirection(TRUE_BTCV_DIRECTION)
        ours = sitk.GetArrayFromImage(_ours(reference, "btcv"))
        if i == 0:
            ours[ours == 6] = 0  # the gallbladder missed
        pred = sitk.GetImageFromArray(ours)
        pred.CopyInformation(reference)
        sitk.WriteImage(reference, str(tmp_path / "ref" / f"{name}.nii.gz"))
        sitk.WriteImage(pred, str(tmp_path / "out" / f"{name}.nii.gz"))
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "ref"), "--csv", str(tmp_path / "y.csv")]) == 0
    rows = {(r["case"], r["organ"]): r for r in _read_csv(tmp_path / "y.csv")}
    missed = rows[(names[0], "gallbladder")]
    assert missed["status"] == "missing_pred" and missed["hd95_mm"] == "" and missed["assd_mm"] == ""
    summary = {s["organ"]: s for s in _read_csv(tmp_path / "y_summary.csv")}
    gallbladder = summary["gallbladder"]
    assert gallbladder["missed"] == "1" and gallbladder["n"] == str(len(names) - 1)
    assert float(gallbladder["hd95_mm_mean"]) == pytest.approx(0.0) and float(gallbladder["dice_mean"]) == 1.0
    assert "urinary_bladder" not in summary
    out = capsys.readouterr().out
    assert "missed" in out and np.isfinite(float(gallbladder["dice_mean"]))


# -- compare ------------------------------------------------------------------------------------------------------
def _totalseg_layout(tmp_path):
    """TotalSegmentator's example CT labels as the reference; as predictions: the same map as TotalSegmentator's
    per-structure mask folder (its default output: `<structure>.nii.gz`) and as its multi-label file, and a map in
    our numbering from a folder whose manifest names our 13-organ model (which segments no urinary bladder)."""
    labels = sitk.ReadImage(str(shared("totalseg_example", "example_seg_fast_force_split.nii.gz")))
    array = sitk.GetArrayFromImage(labels)
    (tmp_path / "ref").mkdir(), (tmp_path / "ts_ml").mkdir(), (tmp_path / "ours").mkdir()
    sitk.WriteImage(labels, str(tmp_path / "ref" / "example.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "ts_ml" / "example.nii.gz"))
    masks = tmp_path / "ts_masks" / "example"
    masks.mkdir(parents=True)
    names = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 21: "urinary_bladder", 52: "aorta"}
    names.update({4: "gallbladder", 6: "stomach", 7: "pancreas", 10: "lung_upper_lobe_left"})
    for value, name in names.items():
        mask = sitk.GetImageFromArray((array == value).astype(np.uint8))
        mask.CopyInformation(labels)
        sitk.WriteImage(mask, str(masks / f"{name}.nii.gz"))
    ours = sitk.GetArrayFromImage(_ours(labels, "totalseg"))
    ours[ours == 6] = 0  # our prediction misses the gallbladder
    ours[ours == 14] = 0  # and holds no bladder (the model does not segment it)
    pred = sitk.GetImageFromArray(ours)
    pred.CopyInformation(labels)
    sitk.WriteImage(pred, str(tmp_path / "ours" / "example.nii.gz"))
    (tmp_path / "ours" / "manifest.csv").write_text(
        "case,input,output,status,model,sha256\nexample,x,y,done,btcv-ct-3d-unet,\n", encoding="utf-8"
    )
    return tmp_path


def test_compare_scores_other_tools_outputs_on_the_organs_both_define(tmp_path, capsys):
    """The issue: against TotalSegmentator's labels, the urinary bladder (no shipped model segments it) entered the
    tables as missed. Now each source is scored on the organs it and the reference define, one case is enough for
    every table, and the paired test says its n."""
    d = _totalseg_layout(tmp_path)
    out = d / "cmp"
    argv = ["compare", "--out", str(out), "--reference", str(d / "ref")]
    argv += ["--predictions", f"ts-masks={d / 'ts_masks'}", "--predictions", f"ts-ml={d / 'ts_ml'}:totalseg"]
    argv += ["--predictions", f"ours={d / 'ours'}"]
    assert main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "reference label convention: totalseg" in captured.err
    rows = _read_csv(out / "metrics.csv")
    by = {(r["model"], r["organ"]): r for r in rows}
    assert float(by[("ts-masks", "urinary_bladder")]["dice"]) == 1.0 and float(by[("ts-ml", "liver")]["dice"]) == 1.0
    assert ("ours", "urinary_bladder") not in by  # not an organ our model segments: not a miss
    assert by[("ours", "gallbladder")]["status"] == "missing_pred" and by[("ours", "gallbladder")]["hd95_mm"] == ""
    wide = _read_csv(out / "comparison_wide.csv")
    assert [r["organ"] for r in wide][-1] == "mean" and set(wide[0]) == {"organ", "ts-masks", "ts-ml", "ours"}
    gallbladder = next(r for r in wide if r["organ"] == "gallbladder")
    assert gallbladder["ours"] == "– (n=0, 1 missed)" and gallbladder["ts-ml"].startswith("1.000 ± 0.000 (n=1")
    tests = {(t["organ"], t["model_a"], t["model_b"]): t for t in _read_csv(out / "paired_tests.csv")}
    assert tests[("liver", "ours", "ts-masks")]["n"] == "1" and tests[("liver", "ours", "ts-masks")]["wilcoxon_p"] in (
        "",
        "nan",
    )
    assert (out / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "comparison.md").read_text(encoding="utf-8")
    assert md.startswith("| model | organ | n | missed |") and "| organ | ts-masks | ts-ml | ours |" in md
    assert "| organ |" in captured.out


def test_paired_wilcoxon_per_organ_with_n():
    from scipy.stats import wilcoxon

    from AbdomenSegLib.evaluation.reports import paired_tests

    a = [0.90, 0.85, 0.80, 0.95, 0.70]
    b = [0.80, 0.84, 0.60, 0.90, 0.71]
    rows = [{"case": f"c{i}", "organ": "liver", "model": "a", "status": "ok", "dice": v} for i, v in enumerate(a)]
    rows += [{"case": f"c{i}", "organ": "liver", "model": "b", "status": "ok", "dice": v} for i, v in enumerate(b)]
    rows.append({"case": "c9", "organ": "liver", "model": "a", "status": "ok", "dice": 0.5})  # b lacks it: unpaired
    (test,) = paired_tests(rows)
    assert test["n"] == 5 and test["wilcoxon_p"] == pytest.approx(wilcoxon(np.subtract(a, b)).pvalue)


def test_compare_corrects_btcv_headers_as_segment_does():
    """The issue's `compare --models btcv-ct-3d-unet --data btcv_ct` without --cases-from read the BTCV files with
    their wrong header (kidneys 0.000): the direction fix now comes from the compared model's training config."""
    from AbdomenSegLib.evaluation.compare import dataset_direction
    from AbdomenSegLib.models.packages import find_model

    card = find_model("btcv-ct-3d-unet")
    assert dataset_direction(shared("btcv_ct"), [card], log=lambda m: None) == list(TRUE_BTCV_DIRECTION)
    assert dataset_direction(shared("chaos_mr_t2"), [card], log=lambda m: None) is None


@pytest.mark.slow
def test_compare_btcv_model_on_btcv_without_cases_from_scores_the_kidneys(tmp_path, capsys):
    """End to end on one BTCV case with the shipped model, the issue's command (kidneys 0.000/0.000 before; with
    the header fixed by hand 0.847/0.954)."""
    argv = ["compare", "--models", "btcv-ct-3d-unet", "--data", str(shared("btcv_ct")), "--labels", "btcv"]
    argv += ["--input-intensity", "btcv_uint8", "--cases", "btcv_img0001", "--out", str(tmp_path / "c")]
    argv += ["--device", "cpu", "--keep-predictions"]
    assert main(argv) == 0
    rows = {r["organ"]: r for r in _read_csv(tmp_path / "c" / "metrics.csv")}
    assert float(rows["kidney_right"]["dice"]) > 0.7 and float(rows["kidney_left"]["dice"]) > 0.7
    kept = sitk.ReadImage(str(tmp_path / "c" / "predictions" / "btcv-ct-3d-unet" / "btcv_img0001.nii.gz"))
    scan = sitk.ReadImage(str(shared("btcv_ct", "images", "btcv_img0001.nii.gz")))
    assert kept.GetSize() == scan.GetSize() and kept.GetDirection() == scan.GetDirection()


def test_islands_behind_a_large_hd95_are_shown(tmp_path):
    """The issue: spleen islands gave an HD95 of 182 mm with nothing beside it. A BTCV spleen with one small island
    150 mm away: Dice stays high, and the row says the predicted spleen is in 2 pieces (what explains its HD95)."""
    reference = sitk.ReadImage(str(shared("btcv_ct", "labels", "btcv_img0001.nii.gz")))
    reference.SetDirection(TRUE_BTCV_DIRECTION)
    ours = sitk.GetArrayFromImage(_ours(reference, "btcv"))
    z, y, x = np.argwhere(ours == 2).mean(axis=0).astype(int)  # our spleen
    shift = int(150 / reference.GetSpacing()[0])
    ours[z - 2 : z + 2, y - 2 : y + 2, x - shift - 2 : x - shift + 2] = 2
    pred = sitk.GetImageFromArray(ours)
    pred.CopyInformation(reference)
    (tmp_path / "ref").mkdir(), (tmp_path / "out").mkdir()
    sitk.WriteImage(reference, str(tmp_path / "ref" / "a.nii.gz"))
    sitk.WriteImage(pred, str(tmp_path / "out" / "a.nii.gz"))
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "ref"), "--csv", str(tmp_path / "y.csv")]) == 0
    spleen = next(r for r in _read_csv(tmp_path / "y.csv") if r["organ"] == "spleen")
    assert float(spleen["dice"]) > 0.99 and spleen["pieces_pred"] == "2"
    liver = next(r for r in _read_csv(tmp_path / "y.csv") if r["organ"] == "liver")
    assert liver["pieces_pred"] == "1"


def test_compare_reads_a_dicom_seg_prediction(tmp_path, capsys):
    """dcmqi's liver as a DICOM SEG object against the same liver as a label map (one organ: its numbering must be
    named, `:abdomenseg`); the SEG is read into our organ table."""
    import shutil

    (tmp_path / "seg").mkdir(), (tmp_path / "ref").mkdir()
    shutil.copy(shared("dcmqi_ct3slice", "liver.dcm"), tmp_path / "seg" / "liver.dcm")
    shutil.copy(shared("dcmqi_ct3slice", "liver_seg.nrrd"), tmp_path / "ref" / "liver.nrrd")
    argv = [
        "compare",
        "--predictions",
        f"dicom-seg={tmp_path / 'seg'}",
        "--reference",
        f"{tmp_path / 'ref'}:abdomenseg",
    ]
    assert main(argv + ["--out", str(tmp_path / "cmp")]) == 0, capsys.readouterr().err
    rows = {r["organ"]: r for r in _read_csv(tmp_path / "cmp" / "metrics.csv")}
    assert float(rows["liver"]["dice"]) > 0.99 and rows["liver"]["status"] == "ok"
    assert {r["status"] for o, r in rows.items() if o != "liver"} == {"absent_both"}
    assert int(rows["liver"]["qc_warnings"]) == 1  # 3 slices: the result check finds no organ in a meaningful amount
