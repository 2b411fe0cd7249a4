"""Compare models on the same cases: one metrics CSV, a model x organ table (CSV + Markdown), a box plot.

Two ways in: `run_comparison` segments a dataset's cases with our models (`compare --models`); `compare_predictions`
scores predictions that exist already, from any tool (`compare --predictions NAME=DIR[:convention]`): our outputs,
an nnU-Net folder, TotalSegmentator's multi-label file (`--ml`) or its folder of one mask per structure (named
`<structure>.nii.gz`, as totalsegmentator/nnunet.py writes them), DICOM SEG. Each source is scored on the organs it
and the reference both define; every case gets the result check (evaluation/reports.py), missed and extra organs are
counted apart, and the tables say n per cell.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.options import LogCallback
from AbdomenSegLib.inference.predictor import get_segmenter
from AbdomenSegLib.inference.segmenter import Options
from AbdomenSegLib.io.files import atomic_output
from AbdomenSegLib.models.packages import find_model
from AbdomenSegLib.preprocessing.datasets import find_cases, read_case

OUTPUTS = (
    "metrics.csv",
    "comparison.csv",
    "comparison.md",
    "comparison_wide.csv",
    "paired_tests.csv",
    "dice_boxplot.png",
)


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
    keep=None,
    log: LogCallback | None = None,
) -> list:
    """One model on one case: its metric rows. Runs here or on a Dask worker (which keeps each model loaded)."""
    from AbdomenSegLib.core.organs import convention_map
    from AbdomenSegLib.evaluation.reports import evaluate_case

    segmenter = get_segmenter(find_model(model), device, log=log or print)
    defined = set(convention_map(convention).values())
    organs = [o for o in segmenter.card["labels"].values() if o in defined]  # what both the model and reference hold
    image, reference = read_case(image_path, label_path, direction)
    prediction = segmenter.segment(image, Options(input_intensity=input_intensity, tta=tta))
    if keep:  # --keep-predictions: <out>/predictions/<model>/<case>.nii.gz, in the scan's grid
        from AbdomenSegLib.io.images import write_labels

        header = sitk.ImageFileReader()
        header.SetFileName(str(image_path))
        header.ReadImageInformation()
        kept = sitk.Image(prediction)
        kept.SetDirection(header.GetDirection())  # the scan file's own header: the same voxels, its grid exactly
        write_labels(kept, Path(keep) / f"{name}.nii.gz", protect=[image_path, label_path])
    return evaluate_case(prediction, reference, reference_convention=convention, organs=organs, case=name, model=label)


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
    keep_predictions=False,
    log: LogCallback = print,
    mapper=None,
) -> list:
    """`direction` corrects the dataset files' headers (datasets.read_case); by default it is the one the training
    config of `cases_from`, or of the compared models, gives for a dataset of the same folder name (as `segment`
    gets it from the same configs), refused when they disagree. `convention` None: detected from the first
    reference (evaluation/conventions.py). `mapper(compare_case, items, names)` runs the (model, case) pairs elsewhere,
    e.g. on a Dask cluster (cli: --workers / --scheduler), and returns their rows in the items' order. `tta`: every
    model with test-time mirroring (each must have been trained with it: checked before any case runs).
    `keep_predictions`: each model's labels also go to <out>/predictions/<model>/<case>.nii.gz."""
    out_dir = Path(out_dir)
    _check_outputs(out_dir, overwrite)
    selected = select_cases(data_root, cases, cases_from)
    cards = [find_model(model) for model in models]
    if direction is None:
        direction = dataset_direction(data_root, [find_model(cases_from)] if cases_from else cards, log)
    if convention is None:
        from AbdomenSegLib.evaluation.conventions import resolve_convention

        _, reference = read_case(selected[0][1], selected[0][2], direction)
        convention = resolve_convention(reference, None, "reference", "--labels", log)
    if tta:
        from AbdomenSegLib.models.mirroring import check_tta

        for card in cards:
            check_tta(card)
    names = [card.name for card in cards]
    # Two versions of one model (e.g. a package and its continuation) share a name: tell them apart by hash.
    labels = [f"{n} ({c['sha256'][:8]})" if names.count(n) > 1 else n for n, c in zip(names, cards)]
    labels = [f"{label} {model}" if labels.count(label) > 1 else label for label, model in zip(labels, models)]
    keep = {label: str((out_dir / "predictions" / _safe(label)).resolve()) for label in labels}
    if keep_predictions:
        kept = [Path(keep[label]) / f"{name}.nii.gz" for label in labels for name, _, _ in selected]
        there = [p for p in kept if p.exists()]
        if there and not overwrite:  # never replaced unasked, and refused before any case is segmented
            raise AbdomenSegError(
                f"{len(there)} kept prediction(s) already exist in '{out_dir / 'predictions'}' (e.g. {there[0].name})",
                "pass --overwrite or choose another --out",
            )
        for folder in keep.values():
            Path(folder).mkdir(parents=True, exist_ok=True)
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
            keep[label] if keep_predictions else None,
        )
        for card, label in zip(cards, labels)
        for name, image_path, label_path in selected
    ]
    rows = []
    if mapper is not None:
        rows = [
            row for case_rows in mapper(compare_case, items, [f"{i[1]}: {i[3]}" for i in items]) for row in case_rows
        ]
    else:
        from AbdomenSegLib.evaluation.reports import CaseClock, flagged_text, outside_text

        clock = CaseClock(len(items))
        for index, item in enumerate(items):
            case_rows = compare_case(*item, log=log)
            rows += case_rows
            log(clock.line(index + 1, f"{item[1]}: {item[3]}") + flagged_text(case_rows))
            if outside_text(case_rows):
                log(outside_text(case_rows))
    return write_outputs(rows, out_dir)


