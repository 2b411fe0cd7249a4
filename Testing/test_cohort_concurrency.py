"""Issue 31, round two: folder runs stay consistent under concurrency and signals. Two real `segment` processes
into one folder share the work (each case once, the manifest right whichever run wrote it last); SIGTERM and Ctrl-C
leave no lock or temporary file and a manifest holding every finished output; a Dask run refuses a folder another
run is writing."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.cohort.manifest import Manifest, case_row, read_manifest
from AbdomenSegLib.cohort.sharing import share_folder
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.io.phantom import make_phantom
from helpers import ROOT

RUN_TIMEOUT_S = 240  # two real runs on a loaded 2-core machine take ~20 s; this only bounds a hang


def _cases(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        ct, _ = make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0), seed=i)
        sitk.WriteImage(ct, str(folder / f"case{i}.nii.gz"))
    return folder


def _segment_process(images, out, model, *extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "AbdomenSegLib", "segment", str(images), str(out), "--model", str(model)]
    return subprocess.Popen(
        argv + ["--no-qc-png", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )


def _outputs(folder: Path) -> list:
    """The finished outputs (pathlib's `*` also matches hidden names: the `.part-*` files being written)."""
    return sorted(p.name for p in folder.glob("case*.nii.gz"))


def _leftovers(folder: Path) -> list:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".lock") or p.name.startswith(".part-")]


def _valid_label_map(path: Path, image: Path) -> bool:
    labels, scan = sitk.ReadImage(str(path)), sitk.ReadImage(str(image))
    same_grid = labels.GetSize() == scan.GetSize() and labels.GetSpacing() == scan.GetSpacing()
    return same_grid and labels.GetOrigin() == scan.GetOrigin() and labels.GetDirection() == scan.GetDirection()


def _stop(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def _two_runs(images, out, model, *extra) -> tuple:
    runs = [_segment_process(images, out, model, *extra) for _ in range(2)]
    try:
        logs = [run.communicate(timeout=RUN_TIMEOUT_S)[1] for run in runs]
    finally:
        _stop(runs)
    return runs, logs


def _each_case_done_once(images, out, runs, logs, cases, *, once=True) -> None:
    for run, log in zip(runs, logs):
        assert run.returncode in (0, 3), log  # 3: the untrained model's results are flagged; never 1 (a failure)
        assert "Traceback" not in log and ", 0 failed" in log, log
    rows = read_manifest(out / "manifest.csv")
    assert sorted(rows) == cases
    assert {r["status"] for r in rows.values()} == {"done"}, rows
    with open(out / "manifest.csv", newline="", encoding="utf-8") as handle:
        assert [r["case"] for r in csv.DictReader(handle)] == cases  # each case once
    assert {r["worker"] for r in rows.values()} <= {f"{os.uname().nodename}:{run.pid}" for run in runs}, rows
    for case in cases:
        assert _valid_label_map(out / f"{case}.nii.gz", images / f"{case}.nii.gz")
    # Each case segmented once, by one of the two (a case the other run held was left to it, not failed).
    written = [line.split()[1] for log in logs for line in log.splitlines() if " -> " in line]
    assert (sorted(written) if once else sorted(set(written))) == cases, logs
    assert not _leftovers(out)


def test_two_runs_into_one_folder_share_the_work(tmp_path, tiny_package):
    images, out = _cases(tmp_path / "images", 6), tmp_path / "out"
    cases = [f"case{i}" for i in range(6)]
    runs, logs = _two_runs(images, out, tiny_package.path)
    _each_case_done_once(images, out, runs, logs, cases)
    # Two --overwrite runs leave alone the outputs the other writes meanwhile. (An output the other run wrote before
    # this one loaded its model was there when it began: replacing it is what --overwrite asks, so not asserted.)
    runs, logs = _two_runs(images, out, tiny_package.path, "--overwrite")
    _each_case_done_once(images, out, runs, logs, cases, once=False)


def test_a_run_whose_cases_another_run_holds_exits_0_and_says_so(tmp_path, tiny_package, capsys):
    """The other run (a real process holding each output's lock and announcing itself in the folder) keeps every
    case: this run leaves them to it, records no `failed` row, exits 0 and says why it segmented nothing."""
    images, out = _cases(tmp_path / "images", 3), tmp_path / "out"
    outputs = [str(out / f"case{i}.nii.gz") for i in range(3)]
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import contextlib, sys, time; sys.path.insert(0, sys.argv[1])\n"
            "from AbdomenSegLib.cohort.sharing import share_folder\n"
            "from AbdomenSegLib.io.files import claim_output\n"
            "with contextlib.ExitStack() as stack:\n"
            " stack.enter_context(share_folder(sys.argv[2], cluster=False))\n"
            " for path in sys.argv[3:]: stack.enter_context(claim_output(path))\n"
            " print('held', flush=True); time.sleep(60)",
            str(ROOT),
            str(out),
            *outputs,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["segment", str(images), str(out), "--model", str(tiny_package.path), "--no-qc-png"])
        err = capsys.readouterr().err
        assert code == 0, err
        assert f"another run (process {holder.pid} on " in err and "is writing" in err
        assert err.count(f"being segmented by another run (process {holder.pid} on ") == 3, err
        assert "0 written" in err and "3 left to another run, 0 failed" in err and "segmented no case" in err
        assert "failed" not in {r["status"] for r in read_manifest(out / "manifest.csv").values()}
        assert not any(Path(p).exists() for p in outputs)
        # The holder's locks are its own: this run removed none of them, and left none of its own.
        assert len(list(out.glob(".*.lock"))) == 4
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_dask_run_refuses_a_folder_another_run_writes(tmp_path, tiny_package, capsys):
    pytest.importorskip("distributed")
    images, out = _cases(tmp_path / "images", 2), tmp_path / "out"
    argv = ["segment", str(images), str(out), "--model", str(tiny_package.path), "--workers", "1"]
    with share_folder(out, cluster=False):
        start = time.perf_counter()
        assert main(argv) == 2
        assert time.perf_counter() - start < 30  # at once: no cluster started, no model loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: another AbdomenSeg run (process ") and "a Dask run cannot share" in err[-1]
    assert "wait for it to finish or choose another output folder" in err[-1]
    assert not _leftovers(out) and not _outputs(out)
    # And a run on this machine refuses a folder a Dask run writes.
    with share_folder(out, cluster=True), pytest.raises(AbdomenSegError, match="on a Dask cluster"):
        with share_folder(out, cluster=False):
            pass
    assert not _leftovers(out)


