"""Window shapes for the 3D model: time and validation Dice of the card's sliding window against windows fitted to
the volume (each axis: the volume's size rounded up to the network's multiple of 16, at most a cap), fewer and
larger windows with less padding. Prints one line per variant; nothing is changed in any card.

    python experiments/bench_windows.py [--model btcv-ct-3d-unet] [--caps 48,160,160 96,160,160 160,160,160]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def fitted(shape, cap, multiple=16):
    return tuple(min(c, multiple * math.ceil(s / multiple)) for s, c in zip(shape, cap))


class Fitted:
    """The card's sliding window, or (with `cap`) one whose window is fitted to each volume."""

    def __init__(self, base, cap, window_class):
        self.base, self.cap, self.window_class = base, cap, window_class

    def __call__(self, net, arr, device, precision="fp32", progress=None, cancel=None):
        window = self.base if self.cap is None else self.window_class(fitted(arr.shape, self.cap))
        return window(net, arr, device, precision, progress, cancel)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--caps", nargs="*", default=["card", "48,160,160", "96,160,160", "160,160,160", "160,192,192"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk
    import torch
    from bench_segment import make_input

    from AbdomenSegLib.core.precision import resolve_precision
    from AbdomenSegLib.evaluation.metrics import summarize
    from AbdomenSegLib.inference import segmenter as inference
    from AbdomenSegLib.inference.inferer import SlidingWindow, inferer_for
    from AbdomenSegLib.models.packages import find_model, load_network
    from AbdomenSegLib.preprocessing.pipeline import to_model_space
    from AbdomenSegLib.training.export import validation_rows

    torch.set_num_threads(2)
    card = find_model(args.model)
    precision = resolve_precision("auto", "cpu", card)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        label = make_input(path, 200)
        image = sitk.ReadImage(str(path))
    space = to_model_space(image, card["spacing"], card["intensity"], orientation=card.get("orientation", "LPS"))
    array = space.array[space.box]
    network = load_network(card).eval()
    print(f"{card.name} ({precision}); timing input: {label}; model-space box {array.shape}")
    original = inference.inferer_for
    for cap in args.caps:
        base = replace(inferer_for(card), fit_multiple=0)  # the card's roi as it was, unfitted
        infer = Fitted(base, None if cap == "card" else [int(c) for c in cap.split(",")], SlidingWindow)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            infer(network, array, "cpu", precision)
            times.append(time.perf_counter() - t)
        roi = base.roi if infer.cap is None else fitted(array.shape, infer.cap)
        inference.inferer_for = lambda card_, overlap=None, tta=False, padding=None, infer=infer: infer
        try:
            rows, _ = validation_rows(card, log=lambda m: None, precision=precision)
        finally:
            inference.inferer_for = original
        dice = {s["organ"]: s["dice_mean"] for s in summarize(rows)}
        mean = float(np.mean(list(dice.values())))
        print(
            f"{cap:>12}: window {roi} on the timing input, infer best {min(times):.2f} s; validation mean Dice "
            f"{mean:.4f} | " + " ".join(f"{o[:8]} {v:.3f}" for o, v in dice.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