def compare_predictions(
    predictions: list, reference: str, out_dir, *, overwrite: bool = False, log: LogCallback = print
) -> list:
    """Score existing predictions of any tool against one reference (`compare --predictions NAME=DIR[:convention]
    ... --reference DIR[:convention]`): every case of the reference that a source holds (a label map named like the
    case, or a folder named like it of one mask per structure), on the organs the source and the reference both
    define. Conventions not named are detected from the first file (evaluation/conventions.py), before any case is
    scored. Returns the summary (evaluation.summarize_apart)."""
    from AbdomenSegLib.core.organs import CONVENTIONS
    from AbdomenSegLib.evaluation.conventions import read_as_ours, resolve_convention, split_source
    from AbdomenSegLib.evaluation.reports import CaseClock, evaluate_case, flagged_text, outside_text

    out_dir = Path(out_dir)
    _check_outputs(out_dir, overwrite)
    ref_path, ref_convention = split_source(reference)
    cases = _reference_cases(Path(ref_path))
    if ref_convention is None and all(read_as_ours(p) for _, p in cases):
        ref_convention = "abdomenseg"  # DICOM SEG references are read into our organ table
    ref_convention = resolve_convention(
        _read(cases[0][1]), ref_convention, "reference", "--reference DIR:<convention>", log
    )
    defined = set(CONVENTIONS[ref_convention].values())
    sources = []
    for spec in predictions:
        name, folder, convention = _prediction_source(spec)
        paths = [(case, _find_prediction(folder, case, len(cases) == 1)) for case, _ in cases]
        found = {case: path for case, path in paths if path is not None}
        if not found:
            raise AbdomenSegError(
                f"--predictions {name}: '{folder}' holds no prediction named like the reference's cases "
                f"({', '.join(c for c, _ in cases[:4])}{' ...' if len(cases) > 4 else ''})",
                "name each prediction like its reference (a file, or a folder of one mask per organ)",
            )
        first = next(iter(found.values()))
        if first.is_dir():
            convention, organs = (
                "abdomenseg",
                sorted(_mask_organs(first), key=list(CONVENTIONS["abdomenseg"].values()).index),
            )
        else:
            from AbdomenSegLib.cohort.manifest import NAME, read_manifest
            from AbdomenSegLib.evaluation.reports import source_organs

            option = f"--predictions {name}={folder}:<convention>"
            if convention is None and (read_as_ours(first) or read_manifest(folder / NAME)):
                convention = "abdomenseg"  # a DICOM SEG is read into our table; a folder with our manifest is ours
            convention = resolve_convention(_read(first), convention, f"{name} prediction", option, log)

            organs = source_organs(folder, convention)
        scored = [o for o in organs if o in defined]
        if not scored:
            raise AbdomenSegError(
                f"--predictions {name} and the reference define no organ in common", "compare it with another reference"
            )
        left = [o for o in organs if o not in defined]
        log(
            f"{name}: {len(found)} of {len(cases)} cases, {convention} labels, scored on {', '.join(scored)}"
            + (f" (not in the reference: {', '.join(left)})" if left else "")
        )
        sources.append((name, found, convention, scored))
    rows = []
    clock = CaseClock(sum(len(found) for _, found, _, _ in sources))
    done = 0
    references = dict(cases)
    for name, found, convention, organs in sources:
        for case, path in found.items():
            prediction = _read_masks(path) if path.is_dir() else _read(path)
            case_rows = evaluate_case(
                prediction,
                _read(references[case]),
                reference_convention=ref_convention,
                prediction_convention=convention,
                organs=organs,
                case=case,
                model=name,
            )
            rows += case_rows
            done += 1
            log(clock.line(done, f"{name}: {case}") + flagged_text(case_rows))
            if outside_text(case_rows):
                log(outside_text(case_rows))
    return write_outputs(rows, out_dir)


