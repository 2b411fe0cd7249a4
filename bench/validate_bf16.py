"""Re-validate the shipped models in bfloat16 before `--precision auto` may use it (issue: close to the CPU floor).

For each model: the card's validation protocol (training.validation_rows: the original files, the full pipeline)
in bf16, per-organ mean Dice against the card's fp32 figures. A model is marked `inference.bf16_validated` when no
organ's mean Dice moves by more than TOLERANCE; the bf16 figures go into the card (`validation.bf16`) either way.
Runs only on a CPU with bf16 instructions (emulated bf16 would take hours). Usage:
    python bench/validate_bf16.py [--models a,b] [--dry-run]
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.01  # mean Dice per organ, bf16 vs fp32


def main(argv=None) -> int:
    from AbdomenSegLib.core.precision import cpu_has_native_bf16
    from AbdomenSegLib.evaluation.metrics import summarize
    from AbdomenSegLib.io.files import write_json
    from AbdomenSegLib.models.packages import catalog
    from AbdomenSegLib.preprocessing.datasets import validation_data
    from AbdomenSegLib.training.run import validation_rows

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", help="comma-separated model names (default: every installed model)")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the cards")
    args = parser.parse_args(argv)
    if not cpu_has_native_bf16():
        print("this CPU has no bf16 instructions: nothing to validate here")
        return 0
    cards = catalog()
    names = args.models.split(",") if args.models else list(cards)
    data_root = ROOT.parent / "shared" / "data"
    for name in names:
        card = cards[name]
        root = data_root / Path(validation_data(card["training"]["config"]["data"])["root"]).name
        rows, seconds = validation_rows(card, root, log=lambda m: None, precision="bf16")
        bf16 = {s["organ"]: round(s["dice_mean"], 4) for s in summarize(rows)}
        fp32 = card["validation"]["dice"]
        diffs = {o: round(bf16[o] - fp32[o], 4) for o in bf16 if o in fp32}
        worst = max(abs(d) for d in diffs.values())
        ok = worst <= TOLERANCE
        print(
            f"{name}: bf16 {sum(seconds) / len(seconds):.1f} s/case; largest mean-Dice change {worst:.4f} "
            f"({'within' if ok else 'OVER'} {TOLERANCE}); per organ {diffs}"
        )
        if args.dry_run:
            continue
        data = dict(card.data)
        data["validation"] = dict(
            data["validation"],
            bf16={
                "dice": bf16,
                "largest_change": worst,
                "tolerance": TOLERANCE,
                "cpu_seconds_per_case": round(sum(seconds) / len(seconds), 2),
            },
        )
        data["inference"] = dict(data.get("inference") or {}, bf16_validated=ok)
        write_json(data, card.path / "card.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
