"""The command line: main job, folders, skip/overwrite, evaluate CSVs, and every bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.io.phantom import make_phantom
from helpers import ROOT, shared, write_phantom_dataset


@pytest.fixture()
def phantom_files(tmp_path):
    ct, labels = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "ref.nii.gz"))
    return tmp_path


def test_module_entry_point_runs_from_the_repository_root(tmp_path):
    out = tmp_path / "phantom.nii.gz"
    result = subprocess.run(
        [sys.executable, "-m", "AbdomenSegLib", "phantom", str(out), "--size", "40", "40", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "SYNTHETIC" in result.stderr and sitk.ReadImage(str(out)).GetSize() == (40, 40, 20)


def test_segment_then_evaluate(phantom_files, tiny_package, capsys):
    d = phantom_files
    # The untrained test model's output may trip the result check (exit 3, written but flagged).
    assert main(["segment", str(d / "ct.nii.gz"), str(d / "organs.seg.nrrd"), "--model", str(tiny_package.path)]) in (
        0,
        3,
    )
    out = sitk.ReadImage(str(d / "organs.seg.nrrd"))
    assert out.GetSize() == (64, 56, 24)
    assert main(["evaluate", str(d / "organs.seg.nrrd"), str(d / "ref.nii.gz"), "--csv", str(d / "m.csv")]) == 0
    lines = (d / "m.csv").read_text().splitlines()
    assert len(lines) == 1 + 14 and (d / "m_summary.csv").is_file()
    # Existing outputs are not replaced without --overwrite.
    before = (d / "m.csv").read_bytes()
    assert main(["evaluate", str(d / "organs.seg.nrrd"), str(d / "ref.nii.gz"), "--csv", str(d / "m.csv")]) == 2
    assert (d / "m.csv").read_bytes() == before
    assert "exists" in capsys.readouterr().err


def test_folders_skip_existing_and_write_one_csv(tmp_path, tiny_package, capsys):
    images, refs = write_phantom_dataset(tmp_path, ref_suffix=".nrrd")
    outs = tmp_path / "out"
    args = ["segment", str(images), str(outs), "--model", str(tiny_package.path)]
    first = main(args)
    assert first in (0, 3)
    assert sorted(p.name for p in outs.iterdir()) == ["case0.nii.gz", "case1.nii.gz", "manifest.csv", "qc"]
    # The result check of a folder run: per case JSON and picture, one CSV, an index of the pictures.
    qc = outs / "qc"
    assert {"case0.json", "case0.png", "case1.json", "case1.png", "qc.csv", "index.html", "contact_sheet.png"} <= {
        p.name for p in qc.iterdir()
    }
    rows = (qc / "qc.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("case,output,model,seconds,qc_warnings,qc_notes,qc_flags") and len(rows) == 3
    # Per-organ intensity statistics beside volume and confidence (issue 28), e.g. liver_mean, liver_sd, liver_median.
    organ = rows[0].split(",")[7].rsplit("_ml", 1)[0]
    assert {f"{organ}_mean", f"{organ}_sd", f"{organ}_median"} <= set(rows[0].split(","))
    report = json.loads((qc / "case0.json").read_text(encoding="utf-8"))
    assert report["case"] == "case0" and {"warnings", "notes", "organs"} <= set(report)
    stamp = (outs / "case0.nii.gz").stat().st_mtime_ns
    assert main(args) == first  # nothing new written; the earlier result checks still count
    assert len((qc / "qc.csv").read_text(encoding="utf-8").splitlines()) == 3  # and stay in qc.csv
    assert "skipped" in capsys.readouterr().err and (outs / "case0.nii.gz").stat().st_mtime_ns == stamp
    assert main(args + ["--overwrite"]) in (0, 3) and (outs / "case0.nii.gz").stat().st_mtime_ns != stamp
    assert main(["evaluate", str(outs / "*.nii.gz"), str(refs), "--csv", str(tmp_path / "all.csv")]) == 0
    rows = (tmp_path / "all.csv").read_text().splitlines()[1:]
    assert {r.split(",")[0] for r in rows} == {"case0", "case1"} and len(rows) == 28


def _bad(tmp_path, kind):
    if kind == "2d":
        path = tmp_path / "slice.nii.gz"
        sitk.WriteImage(sitk.Image([32, 32], sitk.sitkInt16), str(path))
    elif kind == "4d":
        path = tmp_path / "dyn.nii.gz"
        sitk.WriteImage(sitk.JoinSeries([sitk.Image([16, 16, 16], sitk.sitkInt16)] * 2), str(path))
    elif kind == "constant":
        path = tmp_path / "blank.nii.gz"
        sitk.WriteImage(sitk.Image([32, 32, 32], sitk.sitkInt16) - 1000, str(path))
    elif kind == "nan":
        path = tmp_path / "nan.nrrd"  # ITK's NIfTI reader turns NaN into 0; NRRD keeps it
        array = sitk.GetArrayFromImage(make_phantom(size=(32, 32, 16))[0]).astype(np.float32)
        array[5, 5, 5] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    elif kind == "labelmap":
        path = tmp_path / "labels.nii.gz"
        sitk.WriteImage(make_phantom(size=(32, 32, 16))[1], str(path))
    elif kind == "missing":
        path = tmp_path / "nothing_here.nii.gz"
    elif kind == "not-image":
        path = tmp_path / "report.nii.gz"
        path.write_text("this is a text file")
    return path


@pytest.mark.parametrize(
    "kind,message",
    [
        ("2d", "2D image"),
        ("4d", "4D image"),
        ("constant", "constant"),
        ("nan", "NaN"),
        ("labelmap", "label map"),
        ("missing", "does not exist"),
        ("not-image", "could not be read"),
    ],
)
def test_bad_input_one_clear_error_nothing_written(tmp_path, tiny_package, capsys, kind, message):
    src = _bad(tmp_path, kind)
    out = tmp_path / "out" / "organs.nii.gz"
    assert main(["segment", str(src), str(out), "--model", str(tiny_package.path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() and not list(tmp_path.rglob(".part-*"))


def test_unknown_model_and_overwriting_the_input(phantom_files, tiny_package, capsys):
    d = phantom_files
    assert main(["segment", str(d / "ct.nii.gz"), str(d / "o.nii.gz"), "--model", "no-such-model"]) == 2
    assert "not installed" in capsys.readouterr().err and not (d / "o.nii.gz").exists()
    before = (d / "ct.nii.gz").read_bytes()
    for extra in ([], ["--overwrite"]):
        code = main(["segment", str(d / "ct.nii.gz"), str(d / "ct.nii.gz"), "--model", str(tiny_package.path)] + extra)
        assert code == 2 and "overwrite the input" in capsys.readouterr().err
    assert (d / "ct.nii.gz").read_bytes() == before


def test_dicom_series_folder_as_input(tmp_path, tiny_package, capsys):
    folder = shared("dcmqi_ct3slice", "ct-3slice")
    # 3 slices (3 mm) are under the tiny model's default minimum extent (models/extent.py): refused, nothing written
    assert main(["segment", str(folder), str(tmp_path / "seg.nrrd"), "--model", str(tiny_package.path)]) == 2
    assert "has 3 slices (3 mm) along z" in capsys.readouterr().err and not (tmp_path / "seg.nrrd").exists()
    # a card that states a smaller minimum reads the series through: the runner pads, the output keeps the grid
    package = tmp_path / "thin-ok"
    shutil.copytree(tiny_package.path, package)
    card = json.loads((package / "card.json").read_text())
    card["input_minimum"] = {"slices": 2, "mm": [0, 0, 0]}
    (package / "card.json").write_text(json.dumps(card))
    assert main(["segment", str(folder), str(tmp_path / "seg.nrrd"), "--model", str(package)]) in (0, 3)
    out, ref = sitk.ReadImage(str(tmp_path / "seg.nrrd")), sitk.ReadImage(str(folder / "01.dcm"))
    assert out.GetSize() == (512, 512, 3)
    assert np.allclose(out.GetOrigin()[:2], ref.GetOrigin()[:2], atol=1e-3)


def test_models_lists_metadata(capsys):
    if main(["models"]) != 0:
        pytest.skip("no model catalog installed")
    text = capsys.readouterr().out
    assert "(default)" in text and "validation Dice" in text
