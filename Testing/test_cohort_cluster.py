"""Cohorts on a Dask cluster (AbdomenSegLib/cohort/cluster.py, manifest.py): real clusters on localhost.

A LocalCluster of 2 worker processes, a `dask scheduler` with two `dask worker` processes started as a user on a
cluster would, and a worker killed in the middle of a case. Outputs must be the sequential run's, voxel for voxel.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("distributed")

from AbdomenSegLib.cli import main  # noqa: E402
from AbdomenSegLib.io.phantom import make_phantom  # noqa: E402
from helpers import ROOT, write_phantom_dataset  # noqa: E402


def _manifest(folder) -> dict:
    with open(Path(folder) / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len({r["case"] for r in rows}) == len(rows), "one row per case"
    return {r["case"]: r for r in rows}


def _same_outputs(a, b, names):
    for name in names:
        x, y = sitk.ReadImage(str(Path(a) / f"{name}.nii.gz")), sitk.ReadImage(str(Path(b) / f"{name}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(x), sitk.GetArrayFromImage(y)), name
        assert x.GetSize() == y.GetSize() and x.GetOrigin() == y.GetOrigin(), name
        assert x.GetSpacing() == y.GetSpacing() and x.GetDirection() == y.GetDirection(), name


def _no_leftovers(folder):
    left = [p.name for p in Path(folder).iterdir() if p.name.startswith(".")]
    assert not left, f"partial files or locks left: {left}"


@pytest.fixture()
def cohort(tmp_path):
    images, refs = write_phantom_dataset(tmp_path / "data", cases=4)
    return images, refs


@pytest.mark.slow
def test_local_cluster_of_two_workers_matches_the_sequential_run(tmp_path, cohort, tiny_package, capsys):
    images, refs = cohort
    (images / "broken.nii.gz").write_bytes(b"not an image")  # one case fails; the others go on
    common = ["--model", str(tiny_package.path), "--device", "cpu", "--no-qc-png"]
    seq, dist = tmp_path / "seq", tmp_path / "dist"
    assert main(["segment", str(images), str(seq)] + common) == 1
    capsys.readouterr()
    assert main(["segment", str(images), str(dist), "--workers", "2"] + common) == 1
    err = capsys.readouterr().err
    assert "local Dask cluster: 2 worker process(es)" in err and "4 written" in err and "1 failed" in err
    names = [f"case{i}" for i in range(4)]
    _same_outputs(seq, dist, names)
    _no_leftovers(dist)

    # The same manifest from both paths: status, model, sha256, volumes; the worker is one of the two processes.
    ms, md = _manifest(seq), _manifest(dist)
    assert set(md) == set(names) | {"broken"}
    assert md["broken"]["status"] == "failed" and "could not be read" in md["broken"]["error"]
    assert [md[n]["status"] for n in names] == ["done"] * 4
    assert md["case0"]["sha256"] == tiny_package["sha256"] and md["case0"]["model"] == "tiny-test"
    assert md["case0"]["device"] == "cpu" and md["case0"]["output"] == str((dist / "case0.nii.gz").resolve())
    assert len({md[n]["worker"] for n in names}) == 2, "both workers worked"
    assert all(md[n]["worker"].split(":")[1] != str(os.getpid()) for n in names), "the client segmented nothing"
    volumes = [k for k in md["case0"] if k.endswith("_ml")]
    assert volumes and all(ms[n][k] == md[n][k] for n in names for k in volumes + ["qc_flags", "status"])
    qc_rows = (dist / "qc" / "qc.csv").read_text(encoding="utf-8").splitlines()
    assert len(qc_rows) == 1 + 4 and (dist / "qc" / "case3.json").is_file()

    # Re-running resumes: done cases are skipped (their rows stay), the failed one is retried.
    stamp = (dist / "case0.nii.gz").stat().st_mtime_ns
    sitk.WriteImage(make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0), seed=9)[0], str(images / "broken.nii.gz"))
    assert main(["segment", str(images), str(dist), "--workers", "2"] + common) in (0, 3)
    again = _manifest(dist)
    assert again["broken"]["status"] == "done" and not again["broken"]["error"]
    assert {n: again[n] for n in names} == {n: md[n] for n in names}
    assert (dist / "case0.nii.gz").stat().st_mtime_ns == stamp
    assert "4 skipped, 0 failed" in capsys.readouterr().err

    # evaluate over the folder on the cluster: the same CSV as here, row for row.
    args = ["evaluate", str(seq), str(refs), "--overwrite"]
    assert main(args + ["--csv", str(tmp_path / "here.csv")]) == 0
    assert main(args + ["--csv", str(tmp_path / "there.csv"), "--workers", "2"]) == 0
    assert (tmp_path / "here.csv").read_bytes() == (tmp_path / "there.csv").read_bytes()


@pytest.mark.slow
def test_a_running_dask_scheduler_and_two_dask_workers(tmp_path, cohort, tiny_package, capsys):
    """As on a cluster: `dask scheduler` and two `dask worker` processes, started by hand; segment --scheduler,
    evaluate --scheduler-file."""
    from distributed import Client

    images, refs = cohort
    dask = Path(sys.executable).parent / "dask"
    if not dask.exists():
        pytest.skip("no `dask` command beside this Python")
    scheduler_file = tmp_path / "scheduler.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name, *command):
        out = open(logs / f"{name}.log", "w")
        procs.append(
            subprocess.Popen(
                [str(dask), *command],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        start(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
        )
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert scheduler_file.exists(), (logs / "scheduler.log").read_text()
        for i in range(2):
            start(
                f"worker{i}",
                "worker",
                "--scheduler-file",
                str(scheduler_file),
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--name",
                f"w{i}",
                "--local-directory",
                str(tmp_path / f"w{i}"),
            )
        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
            address = client.scheduler.address

        common = ["--model", str(tiny_package.path), "--device", "cpu", "--no-qc-png"]
        assert main(["segment", str(images), str(tmp_path / "seq")] + common) in (0, 3)
        assert main(["segment", str(images), str(tmp_path / "dist"), "--scheduler", address] + common) in (0, 3)
        err = capsys.readouterr().err
        assert f"Dask cluster {address}: 2 worker(s)" in err and "4 written" in err
        names = [f"case{i}" for i in range(4)]
        _same_outputs(tmp_path / "seq", tmp_path / "dist", names)
        _no_leftovers(tmp_path / "dist")
        rows = _manifest(tmp_path / "dist")
        assert all(rows[n]["status"] == "done" for n in names) and len({rows[n]["worker"] for n in names}) == 2

        assert (
            main(
                [
                    "evaluate",
                    str(tmp_path / "dist"),
                    str(refs),
                    "--csv",
                    str(tmp_path / "m.csv"),
                    "--scheduler-file",
                    str(scheduler_file),
                ]
            )
            == 0
        )
        assert {r["case"] for r in csv.DictReader(open(tmp_path / "m.csv"))} == set(names)
    finally:
        for proc in reversed(procs):
            with _suppress():
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


def _suppress():
    import contextlib

    return contextlib.suppress(ProcessLookupError, PermissionError)


@pytest.mark.slow
def test_a_worker_killed_mid_case_every_case_done_exactly_once(tmp_path, tiny_package):
    """SIGKILL the worker holding a case's lock: Dask runs the case again on a worker, which takes over the dead
    worker's lock; the run ends with every case done once, no partial file and no lock left."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        ct, _ = make_phantom(size=(96, 80, 32), spacing=(4.0, 4.0, 7.0), seed=i)
        sitk.WriteImage(ct, str(images / f"case{i}.nii.gz"))
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "AbdomenSegLib",
        "segment",
        str(images),
        str(out),
        "--workers",
        "2",
        "--model",
        str(tiny_package.path),
        "--device",
        "cpu",
        "--no-qc-png",
    ]
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, victim_case = None, None
    try:
        deadline = time.time() + 120
        while killed is None and time.time() < deadline and run.poll() is None:
            for lock in out.glob(".case*.nii.gz.lock") if out.is_dir() else ():
                try:
                    pid = int(lock.read_text().split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if pid != run.pid:
                    os.kill(pid, signal.SIGKILL)
                    killed, victim_case = pid, lock.name[1 : -len(".nii.gz.lock")]
                    break
            time.sleep(0.01)
        stdout, stderr = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert killed is not None, f"no case was caught in progress:\n{stderr}"
    assert run.returncode in (0, 3), stderr
    rows = _manifest(out)
    names = [f"case{i}" for i in range(6)]
    assert sorted(rows) == names and all(rows[n]["status"] == "done" for n in names), rows
    assert rows[victim_case]["worker"] != f"{os.uname().nodename}:{killed}", "the killed worker did not finish it"
    assert "6 written" in stderr and "0 failed" in stderr
    _no_leftovers(out)
    for name in names:  # every output whole
        assert sitk.ReadImage(str(out / f"{name}.nii.gz")).GetSize() == (96, 80, 32)


@pytest.mark.slow
def test_compare_on_a_cluster_gives_the_same_table(tmp_path, tiny_package):
    images, refs = write_phantom_dataset(tmp_path / "data", cases=2)
    refs.rename(tmp_path / "data" / "labels")
    args = [
        "compare",
        "--models",
        str(tiny_package.path),
        "--data",
        str(tmp_path / "data"),
        "--labels",
        "abdomenseg",
        "--device",
        "cpu",
    ]
    assert main(args + ["--out", str(tmp_path / "here")]) == 0
    assert main(args + ["--out", str(tmp_path / "there"), "--workers", "1"]) == 0
    for name in ("metrics.csv", "comparison.csv", "comparison.md"):
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes(), name


def test_gpu_pinning_one_worker_per_gpu_each_its_own(tmp_path):
    """--device cuda with --workers N: worker i sees only GPU i (CUDA_VISIBLE_DEVICES, set before it starts).
    Checked here with the GPU list given, on the CPU."""
    from AbdomenSegLib.cohort.cluster import connect
    from AbdomenSegLib.core.errors import AbdomenSegError

    with pytest.raises(AbdomenSegError, match="one worker per GPU"):
        with connect(workers=3, device="cuda", gpus=["0", "1"], log=lambda m: None):
            pass
    with connect(workers=2, device="cpu", gpus=["3", "5"], log=lambda m: None) as (client, settings):
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["3", "5"]


def test_cluster_options_are_checked_before_any_work(tmp_path, tiny_package, capsys):
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_phantom(size=(32, 32, 16))[0], str(ct))
    assert main(["segment", str(ct), str(tmp_path / "o.nii.gz"), "--workers", "2"]) == 2
    assert "set of cases" in capsys.readouterr().err and not (tmp_path / "o.nii.gz").exists()
    with pytest.raises(SystemExit):
        main(["segment", str(tmp_path), str(tmp_path / "out"), "--workers", "0"])
    with pytest.raises(SystemExit):
        main(["segment", str(tmp_path), str(tmp_path / "out"), "--workers", "2", "--scheduler", "tcp://x:1"])
    missing = tmp_path / "nowhere.json"
    assert (
        main(
            [
                "segment",
                str(tmp_path),
                str(tmp_path / "out"),
                "--scheduler-file",
                str(missing),
                "--model",
                str(tiny_package.path),
            ]
        )
        == 2
    )
    assert "scheduler file" in capsys.readouterr().err


