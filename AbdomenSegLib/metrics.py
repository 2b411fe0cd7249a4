"""Per-organ agreement between a predicted and a reference label map, in millimetres.

Dice, IoU and volumes are counted on the voxels; HD95, average symmetric surface distance (ASSD) and
surface Dice at a tolerance use MONAI's surface-distance functions with the real voxel spacing.

Defined values where an organ is missing (documented in the README):
- absent from both maps: status `absent_both`; Dice = IoU = surface Dice = 1, HD95 = ASSD = 0.
  Summaries leave these rows out (nothing was there to get right).
- absent from one map: status `missing_pred` or `missing_ref`; Dice = IoU = surface Dice = 0 and
  HD95 = ASSD = the image diagonal in mm (the largest distance possible in that grid), as BraTS does.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import AbdomenSegError
from .io import atomic_output
from .organs import BY_NAME, CONVENTIONS, convert_labels
from .preprocess import bounding_box, resample_to_reference

FIELDS = ("case", "model", "organ", "label", "status", "dice", "iou", "hd95_mm", "assd_mm", "surface_dice",
          "tolerance_mm", "volume_pred_ml", "volume_ref_ml", "volume_diff_ml")
METRIC_UNITS = {
    "dice": ("", "Dice similarity coefficient 2|P∩R|/(|P|+|R|)"),
    "iou": ("", "Intersection over union (Jaccard) |P∩R|/|P∪R|"),
    "hd95_mm": ("mm", "95th percentile symmetric Hausdorff distance between surfaces"),
    "assd_mm": ("mm", "Average symmetric surface distance"),
    "surface_dice": ("", "Fraction of both surfaces within the tolerance of the other (normalised surface Dice)"),
    "volume_pred_ml": ("mL", "Predicted organ volume"),
    "volume_ref_ml": ("mL", "Reference organ volume"),
    "volume_diff_ml": ("mL", "Predicted minus reference volume"),
    "confidence": ("", "Network confidence: mean max-probability inside the organ (low: likely inaccurate; "
                       "calibrated per model on its validation split)"),
    "pieces": ("", "Connected pieces of the organ"),
    "at_border": ("", "Image borders the organ touches (its volume is then incomplete)"),
    "flags": ("", "Result check flags for this organ (see the warning in the panel)"),
}


def align_reference(reference: sitk.Image, prediction: sitk.Image) -> sitk.Image:
    """The reference label map in the prediction's grid (nearest neighbour when grids differ)."""
    if reference.GetDimension() != 3:
        raise AbdomenSegError(f"reference is {reference.GetDimension()}D", "give a 3D label map as reference")
    same = (reference.GetSize() == prediction.GetSize()
            and np.allclose(reference.GetSpacing(), prediction.GetSpacing(), atol=1e-4)
            and np.allclose(reference.GetOrigin(), prediction.GetOrigin(), atol=1e-3)
            and np.allclose(reference.GetDirection(), prediction.GetDirection(), atol=1e-4))
    if same:
        return reference
    if not _overlaps(reference, prediction):
        raise AbdomenSegError("reference and prediction do not overlap in space",
                              "check that the reference belongs to this scan (same patient, same coordinate system)")
    return resample_to_reference(reference, prediction, is_label=True)


def _overlaps(a: sitk.Image, b: sitk.Image) -> bool:
    def box(img):
        size = img.GetSize()
        pts = np.array([img.TransformContinuousIndexToPhysicalPoint((x, y, z))
                        for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5) for z in (-0.5, size[2] - 0.5)])
        return pts.min(0), pts.max(0)
    (alo, ahi), (blo, bhi) = box(a), box(b)
    return bool(np.all(alo < bhi) and np.all(blo < ahi))


# The largest value each convention defines (TotalSegmentator's tasks hold many structures we do not
# score: their values are valid there and map to background).
CONVENTION_MAX_VALUE = {"abdomenseg": 14, "btcv": 13, "chaos": 4, "totalseg": 117, "totalseg_mr": 57}
# No label convention has this many distinct values; a scan has thousands.
_MAX_LABEL_VALUES = 200


