"""Tables of `evaluate` and `compare` that cannot mislead: missed and extra organs counted apart, n in every cell,
the result check's flags beside every case.

metrics.evaluate gives one row per case and organ. An organ absent from the prediction (status missing_pred,
"missed") or from the reference (missing_ref, "extra") has no surface distance: metrics.evaluate writes the
image diagonal there (BraTS's convention, which the trainer and the model cards keep), and averaged with the
others one missed gallbladder made a cohort's HD95 mean 267.6 mm. Here those rows keep Dice 0 and lose their
distances (blank), and every summary averages the cases where both maps hold the organ, with the missed and extra
counts and n beside the mean.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.evaluation.metrics import FIELDS, UNSCORED, outside_note, write_csv
from AbdomenSegLib.io.files import atomic_output

MISSED, EXTRA = "missing_pred", "missing_ref"
REPORT_FIELDS = (*FIELDS, "pieces_pred", "qc_warnings", "qc_flags")
SUMMARY_METRICS = ("dice", "iou", "hd95_mm", "assd_mm", "surface_dice", "volume_diff_ml")
SUMMARY_FIELDS = (
    "model",
    "organ",
    "cases",
    "n",
    "missed",
    "extra",
    "flagged",
    *(f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std")),
)


def case_check(prediction: sitk.Image, convention: str, organs) -> tuple:
    """The result check on a prediction read in `convention`, for the organs it should hold: (warnings, notes) as
    text (a note: e.g. an organ in several pieces, which explains a large HD95) and {organ: connected pieces}."""
    from AbdomenSegLib.core.organs import convert_labels
    from AbdomenSegLib.qc.check import assess

    labels = sitk.GetImageFromArray(convert_labels(sitk.GetArrayViewFromImage(prediction), convention))
    labels.CopyInformation(prediction)
    report = assess(labels, expected=list(organs))
    pieces = {name: organ.pieces for name, organ in report.organs.items()}
    return [str(f) for f in report.warnings], [str(f) for f in report.notes], pieces


def report_rows(rows: list, warnings: list | None = None, notes: list | None = None, pieces=None) -> list:
    """metrics.evaluate rows for the tables: missed/extra organs without distances, the case's result check
    (qc_warnings counts its warnings, which flag the case; qc_flags holds them and its notes as text) and the
    predicted organ's connected pieces (islands far from the organ make a large HD95 with a good Dice)."""
    out = []
    for row in rows:
        row = dict(row)
        if pieces is not None:
            row["pieces_pred"] = pieces.get(row["organ"], 0)
        if row["status"] in (MISSED, EXTRA):
            row.update(hd95_mm=None, assd_mm=None)
        if warnings is not None:
            text = list(warnings) + [f"note: {n}" for n in notes or []]
            row.update(qc_warnings=len(warnings), qc_flags=" | ".join(text))
        out.append(row)
    return out


def outside_text(case_rows: list) -> str:
    """`note: 23.4% of the predicted organs ... lie outside the reference's field of view ...` for a log line when a
    case's prediction reaches past the reference's grid by more than metrics.OUTSIDE_NOTE_FRACTION, else ""."""
    note = outside_note(case_rows)
    return f"note: {case_rows[0]['case'] or 'this case'}: {note}" if note else ""


def flagged_text(case_rows: list) -> str:
    """` FLAGGED (...)` for a log line when the case's result check warned, else ""."""
    if case_rows and case_rows[0].get("qc_warnings"):
        count, first = case_rows[0]["qc_warnings"], case_rows[0]["qc_flags"].split(" | ")[0]
        return f" FLAGGED ({count} warning{'s' * (count > 1)}; first: {first}; all in the CSV's qc_flags)"
    return ""


def summarize_apart(rows: list) -> list:
    """Per (model, organ): mean and sd over the n cases where both maps hold the organ; missed, extra and flagged
    (cases the result check warned about) counted apart. Organs absent from both maps (or predicted only outside the
    reference's field of view) are left out."""
    groups: dict = {}
    for row in rows:
        if row["status"] not in UNSCORED:
            groups.setdefault((row.get("model", ""), row["organ"]), []).append(row)
    summary = []
    for (model, organ), items in groups.items():
        both = [i for i in items if i["status"] == "ok"]
        entry = {
            "model": model,
            "organ": organ,
            "cases": len(items),
            "n": len(both),
            "missed": sum(i["status"] == MISSED for i in items),
            "extra": sum(i["status"] == EXTRA for i in items),
            "flagged": sum(bool(i.get("qc_warnings")) for i in items),
        }
        for key in SUMMARY_METRICS:
            values = np.array([float(i[key]) for i in both], dtype=float)
            entry[f"{key}_mean"] = float(values.mean()) if len(values) else math.nan
            entry[f"{key}_std"] = float(values.std()) if len(values) else math.nan
        summary.append(entry)
    return summary


