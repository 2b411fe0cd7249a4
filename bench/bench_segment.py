"""Benchmark: segment a 512x512x~200 CT; prints seconds per stage, the whole process and peak memory.

    python bench/bench_segment.py [--device cpu|cuda|auto] [--model NAME] [--slices 200]
        [--precision fp32,bf16] [--repeats 3] [--compare-with DIR]

The input is a real BTCV case (../shared/data) converted to HU and resampled to 512x512 in-plane,
or the synthetic phantom at that size when the data are absent. Each run is a fresh process, so its
peak RSS and its start-up belong to that run alone:
- stages (one process per precision): start-up (Python + the engine's imports), model load, read,
  preprocess, infer, resample back, post-processing, result check, write;
- whole process: `python -m AbdomenSegLib segment IN OUT` timed from outside, best of --repeats;
  --compare-with another checkout (e.g. a git worktree of an earlier commit) runs its CLI on the same
  input, interleaved, for a before/after table on the same machine.
"""

import time

_STARTED = time.perf_counter()  # before any heavy import: the child's start-up is measured from here

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_input(path: Path, slices: int) -> str:
    import numpy as np
    import SimpleITK as sitk

    source = ROOT.parent / "shared" / "data" / "btcv_ct" / "images" / "btcv_img0001.nii.gz"
    if source.is_file():
        image = sitk.ReadImage(str(source))
        from AbdomenSegLib.models.packages import (
            find_model,  # the BTCV copy's header fix, as the default model's config gives it
        )

        image.SetDirection([float(v) for v in find_model()["training"]["config"]["data"]["direction"]])
        hu = sitk.GetArrayFromImage(image).astype(np.float32) * (400.0 / 255.0) - 125.0
        # Outside the window BTCV stores -125 HU; put air back outside the body as a real scan has it.
        hu[hu <= -124.9] = -1000.0
        real = sitk.GetImageFromArray(hu)
        real.CopyInformation(image)
        label = f"BTCV case btcv_img0001 in HU, resampled to 512x512x{slices}"
    else:
        from AbdomenSegLib.io.phantom import make_phantom

        real, _ = make_phantom(size=(128, 128, 50), spacing=(3.0, 3.0, 8.0))
        label = f"SYNTHETIC phantom resampled to 512x512x{slices} (no ../shared/data)"
    size = [512, 512, slices]
    extent = [n * s for n, s in zip(real.GetSize(), real.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, size)]
    out = sitk.Resample(
        real,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        real.GetOrigin(),
        spacing,
        real.GetDirection(),
        -1000.0,
        sitk.sitkInt16,
    )
    sitk.WriteImage(out, str(path), useCompression=True)
    return f"{label}; spacing {[round(s, 3) for s in spacing]} mm"


def run_once(input_path: str, output_path: str, device: str, model, precision="auto") -> dict:
    import torch

    from AbdomenSegLib.inference.predictor import get_segmenter
    from AbdomenSegLib.inference.segmenter import Options
    from AbdomenSegLib.io.images import read_image, write_labels
    from AbdomenSegLib.qc.outputs import assess_result

    times = {"startup_imports": time.perf_counter() - _STARTED}
    t = time.perf_counter()
    segmenter = get_segmenter(model, device, log=lambda m: None)
    times["load_model"] = time.perf_counter() - t
    start = time.perf_counter()
    t = time.perf_counter()
    image = read_image(input_path)
    times["read"] = time.perf_counter() - t
    options = Options(precision=precision)
    labels = segmenter.segment(image, options)
    times.update(segmenter.timings.stages)
    t = time.perf_counter()
    assess_result(segmenter, labels, options)  # the result check the command runs before writing
    times["result_check"] = time.perf_counter() - t
    t = time.perf_counter()
    write_labels(labels, output_path)
    times["write"] = time.perf_counter() - t
    times["total_read_to_write"] = time.perf_counter() - start
    result = {
        "device": segmenter.device,
        "precision": segmenter.precision,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "threads": torch.get_num_threads(),
    }
    if segmenter.device == "cuda":
        result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        result["gpu"] = torch.cuda.get_device_name(0)
    return result


def whole_process(root: Path, input_path: str, output_path: str, device: str, model, precision) -> float:
    """Seconds of `python -m AbdomenSegLib segment` in `root` (a checkout), start-up included."""
    cmd = [sys.executable, "-m", "AbdomenSegLib", "segment", input_path, output_path, "--overwrite", "--device", device]
    if precision:
        cmd += ["--precision", precision]
    if model:
        cmd += ["--model", model]
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode not in (0, 3):
        raise RuntimeError(done.stderr[-2000:])
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="all", choices=("all", "cpu", "cuda", "auto"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--precision", default="fp32,bf16", help="CPU precisions to run (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="whole-process runs per setting (best is kept)")
    parser.add_argument("--compare-with", help="another checkout whose CLI runs on the same input (before/after)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-precision", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(args.child[0], args.child[1], args.device, args.model, args.child_precision)))
        return
    import torch

    from AbdomenSegLib.core.precision import cpu_has_native_bf16

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "all" else [args.device]
    precisions = [p for p in args.precision.split(",") if p != "bf16" or cpu_has_native_bf16()]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "ct512.nii.gz"
        print("input:", make_input(source, args.slices))
        print(f"CPU bf16 instructions: {cpu_has_native_bf16()}; torch threads {torch.get_num_threads()}")
        out = str(Path(tmp) / "out.nii.gz")
        for device in devices:
            for precision in precisions if device == "cpu" else ["auto"]:
                cmd = [
                    sys.executable,
                    __file__,
                    "--device",
                    device,
                    "--child",
                    str(source),
                    out,
                    "--child-precision",
                    precision,
                ]
                if args.model:
                    cmd += ["--model", args.model]
                result = json.loads(
                    subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                )
                print(json.dumps(result, indent=2))
        print(f"whole process (python -m AbdomenSegLib segment, best of {args.repeats}):")
        settings = [("this checkout", ROOT, p) for p in precisions]
        if args.compare_with:
            settings.insert(0, ("compared checkout", Path(args.compare_with), None))
        best = {label + (f" {p}" if p else ""): float("inf") for label, _, p in settings}
        for _ in range(args.repeats):  # interleaved, so that a busy moment hits every setting alike
            for label, root, precision in settings:
                key = label + (f" {precision}" if precision else "")
                best[key] = min(best[key], whole_process(root, str(source), out, "cpu", args.model, precision))
        for key, seconds in best.items():
            print(f"  {key:28s} {seconds:6.2f} s")
        if "cuda" not in devices:
            print("CUDA: not available on this machine")


if __name__ == "__main__":
    main()