def _read(path):
    from AbdomenSegLib.io.images import read_image

    return read_image(path)


def _reference_cases(path: Path) -> list:
    """[(case, file)] of a reference folder (or one file)."""
    from AbdomenSegLib.io.images import case_name, image_suffix

    if path.is_file():
        return [(case_name(path), path)]
    if not path.is_dir():
        raise AbdomenSegError(f"reference '{path}' does not exist", "give a folder of reference label maps or one file")
    cases = [
        (case_name(p) if image_suffix(p) else p.name[:-4], p)
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.startswith(".") and (image_suffix(p) or p.name.lower().endswith(".dcm"))
    ]
    if not cases:
        raise AbdomenSegError(f"reference folder '{path}' holds no label map", "check the path")
    return cases


def _prediction_source(spec: str) -> tuple:
    """`NAME=DIR[:convention]` -> (name, folder, convention or None)."""
    from AbdomenSegLib.evaluation.conventions import split_source

    name, sep, rest = str(spec).partition("=")
    if not sep or not name.strip() or not rest:
        raise AbdomenSegError(
            f"--predictions '{spec}' is not NAME=DIR[:convention]",
            "e.g. --predictions totalseg=ts_out/:totalseg --predictions ours=out/",
        )
    folder, convention = split_source(rest)
    if not Path(folder).exists():
        raise AbdomenSegError(f"--predictions {name}: '{folder}' does not exist", "check the path")
    return name.strip(), Path(folder), convention


def _find_prediction(folder: Path, case: str, only_case: bool):
    """A case's prediction in a source folder: a label map named like the case, or a folder named like it of one
    mask per structure (TotalSegmentator's default output); for a one-case reference, the source itself (a file,
    or a folder of masks)."""
    from AbdomenSegLib.cohort.batch import find_reference

    if folder.is_file():
        return folder if only_case else None
    found = find_reference(folder, case)
    if found is not None:
        return found
    if (folder / case).is_dir() and _mask_organs(folder / case):
        return folder / case
    if only_case and _mask_organs(folder):
        return folder
    return None


def _mask_files(folder: Path) -> dict:
    """{organ: mask file} of a folder of one binary mask per structure (`spleen.nii.gz`, `kidney_left.nii.gz`,
    `portal_vein_and_splenic_vein.nii.gz`, ...: TotalSegmentator's names, matched through organs.organ_from_name);
    files of structures we do not score are left out."""
    from AbdomenSegLib.core.organs import organ_from_name
    from AbdomenSegLib.io.images import case_name, image_suffix

    masks = {}
    for p in sorted(folder.iterdir()):
        organ = organ_from_name(case_name(p)) if p.is_file() and image_suffix(p) else None
        if organ is not None:
            masks[organ.name] = p
    return masks


def _mask_organs(folder: Path) -> list:
    return list(_mask_files(folder))


def _read_masks(folder: Path) -> sitk.Image:
    """One label map in our organ table from a folder of per-structure masks (all in one grid, else refused)."""
    import numpy as np

    from AbdomenSegLib.core.organs import BY_NAME

    out: np.ndarray | None = None
    grid: sitk.Image | None = None
    for organ, path in _mask_files(folder).items():
        mask = _read(path)
        if grid is None:
            grid, out = mask, np.zeros(sitk.GetArrayViewFromImage(mask).shape, np.uint8)
        elif mask.GetSize() != grid.GetSize() or not np.allclose(mask.GetOrigin(), grid.GetOrigin(), atol=1e-3):
            raise AbdomenSegError(f"'{path}' is not in the grid of the other masks in '{folder}'", "check the folder")
        assert out is not None  # made with `grid` from the first mask
        out[sitk.GetArrayViewFromImage(mask) > 0] = BY_NAME[organ].label
    if out is None or grid is None:
        raise AbdomenSegError(f"'{folder}' holds no organ masks", "give a folder of one mask per organ (name.nii.gz)")
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(grid)
    return image


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in label)


