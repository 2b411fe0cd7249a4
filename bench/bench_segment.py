"""Benchmark: segment a 512x512x~200 CT with the default model; prints seconds per stage and peak memory.

    python bench/bench_segment.py [--device cpu|cuda|auto] [--model NAME] [--slices 200]

The input is a real BTCV case (../shared/data) converted to HU and resampled to 512x512 in-plane,
or the synthetic phantom at that size when the data are absent. Each device runs in a fresh process
so its peak RSS belongs to that run alone.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_input(path: Path, slices: int) -> str:
    import numpy as np
    import SimpleITK as sitk
    source = ROOT.parent / "shared" / "data" / "btcv_ct" / "images" / "btcv_img0001.nii.gz"
    if source.is_file():
        image = sitk.ReadImage(str(source))
        from AbdomenSegLib.models import find_model  # the BTCV copy's header fix, as the default model's config gives it
        image.SetDirection([float(v) for v in find_model()["training"]["config"]["data"]["direction"]])
        hu = sitk.GetArrayFromImage(image).astype(np.float32) * (400.0 / 255.0) - 125.0
        # Outside the window BTCV stores -125 HU; put air back outside the body as a real scan has it.
        hu[hu <= -124.9] = -1000.0
        real = sitk.GetImageFromArray(hu)
        real.CopyInformation(image)
        label = f"BTCV case btcv_img0001 in HU, resampled to 512x512x{slices}"
    else:
        from AbdomenSegLib.phantom import make_phantom
        real, _ = make_phantom(size=(128, 128, 50), spacing=(3.0, 3.0, 8.0))
        label = f"SYNTHETIC phantom resampled to 512x512x{slices} (no ../shared/data)"
    size = [512, 512, slices]
    extent = [n * s for n, s in zip(real.GetSize(), real.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, size)]
    out = sitk.Resample(real, size, sitk.Transform(), sitk.sitkLinear, real.GetOrigin(), spacing,
                        real.GetDirection(), -1000.0, sitk.sitkInt16)
    sitk.WriteImage(out, str(path), useCompression=True)
    return f"{label}; spacing {[round(s, 3) for s in spacing]} mm"


def run_once(input_path: str, output_path: str, device: str, model) -> dict:
    import torch
    from AbdomenSegLib.inference import get_segmenter
    from AbdomenSegLib.io import read_image, write_labels
    times = {}
    t = time.perf_counter()
    segmenter = get_segmenter(model, device, log=lambda m: None)
    times["load_model"] = time.perf_counter() - t
    start = time.perf_counter()
    t = time.perf_counter()
    image = read_image(input_path)
    times["read"] = time.perf_counter() - t
    labels = segmenter.segment(image)
    times.update(segmenter.timings.stages)
    t = time.perf_counter()
    write_labels(labels, output_path)
    times["write"] = time.perf_counter() - t
    times["total_read_to_write"] = time.perf_counter() - start
    result = {"device": segmenter.device, "seconds": {k: round(v, 2) for k, v in times.items()},
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2),
              "threads": torch.get_num_threads()}
    if segmenter.device == "cuda":
        result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2)
        result["gpu"] = torch.cuda.get_device_name(0)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="all", choices=("all", "cpu", "cuda", "auto"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(args.child[0], args.child[1], args.device, args.model)))
        return
    import torch
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "all" else [args.device]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "ct512.nii.gz"
        print("input:", make_input(source, args.slices))
        for device in devices:
            cmd = [sys.executable, __file__, "--device", device, "--child", str(source), str(Path(tmp) / "out.nii.gz")]
            if args.model:
                cmd += ["--model", args.model]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            print(json.dumps(result, indent=2))
        if "cuda" not in devices:
            print("CUDA: not available on this machine")


if __name__ == "__main__":
    main()
