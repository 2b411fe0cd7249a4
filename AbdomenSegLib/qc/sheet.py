"""A picture per case, and an index of pictures for a folder run: what a person looks at to trust a result.

`render_case_sheet` draws one PNG (1400x800 px): axial, coronal and sagittal slices through the organs with
their outlines in the organ colours, the volume table and the result's flags (warnings, notes).
`write_contact_sheet` makes, for a folder run, an `index.html` (one thumbnail per case, warned cases first)
and `contact_sheet.png` (a grid of thumbnails; 100 per PNG, then `contact_sheet_2.png`, ...).

Display conventions: slices are shown in LPS voxel order after reorienting (nearest axes for oblique
images), i.e. radiological convention: the patient's right on the image's left in axial and coronal views,
anterior at the top of axial views and on the left of sagittal views, superior at the top of coronal and
sagittal views. Pixels are made square in millimetres, so every view keeps its physical aspect ratio.

matplotlib is imported only when a sheet is drawn, and its Agg canvas is used directly on a private
Figure (no pyplot, no `matplotlib.use`): drawing never switches the host's backend (3D Slicer's Python)
and is safe from worker threads.
"""

from __future__ import annotations

import html
import os
import textwrap
import urllib.parse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.organs import BY_LABEL, BY_NAME, ORGANS
from AbdomenSegLib.io.files import atomic_output
from AbdomenSegLib.qc.check import TRACE_ML

WIDTH_PX, HEIGHT_PX, DPI = 1400, 800, 100
CT_WINDOW = (-160.0, 240.0)  # soft tissue, HU
MR_PERCENTILES = (1.0, 99.0)  # of the body's voxels

BACKGROUND = "#0e0e10"
TEXT = "#e8e8e8"
DIM = "#9a9a9a"
WARNING = "#ff5c4d"
WARNING_FIX = "#e0a397"
NOTE = "#b4b4b4"
ORANGE = "#ffa64d"
GOOD = "#62d26f"
LETTERS = "#ffd84a"

MARGIN = 16
TABLE_WIDTH = 440
FLAG_LINE_PX = 17
MAX_FLAG_LINES = 8
PANEL_TITLE_PX = 18
GAP = 12
MAX_PNG_BYTES = 400_000

_PROFILE_VOXELS = 4_000_000  # labels are subsampled to at most this many voxels to choose the slices
_SAMPLE_VOXELS = 1_000_000  # image voxels sampled for the MR / unknown-modality display window

THUMB_W, THUMB_H = 336, 192
SHEET_COLUMNS = 5
PER_SHEET = 100


# ----------------------------------------------------------------------------------------- report access
def _text(item, key: str) -> str:
    """A flag's field, whether the flag is a dict, an object with attributes or a plain string."""
    if item is None:
        return ""
    if isinstance(item, str):
        return item if key == "problem" else ""
    if isinstance(item, dict):
        value = item.get(key)
        if value is None and key == "problem":
            value = item.get("message") or item.get("code")
        return "" if value is None else str(value)
    value = getattr(item, key, None)
    if value is None and key == "problem":
        return str(item)
    return "" if value is None else str(value)


def _field(item, key: str):
    if isinstance(item, dict):
        return item.get(key)
    return getattr(item, key, None)


def _flags(report: dict, key: str) -> list:
    value = (report or {}).get(key) or []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


