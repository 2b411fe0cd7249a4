"""Benchmark: cases per hour of a folder run, sequential and on a local Dask cluster of 1 and 2 workers.

    python bench/bench_cohort.py [--cases 6] [--model NAME] [--device cpu] [--workers 1,2]

Inputs: --cases copies of the BTCV CT volume btcv_img0001 from ../shared/data (stored as the 0-255 window, so the
runs pass --input-intensity btcv_uint8), or of a synthetic phantom of a similar size when the data are absent.
Every run is a fresh `python -m AbdomenSegLib segment IN OUT --no-qc-png` process timed from outside, so start-up
(imports, model load, for Dask the cluster and its workers) counts. Each mode runs once on 1 case and once on all of them:

- cases/hour: all cases over the whole process's wall time;
- steady seconds per case: (T(N) - T(1)) / (N - 1), the start-up taken out;
- start-up: T(1) minus one steady case;
- per-case overhead of the distributed path: its steady seconds per case (1 worker) minus the sequential one's.
"""

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BTCV = ROOT.parent / "shared" / "data" / "btcv_ct" / "images"


def make_inputs(folder: Path, count: int) -> list:
    folder.mkdir(parents=True)
    source = BTCV / "btcv_img0001.nii.gz"
    if source.is_file():  # copies of one case: every case costs the same, so T(N) - T(1) is N - 1 cases
        for i in range(count):
            shutil.copy(source, folder / f"case{i}.nii.gz")
        return ["--input-intensity", "btcv_uint8"]
    import SimpleITK as sitk

    from AbdomenSegLib.io.phantom import make_phantom

    ct, _ = make_phantom(size=(256, 256, 120), spacing=(1.5, 1.5, 3.0), seed=0)
    for i in range(count):
        sitk.WriteImage(ct, str(folder / f"case{i}.nii.gz"))
    return []


def run(inputs: Path, out: Path, extra: list) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "AbdomenSegLib", "segment", str(inputs), str(out), "--no-qc-png", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 3):
        raise SystemExit(f"run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(r["status"] == "done" for r in rows), rows
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--model", help="model name or package folder (default: the catalog's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", default="1,2", help="comma-separated numbers of Dask workers")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    try:
        all_in, one_in = work / "all", work / "one"
        extra = make_inputs(all_in, args.cases)
        one_in.mkdir()
        first = sorted(all_in.iterdir())[0]
        shutil.copy(first, one_in / first.name)
        extra += ["--device", args.device] + (["--model", args.model] if args.model else [])
        modes = [("sequential", [])] + [(f"{n} worker(s)", ["--workers", n]) for n in args.workers.split(",")]
        source = "BTCV CT" if extra[:1] == ["--input-intensity"] else "synthetic phantom"
        import os

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"{args.cases} {source} cases, device {args.device}, {cpus} CPU cores")
        print(f"{'mode':14s} {'T(1) s':>8s} {'T(N) s':>8s} {'cases/h':>8s} {'s/case':>7s} {'start-up s':>10s}")
        steady = {}
        for name, flags in modes:
            t1 = run(one_in, work / "out1", extra + flags)
            tn = run(all_in, work / "outN", extra + flags)
            per_case = (tn - t1) / max(1, args.cases - 1)
            steady[name] = per_case
            print(
                f"{name:14s} {t1:8.1f} {tn:8.1f} {args.cases / tn * 3600:8.0f} {per_case:7.2f} {t1 - per_case:10.1f}",
                flush=True,
            )
        one = next((k for k in steady if k.startswith("1 ")), None)
        if one:
            print(
                f"per-case overhead of the distributed path (1 worker vs sequential): "
                f"{steady[one] - steady['sequential']:+.2f} s"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
