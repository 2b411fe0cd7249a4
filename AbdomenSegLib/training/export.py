"""A trained run exported as a model package, validated the way its card says, and the card filled in.

`train_and_export` trains (trainer.py), exports the best weights with their card (models.export_package) and
runs the card's validation protocol: every validation case segmented from its original file by `Segmenter`,
in its own grid, and scored (metrics.py). The shipped models' tests re-run the same protocol
(Testing/test_models_shipped.py), so a card's figures stay reproducible.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.options import LogCallback
from AbdomenSegLib.io.files import write_json
from AbdomenSegLib.training.config import load_config
from AbdomenSegLib.training.trainer import Trainer


def validation_rows(
    card, root=None, log: LogCallback = print, precision="fp32", segmenter=None, overlap=None, tta=False
) -> tuple[list, list]:
    """The card's validation protocol: segment each validation case from its original file, in its own grid,
    and score it. Returns (metric rows, seconds per case). `root` overrides the card's data folder. The card's
    figures are fp32; `precision="bf16"` re-validates the model in bfloat16 (bench/validate_bf16.py).
    `segmenter` runs another model (or an ensemble) on this card's protocol, `overlap` another window overlap,
    `tta` test-time mirroring (experiments/bench_ensemble.py). A second-stage model's card (cascade.py) is validated
    on the region its training saw: each case cut to the box around its reference's region organs
    (region.reference_crop)."""
    from AbdomenSegLib.evaluation.metrics import evaluate
    from AbdomenSegLib.inference.cascade import segment_crop
    from AbdomenSegLib.inference.segmenter import Options, Segmenter
    from AbdomenSegLib.preprocessing.datasets import validation_data

    data = validation_data(card["training"]["config"]["data"])
    segmenter = segmenter or Segmenter(card, "cpu", log=log)
    rows, seconds = [], []
    for name, image, label in validation_cases(card, root):
        convention, region = data["convention"], card.get("cascade")
        if region:
            from AbdomenSegLib.preprocessing.region import reference_crop

            image, label, convention = reference_crop(image, label, convention, region)
        start = time.time()
        options = Options(input_intensity=data["input_intensity"], precision=precision, overlap=overlap, tta=tta)
        prediction = segment_crop(segmenter, image, options) if region else segmenter.segment(image, options)
        seconds.append(time.time() - start)
        rows += evaluate(
            prediction,
            label,
            reference_convention=convention,
            organs=list(card["labels"].values()),
            case=name,
            model=card.name,
        )
        log(f"validated {name} ({seconds[-1]:.1f} s)")
    return rows, seconds


def validation_cases(card, root=None):
    """(name, image, label) of each of the card's validation cases, read from its original files (the card's
    data folder, or `root`) with the true direction where the card's data gives one."""
    from AbdomenSegLib.preprocessing.datasets import find_cases, read_case, validation_data

    data = validation_data(card["training"]["config"]["data"])
    wanted = set(card["training"]["validation_cases"])
    for name, image_path, label_path in find_cases(root or data["root"]):
        if data["prefix"] + name in wanted:
            yield (name, *read_case(image_path, label_path, data.get("direction")))


MEAN = "mean over cases where the organ is present in prediction or reference"
WHOLE_PROTOCOL = "full pipeline on the original validation files (input grid), never trained on; " + MEAN
REGION_PROTOCOL = (
    "region crop, not the whole scan: the second stage alone on each validation case (never trained on) cut from its "
    "original file to the box around its reference's cascade.organs plus cascade.margin_mm, full pipeline in the "
    "crop's grid (whole scans behind the first stage: validation_cascade); " + MEAN
)


def validate_package(card, log: LogCallback = print, segmenter=None) -> dict:
    """Full-pipeline validation summary for the card (per-organ means over the validation cases); `segmenter`
    runs another model on the card's protocol (validate_cascade)."""
    from AbdomenSegLib.evaluation.metrics import summarize

    rows, seconds = validation_rows(card, log=log, segmenter=segmenter)
    summary = {s["organ"]: s for s in summarize(rows)}
    return {
        "protocol": REGION_PROTOCOL if card.get("cascade") else WHOLE_PROTOCOL,
        "cases": sorted(card["training"]["validation_cases"]),
        **{
            metric: {o: round(s[f"{metric}_mean"], 4) for o, s in summary.items()}
            for metric in ("dice", "iou", "hd95_mm", "assd_mm", "surface_dice")
        },
        "dice_std": {o: round(s["dice_std"], 4) for o, s in summary.items()},
        "cpu_seconds_per_case": round(float(np.mean(seconds)), 1) if seconds else None,
    }