def _check_outputs(out_dir: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUTS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise AbdomenSegError(
            f"{', '.join(existing)} already exist in '{out_dir}'", "pass --overwrite or choose another --out"
        )


def dataset_direction(data_root, cards, log: LogCallback):
    """The header fix (data.direction) the cards' training configs give for a dataset of `data_root`'s folder
    name, as `segment` users get it from the same configs; None when no card was trained on such a dataset;
    refused when two cards give different ones."""
    from AbdomenSegLib.preprocessing.datasets import validation_data

    found = {}
    for card in cards:
        data = (card.get("training") or {}).get("config", {}).get("data")
        if not isinstance(data, dict):
            continue
        data = validation_data(data)
        if data.get("root") and Path(data["root"]).name == Path(data_root).name and data.get("direction"):
            found[card.name] = tuple(float(v) for v in data["direction"])
    if len(set(found.values())) > 1:
        raise AbdomenSegError(
            f"the models' training configs give '{Path(data_root).name}' different header directions "
            f"({', '.join(f'{n}: {d}' for n, d in found.items())})",
            "compare them in separate runs, or fix the dataset's headers",
        )
    if found:
        direction = next(iter(found.values()))
        log(f"'{Path(data_root).name}' headers corrected to direction {list(direction)} (from {', '.join(found)})")
        return list(direction)
    return None


def write_outputs(rows: list, out_dir) -> list:
    """metrics.csv, comparison.csv/.md, comparison_wide.csv, paired_tests.csv and the box plot; the summary."""
    from AbdomenSegLib.evaluation.reports import summarize_apart, write_tables

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tables(rows, out_dir, summary_name="comparison", markdown_first=markdown_table)
    box_plot(rows, out_dir / "dice_boxplot.png")
    return summarize_apart(rows)


def markdown_table(summary) -> str:
    """One row per model and organ: n (cases where both maps hold the organ), missed, extra, flagged, the means."""
    from AbdomenSegLib.evaluation.reports import cell

    lines = [
        "| model | organ | n | missed | extra | flagged | Dice | IoU | HD95 (mm) | surface Dice |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['organ']} | {s['n']} | {s['missed']} | {s['extra']} | {s['flagged']} | "
            + " | ".join(
                cell(s, m, d).split(" (")[0] for m, d in (("dice", 3), ("iou", 3), ("hd95_mm", 1), ("surface_dice", 3))
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def box_plot(rows, path):
    """Dice per organ, one box per model over the cases where both maps hold the organ, each case a dot (so one
    case reads too); an organ's missed/extra counts are under its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from AbdomenSegLib.evaluation.metrics import UNSCORED
    from AbdomenSegLib.evaluation.reports import EXTRA, MISSED

    rows = [r for r in rows if r["status"] not in UNSCORED]
    models = sorted({r["model"] for r in rows})
    organs = list(dict.fromkeys(r["organ"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, len(organs) * len(models) * 0.45 + 2), 4.8))
    width = 0.8 / max(1, len(models))
    for m, model in enumerate(models):
        data = [
            [r["dice"] for r in rows if r["model"] == model and r["organ"] == o and r["status"] == "ok"] for o in organs
        ]
        positions = [i + (m - (len(models) - 1) / 2) * width for i in range(len(organs))]
        filled = [(p, d) for p, d in zip(positions, data) if d]
        if filled:
            boxes = ax.boxplot(
                [d for _, d in filled],
                positions=[p for p, _ in filled],
                widths=width * 0.9,
                patch_artist=True,
                manage_ticks=False,
            )
            for box in boxes["boxes"]:
                box.set_facecolor(f"C{m}")
                box.set_alpha(0.6)
        for p, d in filled:
            ax.plot([p] * len(d), d, "o", color=f"C{m}", markersize=3, markeredgecolor="black", markeredgewidth=0.4)
        ax.plot([], [], color=f"C{m}", linewidth=8, label=model)

    def tick(organ):
        these = [r for r in rows if r["organ"] == organ]
        missed = sum(r["status"] == MISSED for r in these)
        extra = sum(r["status"] == EXTRA for r in these)
        notes = [f"{missed} missed"] * bool(missed) + [f"{extra} extra"] * bool(extra)
        return organ + (f"\n({', '.join(notes)})" if notes else "")

    ax.set_xticks(range(len(organs)), [tick(o) for o in organs], rotation=45, ha="right")
    ax.set_ylabel("Dice (cases where both maps hold the organ)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", title="model")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_output(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