def test_manifest_writes_merge_the_other_runs_rows(tmp_path):
    """Two runs' manifests of one folder, written in turn: neither loses the other's rows, and a `skipped` row of
    the run that found an output another run had just written yields to that run's `done` row."""
    first, second = Manifest(tmp_path), Manifest(tmp_path)
    first.record(case_row("a", "a.nii", tmp_path / "a.nii.gz", "done", worker="h:1"))
    second.record(case_row("b", "b.nii", tmp_path / "b.nii.gz", "done", worker="h:2"))
    second.record(case_row("a", "a.nii", tmp_path / "a.nii.gz", "skipped", worker=""))
    first.write()
    second.write()
    first.record(case_row("c", "c.nii", tmp_path / "c.nii.gz", "failed", worker="h:1", error="unreadable"))
    first.write()
    rows = read_manifest(tmp_path / "manifest.csv")
    assert {c: (r["status"], r["worker"]) for c, r in rows.items()} == {
        "a": ("done", "h:1"),
        "b": ("done", "h:2"),
        "c": ("failed", "h:1"),
    }
    assert first.counts() == {"done": 2, "skipped": 0, "failed": 1}
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize(
    "sent,code,said", [(signal.SIGTERM, 143, "cancelled (SIGTERM)"), (signal.SIGINT, 130, "cancelled")]
)
def test_a_signal_leaves_no_lock_and_a_manifest_of_every_finished_case(tmp_path, tiny_package, sent, code, said):
    images, out = _cases(tmp_path / "images", 6), tmp_path / "out"
    run = _segment_process(images, out, tiny_package.path)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not _outputs(out) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert run.poll() is None, "the run ended before the first case was written"
        run.send_signal(sent)
        err = run.communicate(timeout=60)[1]
    finally:
        _stop([run])
    assert run.returncode == code, err
    assert err.strip().splitlines()[-1] == said and "Traceback" not in err, err
    assert not _leftovers(out), _leftovers(out)
    finished = _outputs(out)
    rows = read_manifest(out / "manifest.csv")
    assert finished and sorted(Path(r["output"]).name for r in rows.values()) == finished, (finished, rows)
    assert {r["status"] for r in rows.values()} == {"done"}
    for name in finished:
        assert _valid_label_map(out / name, images / name)


def test_main_puts_the_previous_sigterm_handler_back(tmp_path):
    """The Slicer engine worker calls main() once per request: no handler of ours stays installed."""
    before = signal.getsignal(signal.SIGTERM)
    assert main(["segment", str(tmp_path / "missing.nii.gz"), str(tmp_path / "out.nii.gz")]) == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_folder_run_into_an_immutable_folder_is_refused_before_any_work(tmp_path, tiny_package, capsys):
    images, out = _cases(tmp_path / "images", 2), tmp_path / "out"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        assert main(["segment", str(images), str(out), "--model", str(tiny_package.path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: cannot write in the output folder") and "Traceback" not in "\n".join(err)
    finally:
        subprocess.run(["chattr", "-i", str(out)])
    assert not list(out.iterdir())