def validate_cascade(card, log: LogCallback = print) -> dict:
    """The second-stage model `card` behind its first stage, on the first stage's validation protocol (its cases,
    whole scans): validate_package's summary of the cascade's output."""
    from AbdomenSegLib.inference.cascade import CascadeSegmenter
    from AbdomenSegLib.inference.predictor import get_segmenter
    from AbdomenSegLib.models.cascade_card import cascade_stages

    stages = cascade_stages(card)
    assert stages is not None  # a second-stage card runs behind its first stage
    first, second = stages
    summary = validate_package(
        first, log=log, segmenter=CascadeSegmenter(get_segmenter(first, "cpu", log), second, log=log)
    )
    summary["protocol"] = f"cascade behind {first.name}, on its validation protocol: " + summary["protocol"]
    return summary


def trainer_class(config: dict) -> type:
    """The Trainer of config's train.trainer: the standard one, or the contrast-agnostic one (training/synth_trainer.py)."""
    if config["train"]["trainer"] == "synth":
        from AbdomenSegLib.training.synth_trainer import SynthTrainer

        return SynthTrainer
    return Trainer


def train_and_export(
    config_source,
    *,
    out=None,
    device="auto",
    resume=False,
    export_only=False,
    export_to=None,
    make_default=False,
    log: LogCallback = print,
):
    """Train (or resume), export the best weights as a package, validate it, fill in its card."""
    import platform
    import sys

    import torch

    from AbdomenSegLib.inference.segmenter import resolve_device
    from AbdomenSegLib.models.packages import export_package

    config = load_config(config_source)
    out = Path(out or f"runs/{config['name']}")
    device = resolve_device(device, log)
    trainer = trainer_class(config)(config, out, device=device, log=log)
    start = time.time()
    if export_only:
        trainer.load_checkpoint()
    else:

        def progress(s: int, n: int, loss: float) -> None:
            if s % 20 == 0 or s == n:
                log(f"step {s}/{n} loss {loss:.4f} ({time.time() - start:.0f} s)")

        trainer.run(resume=resume, progress=progress)
    if trainer.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
        if trainer.rank != 0:
            return None  # rank 0 exports and validates
    network = trainer.best_network()
    history = trainer.history
    hardware = (
        torch.cuda.get_device_name(0)
        if device == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    card_data = trainer.card()
    card_data["training"].update(
        {
            "command": f"python -m AbdomenSegLib train {config_source} --out {out}",
            "export_command": "python -m AbdomenSegLib " + " ".join(sys.argv[1:]) if sys.argv[1:] else "",
            "hardware": hardware,
            "torch": torch.__version__,
            "seconds": history[-1]["seconds"] if history else None,
            "history": history,
        }
    )
    target = Path(export_to) / config["name"] if export_to else out / "package"
    card = export_package(network, card_data, target, register_in=export_to, make_default=make_default)
    log(f"exported {target}; validating on {card['training']['validation_cases']}")
    card.data["validation"] = validate_package(card, log=log)
    whole, note = card.data["validation"], "full pipeline"
    if card.get("cascade"):  # figures for the region crop above; the whole scans through the first stage here
        try:
            whole = card.data["validation_cascade"] = validate_cascade(card, log=log)
            note = "full pipeline, both stages"
        except AbdomenSegError as error:
            log(f"cascade validation skipped: {error} (run bench/bench_cascade.py once the first stage is installed)")
            note = "second stage alone on the region crop"
    card.data["timing"] = {
        "cpu_seconds": whole["cpu_seconds_per_case"],
        "cpu_note": f"mean seconds per validation case, {note}, CPU with {torch.get_num_threads()} threads",
        "gpu_seconds": None,
    }
    write_json(card.data, target / "card.json")
    log("validation Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in card.data["validation"]["dice"].items()))
    return card
