"""The background segmentation process (AbdomenSegLib/background.py): real child processes, no mocked subprocess."""

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.io.phantom import make_phantom
from AbdomenSegLib.slicer import background
from AbdomenSegLib.slicer.background import SegmentationProcess, build_command, python_executable

# The child imports torch + MONAI (several seconds on a shared CPU) before its first progress line.
OUTCOME_TIMEOUT_S = 90


def _env():
    """The child on as many threads as the tests' torch (conftest), so results can be compared bit for bit."""
    return dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", HF_HUB_OFFLINE="1")


def _events_until_outcome(run, timeout=OUTCOME_TIMEOUT_S, stop_at=None):
    """Poll as a QTimer would (every 20 ms) until the outcome, or until `stop_at(event)`; bounded."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = run.poll()
        events += new
        if stop_at and any(stop_at(e) for e in new):
            return events
        if not run.running:
            return events + run.poll()
        time.sleep(0.02)
    run.cancel()
    pytest.fail(f"no outcome within {timeout} s; events so far: {events[-5:]}")


def _same_grid(a, b):
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


def test_end_to_end_matches_the_cli_in_process(tmp_path, tiny_package):
    turn = np.radians(20)  # oblique, so the direction matrix is really carried through the files
    rotation = [[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]]
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0), direction=rotation)
    run = SegmentationProcess().start(ct, model=tiny_package.path, device="cpu", env=_env())
    temp_dir = run.temp_dir
    try:
        assert run.running and not run.finished and temp_dir.is_dir()
        events = _events_until_outcome(run)
        assert run.error is None, (run.error, events[-3:])
        assert run.finished and not run.running and run.succeeded
        progress = [e["progress"] for e in events if "progress" in e]
        assert progress and progress == sorted(progress) and progress[-1] == 1.0
        assert all("message" in e for e in events if "progress" in e)
        done = [e for e in events if e.get("done")]
        assert len(done) == 1 and done[0]["exit"] in (0, 3) and done[0]["model"] == "tiny-test"
        assert run.flags == done[0]["flags"] and run.device == "cpu"
        written = sitk.ReadImage(str(temp_dir / background.OUTPUT_NAME))  # the child's file, before result()
        for get in ("GetSpacing", "GetOrigin", "GetDirection"):
            assert np.allclose(getattr(written, get)(), getattr(ct, get)(), rtol=0, atol=1e-9), get
        labels = run.result()
    finally:
        run.cleanup()
    assert not temp_dir.exists() and run.temp_dir is None
    assert run._process.poll() is not None  # nothing left running after cleanup
    _same_grid(labels, ct)

    # the same file through the CLI in this process
    src, out = tmp_path / "in.nrrd", tmp_path / "out.nrrd"
    sitk.WriteImage(ct, str(src), useCompression=False)
    assert main(["segment", str(src), str(out), "--model", str(tiny_package.path), "--device", "cpu"]) in (0, 3)
    expected = sitk.ReadImage(str(out))
    assert np.array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(expected))
    assert sitk.GetArrayFromImage(labels).any()


def test_cancel_ends_the_run_within_a_second_and_leaves_nothing(tiny_package):
    # 16 inference calls after the first progress line: the child is really mid-run when cancelled.
    ct, _ = make_phantom(size=(128, 112, 48), spacing=(3.0, 3.0, 5.0))
    run = SegmentationProcess().start(ct, model=tiny_package.path, device="cpu", env=_env())
    temp_dir, process = run.temp_dir, run._process
    try:
        events = _events_until_outcome(run, stop_at=lambda e: "progress" in e)
        assert any("progress" in e for e in events), events
        assert run.running and process.poll() is None, "the run ended before it could be cancelled"
        start = time.monotonic()
        run.cancel(timeout=1.0)
        latency = time.monotonic() - start
    finally:
        run.cleanup()
    print(f"cancel latency {latency * 1000:.0f} ms")
    assert latency < 1.0
    assert process.returncode is not None  # reaped: no zombie
    assert not Path(f"/proc/{process.pid}").exists() or sys.platform != "linux"
    if os.name == "posix":
        with pytest.raises(ProcessLookupError):  # nothing of its process group is left either
            os.killpg(process.pid, 0)
    assert not temp_dir.exists()
    assert run.cancelled and run.error == "segmentation cancelled" and not run.succeeded
    assert not any(e.get("done") for e in events + run.poll())
    with pytest.raises(Exception, match="cancelled"):
        run.result()


def test_bad_input_gives_the_error_and_no_result(tiny_package):
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    blank = sitk.Image(ct.GetSize(), sitk.sitkInt16) + 40
    blank.CopyInformation(ct)
    run = SegmentationProcess().start(blank, model=tiny_package.path, device="cpu", env=_env())
    temp_dir = run.temp_dir
    try:
        events = _events_until_outcome(run)
        assert not run.succeeded
        assert "constant" in run.error, run.error
        assert {"error": run.error} in events
        with pytest.raises(Exception, match="constant"):
            run.result()
        assert run.wait(OUTCOME_TIMEOUT_S)
    finally:
        run.cleanup()
    assert not temp_dir.exists()


@pytest.mark.skipif(os.name != "posix", reason="a shell script stands in for a crashing interpreter")
def test_a_child_that_dies_without_an_outcome_line_is_an_error(tmp_path):
    crash = tmp_path / "crashing-python"
    crash.write_text("#!/bin/sh\necho 'Segmentation fault (core dumped)' >&2\nexit 139\n")
    crash.chmod(0o755)
    ct, _ = make_phantom(size=(16, 16, 8), spacing=(6.0, 6.0, 10.0))
    run = SegmentationProcess().start(ct, python=crash)
    try:
        assert run.wait(30)
        assert run.poll() == [{"error": run.error}]
        assert "exit code 139" in run.error and "Segmentation fault" in run.error
        assert not run.succeeded and run.returncode == 139
    finally:
        run.cleanup()


def test_the_command_line_is_the_documented_one(tmp_path):
    assert python_executable() == sys.executable  # outside Slicer
    command = build_command(
        "/opt/Slicer/bin/PythonSlicer",
        tmp_path / "in.nrrd",
        tmp_path / "out.nrrd",
        model="btcv-ct-3d",
        device="cuda",
        organs=["liver", "spleen"],
        largest_component="all",
        fill_holes=True,
    )
    assert command == [
        "/opt/Slicer/bin/PythonSlicer",
        "-m",
        "AbdomenSegLib",
        "segment",
        str(tmp_path / "in.nrrd"),
        str(tmp_path / "out.nrrd"),
        "--progress-json",
        "--device",
        "cuda",
        "--largest-component",
        "all",
        "--input-intensity",
        "native",
        "--model",
        "btcv-ct-3d",
        "--organs",
        "liver,spleen",
        "--fill-holes",
    ]
    # every option is one the CLI accepts
    from AbdomenSegLib.cli import build_parser

    args = build_parser().parse_args(command[3:])
    assert args.progress_json and args.organs == "liver,spleen" and args.fill_holes and args.quality == "standard"
    # the fine second stage and mirroring reach the engine as the CLI's options
    high = build_command("python", "in.nrrd", "out.nrrd", quality="high", tta=True)
    assert high[-3:] == ["--tta", "--quality", "high"]
    args = build_parser().parse_args(high[3:])
    assert args.quality == "high" and args.tta
    # the engine is importable from the child's working directory (the package's parent folder)
    assert (background.PACKAGE_PARENT / "AbdomenSegLib" / "__main__.py").is_file()


def test_inside_slicer_the_interpreter_is_pythonslicer(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    (fake_bin / name).write_text("")
    (fake_bin / name).chmod(0o755)
    monkeypatch.setitem(sys.modules, "slicer", type(sys)("slicer"))
    sys.modules["slicer"].app = object()  # what only the Slicer application has
    monkeypatch.setenv("PATH", str(fake_bin))
    assert Path(python_executable()) == fake_bin / name


def test_start_failure_leaves_no_temp_folder(tmp_path):
    ct, _ = make_phantom(size=(16, 16, 8), spacing=(6.0, 6.0, 10.0))
    run = SegmentationProcess()
    with pytest.raises(OSError):
        run.start(ct, python=tmp_path / "no-such-python", temp_root=tmp_path)
    assert run.temp_dir is None and [p.name for p in tmp_path.iterdir()] == []
