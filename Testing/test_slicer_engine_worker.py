"""The long-lived engine process of the Slicer panel (worker.py + engine_worker.py): real processes throughout."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.io.phantom import make_phantom
from AbdomenSegLib.slicer.background import SegmentationProcess
from AbdomenSegLib.slicer.engine_worker import EngineWorker

OUTCOME_TIMEOUT_S = 90


def _env():
    return dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", HF_HUB_OFFLINE="1")


def _run(worker, image, package, **kw):
    run = SegmentationProcess(worker=worker).start(image, model=package.path, device="cpu", env=_env(), **kw)
    assert run.wait(OUTCOME_TIMEOUT_S), "no outcome in time"
    return run


def _gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def worker():
    w = EngineWorker()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))[0]


def test_runs_share_one_process_and_give_the_cli_result(tmp_path, tiny_package, worker, phantom):
    src, out = tmp_path / "in.nrrd", tmp_path / "out.nrrd"
    sitk.WriteImage(phantom, str(src), useCompression=False)
    assert main(["segment", str(src), str(out), "--model", str(tiny_package.path), "--device", "cpu"]) in (0, 3)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    pids = []
    for _ in range(3):
        run = _run(worker, phantom, tiny_package)
        try:
            assert run.succeeded, run.error
            events = run.poll()
            assert [e for e in events if e.get("done")] and any("progress" in e for e in events)
            labels = run.result()
            log = (run.temp_dir / "segment.log").read_text(encoding="utf-8")
        finally:
            run.cleanup()
        assert np.array_equal(sitk.GetArrayFromImage(labels), expected)
        assert labels.GetDirection() == phantom.GetDirection() and labels.GetOrigin() == phantom.GetOrigin()
        assert "model tiny-test on cpu" in log  # each run's log is its own
        pids.append(worker.pid)
    assert worker.starts == 1 and len(set(pids)) == 1 and worker.alive and not worker.busy


def test_a_bad_input_is_an_error_and_the_worker_goes_on(tiny_package, worker, phantom):
    blank = sitk.Image(phantom.GetSize(), sitk.sitkInt16) + 40
    blank.CopyInformation(phantom)
    run = _run(worker, blank, tiny_package)
    run.cleanup()
    assert "constant" in run.error
    pid = worker.pid
    good = _run(worker, phantom, tiny_package)
    succeeded = good.succeeded
    good.cleanup()
    assert succeeded and worker.pid == pid and worker.starts == 1


def test_cancel_ends_the_worker_and_the_next_run_starts_a_fresh_one(tiny_package, worker):
    big, _ = make_phantom(size=(128, 112, 48), spacing=(3.0, 3.0, 5.0))
    run = SegmentationProcess(worker=worker).start(big, model=tiny_package.path, device="cpu", env=_env())
    temp_dir, deadline = run.temp_dir, time.monotonic() + OUTCOME_TIMEOUT_S
    while not any("progress" in e for e in run.poll()):  # really mid-run
        assert time.monotonic() < deadline and run.running
        time.sleep(0.02)
    pid = worker.pid
    start = time.monotonic()
    run.cancel(timeout=1.0)
    assert time.monotonic() - start < 1.5
    assert _gone(pid, 2.0) and not worker.alive and not temp_dir.exists()
    assert run.cancelled and run.error == "segmentation cancelled" and not run.succeeded
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left
        os.killpg(pid, 0)
    again = _run(worker, make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0))[0], tiny_package)
    succeeded = again.succeeded
    again.cleanup()
    assert succeeded and worker.starts == 2


def test_a_worker_that_dies_mid_run_is_an_error_with_its_log(tiny_package, worker):
    big, _ = make_phantom(size=(128, 112, 48), spacing=(3.0, 3.0, 5.0))
    run = SegmentationProcess(worker=worker).start(big, model=tiny_package.path, device="cpu", env=_env())
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while not any("progress" in e for e in run.poll()):
        assert time.monotonic() < deadline and run.running
        time.sleep(0.02)
    os.kill(worker.pid, 9)  # a crash (out of memory killer, a segfault in a native library)
    assert run.wait(10)
    run.cleanup()
    assert not run.succeeded and "stopped with exit code -9" in run.error
    again = _run(worker, make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0))[0], tiny_package)
    succeeded = again.succeeded
    again.cleanup()
    assert succeeded and worker.starts == 2


@pytest.mark.slow
def test_an_idle_worker_exits_and_is_replaced(tiny_package, phantom):
    worker = EngineWorker(idle_exit_s=2.0)
    try:
        first = _run(worker, phantom, tiny_package)
        assert first.succeeded, first.error
        first.cleanup()
        pid = worker.pid
        assert _gone(pid, 30.0), "the idle worker did not exit"
        second = _run(worker, phantom, tiny_package)
        assert second.succeeded, second.error
        second.cleanup()
        assert worker.starts == 2
    finally:
        worker.stop()


def test_the_worker_ends_with_its_parent(tmp_path):
    """Slicer quitting (or crashing) must not leave an engine process holding a model in memory."""
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from AbdomenSegLib.slicer.engine_worker import EngineWorker;"
        "w = EngineWorker(temp_root=sys.argv[2]).start(); print(w.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen(  # killed below, so its worker folder stays: in tmp_path, not the system's temp
        [sys.executable, "-c", script, str(os.getcwd()), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(tmp_path),
        env=dict(_env(), PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        pid = int(parent.stdout.readline())
        assert not _gone(pid, 1.0)
        parent.kill()
        parent.wait()
        assert _gone(pid, 60.0), "the worker outlived its parent"
    finally:
        parent.kill()
        try:
            os.killpg(pid, 9)
        except (ProcessLookupError, UnboundLocalError, PermissionError):
            pass


def test_a_busy_worker_is_never_handed_a_second_run(tiny_package, worker, phantom):
    big, _ = make_phantom(size=(128, 112, 48), spacing=(3.0, 3.0, 5.0))
    first = SegmentationProcess(worker=worker).start(big, model=tiny_package.path, device="cpu", env=_env())
    try:
        with pytest.raises(RuntimeError, match="busy"):
            SegmentationProcess(worker=worker).start(phantom, model=tiny_package.path, device="cpu", env=_env())
        assert first.wait(OUTCOME_TIMEOUT_S) and first.succeeded
    finally:
        first.cleanup()
