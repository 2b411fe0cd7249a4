"""Where the result check goes: a report per case (JSON and a picture), and for a folder run one CSV and an
index of the pictures. The command line and the Slicer batch script share it."""

from __future__ import annotations

import json
from pathlib import Path

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.untrusted import load_json
from AbdomenSegLib.io.files import atomic_output
from AbdomenSegLib.qc.check import TRACE_ML, Flag, QCReport, assess
from AbdomenSegLib.qc.statistics import intensity_unit


def assess_result(segmenter, labels, options=None, image=None) -> QCReport:
    """The result check of a label map the segmenter just made: the organs it could have found (those the
    model segments and the user kept), its confidence and the model's calibrated threshold; with the `image`
    (its grid), each organ's intensity statistics."""
    card = segmenter.card
    asked = getattr(options, "organs", None)
    expected = [n for n in card["labels"].values() if not asked or n in asked]
    confidence = getattr(segmenter, "last_confidence", None) or {}
    low = (card.get("qc") or {}).get("confidence", {}).get("low_below")
    from AbdomenSegLib.core.organs import BY_LABEL

    single = [
        BY_LABEL[v].name for v in segmenter.largest_component_organs(getattr(options, "largest_component", "model"))
    ]
    report = assess(
        labels,
        expected=expected,
        asked=asked,
        confidence=confidence,
        confidence_low=low,
        single_piece=single,
        image=image,
        input_intensity=getattr(options, "input_intensity", "native") or "native",
    )
    report.flags += short_input_flags(card, image if image is not None else labels)
    return report


def short_input_flags(card, image) -> list:
    """A warning when the scan, long enough not to be refused, is shorter than the model was seen to segment right
    (models/extent.py: flag_mm, measured)."""
    from AbdomenSegLib.core.limits import AXIS_NAMES
    from AbdomenSegLib.models.extent import short_of_flag

    short = short_of_flag(card, image.GetSize(), image.GetSpacing(), image.GetDirection())
    return [
        Flag(
            "short_input",
            f"the scan covers only {have:.0f} mm along {AXIS_NAMES[axis]}; model '{card.name}' was seen to miss or "
            f"misshape organs in scans shorter than {need:.0f} mm there",
            "check the organs near the scan's ends, or give a scan covering the whole abdomen",
        )
        for axis, have, need in short[:1]
    ]


def check_and_record(files, segmenter, name, image, labels, options, *, output, started: float, **extra) -> tuple:
    """The result check of one segmented case, recorded in `files` (a QCFiles: qc/<case>.json, its picture, a
    row of qc.csv); `extra` goes into the JSON (a Dask worker adds where it ran). Returns (report, its JSON)."""
    import time

    from AbdomenSegLib.inference.cascade import made_by

    report = assess_result(segmenter, labels, options, image)
    qc = files.add(
        name,
        image,
        labels,
        report,
        output=str(output),
        model=made_by(segmenter)[0],  # a two-stage run names both models ("first>fine")
        modality=segmenter.card["modality"],
        intensity_unit=intensity_unit(segmenter.card["modality"]),
        seconds=round(time.time() - started, 1),
        **extra,
    )
    return report, qc


_NOTE_TITLES = {
    "cut_by_border": "cut by the image border",
    "low_confidence": "low confidence",
    "volume_low": "below the adult volume band",
    "volume_high": "above the adult volume band",
    "pieces": "in several pieces",
    "not_found": "not found",
    "spleen_larger_than_liver": "spleen > liver",
}


def summary_lines(case: str, report: QCReport) -> list:
    """What stderr shows after a case: each warning in full, the notes in one line grouped by kind; nothing
    when all is well. The report (qc.json, the picture) has every note with its fix."""
    lines = [f"warning: {case}: {flag}" for flag in report.warnings]
    groups: dict = {}
    for flag in report.notes:
        groups.setdefault(_NOTE_TITLES.get(flag.code, flag.code), []).append(flag.organ or "")
    if groups:
        parts = [
            f"{title} ({', '.join(filter(None, organs))})" if any(organs) else title for title, organs in groups.items()
        ]
        lines.append(f"note: {case}: " + "; ".join(parts))
    return lines


