"""Does the network's own confidence predict Dice? The shipped models on their validation splits.

    python experiments/qc_confidence.py [--models NAME ...] [--from-cache] [--no-write]

For each shipped model, runs the card's validation protocol (training.validation_rows: full pipeline on the
original validation files, scored in their own grid) with the Segmenter instrumented to keep, per case, every
confidence measure of AbdomenSegLib/confidence.py on the very probabilities the label map came from. Each
(model, case, organ) the model predicted becomes one point (confidence, Dice); organs the model did not predict
have no confidence and are counted apart, organs absent from prediction and reference are left out.

Prints the points, Pearson's r and Spearman's rho per model and pooled for each measure, draws
experiments/figures/confidence_vs_dice.png (the kept measure, confidence.MEASURE), and writes into each card
`"qc": {"confidence": {...}}` with the threshold `low_below` (rule in THRESHOLD_RULE). The points are cached in
.cache/qc_confidence.json (with the weights' sha256) so that --from-cache and Testing/test_inference_confidence.py can
recompute the summary without re-running inference. CPU heavy: ~1 min for the 3D CT model, a few minutes for the
2.5D model, seconds for MR, on 2 threads.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("btcv-ct-3d-unet", "btcv-ct-2d-unet-r18", "chaos-mr-t2-3d-unet", "mr-any-3d-unet")
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / ".cache" / "qc_confidence.json"
FIGURE = ROOT / "experiments" / "figures" / "confidence_vs_dice.png"
GOOD_DICE = 0.7
THRESHOLD_RULE = (
    f"largest t (floored to 3 decimals) such that no organ with Dice >= {GOOD_DICE} on the validation "
    "split had confidence < t, i.e. the lowest confidence of a good organ; few points (4 cases), "
    "so an indication, not a calibrated probability"
)


def data_root(card) -> Path:
    """The card's dataset folder under ../shared/data (as Testing/conftest.py finds it)."""
    from AbdomenSegLib.preprocessing.datasets import validation_data

    return DATA / validation_data(card["training"]["config"]["data"])["root"].split("/")[-1]


@contextlib.contextmanager
def instrumented():
    """Segmenter, patched for the duration: each segment() appends {"measures", "last_confidence", "seconds"}
    (every measure on the probabilities _infer returned; the hook's own result; organ_confidence's cost)."""
    from AbdomenSegLib.inference import confidence
    from AbdomenSegLib.inference.segmenter import Segmenter

    records = []
    infer, segment = Segmenter._infer, Segmenter.segment

    def _infer(self, *args, **kwargs):
        probabilities = infer(self, *args, **kwargs)
        start = time.perf_counter()
        confidence.organ_confidence(probabilities, self.card.channel_organs)
        seconds = time.perf_counter() - start
        records.append(
            {
                "measures": confidence.confidence_measures(probabilities, self.card.channel_organs),
                "seconds": seconds,
                "voxels": int(probabilities[0].size),
                "channels": int(probabilities.shape[0]),
            }
        )
        return probabilities

    def _segment(self, *args, **kwargs):
        out = segment(self, *args, **kwargs)
        records[-1]["last_confidence"] = dict(self.last_confidence)
        return out

    Segmenter._infer, Segmenter.segment = _infer, _segment
    try:
        yield records
    finally:
        Segmenter._infer, Segmenter.segment = infer, segment


def collect(card, cases=None, log=print) -> tuple[list, list]:
    """(points, cost records) for one model: its validation protocol, reused as is; `cases` restricts it to
    some of the card's validation cases (a lighter check)."""
    from AbdomenSegLib.inference import confidence
    from AbdomenSegLib.models.packages import ModelCard
    from AbdomenSegLib.training.run import validation_rows

    if cases is not None:
        data = copy.deepcopy(card.data)
        data["training"]["validation_cases"] = [c for c in data["training"]["validation_cases"] if c in cases]
        card = ModelCard(card.path, data)
    with instrumented() as records:
        rows, _ = validation_rows(card, data_root(card), log=log)
    names = list(dict.fromkeys(r["case"] for r in rows))  # validation_rows scores the cases in segment order
    if len(names) != len(records):
        raise RuntimeError(f"{len(records)} segmentations for {len(names)} scored cases")
    by_case = dict(zip(names, records))
    points = []
    for row in rows:
        record = by_case[row["case"]]
        kept = record["last_confidence"]
        if kept != record["measures"][confidence.MEASURE]:
            raise RuntimeError(f"Segmenter.last_confidence disagrees with {confidence.MEASURE} on {row['case']}")
        if row["status"] == "absent_both":
            continue
        point = {
            "model": card.name,
            "case": row["case"],
            "organ": row["organ"],
            "status": row["status"],
            "dice": float(row["dice"]),
        }
        point.update({m: values.get(row["organ"]) for m, values in record["measures"].items()})
        points.append(point)
    return points, records


