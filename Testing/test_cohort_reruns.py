"""Issue 27: a folder re-run cannot mix models. The issue's run (`segment u8/ out_a/ --model other` into a folder of
another model's outputs) said "3 skipped", exit 0, and left the other model's outputs and manifest."""

import json

from AbdomenSegLib.cli import main
from AbdomenSegLib.cohort.manifest import read_manifest
from helpers import write_phantom_dataset


def _stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.nii.gz")}


def test_a_rerun_with_another_model_or_options_is_refused_before_work(
    tmp_path, tiny_package, background_only_package, capsys
):
    images, _ = write_phantom_dataset(tmp_path)
    out = tmp_path / "out"
    args = ["segment", str(images), str(out), "--model", str(tiny_package.path), "--no-qc-png"]
    assert main(args) in (0, 3)
    rows = read_manifest(out / "manifest.csv")
    assert {r["model"] for r in rows.values()} == {"tiny-test"}
    assert {r["quality"] for r in rows.values()} == {"standard"}
    assert json.loads(rows["case0"]["options"])["fill_holes"] is False
    before, manifest = _stamps(out), (out / "manifest.csv").read_bytes()
    capsys.readouterr()
    # The same run again resumes (skips), as before.
    assert main(args) in (0, 3) and "skipped" in capsys.readouterr().err
    # Another model, or other options, into the same folder: refused, nothing touched.
    other = ["segment", str(images), str(out), "--model", str(background_only_package.path), "--no-qc-png"]
    for argv in (other, args + ["--fill-holes"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "holds outputs of another run" in err and "--overwrite" in err
        assert _stamps(out) == before and (out / "manifest.csv").read_bytes() == manifest
    # --overwrite replaces them, and the manifest says so.
    assert main(other + ["--overwrite"]) in (0, 3)
    assert {r["model"] for r in read_manifest(out / "manifest.csv").values()} == {"background-only"}


def test_logs_a_script_reads_one_line_per_case(tmp_path, tiny_package, capsys):
    """stderr captured (not a terminal): no progress-bar redraws (carriage returns), one line per case with its time,
    the time elapsed and an estimate of the time left; evaluate's table on stdout, its diagnostics on stderr."""
    images, refs = write_phantom_dataset(tmp_path, cases=3)
    out = tmp_path / "out"
    assert main(["segment", str(images), str(out), "--model", str(tiny_package.path), "--no-qc-png"]) in (0, 3)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    lines = [line for line in err.splitlines() if " -> " in line]
    assert len(lines) == 3 and all("elapsed" in line and "s left" in line for line in lines)
    assert lines[0].startswith("[1/3] case0 -> ") and lines[-1].endswith(("left)", "FLAGGED"))
    assert main(["evaluate", str(out), str(refs), "--reference-labels", "abdomenseg"]) == 0
    captured = capsys.readouterr()
    assert "Dice mean" in captured.out and "Dice mean" not in captured.err
    assert "evaluated" in captured.err and "evaluated" not in captured.out