def test_manifest_resume_rules(tmp_path):
    from AbdomenSegLib.cohort.manifest import Manifest, case_row, read_manifest
    from AbdomenSegLib.core.errors import AbdomenSegError

    m = Manifest(tmp_path)
    m.record(
        case_row(
            "a",
            "in/a",
            tmp_path / "a.nii.gz",
            "done",
            seconds=1.234,
            device="cpu",
            model="x",
            qc_columns={"qc_warnings": 0, "liver_ml": 1.5, "spleen_ml": 2.0},
        )
    )
    m.record(case_row("b", "in/b", tmp_path / "b.nii.gz", "failed", error="boom"))
    m.write()
    rows = read_manifest(tmp_path / "manifest.csv")
    assert rows["a"]["seconds"] == "1.23" and rows["b"]["error"] == "boom"
    header = (tmp_path / "manifest.csv").read_text().splitlines()[0].split(",")
    assert header[:10] == [
        "case",
        "input",
        "output",
        "status",
        "seconds",
        "worker",
        "device",
        "model",
        "sha256",
        "error",
    ] and header.index("liver_ml") < header.index("spleen_ml")
    again = Manifest(tmp_path)
    assert again.skipped("a", "in/a", tmp_path / "a.nii.gz")["status"] == "done"  # an earlier done row stays
    assert again.skipped("c", "in/c", tmp_path / "c.nii.gz")["status"] == "skipped"  # made by no recorded run
    (tmp_path / "manifest.csv").write_text("garbage\x00,\n")
    with pytest.raises(AbdomenSegError, match="manifest"):
        Manifest(tmp_path)