# ------------------------------------------------------------------------------------ display volumes
def _on_image_grid(image: sitk.Image, labels: sitk.Image) -> sitk.Image:
    same = (
        labels.GetSize() == image.GetSize()
        and np.allclose(labels.GetSpacing(), image.GetSpacing(), rtol=1e-4)
        and np.allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-3)
        and np.allclose(labels.GetDirection(), image.GetDirection(), atol=1e-4)
    )
    if same:
        return labels
    return sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def _lps_views(image: sitk.Image, labels: sitk.Image):
    """(image array, label array, (sx, sy, sz) mm, oblique, images): (z, y, x) arrays in LPS order, i.e. index x
    towards the patient's left, y posterior, z superior. Axis-aligned grids give numpy views (transposes and
    flips, no copy: cheap on a 512x512x200 CT); a grid whose axes are not a signed permutation of LPS
    (oblique) is snapped to the nearest axes, as DICOMOrient does. The arrays are views into `images`,
    which the caller must keep alive while it uses them."""
    labels = _on_image_grid(image, labels)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    physical = np.argmax(np.abs(direction), axis=0)  # index axis i runs mostly along physical axis physical[i]
    if sorted(physical.tolist()) != [0, 1, 2]:
        image, labels = sitk.DICOMOrient(image, "LPS"), sitk.DICOMOrient(labels, "LPS")
        return (
            sitk.GetArrayViewFromImage(image),
            sitk.GetArrayViewFromImage(labels),
            image.GetSpacing(),
            True,
            (image, labels),
        )
    signs = np.sign(direction[physical, np.arange(3)])
    oblique = not np.allclose(np.abs(direction), np.eye(3)[:, physical], atol=1e-3)
    index_of = {int(p): i for i, p in enumerate(physical)}  # physical axis -> index axis
    order = [2 - index_of[2 - t] for t in range(3)]  # numpy axes (z, y, x) = index axes (2, 1, 0)
    spacing = tuple(image.GetSpacing()[index_of[p]] for p in range(3))
    arrays = []
    for volume in (image, labels):
        array = sitk.GetArrayViewFromImage(volume).transpose(order)
        flips = tuple(t for t in range(3) if signs[index_of[2 - t]] < 0)
        arrays.append(np.flip(array, flips) if flips else array)
    return arrays[0], arrays[1], spacing, oblique, (image, labels)


def _stride(shape, budget: int) -> int:
    total = float(np.prod(shape))
    return max(1, int(np.ceil((total / budget) ** (1.0 / 3.0)))) if total > budget else 1


# The axial view goes through these organs when the result has them (the level of the kidneys' hila and the
# pancreas, where most abdominal organs show together); the coronal and sagittal views through the most organ.
AXIAL_ORGANS = ("kidney_right", "kidney_left", "pancreas")


def _axial_level(mask: np.ndarray, labels: np.ndarray, step: int) -> int | None:
    """The axial slice (subsampled index) that shows the most of AXIAL_ORGANS found, ties broken by the number of
    organs in it and then by labelled voxels; None when none of them is in the result."""
    values = [BY_NAME[n].label for n in AXIAL_ORGANS]
    present = [np.asarray(labels == v).sum(axis=(1, 2)) for v in values]
    if not any(p.any() for p in present):
        return None
    # An organ counts in a slice from a tenth of its largest cross-section (not a few stray voxels).
    shown = sum((p >= max(1, 0.1 * p.max())) for p in present if p.any())
    organs_in = np.array([len(np.unique(labels[z])) for z in range(labels.shape[0])])
    score = shown.astype(np.float64) * 1e9 + organs_in * 1e6 + mask.sum(axis=(1, 2))
    return int(np.argmax(score))