def _distinct_values(array: np.ndarray) -> np.ndarray:
    """Every value present (a bincount for integer maps: one pass, no sort); float images are sampled."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize <= 4 and array.size:
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high < 1 << 16:
            return np.flatnonzero(np.bincount(array.ravel(), minlength=1))
        return np.unique(array[::2, ::2, ::2])
    return np.unique(array[::2, ::2, ::2])


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise AbdomenSegError(f"unknown label convention '{convention}'", f"use one of: {', '.join(CONVENTIONS)}")


def _check_label_map(image: sitk.Image, what: str, convention: str):
    """Refuse an image that is not a label map of `convention`: a CT or MR given by mistake, or values
    the convention does not define (scored as background they would give Dice 0 without a word)."""
    values = _distinct_values(sitk.GetArrayViewFromImage(image))
    option = "--reference-labels" if what == "reference" else "--prediction-labels"
    if (not np.all(values == np.round(values)) or values.min() < 0 or len(values) > _MAX_LABEL_VALUES):
        raise AbdomenSegError(
            f"the {what} is not a label map (values {values.min():g} to {values.max():g}, {len(values)} distinct): "
            "it looks like a scan", f"give the {what} as a label map with integer organ values")
    top = int(values.max())
    if top > CONVENTION_MAX_VALUE[convention]:
        unknown = [int(v) for v in values if v > CONVENTION_MAX_VALUE[convention]]
        fits = [c for c, m in CONVENTION_MAX_VALUE.items() if m >= top]
        raise AbdomenSegError(
            f"the {what} holds label values {', '.join(map(str, unknown[:8]))}{' ...' if len(unknown) > 8 else ''} "
            f"that the '{convention}' convention does not define (it uses 1-{CONVENTION_MAX_VALUE[convention]})",
            f"pass the {what}'s convention with {option} ({' or '.join(fits) or 'none of ours fits'})")


def evaluate(prediction: sitk.Image, reference: sitk.Image, *, reference_convention: str = "abdomenseg",
             prediction_convention: str = "abdomenseg", organs=None, tolerance_mm: float = 2.0,
             case: str = "", model: str = "") -> list:
    """One row (dict) per organ. Organs default to those the reference convention can label."""
    for convention in (reference_convention, prediction_convention):
        check_convention(convention)
    _check_label_map(prediction, "prediction", prediction_convention)
    _check_label_map(reference, "reference", reference_convention)
    reference = align_reference(reference, prediction)
    pred = convert_labels(sitk.GetArrayViewFromImage(prediction), prediction_convention)
    ref = convert_labels(sitk.GetArrayViewFromImage(reference), reference_convention)
    spacing_zyx = tuple(float(s) for s in prediction.GetSpacing()[::-1])
    if organs is None:
        organs = [name for name in BY_NAME if name in CONVENTIONS[reference_convention].values()]
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    diagonal = float(np.linalg.norm(np.array(pred.shape) * np.array(spacing_zyx)))
    rows = []
    for name in organs:
        organ = BY_NAME[name]
        p, r = pred == organ.label, ref == organ.label
        row = {"case": case, "model": model, "organ": name, "label": organ.label, "tolerance_mm": tolerance_mm,
               "volume_pred_ml": float(p.sum()) * voxel_ml, "volume_ref_ml": float(r.sum()) * voxel_ml}
        row["volume_diff_ml"] = row["volume_pred_ml"] - row["volume_ref_ml"]
        if not p.any() and not r.any():
            row.update(status="absent_both", dice=1.0, iou=1.0, hd95_mm=0.0, assd_mm=0.0, surface_dice=1.0)
        elif not p.any() or not r.any():
            row.update(status="missing_pred" if not p.any() else "missing_ref", dice=0.0, iou=0.0,
                       hd95_mm=diagonal, assd_mm=diagonal, surface_dice=0.0)
        else:
            inter, union = float((p & r).sum()), float((p | r).sum())
            row.update(status="ok", dice=2 * inter / (p.sum() + r.sum()), iou=inter / union)
            row.update(surface_metrics(p, r, spacing_zyx, tolerance_mm))
        rows.append(row)
    return rows


def surface_metrics(p: np.ndarray, r: np.ndarray, spacing, tolerance_mm: float) -> dict:
    """HD95, ASSD and surface Dice of two non-empty masks (MONAI, computed in the union's box)."""
    import torch
    from monai.metrics import (compute_average_surface_distance, compute_hausdorff_distance,
                               compute_surface_dice)
    box = bounding_box(p | r, margin=2)
    pt = torch.as_tensor(np.ascontiguousarray(p[box]))[None, None]
    rt = torch.as_tensor(np.ascontiguousarray(r[box]))[None, None]
    spacing = list(spacing)
    hd95 = compute_hausdorff_distance(pt, rt, include_background=True, percentile=95, spacing=spacing)
    assd = compute_average_surface_distance(pt, rt, include_background=True, symmetric=True, spacing=spacing)
    nsd = compute_surface_dice(pt, rt, class_thresholds=[tolerance_mm], include_background=True, spacing=spacing)
    return {"hd95_mm": float(hd95), "assd_mm": float(assd), "surface_dice": float(nsd)}


def summarize(rows: list) -> list:
    """Mean and std per (model, organ) over cases, leaving out organs absent from both maps."""
    groups = {}
    for row in rows:
        if row["status"] != "absent_both":
            groups.setdefault((row.get("model", ""), row["organ"]), []).append(row)
    summary = []
    for (model, organ), items in groups.items():
        entry = {"model": model, "organ": organ, "cases": len(items)}
        for key in ("dice", "iou", "hd95_mm", "assd_mm", "surface_dice", "volume_diff_ml"):
            values = np.array([float(i[key]) for i in items])
            entry[f"{key}_mean"] = float(values.mean())
            entry[f"{key}_std"] = float(values.std())
        summary.append(entry)
    return summary


def write_csv(rows: list, path, fields=None) -> Path:
    """Atomic CSV write (temp file + rename)."""
    path = Path(path)
    fields = fields or (list(FIELDS) if rows and set(FIELDS) <= set(rows[0]) else list(rows[0]) if rows else list(FIELDS))
    with atomic_output(path, ".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})
    return path


def format_table(rows: list) -> str:
    lines = [f"{'organ':22s} {'status':12s} {'Dice':>6s} {'IoU':>6s} {'HD95mm':>7s} {'ASSDmm':>7s} {'NSD':>6s} {'Vpred mL':>9s} {'Vref mL':>9s}"]
    for r in rows:
        lines.append(f"{r['organ']:22s} {r['status']:12s} {r['dice']:6.3f} {r['iou']:6.3f} {r['hd95_mm']:7.1f} "
                     f"{r['assd_mm']:7.2f} {r['surface_dice']:6.3f} {r['volume_pred_ml']:9.1f} {r['volume_ref_ml']:9.1f}")
    return "\n".join(lines)
