"""Batch segmentation inside Slicer: a folder of volumes -> .seg.nrrd files (+ one metrics CSV).

Run as `Slicer --no-main-window --python-script Resources/Scripts/AbdomenSegBatch.py --input DIR --output DIR
[--reference DIR --reference-labels btcv]`. The work is done on the MRML scene through the same logic
the module uses; returns a process exit code (non-zero when any case failed).
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

from AbdomenSegLib.cohort.batch import expand_inputs, find_reference
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.options import QUALITIES, LogCallback
from AbdomenSegLib.evaluation.metrics import write_csv
from AbdomenSegLib.io.images import read_image


def parse(argv):
    parser = argparse.ArgumentParser(prog="AbdomenSegBatch.py", description=__doc__)
    parser.add_argument("--input", required=True, help="folder (or quoted glob) of volumes or DICOM series folders")
    parser.add_argument("--output", required=True, help="folder for <case>.seg.nrrd and metrics.csv")
    parser.add_argument("--reference", help="folder of reference label maps named like the inputs")
    parser.add_argument(
        "--reference-labels",
        default=None,
        help="label convention of the references (default: detected from the first reference, refused when "
        "several or none fit)",
    )
    parser.add_argument(
        "--model",
        help="installed model name or package folder (default: the catalog default); several joined by '+' (a+b) "
        "run as an ensemble, as the command line's --model a+b",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time mirroring, as the command line's --tta (refused for models trained without mirroring)",
    )
    parser.add_argument(
        "--quality",
        default="standard",
        choices=QUALITIES,
        help="high: the model's fine second stage too, as the command line's --quality high",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--accept-terms",
        action="store_true",
        help="accept the model's non-permissive terms (the BTCV models: research use only; Resources/models/TERMS.md)",
    )
    parser.add_argument(
        "--no-qc-png", action="store_true", help="skip the result check's pictures (about 1 s per case)"
    )
    return parser.parse_args(argv)


def run(argv, scene, log: LogCallback = print) -> int:
    from AbdomenSegLib.models.choice import resolve
    from AbdomenSegLib.slicer.logic import AbdomenSegCore, labelmap_node_from_image, scalar_volume_node_from_image

    args = parse(argv)
    card = resolve(args.model, args.tta, quality=args.quality)  # refused once, before any case is read
    _check_terms(card.name, args.accept_terms)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    from AbdomenSegLib.qc.outputs import QCFiles
    from AbdomenSegLib.slicer.logic import qc_report

    core = AbdomenSegCore(scene, log=log)
    pictures = not args.no_qc_png and can_draw(log)
    qc_files = QCFiles(out_dir / "qc", pictures=pictures)
    cases, _ = expand_inputs(args.input)
    if args.reference and not args.reference_labels:  # named or detected before any case is segmented
        from AbdomenSegLib.evaluation.conventions import read_as_ours, resolve_convention

        first = next(filter(None, (find_reference(Path(args.reference), name) for name, _ in cases)), None)
        if first is not None and read_as_ours(first):  # a DICOM SEG is read into our organ table
            args.reference_labels = "abdomenseg"
        elif first is not None:
            args.reference_labels = resolve_convention(read_image(first), None, "reference", "--reference-labels", log)
    rows, failures = [], []
    for index, (name, path) in enumerate(cases, start=1):
        target = out_dir / f"{name}.seg.nrrd"
        if target.exists() and not args.overwrite:
            log(f"[{index}/{len(cases)}] {name}: {target} exists, skipped")
            continue
        start = time.time()
        nodes = []
        try:
            image = read_image(path)
            volume = scalar_volume_node_from_image(scene, image, name)
            nodes.append(volume)
            seg = core.segment(volume, model=card, device=args.device, tta=args.tta, quality=args.quality)
            nodes.append(seg)
            case_rows = []
            if args.reference:
                ref_path = find_reference(Path(args.reference), name)
                if ref_path is None:
                    log(f"[{index}/{len(cases)}] {name}: no reference found, metrics skipped")
                else:
                    reference = labelmap_node_from_image(scene, read_image(ref_path), f"{name} reference")
                    nodes.append(reference)
                    table = core.compare_with_reference(
                        seg, reference, volume_node=volume, reference_convention=args.reference_labels
                    )
                    nodes.append(table)
                    case_rows = _table_rows(table, name, seg.GetAttribute("AbdomenSeg.model"))
            report = qc_report(seg) or {}
            try:  # the result check is a by-product: it never fails a case that segmented
                _add_qc(qc_files, name, image, core.last_labels, report, str(target), log, f"[{index}/{len(cases)}]")
            except Exception as exc:
                log(f"[{index}/{len(cases)}] {name}: warning: the result check could not be written ({exc})")
            # Written last: an existing output means a finished case, which a re-run skips.
            _write_segmentation(scene, seg, target)
            rows += case_rows
            log(f"[{index}/{len(cases)}] {name} -> {target} ({time.time() - start:.1f} s)")
        except AbdomenSegError as exc:  # e.g. no organ found: this case fails, the others go on
            failures.append(name)
            log(f"[{index}/{len(cases)}] {name}: error: {exc}")
        except Exception:  # a bug: report it whole, and still do the other cases
            failures.append(name)
            log(f"[{index}/{len(cases)}] {name}: unexpected error\n{traceback.format_exc()}")
        finally:
            for node in nodes:  # keep memory flat over long batches
                scene.RemoveNode(node)
    for path in qc_files.finish():
        log(f"result check: {path}")
    if rows:
        write_csv(rows, out_dir / "metrics.csv")
        log(f"metrics: {out_dir / 'metrics.csv'}")
    if failures:
        log(f"{len(failures)} case(s) failed: {', '.join(failures)}")
    return 1 if failures else 0


def _check_terms(model: str, accepted: bool) -> None:
    """Refuse a model whose terms are not permissive unless --accept-terms was given (the panel asks instead)."""
    from AbdomenSegLib.models.store import terms_of, terms_to_accept

    pending = [] if accepted else terms_to_accept(model, {})
    if pending:
        licences = "; ".join(f"{e['name']}: {terms_of(e).get('licence', 'not stated')}" for e in pending)
        raise AbdomenSegError(
            f"the model's terms need your acceptance ({licences})",
            "read Resources/models/TERMS.md and pass --accept-terms to accept them",
        )


def can_draw(log: LogCallback = print) -> bool:
    """True when matplotlib (the result check's pictures) imports. Slicer does not ship it (no
    SuperBuild/External_python-matplotlib.cmake in Slicer v5.6.2-v5.12.0): there the pictures are skipped with a
    note, and the rest of the result check (JSON, qc.csv) and the metrics are written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log(
            "note: result check pictures skipped: matplotlib is not installed in this Python "
            "(slicer.util.pip_install('matplotlib') adds them; --no-qc-png silences this note)"
        )
        return False
    return True