def _centre_slices(labels: np.ndarray):
    """(z, y, x) of the slices to show: axial through the kidneys and pancreas (AXIAL_ORGANS) when found, else
    the slice with the most labelled voxels, as along the other axes; the middle when empty."""
    step = _stride(labels.shape, _PROFILE_VOXELS)
    sub = np.asarray(labels[::step, ::step, ::step])
    mask = sub > 0
    if not mask.any():
        return tuple(n // 2 for n in labels.shape), False
    centre = []
    for axis, n in enumerate(labels.shape):
        profile = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        centre.append(min(n - 1, int(np.argmax(profile)) * step))
    level = _axial_level(mask, sub, step)
    if level is not None:
        centre[0] = min(labels.shape[0] - 1, level * step)
    return tuple(centre), True


def _looks_like_hu(sample: np.ndarray) -> bool:
    return sample.size > 0 and float(np.percentile(sample, 1)) <= -500.0


def _display_window(image: np.ndarray, modality) -> tuple:
    """CT: a soft-tissue window. MR (and unknown modalities whose values are not HU): the 1-99th
    percentile of the body's voxels (those above half an Otsu threshold between background and body)."""
    modality = str(modality or "").upper()
    if modality == "CT":
        return CT_WINDOW
    step = _stride(image.shape, _SAMPLE_VOXELS)
    sample = np.asarray(image[::step, ::step, ::step], dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if modality != "MR" and _looks_like_hu(sample):
        return CT_WINDOW
    if sample.size == 0:
        return (0.0, 1.0)
    low, high = float(sample.min()), float(sample.max())
    if high <= low:
        return (low - 1.0, high + 1.0)
    from skimage.filters import threshold_otsu

    body = sample[sample > low + 0.5 * (float(threshold_otsu(sample)) - low)]
    if body.size < 100:
        body = sample
    low, high = (float(v) for v in np.percentile(body, MR_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def _views(image: np.ndarray, labels: np.ndarray, spacing, centre):
    """(name, image slice, label slice, (column mm, row mm), letters (left, right, top, bottom), caption)."""
    sx, sy, sz = spacing
    z, y, x = centre
    nz, ny, nx = labels.shape
    return [
        ("axial", image[z], labels[z], (sx, sy), ("R", "L", "A", "P"), f"axial {z + 1}/{nz}"),
        ("coronal", image[::-1, y, :], labels[::-1, y, :], (sx, sz), ("R", "L", "S", "I"), f"coronal {y + 1}/{ny}"),
        ("sagittal", image[::-1, :, x], labels[::-1, :, x], (sy, sz), ("A", "P", "S", "I"), f"sagittal {x + 1}/{nx}"),
    ]


def _fit(shape, pixel_mm, box_w: float, box_h: float):
    """Output (rows, columns) of a slice drawn with square pixels inside a box, keeping its physical aspect."""
    height_mm, width_mm = shape[0] * pixel_mm[1], shape[1] * pixel_mm[0]
    scale = min(box_w / width_mm, box_h / height_mm)
    return max(1, int(round(height_mm * scale))), max(1, int(round(width_mm * scale)))


def _resample_2d(array: np.ndarray, out_shape, order: int) -> np.ndarray:
    """Resample onto out_shape pixel centres covering the same extent (nearest or linear)."""
    rows = (np.arange(out_shape[0]) + 0.5) * array.shape[0] / out_shape[0] - 0.5
    cols = (np.arange(out_shape[1]) + 0.5) * array.shape[1] / out_shape[1] - 0.5
    if order == 0:
        r = np.clip(np.floor(rows + 0.5).astype(int), 0, array.shape[0] - 1)
        c = np.clip(np.floor(cols + 0.5).astype(int), 0, array.shape[1] - 1)
        return array[r[:, None], c[None, :]]
    from scipy import ndimage

    grid = np.meshgrid(np.clip(rows, 0, array.shape[0] - 1), np.clip(cols, 0, array.shape[1] - 1), indexing="ij")
    return ndimage.map_coordinates(np.asarray(array, dtype=np.float32), grid, order=1, mode="nearest")


def _colour_table(max_value: int) -> np.ndarray:
    lut = np.full((max_value + 1, 3), 0.92)  # values outside our organ table: near-white outlines
    lut[0] = 0.0
    for organ in ORGANS:
        if organ.label <= max_value:
            lut[organ.label] = organ.color_float
    return lut


def _panel_rgb(image2d, labels2d, pixel_mm, window, out_shape) -> np.ndarray:
    """uint8 RGB of a windowed slice with organ outlines (2 px inside each organ, 1 px on small panels)."""
    from scipy import ndimage

    low, high = window
    gray = np.nan_to_num(np.asarray(image2d, dtype=np.float32), nan=low, posinf=high, neginf=low)
    gray = _resample_2d(np.clip((gray - low) / (high - low), 0.0, 1.0), out_shape, 1)
    lab = np.asarray(labels2d)
    lab = np.clip(np.rint(lab).astype(np.int64) if lab.dtype.kind == "f" else lab.astype(np.int64), 0, None)
    lab = _resample_2d(lab, out_shape, 0)
    rgb = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=2)
    if lab.any():
        size = 5 if min(out_shape) >= 200 else 3
        edge = (lab > 0) & (
            (ndimage.maximum_filter(lab, size=size) != lab) | (ndimage.minimum_filter(lab, size=size) != lab)
        )
        rgb[edge] = _colour_table(int(lab.max()))[lab[edge]]
    return np.round(rgb * 255.0).astype(np.uint8)


def _layouts(shapes, box_w: float, box_h: float):
    """Candidate panel boxes (x, y from the top-left, w, h) for the three views; the one showing the most
    image area wins: three in a row (tall scans), or axial left with coronal over sagittal (short scans)."""
    titled = box_h - PANEL_TITLE_PX
    third = (box_w - 2 * GAP) / 3.0
    row = [(i * (third + GAP), 0.0, third, titled) for i in range(3)]
    half_h = (box_h - GAP) / 2.0 - PANEL_TITLE_PX
    candidates = [row]
    for split in (0.45, 0.5, 0.55):
        left = box_w * split - GAP / 2.0
        right = box_w - left - GAP
        candidates.append(
            [
                (0.0, 0.0, left, titled),
                (left + GAP, 0.0, right, half_h),
                (left + GAP, half_h + PANEL_TITLE_PX + GAP, right, half_h),
            ]
        )

    def area(layout):
        total = 0.0
        for (shape, pixel_mm), (_, _, w, h) in zip(shapes, layout):
            rows, cols = _fit(shape, pixel_mm, max(w, 1.0), max(h, 1.0))
            total += rows * cols
        return total

    return max(candidates, key=area)


# ------------------------------------------------------------------------------------------- the sheet
def _flag_lines(warnings, notes, width_chars: int, empty: bool):
    """[(text, colour, weight)] for the flags block, at most MAX_FLAG_LINES: fixes are dropped first."""
    blocks = []
    for flag in warnings:
        problem = _text(flag, "problem").strip() or "warning"
        lines = textwrap.wrap("\u26a0 " + problem, width_chars, subsequent_indent="   ") or ["\u26a0"]
        fix = _text(flag, "fix").strip()
        fix_lines = (
            textwrap.wrap("\u2192 " + fix, width_chars, initial_indent="   ", subsequent_indent="     ") if fix else []
        )
        blocks.append(([(t, WARNING, "bold") for t in lines], [(t, WARNING_FIX, "normal") for t in fix_lines]))
    grouped = {  # one line per kind for the notes about many organs
        code: [str(_field(f, "organ")) for f in notes if _field(f, "code") == code and _field(f, "organ")]
        for code in ("low_confidence", "cut_by_border")
    }
    for flag in notes:
        code, organ = _field(flag, "code"), str(_field(flag, "organ"))
        if len(grouped.get(code, ())) > 1:
            if organ != grouped[code][0]:
                continue
            names = ", ".join(grouped[code])
            problem = (
                f"the network is unsure of {names} (confidence under the model's threshold)"
                if code == "low_confidence"
                else f"{names} touch the image border: their volumes are incomplete"
            )
        else:
            problem = _text(flag, "problem").strip() or "note"
        lines = textwrap.wrap("\u2022 " + problem, width_chars, subsequent_indent="   ")
        blocks.append(([(t, NOTE, "normal") for t in lines], []))
    if not blocks:
        return [("\u2713 no flags", GOOD, "bold")] if not empty else []
    with_fixes = [line for main, fixes in blocks for line in main + fixes]
    if len(with_fixes) <= MAX_FLAG_LINES:
        return with_fixes
    mains = [line for main, _ in blocks for line in main]
    if len(mains) <= MAX_FLAG_LINES:
        return mains
    shown: list[tuple[str, str, str]] = []
    count = 0
    for main, _ in blocks:
        if len(shown) + len(main) > MAX_FLAG_LINES - 1:
            break
        shown += main
        count += 1
    shown.append((f"\u2026 and {len(blocks) - count} more flag(s): see the report", DIM, "normal"))
    return shown


def _missed(flags) -> set:
    """Organs a flag calls not found or missing: the table lists them as such, never with a volume."""
    return {str(_field(f, "organ")) for f in flags if _field(f, "code") in ("not_found", "missing_organ")}


def _organ_rows(report: dict, labels: np.ndarray, voxel_ml: float, missed=frozenset()):
    """[(name, display name, colour, organ entry)] in the organ table's order; volumes from the label map
    when the report has none. Organs in `missed` (a flag says they were not found) get {"missed": True}."""
    organs = (report or {}).get("organs")
    if not isinstance(organs, dict):
        flat = np.asarray(labels).ravel()
        counts = np.bincount(flat if flat.dtype.kind == "u" else np.clip(flat.astype(np.int64), 0, None))
        organs = {
            BY_LABEL[int(v)].name: {"volume_ml": float(counts[v]) * voxel_ml}
            for v in np.flatnonzero(counts)
            if v in BY_LABEL
        }
    order = {o.name: i for i, o in enumerate(ORGANS)}
    rows = []
    for name in sorted(organs, key=lambda n: (order.get(str(n), len(order)), str(n))):
        organ = BY_NAME.get(str(name))
        entry = organs[name] if isinstance(organs[name], dict) else {"volume_ml": organs[name]}
        volume = _number(entry.get("volume_ml"))
        if str(name) in missed or (volume is not None and volume < TRACE_ML):
            entry = {"missed": True}
        rows.append(
            (
                str(name),
                organ.display_name if organ else str(name),
                organ.color_float if organ else (0.92, 0.92, 0.92),
                entry,
            )
        )
    return rows


def _format_ml(value) -> str:
    if value is None:
        return "\u2013"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:,.0f}"


def _draw_table(fig, rows, x0: float, top: float, width: float, bottom: float, flagged: dict, empty: bool):
    from matplotlib.patches import Rectangle

    def text(x, y, s, **kw):
        kw.setdefault("color", TEXT)
        kw.setdefault("fontsize", 10)
        fig.text(x / WIDTH_PX, 1.0 - y / HEIGHT_PX, s, va="center", parse_math=False, **kw)

    columns = {"name": x0 + 22, "ml": x0 + 238, "conf": x0 + 292, "pieces": x0 + 352, "mark": x0 + 366}
    y = top + 10
    text(x0, y, "Organ", fontweight="bold", color=DIM)
    text(columns["ml"], y, "mL", ha="right", fontweight="bold", color=DIM)
    text(columns["conf"], y, "conf.", ha="right", fontweight="bold", color=DIM)
    text(columns["pieces"], y, "pieces", ha="right", fontweight="bold", color=DIM)
    fig.add_artist(
        Rectangle(
            (x0 / WIDTH_PX, 1.0 - (y + 12) / HEIGHT_PX),
            width / WIDTH_PX,
            1.0 / HEIGHT_PX,
            color="#444444",
            transform=fig.transFigure,
        )
    )
    if not rows:
        text(
            x0,
            y + 34,
            "no organ found" if empty else "no organ volumes in the report",
            color=WARNING,
            fontsize=13,
            fontweight="bold",
        )
        return
    row_h = min(24.0, (bottom - top - 60) / max(len(rows), 1))
    marked = False
    for i, (name, display, colour, entry) in enumerate(rows):
        yy = y + 12 + row_h * (i + 0.5) + 4
        if i % 2 == 0:
            fig.add_artist(
                Rectangle(
                    (x0 / WIDTH_PX, 1.0 - (yy + row_h / 2) / HEIGHT_PX),
                    width / WIDTH_PX,
                    row_h / HEIGHT_PX,
                    color="#18181c",
                    transform=fig.transFigure,
                    zorder=0,
                )
            )
        fig.add_artist(
            Rectangle(
                ((x0 + 2) / WIDTH_PX, 1.0 - (yy + 7) / HEIGHT_PX),
                14 / WIDTH_PX,
                14 / HEIGHT_PX,
                facecolor=colour,
                edgecolor="none",
                transform=fig.transFigure,
            )
        )
        name_colour = {"warning": WARNING, "note": ORANGE}.get(flagged.get(name, ""), TEXT)
        text(columns["name"], yy, display, color=name_colour)
        if entry.get("missed"):
            text(columns["ml"], yy, "not found", ha="right", color=DIM)
            continue
        volume = _number(entry.get("volume_ml"))
        marks, ml_colour = [], TEXT
        bounds = entry.get("normal_range_ml")
        if volume is not None and isinstance(bounds, (list, tuple)) and len(bounds) == 2:
            low, high = _number(bounds[0]), _number(bounds[1])
            if low is not None and volume < low:
                marks.append("\u2193 low")
                ml_colour = ORANGE
            elif high is not None and volume > high:
                marks.append("\u2191 high")
                ml_colour = ORANGE
        text(columns["ml"], yy, _format_ml(volume), ha="right", color=ml_colour)
        confidence = _number(entry.get("confidence"))
        text(columns["conf"], yy, "\u2013" if confidence is None else f"{confidence:.2f}", ha="right")
        pieces = entry.get("pieces")
        pieces_colour = ORANGE if isinstance(pieces, (int, float)) and pieces > 1 else TEXT
        text(columns["pieces"], yy, "\u2013" if pieces is None else str(pieces), ha="right", color=pieces_colour)
        if entry.get("at_border"):
            marks.append("at edge")
        if marks:
            marked = True
            text(columns["mark"], yy, ", ".join(marks), color=ORANGE, fontsize=9)
    if marked:
        text(
            x0,
            y + 12 + row_h * len(rows) + 18,
            "\u2191/\u2193 outside the normal adult range; at edge: touches the image border",
            color=DIM,
            fontsize=8.5,
        )


def render_case_sheet(image: sitk.Image, labels: sitk.Image, report: dict, path, *, title: str = "") -> Path:
    """Write one PNG (1400x800 px) with axial, coronal and sagittal views through the organs (outlines in
    the organ colours), the volume table and the report's flags; returns `path`. Written atomically."""
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image as PILImage

    report = report if isinstance(report, dict) else {}
    if image.GetDimension() != 3 or labels.GetDimension() != 3:
        raise ValueError("render_case_sheet needs 3D image and label volumes")
    array, label_array, lps_spacing, oblique, _keep_alive = _lps_views(image, labels)
    centre, found = _centre_slices(label_array)
    window = _display_window(array, report.get("modality"))
    views = _views(array, label_array, lps_spacing, centre)

    warnings = _flags(report, "warnings")
    notes = _flags(report, "notes")
    if not found and not any(_field(w, "code") == "empty" for w in warnings):
        warnings.insert(
            0,
            {
                "code": "empty",
                "problem": "no organ found in this image",
                "fix": "check that the image covers the abdomen and that the model fits its modality",
            },
        )
    flagged = {}
    for kind, items in (("note", notes), ("warning", warnings)):
        for item in items:
            for organ in [_field(item, "organ"), *(_field(item, "organs") or [])]:
                if organ:
                    flagged[str(organ)] = kind

    fig = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, facecolor=BACKGROUND)
    canvas = FigureCanvasAgg(fig)

    def text(x, y, s, **kw):  # x, y in pixels from the top-left; "$" in names and problems is no math
        kw.setdefault("color", TEXT)
        fig.text(x / WIDTH_PX, 1.0 - y / HEIGHT_PX, s, parse_math=False, **kw)

    # title and facts
    heading = title or str(report.get("case") or "")
    text(MARGIN, 22, heading or "(unnamed case)", fontsize=15, fontweight="bold", va="center")
    size, spacing = image.GetSize(), image.GetSpacing()
    facts = [str(report[k]) for k in ("model", "modality") if report.get(k)]
    facts.append("\u00d7".join(str(n) for n in size) + " voxels, " + "\u00d7".join(f"{s:.3g}" for s in spacing) + " mm")
    if oblique:
        facts.append("oblique: shown along the nearest axes")
    text(MARGIN, 44, "  \u00b7  ".join(facts), fontsize=10, color=DIM, va="center")

    # flags
    width_chars = int((WIDTH_PX - 2 * MARGIN) / (10 * DPI / 72 * 0.58))
    lines = _flag_lines(warnings, notes, width_chars, not found)
    y = 66
    for line, colour, weight in lines:
        text(MARGIN, y, line, fontsize=10, color=colour, fontweight=weight, va="center")
        y += FLAG_LINE_PX
    content_top = y + 4

    # views
    views_w = WIDTH_PX - 2 * MARGIN - TABLE_WIDTH - 2 * GAP
    views_h = HEIGHT_PX - MARGIN - content_top
    shapes = [(v[1].shape, v[3]) for v in views]
    layout = _layouts(shapes, views_w, views_h)
    stroke = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    for (_name, img2d, lab2d, pixel_mm, letters, caption), (bx, by, bw, bh) in zip(views, layout):
        rows, cols = _fit(img2d.shape, pixel_mm, max(bw, 1.0), max(bh, 1.0))
        rgb = _panel_rgb(img2d, lab2d, pixel_mm, window, (rows, cols))
        left = int(round(MARGIN + bx + (bw - cols) / 2.0))
        top = int(round(content_top + by + PANEL_TITLE_PX + (bh - rows) / 2.0))
        fig.figimage(rgb, xo=left, yo=HEIGHT_PX - top - rows, origin="upper", resize=False)
        text(left, top - 9, caption, fontsize=9, color=DIM, va="center")
        kw = dict(fontsize=10, fontweight="bold", color=LETTERS, path_effects=stroke)
        if cols >= 24:
            text(left + 4, top + rows / 2.0, letters[0], ha="left", va="center", **kw)
            text(left + cols - 4, top + rows / 2.0, letters[1], ha="right", va="center", **kw)
        if rows >= 40:
            text(left + cols / 2.0, top + 3, letters[2], ha="center", va="top", **kw)
            text(left + cols / 2.0, top + rows - 3, letters[3], ha="center", va="bottom", **kw)

    # volume table
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    table_x = WIDTH_PX - MARGIN - TABLE_WIDTH
    _draw_table(
        fig,
        _organ_rows(report, label_array, voxel_ml, _missed(warnings + notes)),
        table_x,
        content_top,
        TABLE_WIDTH,
        HEIGHT_PX - MARGIN,
        flagged,
        not found,
    )

    canvas.draw()
    picture = PILImage.fromarray(np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3]))
    data = _png_bytes(picture)
    if len(data) > MAX_PNG_BYTES:  # very noisy images: 256 colours (median cut) keep it small
        data = min(data, _png_bytes(picture.quantize(256, method=PILImage.Quantize.MEDIANCUT)), key=len)
    path = Path(path)
    with atomic_output(path, ".png") as tmp:
        Path(tmp).write_bytes(data)
    return path