def cell(entry: dict, metric: str = "dice", digits: int = 3) -> str:
    """`0.912 ± 0.021 (n=4, 1 missed)`: the mean, sd and n of one summary entry, with what was left out."""
    mean, sd = entry[f"{metric}_mean"], entry[f"{metric}_std"]
    text = "–" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {sd:.{digits}f}"
    extra = [f"n={entry['n']}"]
    extra += [f"{entry[k]} {k}" for k in ("missed", "extra", "flagged") if entry[k]]
    return f"{text} ({', '.join(extra)})"


def wide_rows(summary: list, metric: str = "dice") -> tuple:
    """(columns, rows) of a table with one row per organ and one column per model, then a row of the means over
    organs (organs where the model has n > 0)."""
    models = list(dict.fromkeys(s["model"] for s in summary))
    organs = list(dict.fromkeys(s["organ"] for s in summary))
    index = {(s["model"], s["organ"]): s for s in summary}
    rows = []
    for organ in organs:
        row = {"organ": organ}
        for model in models:
            entry = index.get((model, organ))
            row[model] = cell(entry, metric) if entry else ""
        rows.append(row)
    mean_row = {"organ": "mean"}
    for model in models:
        means = [index[(model, o)][f"{metric}_mean"] for o in organs if (model, o) in index]
        means = [m for m in means if math.isfinite(m)]
        mean_row[model] = f"{np.mean(means):.3f} ({len(means)} organs)" if means else "–"
    rows.append(mean_row)
    return ["organ", *models], rows


def wide_markdown(summary: list, metric: str = "dice") -> str:
    columns, rows = wide_rows(summary, metric)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def paired_tests(rows: list, metric: str = "dice") -> list:
    """Per organ and pair of models: Wilcoxon signed-rank test (scipy) on the cases both models and the
    reference hold the organ, with n and the mean difference; p is blank where n < 2 or all differences are 0."""
    from itertools import combinations

    from scipy.stats import wilcoxon

    values: dict = {}
    for row in rows:
        if row["status"] == "ok":
            values.setdefault(row["organ"], {}).setdefault(row["model"], {})[row["case"]] = float(row[metric])
    tests = []
    for organ, by_model in values.items():
        for a, b in combinations(sorted(by_model), 2):
            cases = sorted(set(by_model[a]) & set(by_model[b]))
            diff = np.array([by_model[a][c] - by_model[b][c] for c in cases])
            p = math.nan
            if len(cases) >= 2 and np.any(diff != 0):
                p = float(wilcoxon(diff).pvalue)
            tests.append(
                {
                    "organ": organ,
                    "model_a": a,
                    "model_b": b,
                    "metric": metric,
                    "n": len(cases),
                    "mean_difference": float(diff.mean()) if len(cases) else math.nan,
                    "wilcoxon_p": p,
                }
            )
    return tests


def write_tables(rows: list, folder, *, summary_name: str = "comparison", markdown_first=None) -> dict:
    """metrics.csv (case x organ x model), <summary_name>.csv (long), <summary_name>_wide.csv and .md (organ rows x
    model columns), paired_tests.csv; returns {name: path}."""
    folder = Path(folder)
    summary = summarize_apart(rows)
    paths = {
        "metrics": write_csv(rows, folder / "metrics.csv", fields=list(REPORT_FIELDS)),
        "summary": write_csv(summary, folder / f"{summary_name}.csv", fields=list(SUMMARY_FIELDS)),
    }
    columns, wide = wide_rows(summary)
    paths["wide"] = write_csv(wide, folder / f"{summary_name}_wide.csv", fields=columns)
    with atomic_output(folder / f"{summary_name}.md") as tmp:
        first = markdown_first(summary) + "\n" if markdown_first else ""
        Path(tmp).write_text(first + markdown_report(summary, rows), encoding="utf-8")
    paths["markdown"] = folder / f"{summary_name}.md"
    paths["tests"] = write_csv(
        paired_tests(rows),
        folder / "paired_tests.csv",
        fields=["organ", "model_a", "model_b", "metric", "n", "mean_difference", "wilcoxon_p"],
    )
    return paths