def _add_qc(qc_files, name, image, labels, report: dict, output: str, log, tag):
    """The case's result check into qc/ (JSON, picture, a row of qc.csv), and its flags into the log."""
    from AbdomenSegLib.qc.check import QCReport

    qc = QCReport.from_dict(report)
    qc_files.add(
        name, image, labels, qc, output=output, model=report.get("model", ""), modality=report.get("modality", "")
    )
    for flag in qc.flags:
        log(f"{tag} {flag.level}: {name}: {flag}")


def _write_segmentation(scene, segmentation_node, path):
    import os

    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    tmp = path.with_name(".part-" + path.name)  # atomic: never leave a half-written .seg.nrrd
    storage.SetFileName(str(tmp))
    try:
        if not storage.WriteData(segmentation_node):
            raise AbdomenSegError(f"could not write '{path}'", "check that the output folder is writable")
        os.replace(tmp, path)
    finally:
        scene.RemoveNode(storage)
        if tmp.exists():
            tmp.unlink()


def _table_rows(table, case, model):
    from AbdomenSegLib.slicer.logic import COLUMN_TITLES, table_column

    columns = {key: table_column(table, title) for key, title in COLUMN_TITLES.items()}
    count = len(columns["organ"])
    return [
        {"case": case, "model": model or "", **{k: v[i] for k, v in columns.items() if v is not None and k != "model"}}
        for i in range(count)
    ]