def organ_table(report: QCReport, unit: str = "HU") -> list:
    """The per-organ summary a single-case run prints on stdout: organ, volume, intensity under it (mean, SD,
    median; `unit` HU for CT) and the network's confidence, in the organ table's order. Organs the check
    counts as not found are listed as such, without a volume."""
    from AbdomenSegLib.core.organs import ORGANS

    missed = {f.organ for f in report.flags if f.code in ("not_found", "missing_organ")}
    head = f"mean {unit}" if unit else "mean"
    lines = [f"{'organ':<22} {'volume mL':>10} {head:>9} {'SD':>7} {'median':>8} {'confidence':>10}"]
    for organ in ORGANS:
        entry = report.organs.get(organ.name)
        if organ.name in missed or (entry is not None and entry.volume_ml < TRACE_ML):
            lines.append(f"{organ.name:<22} {'not found':>10}")
            continue
        if entry is None:
            continue
        stat = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        conf = "-" if entry.confidence is None else f"{entry.confidence:.2f}"
        lines.append(
            f"{organ.name:<22} {entry.volume_ml:>10.1f} {stat(entry.mean):>9} {stat(entry.sd):>7} "
            f"{stat(entry.median):>8} {conf:>10}"
        )
    return lines


class QCFiles:
    """Per case `<case>.json` and `<case>.png` in `folder` (folder runs), or the paths given (single case);
    `finish()` adds `qc.csv` and the picture index (index.html, contact_sheet.png) to the folder."""

    def __init__(self, folder=None, *, json_path=None, png_path=None, pictures=True):
        self.folder = Path(folder) if folder else None
        self.json_path, self.png_path, self.pictures = json_path, png_path, pictures
        self.rows, self.entries = [], []
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, case: str, image, labels, report: QCReport, **extra) -> dict:
        data = report.as_dict(case=case, **extra)
        json_path = self.folder / f"{case}.json" if self.folder else self.json_path
        png_path = self.folder / f"{case}.png" if self.folder and self.pictures else self.png_path
        if json_path:
            with atomic_output(json_path, ".json") as tmp:
                Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        if png_path:
            from AbdomenSegLib.qc.sheet import render_case_sheet

            render_case_sheet(image, labels, data, png_path, title=f"{case} ({extra.get('model', '')})")
        self.rows.append(
            {
                "case": case,
                **{k: v for k, v in extra.items() if k not in ("modality", "intensity_unit")},
                **report.columns(),
            }
        )
        self.entries.append(
            {
                "case": case,
                "png": str(png_path) if png_path else "",
                "warnings": data["warnings"],
                "notes": data["notes"],
            }
        )
        return data

    def add_existing(self, case: str) -> int | None:
        """A case skipped because its output exists: its earlier report stays in the CSV and the index (a re-run
        must not drop it), and its warnings still count. Returns their number, or None without a report."""
        path = self.folder / f"{case}.json" if self.folder else None
        if path is None or not path.is_file():
            return None
        try:
            data = load_json(path, "result check", "")
            report = QCReport.from_dict(data)
        except (AbdomenSegError, ValueError, KeyError, TypeError):
            return None
        extra = {k: data[k] for k in ("output", "model", "seconds") if k in data}
        self.rows.append({"case": case, **extra, **report.columns()})
        png = self.folder / f"{case}.png"
        self.entries.append(
            {
                "case": case,
                "png": str(png) if png.is_file() else "",
                "warnings": data.get("warnings", []),
                "notes": data.get("notes", []),
            }
        )
        return len(report.warnings)

    def finish(self) -> list:
        """Write the folder's CSV and picture index; returns what was written."""
        if not self.folder or not self.rows:
            return []
        from AbdomenSegLib.io.tables import write_table

        fields = []
        for row in self.rows:  # organs differ between cases: the union of columns, in first-seen order
            fields += [k for k in row if k not in fields]
        written = [write_table(self.rows, self.folder / "qc.csv", fields)]
        if self.pictures and any(e["png"] for e in self.entries):
            from AbdomenSegLib.qc.sheet import write_contact_sheet

            written += list(write_contact_sheet([e for e in self.entries if e["png"]], self.folder))
        return written
