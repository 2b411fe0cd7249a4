"""The fuzz driver (bench/fuzz_inputs.py) runs end to end on a few mutations and sorts every case.

Uses a synthetic phantom CT and the tiny untrained model, so it needs no real data and stays fast; the
real report comes from running the driver by hand on ../shared/data.
"""

import importlib.util
import sys

import SimpleITK as sitk

from AbdomenSegLib.io.phantom import make_phantom
from helpers import ROOT


def _driver():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", ROOT / "bench" / "fuzz_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_inputs"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_driver_sorts_every_case(tmp_path, tiny_package, capsys):
    fuzz = _driver()
    ct, _ = make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0))
    sitk.WriteImage(sitk.Cast(ct, sitk.sitkInt16), str(tmp_path / "ct.nii.gz"))
    report = fuzz.run(
        [
            "--cases",
            "5",
            "--seed",
            "3",
            "--model",
            str(tiny_package.path),
            "--ct",
            str(tmp_path / "ct.nii.gz"),
            "--dicom",
            "",
            "--ts-labels",
            "",
            "--families",
            "gzip-truncation,nii-truncation,nifti-benign",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    results, total = report["results"], report["counts"]["total"]
    assert len(results) == total["tried"] == 5
    assert sum(total[k] for k in fuzz.OUTCOMES) == 5
    assert {r.mutation.family for r in results} == {"gzip-truncation", "nii-truncation", "nifti-benign"}
    problems = [f"{r.mutation.name}: {r.outcome} {r.detail}" for r in results if r.outcome == "crashed"]
    assert not problems, problems
    # A cut gzip stream is always detectable (CRC and length trailer).
    assert all(r.outcome == "refused" for r in results if r.mutation.family == "gzip-truncation")
    # The untrained model's answer may be flagged, and a header that readers can take two ways (qform and sform
    # moved apart) may be refused, but a re-encoded image must never give other labels.
    assert all(r.outcome in ("correct", "flagged", "refused") for r in results if r.mutation.family == "nifti-benign")
    printed = capsys.readouterr().out
    assert "family" in printed and "total" in printed and "wall time" in printed
    assert (tmp_path / "out" / "results.json").is_file()
