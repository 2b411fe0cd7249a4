"""Benchmark: the Slicer panel's Segment, click to organs in the scene, first and later clicks.

    python bench/bench_slicer_run.py [--slices 200] [--model NAME] [--repeats 3]

What the panel does on Segment, on Slicer's real MRML (the slicer-core wheel; the Qt panel itself is not
here): BackgroundRun from its creation (the volume node read out of MRML, written for the engine) until the
segmentation node holds the organs, plus the organ-volume table the panel shows next. Two ways:
- a process per run (the panel before the engine worker: every click pays Python start-up and model load);
- the engine worker (engine_worker.py): the first click starts it, later clicks reuse it.
The input is bench_segment.py's 512x512xN CT (a real BTCV case in HU, or the phantom without ../shared/data).
"""

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="clicks per way (the first is the cold one)")
    args = parser.parse_args()

    import numpy as np
    import SimpleITK as sitk
    import slicer
    from bench_segment import make_input

    from AbdomenSegLib.slicer import logic as sl
    from AbdomenSegLib.slicer.engine_worker import EngineWorker
    from AbdomenSegLib.slicer.runs import BackgroundRun

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        label = make_input(path, args.slices)
        image = sitk.ReadImage(str(path))
    print(f"input: {label}")
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    node.SetIJKToRASMatrix(sl.ijk_to_ras(image))
    core = sl.AbdomenSegCore(scene, log=lambda m: None)
    models = [args.model] if args.model else [None]

    def click(worker):
        start = time.perf_counter()
        run = BackgroundRun(core, node, models, device="cpu", worker=worker)
        while run.step():
            time.sleep(0.01)  # the panel's QTimer polls every 100 ms; finer here so polling adds nothing
        if run.error:
            raise SystemExit(f"run failed: {run.error}")
        in_scene = time.perf_counter() - start
        seg = next(iter(run.results.values()))
        core.organ_volumes(seg, node)
        total = time.perf_counter() - start
        scene.RemoveNode(seg)
        return in_scene, total

    rows = []
    for i in range(args.repeats):
        rows.append(("process per run", i + 1, *click(None)))
    worker = EngineWorker()
    try:
        for i in range(args.repeats):
            rows.append(("engine worker", i + 1, *click(worker)))
        assert worker.starts == 1
    finally:
        worker.stop()
    print("| way | click | organs in the scene (s) | + volume table (s) |")
    print("|---|---|---|---|")
    for way, n, in_scene, total in rows:
        print(f"| {way} | {n} | {in_scene:.2f} | {total:.2f} |")
    later = [total for way, n, _, total in rows if way == "engine worker" and n > 1]
    if later:
        print(f"engine worker, later clicks: median {float(np.median(later)):.2f} s")


if __name__ == "__main__":
    main()
