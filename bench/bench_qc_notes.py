"""How often the result check puts a note on a good organ, and what removing small islands costs.

    PYTHONPATH=. python bench/bench_qc_notes.py [--model btcv-ct-3d-unet] [--cache /tmp/qc_cache] [--example]

Segments each validation case of the model's card (its protocol: original files, true direction, never trained
on) once and caches the label map and the network's per-organ confidence (`--cache`); then, with the result
check of this checkout, counts per organ with Dice >= 0.85 whether a flag names it (docs/result_check.md), and
for island removal the Dice per organ with non-largest pieces below 0, 1, 2, 5, 10, 20, 50 mL removed.
`--example` adds TotalSegmentator's example CT against TotalSegmentator's own labels (a model's output, not a
person's). One thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

GOOD = 0.85
ISLAND_ML = (0, 1, 2, 5, 10, 20, 50)


def _dice(pred: np.ndarray, ref: np.ndarray, value: int) -> float | None:
    p, r = pred == value, ref == value
    total = int(p.sum()) + int(r.sum())
    return None if total == 0 else 2.0 * int((p & r).sum()) / total


def cached_cases(model: str, cache: Path, example: bool) -> list:
    """[(case, image, prediction, reference in our numbering, confidence)] from the cache, filled on first use."""
    import torch

    from AbdomenSegLib.core.organs import convert_labels
    from AbdomenSegLib.inference.segmenter import Options, Segmenter
    from AbdomenSegLib.models.packages import find_model
    from AbdomenSegLib.training.config import validation_data
    from AbdomenSegLib.training.export import validation_cases

    torch.set_num_threads(1)
    card = find_model(model)
    data = validation_data(card["training"]["config"]["data"])
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / data["root"].split("/")[-1]
    folder = cache / model
    folder.mkdir(parents=True, exist_ok=True)
    todo = (
        [
            (name, image, ref, data["convention"], data["input_intensity"])
            for name, image, ref in validation_cases(card, root)
        ]
        if not (folder / "done").exists()
        else []
    )
    if example and not (folder / "example_ct.json").exists():
        ts = root.parent / "totalseg_example"
        todo.append(
            (
                "example_ct",
                sitk.ReadImage(str(ts / "example_ct.nii.gz")),
                sitk.ReadImage(str(ts / "example_seg_fast_force_split.nii.gz")),
                "totalseg",
                "native",
            )
        )
    segmenter = Segmenter(card, "cpu", log=lambda m: None) if todo else None
    # The cache holds the network's labels before island removal (the card's own post-processing otherwise).
    post = card.get("postprocess", {})
    island_ml = post.pop("remove_islands_ml", None)
    for name, image, ref, convention, intensity in todo:
        pred = segmenter.segment(image, Options(input_intensity=intensity))
        sitk.WriteImage(image, str(folder / f"{name}_image.nii.gz"))
        sitk.WriteImage(pred, str(folder / f"{name}_pred.nii.gz"))
        reference = sitk.GetImageFromArray(convert_labels(sitk.GetArrayFromImage(ref), convention))
        reference.CopyInformation(ref)
        sitk.WriteImage(reference, str(folder / f"{name}_ref.nii.gz"))
        (folder / f"{name}.json").write_text(
            json.dumps({"confidence": segmenter.last_confidence, "input_intensity": intensity})
        )
        print(f"segmented {name}", flush=True)
    if island_ml is not None:
        post["remove_islands_ml"] = island_ml
    (folder / "done").write_text("")
    cases = []
    for meta in sorted(folder.glob("*.json")):
        name = meta.stem
        if name == "example_ct" and not example:
            continue
        read = lambda s, name=name: sitk.ReadImage(str(folder / f"{name}_{s}.nii.gz"))  # noqa: E731
        cases.append((name, read("image"), read("pred"), read("ref"), json.loads(meta.read_text())))
    return cases


def notes_on_good_organs(model: str, cases: list) -> dict:
    from AbdomenSegLib.core.organs import BY_NAME
    from AbdomenSegLib.models.packages import find_model
    from AbdomenSegLib.qc.check import assess

    card = find_model(model)
    low = (card.get("qc") or {}).get("confidence", {}).get("low_below")
    single = card.get("postprocess", {}).get("largest_component", [])
    good, noted, per_code, rows = 0, 0, {}, []
    from AbdomenSegLib.inference import postprocess

    post = card.get("postprocess", {})
    kept = set(post.get("largest_component", [])) | set(post.get("keep_islands", []))
    islands = [BY_NAME[n].label for n in card["labels"].values() if n not in kept]
    for name, image, pred, ref, meta in cases:
        if post.get("remove_islands_ml"):  # the card's island removal, on the cached network labels
            array = sitk.GetArrayFromImage(pred)
            postprocess.remove_small_islands(
                array, float(np.prod(pred.GetSpacing())) / 1000.0, post["remove_islands_ml"], islands
            )
            cleaned = sitk.GetImageFromArray(array)
            cleaned.CopyInformation(pred)
            pred = cleaned
        report = assess(
            pred,
            expected=list(card["labels"].values()),
            confidence=meta["confidence"],
            confidence_low=low,
            single_piece=single,
            image=image,
        )
        p, r = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref)
        for organ in card["labels"].values():
            d = _dice(p, r, BY_NAME[organ].label)
            if d is None or d < GOOD:
                continue
            flags = [f for f in report.flags if f.organ == organ or organ in (getattr(f, "organs", None) or ())]
            good += 1
            noted += bool(flags)
            for f in flags:
                per_code[f.code] = per_code.get(f.code, 0) + 1
            rows.append((name, organ, round(d, 3), [f.code for f in flags]))
        rows.append((name, "warnings", None, [f.code for f in report.warnings]))
    return {
        "good_organs": good,
        "with_a_note": noted,
        "fraction": round(noted / max(good, 1), 3),
        "by_code": per_code,
        "rows": rows,
    }


def island_dice(cases: list, organs) -> dict:
    """{threshold mL: {organ: mean Dice over the cases where prediction or reference has it}}, every organ's small
    pieces removed (none exempt: this is how the portal/splenic vein's loss showed)."""
    from AbdomenSegLib.core.organs import BY_NAME
    from AbdomenSegLib.inference.postprocess import remove_small_islands

    out = {}
    for ml in ISLAND_ML:
        scores = {}
        for _, _, pred, ref, _ in cases:
            p = sitk.GetArrayFromImage(pred)
            voxel_ml = float(np.prod(pred.GetSpacing())) / 1000.0
            if ml:
                remove_small_islands(p, voxel_ml, ml)
            r = sitk.GetArrayViewFromImage(ref)
            for organ in organs:
                d = _dice(p, r, BY_NAME[organ].label)
                if d is not None:
                    scores.setdefault(organ, []).append(d)
        out[ml] = {o: round(float(np.mean(v)), 4) for o, v in scores.items()}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="btcv-ct-3d-unet")
    p.add_argument("--cache", default="/tmp/qc_cache")
    p.add_argument("--example", action="store_true", help="add TotalSegmentator's example CT (CT models)")
    p.add_argument("--islands", action="store_true")
    p.add_argument("--rows", action="store_true")
    args = p.parse_args()
    from AbdomenSegLib.models.packages import find_model

    cases = cached_cases(args.model, Path(args.cache), args.example)
    result = notes_on_good_organs(args.model, cases)
    rows = result.pop("rows")
    print(json.dumps({"model": args.model, "cases": [c[0] for c in cases], **result}))
    if args.rows:
        for row in rows:
            print(row)
    if args.islands:
        validation = [c for c in cases if c[0] != "example_ct"]
        organs = list(find_model(args.model)["labels"].values())
        print("validation", json.dumps(island_dice(validation, organs)))
        example = [c for c in cases if c[0] == "example_ct"]
        if example:
            print("example_ct", json.dumps(island_dice(example, organs)))


if __name__ == "__main__":
    main()