def _png_bytes(picture) -> bytes:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- contact sheets
def _resolve_png(png, out_dir: Path):
    if not png:
        return None
    png = Path(png)
    if png.is_absolute():
        return png
    if (out_dir / png).exists() or not png.exists():
        return out_dir / png
    return png.resolve()


def _href(target: Path, out_dir: Path) -> str:
    try:
        relative = os.path.relpath(os.path.abspath(target), os.path.abspath(out_dir))
    except ValueError:  # another drive (Windows): only an absolute link can reach it
        return Path(os.path.abspath(target)).as_uri()
    return urllib.parse.quote(relative.replace(os.sep, "/"))


def _font(size: int):
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # noqa: BLE001 - any font problem: PIL's own font still draws
        return ImageFont.load_default()


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "\u2026", font=font) > width:
        text = text[:-1]
    return text + "\u2026"


def _sheet_png(cases, path: Path, header: str) -> None:
    from PIL import Image, ImageDraw

    resample = getattr(Image, "Resampling", Image).LANCZOS
    cell_w, cell_h, pad, head = THUMB_W + 12, THUMB_H + 26, 12, 40
    columns = max(1, min(SHEET_COLUMNS, len(cases)))
    rows = max(1, -(-len(cases) // columns))
    sheet = Image.new("RGB", (pad + columns * cell_w, head + rows * cell_h + pad), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, bold = _font(13), _font(16)
    draw.text((pad, 12), header, fill=TEXT, font=bold)
    for i, case in enumerate(cases):
        x = pad + (i % columns) * cell_w
        y = head + (i // columns) * cell_h
        thumb = None
        if case["path"] is not None:
            try:
                with Image.open(case["path"]) as picture:
                    thumb = picture.convert("RGB")
                    thumb.thumbnail((THUMB_W, THUMB_H), resample)
            except (OSError, ValueError):
                thumb = None
        if thumb is None:
            draw.rectangle([x, y, x + THUMB_W - 1, y + THUMB_H - 1], fill="#2a2a2a")
            draw.text((x + 10, y + THUMB_H // 2 - 8), "no picture", fill=DIM, font=font)
        else:
            sheet.paste(thumb, (x + (THUMB_W - thumb.width) // 2, y + (THUMB_H - thumb.height) // 2))
        if case["warnings"]:
            draw.rectangle([x - 4, y - 4, x + THUMB_W + 3, y + THUMB_H + 3], outline=WARNING, width=4)
        label = case["case"] + (f"  \u26a0 {len(case['warnings'])}" if case["warnings"] else "")
        draw.text(
            (x, y + THUMB_H + 6),
            _fit_text(draw, label, font, THUMB_W),
            font=font,
            fill=WARNING if case["warnings"] else TEXT,
        )
    with atomic_output(path, ".png") as tmp:
        sheet.save(tmp, format="PNG", optimize=True)


_HTML_STYLE = """
body{background:#0e0e10;color:#e8e8e8;font-family:sans-serif;margin:16px}
h1{font-size:20px;margin:0 0 4px} .summary{color:#9a9a9a;margin-bottom:12px}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.case{width:352px;background:#18181c;border:3px solid #18181c;border-radius:4px;padding:6px}
.case.warned{border-color:#ff5c4d}
.case img{width:350px;display:block;background:#222;min-height:100px}
.name{font-weight:bold;margin-top:4px;word-break:break-all}
.badge{display:inline-block;border-radius:3px;padding:0 5px;margin-left:6px;font-size:12px}
.badge.w{background:#ff5c4d;color:#000} .badge.n{background:#555;color:#eee}
.problem{color:#ff8a7d;font-size:12px;margin-top:2px} .missing{color:#9a9a9a;padding:40px 0;text-align:center}
"""


def write_contact_sheet(entries: list, out_dir) -> tuple:
    """`index.html` and `contact_sheet.png` (then `_2`, `_3`, ... per 100 cases) in `out_dir` for a folder
    run; returns (index.html, the first contact sheet). Cases with warnings come first.

    entries: [{"case": name, "png": path (absolute, or relative to out_dir), "warnings": [...], "notes": [...]}]
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for index, entry in enumerate(entries or []):
        entry = entry if isinstance(entry, dict) else {}
        cases.append(
            {
                "case": str(entry.get("case") or f"case {index + 1}"),
                "path": _resolve_png(entry.get("png"), out_dir),
                "warnings": _flags(entry, "warnings"),
                "notes": _flags(entry, "notes"),
                "index": index,
            }
        )
    cases.sort(key=lambda c: (not c["warnings"], c["case"].lower(), c["index"]))
    warned = sum(1 for c in cases if c["warnings"])
    summary = f"{len(cases)} case{'s' if len(cases) != 1 else ''}, {warned} with warnings"

    pages = [cases[i : i + PER_SHEET] for i in range(0, len(cases), PER_SHEET)] or [[]]
    sheet_paths = [
        out_dir / ("contact_sheet.png" if i == 0 else f"contact_sheet_{i + 1}.png") for i in range(len(pages))
    ]
    for number, (page, sheet) in enumerate(zip(pages, sheet_paths), 1):
        header = summary + (f"  (page {number} of {len(pages)})" if len(pages) > 1 else "")
        _sheet_png(page, sheet, header if page else "no cases")
    stale = len(pages) + 1
    while (out_dir / f"contact_sheet_{stale}.png").exists():  # pages of an earlier, larger run
        (out_dir / f"contact_sheet_{stale}.png").unlink()
        stale += 1

    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>AbdomenSeg quality check</title>",
        f"<style>{_HTML_STYLE}</style></head><body>",
        "<h1>AbdomenSeg quality check</h1>",
        f'<div class="summary">{esc(summary)} &middot; contact sheet: '
        + ", ".join(f'<a href="{esc(_href(p, out_dir))}">{esc(p.name)}</a>' for p in sheet_paths)
        + "</div>",
        '<div class="grid">',
    ]
    for case in cases:
        problems = [_text(w, "problem") for w in case["warnings"]] + [_text(n, "problem") for n in case["notes"]]
        tooltip = esc("\n".join(p for p in problems if p))
        badges = ""
        if case["warnings"]:
            badges += (
                f'<span class="badge w">{len(case["warnings"])} warning{"s" * (len(case["warnings"]) != 1)}</span>'
            )
        if case["notes"]:
            badges += f'<span class="badge n">{len(case["notes"])} note{"s" * (len(case["notes"]) != 1)}</span>'
        if case["path"] is not None and case["path"].is_file():
            href = esc(_href(case["path"], out_dir))
            picture = (
                f'<a href="{href}"><img src="{href}" loading="lazy" alt="{esc(case["case"])}" '
                f'title="{tooltip}"></a>'
            )
        else:
            picture = '<div class="missing">no picture</div>'
        first = _text(case["warnings"][0], "problem") if case["warnings"] else ""
        if len(first) > 160:
            first = first[:159] + "\u2026"
        parts.append(
            f'<div class="case{" warned" if case["warnings"] else ""}">{picture}'
            f'<div class="name">{esc(case["case"])}{badges}</div>'
            + (f'<div class="problem">{esc(first)}</div>' if first else "")
            + "</div>"
        )
    parts += ["</div>", "</body></html>", ""]
    index_path = out_dir / "index.html"
    with atomic_output(index_path, ".html") as tmp:
        Path(tmp).write_text("\n".join(parts), encoding="utf-8")
    return index_path, sheet_paths[0]
