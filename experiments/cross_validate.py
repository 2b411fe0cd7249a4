"""K-fold cross-validation of a training recipe (a chain of configs, each continuing the previous one), at a
fraction of its steps, with the project's own `train`: a second estimate of a recipe's accuracy that no design
choice has looked at (the fixed validation split has informed earlier choices).

    python experiments/cross_validate.py Resources/configs/btcv_ct_3d.json Resources/configs/btcv_ct_3d_stage2.json \
        Resources/configs/btcv_ct_3d_stage3.json Resources/configs/btcv_ct_3d_stage4.json --folds 4 --step-scale 0.1

For each fold k of n, every config of the chain is trained with `data.fold = {"index": k, "of": n}` (the cases
shuffled by the config's data.seed and dealt round-robin, datasets.split_cases), `round(steps * step-scale)`
steps, the previous stage's package as `init_from`, and validation only at its last step (so the fold's own
validation cases pick no checkpoint). Each stage's package is validated by the full pipeline at export
(export.validate_package), and the last stage's per-organ means are pooled over the folds (the fold
means weighted by their case counts). A stage whose validated package exists is not trained again, so an
interrupted run goes on with the stage it stopped in (that stage starts again; with validation only at the last
step it has no earlier checkpoint). <out>/settings.json keeps the recipe, folds and scale: another one for the
same --out is refused, so no package trained on another split is reused. Prints the per-fold and the pooled
per-organ Dice and writes them to <out>/cross_validation.json (--only-fold K: cross_validation-fold-K.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from AbdomenSegLib.core.errors import AbdomenSegError  # noqa: E402
from AbdomenSegLib.training.config import load_config  # noqa: E402


def stage_config(config_path: Path, index: int, fold, folds: int, scale: float, init_from) -> dict:
    """The derived config of one stage of one fold (it extends the recipe's file and states only the changes);
    fold "split": the config's own validation split (data.val_count, data.seed), for comparison."""
    merged = load_config(config_path)
    steps = max(1, round(merged["train"]["steps"] * scale))
    return {
        "extends": str(config_path.resolve()),
        "name": f"{merged['name']}-cv{fold}-s{index}",
        "data": {"fold": None if fold == "split" else {"index": fold, "of": folds}},
        "train": {"steps": steps, "val_every": steps, "init_from": init_from},
    }


SPLIT_KEYS = ("root", "sources", "val_source", "seed", "direction", "region")  # what deals the folds


def check_recipe(configs) -> None:
    """Every stage's config is valid, the first trains from scratch (weights trained on all cases would have
    seen every fold's validation cases), and all deal the same folds (same data and seed: else a later stage
    would validate on cases an earlier one trained on); before any training."""
    merged = [load_config(path) for path in configs]
    start = merged[0]["train"]["init_from"]
    if start:
        raise AbdomenSegError(
            f"the recipe's first config '{configs[0]}' starts from '{start}', which was trained on every fold's "
            "validation cases",
            "start the chain with a config that trains from scratch",
        )
    for path, config in zip(configs[1:], merged[1:]):
        differ = [k for k in SPLIT_KEYS if config["data"][k] != merged[0]["data"][k]]
        if differ:
            raise AbdomenSegError(
                f"config '{path}' has another data.{differ[0]} than '{configs[0]}', so its folds would hold other "
                "cases",
                "give every stage of the recipe the same data and data.seed",
            )


def check_settings(out: Path, settings: dict) -> None:
    """Record the run's settings in <out>, or refuse when <out> holds a run with others."""
    path = out / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            changed = [k for k in settings if before.get(k) != settings[k]]
            raise AbdomenSegError(
                f"'{out}' holds a cross-validation with another {', '.join(changed)}, whose packages were trained "
                "on other splits",
                "give another --out, or delete that folder",
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def validated(package: Path) -> bool:
    """The stage finished: its package exists and its card holds the export's validation (an export cut off
    while validating leaves a card without it)."""
    card = package / "card.json"
    return card.is_file() and "validation" in json.loads(card.read_text())


def run_fold(configs, fold, folds: int, scale: float, out: Path) -> dict:
    """Train the chain for one fold; the last stage's card validation."""
    init_from = None
    for index, config_path in enumerate(configs):
        stage_dir = out / f"fold-{fold}" / f"stage-{index}"
        package = stage_dir / "package"
        if not validated(package):
            stage_dir.mkdir(parents=True, exist_ok=True)
            derived = stage_dir.with_suffix(".json")
            derived.write_text(json.dumps(stage_config(config_path, index, fold, folds, scale, init_from), indent=1))
            start = time.time()
            with open(stage_dir.with_suffix(".log"), "w") as log:
                result = subprocess.run(
                    [sys.executable, "-m", "AbdomenSegLib", "train", str(derived), "--out", str(stage_dir), "--resume"],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if result.returncode:
                raise SystemExit(f"error: fold {fold} stage {index} failed. See {stage_dir.with_suffix('.log')}")
            print(f"fold {fold} stage {index} ({config_path.name}): {time.time() - start:.0f} s", flush=True)
        init_from = str(package)
    card = json.loads((package / "card.json").read_text())
    return {"cases": card["validation"]["cases"], "dice": card["validation"]["dice"]}


def pooled(results: list) -> dict:
    """Per organ: the fold means weighted by the folds' case counts (the mean over all cases wherever the organ
    is scored in every case; a card's mean leaves out cases where the organ is in neither reference nor
    prediction), and the standard deviation of the fold means. A fold without the organ counts for nothing."""
    organs = list(dict.fromkeys(o for r in results for o in r["dice"]))
    out = {}
    for organ in organs:
        means = np.array([r["dice"].get(organ, np.nan) for r in results], float)
        weights = np.array([len(r["cases"]) for r in results], float) * np.isfinite(means)
        out[organ] = {
            "mean": round(float(np.nansum(means * weights) / weights.sum()), 4),
            "fold_std": round(float(np.nanstd(means)), 4),
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", type=Path, help="the recipe: configs in training order")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--step-scale", type=float, default=0.1, help="fraction of each config's steps")
    p.add_argument("--only-fold", type=int, help="train this fold only (e.g. one per session or machine)")
    p.add_argument(
        "--split",
        action="store_true",
        help="also train the scaled recipe on the configs' own validation split (reported apart, not pooled)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "cross-validation")
    p.add_argument(
        "--record-in",
        type=Path,
        help="a package folder whose card gets the pooled figures as its `cross_validation` block (all folds only)",
    )
    a = p.parse_args(argv)
    if a.folds < 2 or not 0 < a.step_scale <= 1:
        raise SystemExit("error: --folds must be at least 2 and --step-scale in (0, 1]. Fix the arguments")
    if a.record_in is not None and (a.only_fold is not None or not (a.record_in / "card.json").is_file()):
        raise SystemExit(f"error: --record-in '{a.record_in}' needs a package folder and all folds. Fix the arguments")
    if a.only_fold is not None and not 0 <= a.only_fold < a.folds:
        raise SystemExit(f"error: --only-fold {a.only_fold} is not one of {a.folds} folds. Give 0 to {a.folds - 1}")
    a.configs, a.out = [c.resolve() for c in a.configs], a.out.resolve()
    os.chdir(ROOT)  # the configs' data roots are relative to the checkout, as `train` runs them
    try:
        check_recipe(a.configs)
        check_settings(a.out, {"recipe": [str(c) for c in a.configs], "folds": a.folds, "step_scale": a.step_scale})
        folds = [a.only_fold] if a.only_fold is not None else range(a.folds)
        results = {k: run_fold(a.configs, k, a.folds, a.step_scale, a.out) for k in folds}
        split = run_fold(a.configs, "split", a.folds, a.step_scale, a.out) if a.split else None
    except AbdomenSegError as error:
        raise SystemExit(f"error: {error}") from None
    organs = list(dict.fromkeys(o for r in results.values() for o in r["dice"]))
    print("organ".ljust(22) + "".join(f"fold {k}".rjust(8) for k in results) + "  pooled (fold std)")
    summary = pooled(list(results.values())) if len(results) == a.folds else {}
    for organ in organs + ["mean"]:
        row = [
            np.mean(list(r["dice"].values())) if organ == "mean" else r["dice"].get(organ, np.nan)
            for r in results.values()
        ]
        line = organ.ljust(22) + "".join(f"{v:8.3f}" for v in row)
        if summary:
            pool = np.mean([s["mean"] for s in summary.values()]) if organ == "mean" else summary[organ]["mean"]
            line += f"  {pool:.3f} ({float(np.nanstd(row)):.3f})"
        if split:
            own = np.mean(list(split["dice"].values())) if organ == "mean" else split["dice"].get(organ, np.nan)
            line += f"  own split {own:.3f}"
        print(line)
    record = {
        "recipe": [str(c) for c in a.configs],
        "folds": a.folds,
        "step_scale": a.step_scale,
        "per_fold": {str(k): r for k, r in results.items()},
        "pooled": summary,
        "own_split": split,
    }
    name = "cross_validation.json" if a.only_fold is None else f"cross_validation-fold-{a.only_fold}.json"
    (a.out / name).write_text(json.dumps(record, indent=1))
    print(f"wrote {a.out / name}")
    if a.record_in is not None:
        record_in_card(a.record_in, record, argv)


def record_in_card(package: Path, record: dict, argv) -> None:
    """The pooled figures as the card's `cross_validation` block (the card's own `validation` stays)."""
    from AbdomenSegLib.io.files import write_json

    card_path = package / "card.json"
    card = json.loads(card_path.read_text())
    card["cross_validation"] = {
        "protocol": f"{record['folds']}-fold cross-validation of the recipe {[Path(c).name for c in record['recipe']]} "
        f"at {record['step_scale']:g} of its steps, trained from scratch per fold; full-pipeline Dice of each "
        "fold's last stage on its own cases, fold means weighted by case count",
        "command": "python experiments/cross_validate.py " + " ".join(str(x) for x in (argv or sys.argv[1:])),
        "dice": {o: v["mean"] for o, v in record["pooled"].items()},
        "dice_fold_std": {o: v["fold_std"] for o, v in record["pooled"].items()},
        "fold_cases": {k: r["cases"] for k, r in record["per_fold"].items()},
        **({"own_split_dice_at_same_scale": record["own_split"]["dice"]} if record["own_split"] else {}),
    }
    write_json(card, card_path)
    print(f"recorded in {card_path}")


if __name__ == "__main__":
    main()
