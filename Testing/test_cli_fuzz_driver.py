"""The fuzz driver (bench/fuzz_inputs.py) runs end to end on a few mutations and sorts every case.

Uses a synthetic phantom CT and the tiny untrained model, so it needs no real data and stays fast; the
real report comes from running the driver by hand on ../shared/data. The audit's families (issue 31) are
sections of the driver: every section has cases, and one case of each runs here and is sorted.
"""

import importlib.util
import sys

import pytest
import SimpleITK as sitk

from AbdomenSegLib.io.phantom import make_phantom
from helpers import ROOT, shared

AUDIT_FAMILIES = (
    "formats and encodings",
    "DICOM variants",
    "intensities",
    "geometry",
    "evaluate",
    "model packages",
    "Dask/cluster options",
    "engine worker protocol",
    "concurrency",
    "disk faults",
)


def _driver():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", ROOT / "bench" / "fuzz_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_inputs"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def phantom_inputs(tmp_path):
    ct, labels = make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0))
    sitk.WriteImage(sitk.Cast(ct, sitk.sitkInt16), str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    return tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"


def _run(fuzz, tiny_package, ct, out, *options, dicom="", ts_labels=""):
    return fuzz.run(
        [
            "--model",
            str(tiny_package.path),
            "--ct",
            str(ct),
            "--dicom",
            str(dicom),
            "--ts-labels",
            str(ts_labels),
            "--out",
            str(out),
            *options,
        ]
    )


def test_driver_sorts_every_case(tmp_path, tiny_package, phantom_inputs, capsys):
    fuzz = _driver()
    ct, _ = phantom_inputs
    families = "gzip-truncation,nii-truncation,nifti-benign"
    report = _run(fuzz, tiny_package, ct, tmp_path / "out", "--cases", "5", "--seed", "3", "--families", families)
    results, total = report["results"], report["counts"]["total"]
    assert len(results) == total["tried"] == 5
    assert sum(total[k] for k in fuzz.OUTCOMES) == 5
    assert {r.mutation.family for r in results} == {"gzip-truncation", "nii-truncation", "nifti-benign"}
    assert {r.mutation.section for r in results} == {"formats"}
    problems = [f"{r.mutation.name}: {r.outcome} {r.detail}" for r in results if r.outcome == "crashed"]
    assert not problems, problems
    # A cut gzip stream is always detectable (CRC and length trailer).
    assert all(r.outcome == "refused" for r in results if r.mutation.family == "gzip-truncation")
    # The untrained model's answer may be flagged, and a header that readers can take two ways (qform and sform
    # moved apart) may be refused, but a re-encoded image must never give other labels.
    assert all(r.outcome in ("clean", "flagged", "refused") for r in results if r.mutation.family == "nifti-benign")
    printed = capsys.readouterr().out
    assert "formats and encodings" in printed and "total" in printed and "wall time" in printed
    assert (tmp_path / "out" / "results.json").is_file()


def test_every_audit_family_is_a_section_with_cases(capsys):
    fuzz = _driver()
    assert tuple(fuzz.SECTIONS.values()) == AUDIT_FAMILIES
    pool = fuzz.build_pool(__import__("random").Random(0))
    assert len({m.name for m in pool}) == len(pool), "mutation names must be unique"
    for key in fuzz.SECTIONS:
        assert [m for m in pool if m.section == key], f"section {key} has no case"
    assert all(m.expected in (fuzz.REFUSE, fuzz.FLAG_OR_REFUSE, fuzz.SAME, fuzz.RIGHT) for m in pool)
    fuzz.run(["--list"])
    listed = capsys.readouterr().out
    for key, title in fuzz.SECTIONS.items():
        assert f"{key} ({title})" in listed


# One case of every new section that the phantom and the tiny model can drive (the DICOM section needs the
# real 3-slice series: see the next test). Outcomes are whatever this branch's engine gives; they must be sorted
# (no driver failure), and the table must have a row per section.
ONE_PER_SECTION = {
    "formats": "uncompressed data named .nii.gz, cut at 0.6",
    "intensities": "negated HU",
    "geometry": "2-slice slab",
    "evaluate": "eval reference with one NaN voxel",
    "models": "card.json nested 100,000 deep",
    "dask": "--scheduler-file not JSON",
    "worker": "worker request: null",
    "concurrency": "two folder runs into one folder",
    "disk": "no space left at: lock",
}


def test_one_case_of_each_new_family_runs_and_is_sorted(tmp_path, tiny_package, phantom_inputs, capsys):
    fuzz = _driver()
    ct, labels = phantom_inputs
    pattern = "^(" + "|".join(__import__("re").escape(name) for name in ONE_PER_SECTION.values()) + ")$"
    report = _run(fuzz, tiny_package, ct, tmp_path / "out", "--all", "--match", pattern, ts_labels=labels)
    results = report["results"]
    assert {r.mutation.section: r.mutation.name for r in results} == ONE_PER_SECTION
    assert all(r.outcome in fuzz.OUTCOMES for r in results)
    driver_failures = [f"{r.mutation.name}: {r.detail}" for r in results if "DRIVER" in r.detail]
    assert not driver_failures, driver_failures
    by_name = {r.mutation.name: r for r in results}
    # Fixed on this branch (hostile files, bounded JSON, the worker's request gate): these must be refused.
    for name in (
        "uncompressed data named .nii.gz, cut at 0.6",
        "card.json nested 100,000 deep",
        "worker request: null",
    ):
        assert by_name[name].outcome == "refused", (name, by_name[name].detail)
    counts = report["counts"]
    assert set(counts) == set(ONE_PER_SECTION) | {"total"}
    assert counts["total"]["tried"] == len(ONE_PER_SECTION)
    printed = capsys.readouterr().out
    for key in ONE_PER_SECTION:
        assert fuzz.SECTIONS[key] in printed


def test_dicom_section_runs_on_the_real_series(tmp_path, tiny_package, phantom_inputs):
    fuzz = _driver()
    series = shared("dcmqi_ct3slice", "ct-3slice")
    ct, _ = phantom_inputs
    report = _run(
        fuzz,
        tiny_package,
        ct,
        tmp_path / "out",
        "--all",
        "--match",
        "^enhanced multi-frame CT, middle frame missing$|^one slice's PixelSpacing",
        dicom=series,
    )
    results = report["results"]
    assert {r.mutation.section for r in results} == {"dicom"} and len(results) == 2
    assert all(r.outcome in fuzz.OUTCOMES and "DRIVER" not in r.detail for r in results), [
        (r.mutation.name, r.outcome, r.detail) for r in results
    ]