def correlations(points: list, measure: str) -> dict:
    """Pearson and Spearman over the points that have a confidence (the organ was predicted)."""
    from scipy import stats

    pairs = [(p[measure], p["dice"]) for p in points if p.get(measure) is not None]
    x = [a for a, _ in pairs]
    y = [b for _, b in pairs]
    if len(pairs) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"pearson": None, "spearman": None, "points": len(pairs)}
    return {
        "pearson": float(stats.pearsonr(x, y)[0]),
        "spearman": float(stats.spearmanr(x, y)[0]),
        "points": len(pairs),
    }


def threshold(points: list, measure: str) -> float | None:
    """THRESHOLD_RULE: the lowest confidence among organs with Dice >= GOOD_DICE, floored to 3 decimals."""
    good = [p[measure] for p in points if p.get(measure) is not None and p["dice"] >= GOOD_DICE]
    return math.floor(min(good) * 1000) / 1000 if good else None


def qc_block(points: list, measure: str) -> dict:
    c = correlations(points, measure)
    return {
        "measure": measure,
        "low_below": threshold(points, measure),
        "validation": {"pearson": _round(c["pearson"]), "spearman": _round(c["spearman"]), "points": c["points"]},
        "rule": THRESHOLD_RULE,
    }


def _round(value, digits=4):
    return None if value is None else round(value, digits)


def write_card_qc(card, block: dict) -> None:
    """Add (or replace) the card's "qc"."confidence", changing nothing else: verified on the parsed JSON and on
    the text, whose every other line must stay as it was."""
    from AbdomenSegLib.io.files import write_json

    path = card.path / "card.json"
    text = path.read_text(encoding="utf-8")
    before = json.loads(text)
    after = copy.deepcopy(before)
    after.setdefault("qc", {})["confidence"] = block
    rest_before = {k: v for k, v in before.items() if k != "qc"}
    rest_after = {k: v for k, v in after.items() if k != "qc"}
    if list(rest_before.items()) != list(rest_after.items()):
        raise RuntimeError(f"{path}: the card would change beyond its qc block")
    qc_before = {k: v for k, v in before.get("qc", {}).items() if k != "confidence"}
    qc_after = {k: v for k, v in after["qc"].items() if k != "confidence"}
    if qc_before != qc_after:
        raise RuntimeError(f"{path}: the card's other qc entries would change")
    write_json(after, path)
    if json.dumps(rest_before, indent=2) != json.dumps(
        {k: v for k, v in json.loads(path.read_text()).items() if k != "qc"}, indent=2
    ):
        raise RuntimeError(f"{path}: written card differs beyond its qc block")


