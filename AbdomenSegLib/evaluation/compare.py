"""Compare models on the same cases: one metrics CSV, a model x organ table (CSV + Markdown), a box plot."""

from __future__ import annotations

from pathlib import Path

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.options import LogCallback
from AbdomenSegLib.evaluation.metrics import evaluate, summarize, write_csv
from AbdomenSegLib.inference.predictor import get_segmenter
from AbdomenSegLib.inference.segmenter import Options
from AbdomenSegLib.io.files import atomic_output
from AbdomenSegLib.models.packages import find_model
from AbdomenSegLib.preprocessing.datasets import find_cases, read_case

OUTPUTS = ("metrics.csv", "comparison.csv", "comparison.md", "dice_boxplot.png")


def select_cases(data_root, cases=None, cases_from=None) -> list:
    """Dataset cases to use: all, a named list, or a model card's validation split."""
    available = find_cases(data_root)
    wanted = list(cases or [])
    if cases_from:
        wanted += find_model(cases_from)["training"]["validation_cases"]
    if not wanted:
        return available
    by_name = {c[0]: c for c in available}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise AbdomenSegError(f"cases {missing} are not in '{data_root}'", "check --cases / --cases-from")
    return [by_name[w] for w in sorted(set(wanted))]


def compare_case(
    model,
    label,
    device,
    name,
    image_path,
    label_path,
    direction,
    convention,
    input_intensity,
    tta=False,
    log: LogCallback | None = None,
) -> list:
    """One model on one case: its metric rows. Runs here or on a Dask worker (which keeps each model loaded)."""
    segmenter = get_segmenter(find_model(model), device, log=log or print)
    organs = list(segmenter.card["labels"].values())
    image, reference = read_case(image_path, label_path, direction)
    prediction = segmenter.segment(image, Options(input_intensity=input_intensity, tta=tta))
    return evaluate(prediction, reference, reference_convention=convention, organs=organs, case=name, model=label)


def run_comparison(
    models,
    data_root,
    convention,
    out_dir,
    *,
    cases=None,
    cases_from=None,
    input_intensity="native",
    direction=None,
    device="auto",
    overwrite=False,
    tta=False,
    log: LogCallback = print,
    mapper=None,
) -> list:
    """`direction` corrects the dataset files' headers (datasets.read_case); by default it is the one the
    `cases_from` model's training config gives when that model was trained on a dataset of the same name.
    `mapper(compare_case, items, names)` runs the (model, case) pairs elsewhere, e.g. on a Dask cluster
    (cli: --workers / --scheduler), and returns their rows in the items' order. `tta`: every model with test-time
    mirroring (each must have been trained with it: checked before any case runs)."""
    out_dir = Path(out_dir)
    existing = [name for name in OUTPUTS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise AbdomenSegError(
            f"{', '.join(existing)} already exist in '{out_dir}'", "pass --overwrite or choose another --out"
        )
    selected = select_cases(data_root, cases, cases_from)
    if direction is None and cases_from:
        data = find_model(cases_from)["training"]["config"]["data"]
        if Path(data["root"]).name == Path(data_root).name:
            direction = data.get("direction")
    rows = []
    cards = [find_model(model) for model in models]
    if tta:
        from AbdomenSegLib.models.mirroring import check_tta

        for card in cards:
            check_tta(card)
    names = [card.name for card in cards]
    # Two versions of one model (e.g. a package and its continuation) share a name: tell them apart by hash.
    labels = [f"{n} ({c['sha256'][:8]})" if names.count(n) > 1 else n for n, c in zip(names, cards)]
    labels = [f"{label} {model}" if labels.count(label) > 1 else label for label, model in zip(labels, models)]
    items = [
        (
            str(card.path),
            label,
            device,
            name,
            str(image_path),
            str(label_path),
            direction,
            convention,
            input_intensity,
            tta,
        )
        for card, label in zip(cards, labels)
        for name, image_path, label_path in selected
    ]
    if mapper is not None:
        rows = [
            row for case_rows in mapper(compare_case, items, [f"{i[1]}: {i[3]}" for i in items]) for row in case_rows
        ]
    else:
        for index, item in enumerate(items):
            rows += compare_case(*item, log=log)
            log(f"{item[1]}: [{index % len(selected) + 1}/{len(selected)}] {item[3]}")
    summary = summarize(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "metrics.csv")
    write_csv(summary, out_dir / "comparison.csv")
    with atomic_output(out_dir / "comparison.md") as tmp:
        Path(tmp).write_text(markdown_table(summary), encoding="utf-8")
    box_plot(rows, out_dir / "dice_boxplot.png")
    return summary


def markdown_table(summary) -> str:
    lines = ["| model | organ | cases | Dice | IoU | HD95 (mm) | surface Dice |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['organ']} | {s['cases']} | {s['dice_mean']:.3f} ± {s['dice_std']:.3f} | "
            f"{s['iou_mean']:.3f} ± {s['iou_std']:.3f} | {s['hd95_mm_mean']:.1f} ± {s['hd95_mm_std']:.1f} | "
            f"{s['surface_dice_mean']:.3f} ± {s['surface_dice_std']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def box_plot(rows, path):
    """Dice per organ, one box per model (organs absent from both maps left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["status"] != "absent_both"]
    models = sorted({r["model"] for r in rows})
    organs = list(dict.fromkeys(r["organ"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, len(organs) * len(models) * 0.45), 4.5))
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        data = [[r["dice"] for r in rows if r["model"] == model and r["organ"] == o] or [float("nan")] for o in organs]
        positions = [i + (m - (len(models) - 1) / 2) * width for i in range(len(organs))]
        boxes = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, manage_ticks=False)
        for box in boxes["boxes"]:
            box.set_facecolor(f"C{m}")
        ax.plot([], [], color=f"C{m}", linewidth=8, label=model)
    ax.set_xticks(range(len(organs)), organs, rotation=45, ha="right")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower left", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_output(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
