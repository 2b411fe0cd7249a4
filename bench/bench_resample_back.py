"""Benchmark: back to the input grid (Segmenter._to_input_grid, smooth) with the per-organ-box resampling
("boxes", Segmenter._smooth_back) against resample_back.py ("cells"), on a 512x512x200 CT.

    python bench/bench_resample_back.py [--slices 200] [--repeat 3] [--rounds 2]

The input is bench_segment.py's (a real BTCV case in HU resampled to 512x512 in-plane, or the phantom).
The default model's probabilities are computed once; then each method runs in fresh processes (alternating,
`--rounds` times, `--repeat` runs each) so that its peak RSS is its own. Prints seconds per run, the peak
memory the method added (RSS high-water mark over the loaded data; numpy's own peak from tracemalloc),
and how the two label maps differ (voxels, per-organ Dice). Note the machine's load: timings are noisy.
"""

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def infer_once(source: Path, tmp: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from AbdomenSegLib.inference.predictor import get_segmenter
    from AbdomenSegLib.inference.segmenter import Options
    from AbdomenSegLib.io.images import read_image
    from AbdomenSegLib.preprocessing.pipeline import to_model_space

    segmenter = get_segmenter(None, "cpu", log=lambda m: None)
    card = segmenter.card
    image = read_image(str(source))
    space = to_model_space(image, card["spacing"], card["intensity"], orientation=card.get("orientation", "LPS"))
    t = time.perf_counter()
    probabilities = segmenter._infer(space.array[space.box], Options(), lambda f, m: None, None)
    np.save(tmp / "probabilities.npy", probabilities)
    sitk.WriteImage(space.image, str(tmp / "model.nrrd"))
    (tmp / "space.pkl").write_bytes(pickle.dumps((space.box, space.array.shape)))
    return {
        "infer_seconds": round(time.perf_counter() - t, 1),
        "model_grid": list(space.array.shape),
        "body_box": [[int(s.start), int(s.stop)] for s in space.box],
        "channels": int(probabilities.shape[0]),
    }


def run_method(method: str, source: Path, tmp: Path, repeat: int) -> dict:
    import tracemalloc

    import numpy as np
    import SimpleITK as sitk

    from AbdomenSegLib.inference.predictor import get_segmenter
    from AbdomenSegLib.io.images import read_image
    from AbdomenSegLib.preprocessing.pipeline import ModelSpace

    segmenter = get_segmenter(None, "cpu", log=lambda m: None)
    segmenter.resample_back = method
    reference = read_image(str(source))
    probabilities = np.load(tmp / "probabilities.npy")
    box, shape = pickle.loads((tmp / "space.pkl").read_bytes())
    space = ModelSpace(sitk.ReadImage(str(tmp / "model.nrrd")), np.zeros(shape, dtype=np.float32), box)
    before = rss_gb()
    seconds = []
    for _ in range(repeat):
        t = time.perf_counter()
        labels = segmenter._to_input_grid(probabilities, space, reference, True)
        seconds.append(round(time.perf_counter() - t, 3))
    rss_added = rss_gb() - before
    tracemalloc.start()
    segmenter._to_input_grid(probabilities, space, reference, True)
    numpy_peak = tracemalloc.get_traced_memory()[1] / 1024**3
    tracemalloc.stop()
    np.save(tmp / f"labels_{method}.npy", labels)
    return {
        "method": method,
        "seconds": seconds,
        "peak_rss_added_gb": round(rss_added, 3),
        "numpy_peak_gb": round(numpy_peak, 3),
        "output_gb": round(labels.nbytes / 1024**3, 3),
    }


def compare(tmp: Path) -> dict:
    import numpy as np

    old, new = np.load(tmp / "labels_boxes.npy"), np.load(tmp / "labels_cells.npy")
    dice = {}
    for organ in np.union1d(np.unique(old), np.unique(new)):
        if organ:
            a, b = old == organ, new == organ
            dice[int(organ)] = round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 6)
    return {
        "differing_voxels": int((old != new).sum()),
        "organ_voxels": int(((old > 0) | (new > 0)).sum()),
        "input_voxels": int(old.size),
        "min_organ_dice": min(dice.values()) if dice else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # method source tmp
    args = parser.parse_args()
    if args.child:
        method, source, tmp = args.child
        result = (
            infer_once(Path(source), Path(tmp))
            if method == "infer"
            else run_method(method, Path(source), Path(tmp), args.repeat)
        )
        print(json.dumps(result))
        return
    from bench_segment import make_input

    def child(method, source, tmp):
        cmd = [sys.executable, __file__, "--repeat", str(args.repeat), "--child", method, str(source), str(tmp)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    print("load average at start:", [round(v, 2) for v in os.getloadavg()], f"({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "ct512.nii.gz"
        print("input:", make_input(source, args.slices))
        print(json.dumps(child("infer", source, tmp)))
        runs = {"boxes": [], "cells": []}
        for _ in range(args.rounds):
            for method in runs:
                result = child(method, source, tmp)
                runs[method].append(result)
                print(json.dumps(result))
        for method, results in runs.items():
            seconds = sorted(s for r in results for s in r["seconds"])
            print(
                f"{method}: min {seconds[0]:.3f} s, median {seconds[len(seconds) // 2]:.3f} s "
                f"over {len(seconds)} runs; "
                f"peak RSS added {max(r['peak_rss_added_gb'] for r in results):.3f} GB, "
                f"numpy peak {max(r['numpy_peak_gb'] for r in results):.3f} GB"
            )
        print("difference:", json.dumps(compare(tmp)))
    print("load average at end:", [round(v, 2) for v in os.getloadavg()])


if __name__ == "__main__":
    main()
