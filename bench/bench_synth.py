"""Time synth.synthesize on a training-size patch (32x96x96, the MR model's grid 7.7x2.5x2.5 mm), one thread.

Run: .venv/bin/python bench/bench_synth.py [--real]  (--real: a patch of a BTCV tissue map from ../shared/data)
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402

from AbdomenSegLib.training.synth import synthesize  # noqa: E402
from AbdomenSegLib.training.tissue_labels import FIRST_TISSUE, LAST_TISSUE  # noqa: E402


def patch_labels(real: bool) -> np.ndarray:
    if real:
        import SimpleITK as sitk

        from AbdomenSegLib.training.tissue_labels import ct_tissue_labels

        data = ROOT.parent / "shared" / "data" / "btcv_ct"
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "images" / "btcv_img0001.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labels" / "btcv_img0001.nii.gz")))
        tissue = ct_tissue_labels(image, label, (3.0, 1.17, 1.17))
        return tissue[60:92, 80:176, 80:176]
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, LAST_TISSUE + 1, size=(4, 12, 12))
    coarse[coarse < FIRST_TISSUE] %= 15
    return np.kron(coarse, np.ones((8, 8, 8), dtype=np.int64)).astype(np.uint8)


def main():
    labels = patch_labels("--real" in sys.argv)
    spacing = (7.7, 2.5, 2.5)
    for seed in range(3):
        synthesize(labels, spacing, np.random.default_rng(seed))  # warm-up
    wall, cpu = [], []
    for seed in range(50):
        start, start_cpu = time.perf_counter(), time.process_time()
        synthesize(labels, spacing, np.random.default_rng(seed))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    for name, times in (("wall", wall), ("cpu", cpu)):  # cpu time: what the call costs on a shared, busy machine
        times = np.array(times) * 1000
        print(
            f"patch {labels.shape} {name}: median {np.median(times):.1f} ms, p90 {np.percentile(times, 90):.1f} ms, "
            f"max {times.max():.1f} ms over {len(times)} seeds (one thread)"
        )


if __name__ == "__main__":
    main()