def markdown_report(summary: list, rows: list) -> str:
    """The wide Dice table, the flagged cases and the paired tests, as Markdown."""
    parts = ["Dice, mean ± sd over the n cases where both maps hold the organ\n", wide_markdown(summary)]
    flagged = sorted({(r["model"], r["case"], r.get("qc_flags", "")) for r in rows if r.get("qc_warnings")})
    if flagged:
        parts.append("\nFlagged by the result check (their rows are in the means; see metrics.csv qc_flags):\n")
        parts += [f"- {m}: {c}: {f}\n" for m, c, f in flagged]
    partial = _outside_notes(rows)
    if partial:
        parts.append("\nPredictions reaching past the reference's field of view (scored inside it only):\n")
        parts += [f"- {m}: {c}: {note}\n" for (m, c), note in partial.items()]
    tests = paired_tests(rows)
    if tests:
        parts.append("\n| organ | models | n | mean Dice difference | Wilcoxon p |\n|---|---|---|---|---|\n")
        parts += [
            f"| {t['organ']} | {t['model_a']} − {t['model_b']} | {t['n']} | {t['mean_difference']:+.3f} | "
            + ("–" if not math.isfinite(t["wilcoxon_p"]) else f"{t['wilcoxon_p']:.3g}")
            + " |\n"
            for t in tests
        ]
    return "".join(parts)


def _outside_notes(rows: list) -> dict:
    """{(model, case): outside_note} of the cases whose prediction reaches past the reference's field of view."""
    cases: dict = {}
    for row in rows:
        cases.setdefault((row.get("model", ""), row["case"]), []).append(row)
    notes = {key: outside_note(case_rows) for key, case_rows in sorted(cases.items())}
    return {key: note for key, note in notes.items() if note}


def source_organs(prediction, convention: str) -> list:
    """The organs a prediction's source can hold: for our label maps (abdomenseg) those of the model that the
    folder's manifest.csv names (when installed), else every organ the convention defines."""
    from AbdomenSegLib.cohort.manifest import NAME, read_manifest
    from AbdomenSegLib.core.organs import BY_NAME, CONVENTIONS

    defined = [o for o in BY_NAME if o in CONVENTIONS[convention].values()]
    if convention != "abdomenseg":
        return defined
    path = Path(prediction)
    folder = path if path.is_dir() else path.parent
    models = {r.get("model", "") for r in read_manifest(folder / NAME).values() if r.get("status") == "done"}
    organs = set()
    for name in models:
        card = _installed(name)
        if card is None:
            return defined
        organs |= set(card["labels"].values())
    return [o for o in defined if o in organs] if organs else defined


def _installed(name: str):
    from AbdomenSegLib.core.errors import AbdomenSegError
    from AbdomenSegLib.models.packages import find_model

    try:
        return find_model(name.split(">")[0])  # a two-stage run's "first>fine": the first stage's organs
    except AbdomenSegError:
        return None


def evaluate_case(prediction: sitk.Image, reference: sitk.Image, **settings) -> list:
    """metrics.evaluate's rows for one case with the result check of the prediction beside them (report_rows); a
    prediction reaching past the reference's field of view gets that note among the check's notes (qc_flags)."""
    from AbdomenSegLib.evaluation.metrics import evaluate

    rows = evaluate(prediction, reference, **settings)
    convention = settings.get("prediction_convention", "abdomenseg")
    organs = settings.get("organs") or [r["organ"] for r in rows]
    warnings, notes, pieces = case_check(prediction, convention, organs)
    note = outside_note(rows)
    return report_rows(rows, warnings, notes + [note] if note else notes, pieces)


class CaseClock:
    """`[3/12] name (4.1 s; elapsed 12 s, about 37 s left)`: one line per case for logs a script reads."""

    def __init__(self, total: int):
        import time

        self.total, self.start, self._time = total, time.monotonic(), time.monotonic
        self.last = self.start

    def line(self, index: int, name: str) -> str:
        now = self._time()
        case, elapsed = now - self.last, now - self.start
        self.last = now
        left = elapsed / index * (self.total - index) if index else 0.0
        return f"[{index}/{self.total}] {name} ({case:.1f} s; elapsed {elapsed:.0f} s, about {left:.0f} s left)"