def draw(points: list, measure: str, summary: dict, thresholds: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from AbdomenSegLib.core.organs import BY_NAME

    models = [m for m in MODELS if any(p["model"] == m for p in points)]
    # tab20 over the organ table's order: Slicer's organ colours are too alike (several reds) to tell apart here.
    palette = plt.get_cmap("tab20").colors
    colours = {name: palette[i % len(palette)] for i, name in enumerate(BY_NAME)}
    shown = [p[measure] for p in points if p.get(measure) is not None]
    low_x = max(0.0, math.floor((min(shown) - 0.03) * 20) / 20) if shown else 0.0
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 5.0), squeeze=False)
    organs_seen = {}
    for ax, model in zip(axes[0], models):
        mine = [p for p in points if p["model"] == model and p.get(measure) is not None]
        for p in mine:
            handle = ax.scatter(
                p[measure],
                p["dice"],
                color=colours[p["organ"]],
                edgecolor="black",
                linewidth=0.5,
                s=42,
                marker="o" if p["status"] == "ok" else "X",
                zorder=3,
            )
            organs_seen.setdefault(p["organ"], handle)
        ax.axhline(GOOD_DICE, color="grey", linestyle=":", linewidth=1)
        if thresholds.get(model) is not None:
            ax.axvline(
                thresholds[model],
                color="firebrick",
                linestyle="--",
                linewidth=1.2,
                label=f"low_below {thresholds[model]:.3f}",
            )
            ax.legend(loc="lower right", fontsize=8)
        c = summary[model]
        ax.set_title(
            f"{model}\nPearson r {_fmt(c['pearson'])}, Spearman ρ {_fmt(c['spearman'])}, " f"n {c['points']}",
            fontsize=10,
        )
        ax.set_xlabel(f"confidence ({measure})")
        ax.set_xlim(low_x, 1.005)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Dice (full pipeline, input grid)")
    pooled = summary["pooled"]
    absent = any(p["status"] != "ok" and p.get(measure) is not None for p in points)
    fig.suptitle(
        f"Confidence vs Dice on the validation splits (4 cases per model; one point per predicted organ "
        f"and case); pooled Pearson r {_fmt(pooled['pearson'])}, Spearman ρ {_fmt(pooled['spearman'])}, "
        f"n {pooled['points']}" + ("  (x: organ predicted but absent from the reference)" if absent else ""),
        fontsize=11,
    )
    fig.legend(
        list(organs_seen.values()),
        list(organs_seen),
        loc="lower center",
        ncol=min(7, len(organs_seen)),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summarize(points: list, measure: str) -> dict:
    """{model: correlations, ..., "pooled": correlations} for one measure."""
    summary = {
        m: correlations([p for p in points if p["model"] == m], measure)
        for m in MODELS
        if any(p["model"] == m for p in points)
    }
    summary["pooled"] = correlations(points, measure)
    return summary


def main(argv=None) -> int:
    import torch

    from AbdomenSegLib.inference import confidence
    from AbdomenSegLib.models.packages import find_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--from-cache", action="store_true", help="reuse the points in .cache/qc_confidence.json")
    parser.add_argument("--no-write", action="store_true", help="do not write the cards' qc block")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    cards = {m: find_model(m) for m in args.models}
    cached = json.loads(CACHE.read_text()) if CACHE.is_file() else {"models": {}}
    points, costs = [], []
    for name, card in cards.items():
        entry = cached["models"].get(name)
        if args.from_cache and entry and entry["sha256"] == card["sha256"]:
            points += entry["points"]
            continue
        if args.from_cache:
            raise SystemExit(f"no cached points for {name} with these weights; run without --from-cache")
        start = time.time()
        model_points, records = collect(card, log=lambda m: print("  " + m, flush=True))
        print(f"{name}: {len(records)} cases in {time.time() - start:.0f} s", flush=True)
        points += model_points
        costs += [dict(model=name, **{k: r[k] for k in ("seconds", "voxels", "channels")}) for r in records]
        cached["models"][name] = {"sha256": card["sha256"], "points": model_points}
    if not args.from_cache:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps(cached, indent=1))

    print(
        f"\n{'model':22s} {'case':14s} {'organ':22s} {'status':12s} {'Dice':>6s} "
        + " ".join(f"{m[:12]:>12s}" for m in confidence.MEASURES)
    )
    for p in points:
        print(
            f"{p['model']:22s} {p['case']:14s} {p['organ']:22s} {p['status']:12s} {p['dice']:6.3f} "
            + " ".join(f"{p[m]:12.3f}" if p.get(m) is not None else f"{'-':>12s}" for m in confidence.MEASURES)
        )
    missed = [p for p in points if p.get(confidence.MEASURE) is None]
    print(
        f"\n{len(missed)} organ(s) in the reference that the model did not predict (no confidence): "
        + ", ".join(f"{p['model']}/{p['case']}/{p['organ']}" for p in missed)
    )

    print(f"\n{'measure':22s} " + " ".join(f"{m:>26s}" for m in [*cards, "pooled"]) + "   (Pearson / Spearman)")
    for measure in confidence.MEASURES:
        s = summarize(points, measure)
        print(
            f"{measure:22s} "
            + " ".join(f"{_fmt(s[m]['pearson']):>12s} / {_fmt(s[m]['spearman']):>11s}" for m in [*cards, "pooled"])
        )
    for cost in costs:
        print(
            f"organ_confidence cost {cost['model']}: {cost['seconds'] * 1000:.0f} ms for {cost['channels']} x "
            f"{cost['voxels'] / 1e6:.2f} M voxels"
        )

    measure = confidence.MEASURE
    summary = summarize(points, measure)
    blocks = {name: qc_block([p for p in points if p["model"] == name], measure) for name in cards}
    thresholds = {name: b["low_below"] for name, b in blocks.items()}
    for name, block in blocks.items():
        mine = [p for p in points if p["model"] == name and p.get(measure) is not None]
        low = [p for p in mine if p["dice"] < GOOD_DICE]
        caught = [p for p in low if block["low_below"] is not None and p[measure] < block["low_below"]]
        flagged = [(p["case"], p["organ"], p["dice"]) for p in caught]
        print(
            f"{name}: low_below {block['low_below']} flags {len(caught)} of {len(low)} predicted organs with "
            f"Dice < {GOOD_DICE} ({', '.join(f'{q[0]}/{q[1]} {q[2]:.2f}' for q in flagged)}) "
            f"and none of the {len(mine) - len(low)} with Dice >= {GOOD_DICE}"
        )
    if set(cards) == set(MODELS):
        print(f"figure: {draw(points, measure, summary, thresholds, FIGURE)}")
    if not args.no_write:
        for name, card in cards.items():
            write_card_qc(card, blocks[name])
            print(f"wrote qc block into {card.path / 'card.json'}: {json.dumps(blocks[name]['validation'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
