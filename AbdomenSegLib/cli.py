"""Command line: `python -m AbdomenSegLib {segment,evaluate,models,phantom,train}`.

Errors a user can fix print one line (`error: <problem>. <fix>`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from AbdomenSegLib.cohort.runner import segment_one
from AbdomenSegLib.core.errors import AbdomenSegError, Cancelled, DiskFull
from AbdomenSegLib.core.options import (
    DEVICES,
    INPUT_INTENSITIES,
    LARGEST_COMPONENT,
    OUTPUT_FORMATS,
    PRECISIONS,
    QUALITIES,
)
from AbdomenSegLib.core.untrusted import printable_lines


def _log(message: str):
    print(printable_lines(message), file=sys.stderr, flush=True)  # file names and card text: no escape sequences


def _say(text: str = "", **kw) -> None:
    """stdout for text that holds card fields (titles, organ names, purposes) or file names."""
    print(printable_lines(text), **kw)


class _JsonLines:
    """`segment --progress-json`: one JSON object per line on stdout, flushed, for a parent process (the Slicer
    module's background run, AbdomenSegLib/background.py): {"progress": f, "message": m} while working, then one
    {"done": true, "output", "flags", "exit", "model", "device", "qc"} or {"error": "<problem>. <fix>"}; "flags" are
    the result check's warnings, "qc" its full report per case. stderr is unchanged."""

    def __init__(self):
        self.flags, self.qc, self.model, self.device = [], [], None, None

    @staticmethod
    def emit(**fields):
        print(json.dumps(fields), file=sys.stdout, flush=True)

    def progress(self, index, count):
        """progress(fraction, message) for case `index` of `count`, scaled to the whole run."""

        def report(fraction, message):
            prefix = f"[{index}/{count}] " if count > 1 else ""
            self.emit(progress=round((index - 1 + float(fraction)) / count, 4), message=prefix + message)

        return report


# Exit statuses: 0 all written and unflagged; 1 some cases of a set failed (the rest were done);
# 2 nothing done, a user-fixable error; 3 written, but the result check flagged something (see stderr);
# 130 cancelled.
EXIT_FLAGGED = 3


def _organ_names(text, allowed=None) -> list | None:
    """Comma-separated organ names, checked before any work (a typo must not cost a run)."""
    from AbdomenSegLib.core.organs import BY_NAME

    if not text:
        return None
    names = [o.strip() for o in text.split(",") if o.strip()]
    unknown = [o for o in names if o not in BY_NAME]
    if unknown or not names:
        raise AbdomenSegError(
            f"unknown organ name(s) {', '.join(unknown) or repr(text)}", f"use names from: {', '.join(BY_NAME)}"
        )
    if allowed is not None:
        outside = [o for o in names if o not in allowed]
        if outside:
            raise AbdomenSegError(
                f"the model does not segment {', '.join(outside)}", f"it segments: {', '.join(allowed)}"
            )
    return names


# -- segment ------------------------------------------------------------------------------------
def _segment(args) -> int:
    from AbdomenSegLib.cohort.batch import expand_inputs, plan_outputs
    from AbdomenSegLib.io.files import check_name_length, check_not_symlink, prepare_output, sweep_partials
    from AbdomenSegLib.io.images import check_input_header, check_output_type
    from AbdomenSegLib.models.choice import resolve

    _organ_names(args.organs)  # a typo must not cost a run: checked before anything else
    cases, batch = expand_inputs(args.input)
    output = Path(args.output)
    check_name_length(output)  # before anything looks at it: the file system refuses such a name with an OSError
    distributed = _on_cluster(args, batch)
    if batch:
        if output.exists() and not output.is_dir():
            raise AbdomenSegError(
                f"output '{output}' is a file but the input is a set of cases", "give an output folder"
            )
        check_output_type(output / f"case{args.format}", [src for _, src in cases])
        targets = plan_outputs(cases, output, args.format)
        if not targets:
            raise AbdomenSegError(
                f"no inputs left in '{args.input}' once earlier outputs are set aside", "give a folder of scans"
            )
        for _, _, dst in targets:
            check_name_length(dst)
            if args.overwrite or not dst.exists():  # (an existing output is skipped, so never written through)
                check_not_symlink(dst)  # a dangling link failed after the work as "another process wrote it"
        prepare_output(output / ".probe", overwrite=True)
        for path in sweep_partials(output):
            _log(f"removed {path.name}, left by an interrupted run")
    else:
        name, src = cases[0]
        if src.exists() and output.exists() and src.resolve() == output.resolve():
            raise AbdomenSegError(f"output '{output}' would overwrite the input", "choose another output path")
        check_output_type(output, [src])
        check_input_header(src)  # complex voxels, NIfTI-2, a size beyond the limits: before the model loads
        prepare_output(output, overwrite=args.overwrite)
        targets = [(name, src, output)]
    _check_qc_paths(args, batch, [src for _, src, _ in targets])
    if args.model is None and not batch:  # an MR scan gets the recommended MR model, said on one line
        from AbdomenSegLib.io.images import read_image
        from AbdomenSegLib.models.choice import model_for_image

        args.model, line = model_for_image(read_image(targets[0][1], segmentation_ok=False))
        if line:
            _log(line)
    # An ensemble that cannot be averaged, or mirroring for a model trained without, is refused before any scan is read.
    card = resolve(args.model, args.tta, quality=args.quality)
    stages = _cascade_stages(card, args.quality, distributed)
    if batch and not args.overwrite:  # a folder holding another run's outputs is refused before any work
        from AbdomenSegLib.cohort.manifest import check_same_run, run_options

        check_same_run(
            output,
            model=card.name,
            sha256=card.get("sha256", ""),
            quality=args.quality,
            options=run_options(_options(args, _organ_names(args.organs))),
        )
    # The scans this process will read, in order; the first starts reading now, while torch is imported.
    reads = [src for _, src, dst in targets if not (batch and dst.exists() and not args.overwrite)]
    from AbdomenSegLib.io.read_ahead import ReadAhead

    def prepare(image):  # in the read-ahead thread: no torch needed
        from AbdomenSegLib.inference.segmenter import prepare_input

        return prepare_input(stages[0] if stages else card, image, args.input_intensity)

    # Another folder run into the same folder shares it (each takes the cases it claims first); a Dask run refuses.
    from AbdomenSegLib.cohort.sharing import share_folder

    sharing: contextlib.AbstractContextManager[list] = (
        share_folder(output, cluster=distributed) if batch else contextlib.nullcontext([])
    )
    with sharing as others:
        for owner in others:
            _log(f"another run ({owner}) is writing '{output}' too: the cases it holds are left to it")
        # (an ensemble's members each prepare the scan for their own grid)
        with ReadAhead([] if distributed else reads, prepare=None if card.members else prepare) as read_ahead:
            return _segment_cases(args, card, targets, batch, output, distributed, read_ahead)


def _options(args, organs):
    """The segmentation choices of a `segment` command (what the manifest records as the run's options)."""
    from AbdomenSegLib.inference.segmenter import Options

    return Options(
        input_intensity=args.input_intensity,
        organs=organs,
        largest_component=args.largest_component,
        fill_holes=args.fill_holes,
        precision=args.precision,
        tta=args.tta,
    )


def _cascade_stages(card, quality, distributed):
    """The (first, second) stage cards of a cascade run (cascade_card.py), None for one model; refused before any
    work, as is a cascade on a Dask cluster."""
    from AbdomenSegLib.models.cascade_card import cascade_stages

    stages = cascade_stages(card, quality)
    if stages and distributed:
        raise AbdomenSegError(
            "a two-stage run (--quality high, or a second-stage model) runs on this machine only, not on a Dask "
            "cluster",
            "leave out --workers/--scheduler, or leave out --quality high",
        )
    return stages


def _segment_cases(args, card, targets, batch, output, distributed, read_ahead) -> int:
    from AbdomenSegLib.cohort.manifest import Manifest, case_row, device_label, run_options
    from AbdomenSegLib.core.precision import resolve_precision
    from AbdomenSegLib.inference.predictor import get_segmenter
    from AbdomenSegLib.io.files import OutputClaimed
    from AbdomenSegLib.qc.outputs import check_and_record, organ_table, summary_lines
    from AbdomenSegLib.qc.statistics import intensity_unit

    options = _options(args, _organ_names(args.organs, allowed=list(card["labels"].values())))
    json_lines = getattr(args, "json_lines", None)
    if distributed:  # the workers load the model (and refuse what it cannot do) before the first case
        segmenter, device = None, ""
        _log(f"model {card.name} on the Dask workers (--device {args.device})")
    else:
        segmenter = get_segmenter(card, args.device, log=_log, quality=args.quality)
        precision = resolve_precision(args.precision, segmenter.device, card)  # a refused bf16 fails before any work
        fine = getattr(segmenter, "second", None)
        _log(
            f"model {segmenter.card.name} on {segmenter.device}"
            + (" (bfloat16)" if precision == "bf16" else "")
            + (f", fine second stage {fine.card.name} on the small organs' region" if fine else "")
        )
        device = device_label(segmenter.device)
    model = {
        "model": card.name,
        "sha256": card.get("sha256", ""),
        "quality": args.quality,
        "options": run_options(options),
    }
    if segmenter:
        from AbdomenSegLib.inference.cascade import made_by

        model["model"], model["sha256"] = made_by(segmenter)  # a two-stage run: "first>fine"
    if json_lines:
        json_lines.model, json_lines.device = model["model"], segmenter.device if segmenter else args.device
    qc_files = _qc_files(args, output, batch)
    manifest = Manifest(output) if batch else None  # read before any work: an unreadable one refuses the run
    failures, flagged, written, skipped, todo = [], [], 0, 0, []
    elsewhere = []  # cases another live run held: it segments them and records their rows
    from AbdomenSegLib.evaluation.reports import CaseClock

    clock = CaseClock(len(targets))
    # --overwrite replaces the outputs that were there when this run began, not those another run writes meanwhile.
    found = {dst: _file_stamp(dst) for _, _, dst in targets} if batch and args.overwrite else {}
    try:
        for index, (name, src, dst) in enumerate(targets, start=1):
            tag = f"[{index}/{len(targets)}] {name}"
            if found and _file_stamp(dst) not in (None, found[dst]):
                elsewhere.append(name)
                _log(f"{tag}: written by another run while this one ran, left as it is")
                continue
            if batch and dst.exists() and not args.overwrite:
                skipped += 1
                earlier = qc_files.add_existing(name)  # its earlier result check stays in qc.csv and counts
                if earlier:
                    flagged.append(name)
                assert manifest is not None  # a batch has one
                manifest.skipped(name, src, dst, qc_json=qc_files.folder / f"{name}.json")
                _log(
                    f"{tag}: {dst} exists, skipped (--overwrite replaces it)"
                    + (f"; its earlier result check has {earlier} warning(s)" if earlier else "")
                )
                continue
            if distributed:
                todo.append((index, name, src, dst))
                continue
            start, before = time.time(), _file_stamp(dst)
            try:
                image, labels = segment_one(
                    segmenter,
                    src,
                    dst,
                    options,
                    args.overwrite,
                    tag,
                    json_lines.progress(index, len(targets)) if json_lines else None,
                    read=read_ahead.get_prepared,
                )
                written += 1
                if manifest:  # the output is written: its row goes in before anything (a signal) can stop the run
                    manifest.record(
                        case_row(name, src, dst, "done", seconds=time.time() - start, device=device, **model)
                    )
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: an output published just before it is in the manifest too
                if manifest and _file_stamp(dst) not in (None, before):
                    manifest.record(
                        case_row(name, src, dst, "done", seconds=time.time() - start, device=device, **model)
                    )
                raise
            except OutputClaimed as exc:
                if not batch:
                    raise
                elsewhere.append(name)
                _log(f"{tag}: being segmented by another run ({exc.owner}), left to it")
                continue
            except DiskFull:
                raise  # every later case would fail the same way: the run stops (exit 2)
            except AbdomenSegError as exc:
                if not batch:
                    raise
                failures.append(name)
                assert manifest is not None  # a batch has one
                manifest.record(
                    case_row(
                        name, src, dst, "failed", seconds=time.time() - start, device=device, error=str(exc), **model
                    )
                )
                _log(f"{tag}: error: {exc}")
                continue
            report, qc = check_and_record(qc_files, segmenter, name, image, labels, options, output=dst, started=start)
            if manifest:
                manifest.record(
                    case_row(
                        name,
                        src,
                        dst,
                        "done",
                        seconds=time.time() - start,
                        device=device,
                        qc_columns=report.columns(),
                        **model,
                    )
                )
            for line in summary_lines(name, report):
                _log(line)
            if not batch and not json_lines and segmenter is not None:  # one case: its organs on stdout
                for line in organ_table(report, intensity_unit(segmenter.card["modality"])):
                    print(line, flush=True)
            if json_lines:
                json_lines.flags += [(f"{name}: " if batch else "") + str(f) for f in report.warnings]
                json_lines.qc.append(qc)
            if report.warnings:
                flagged.append(name)
            _log(clock.line(index, f"{name} -> {dst}") + (" FLAGGED" if report.warnings else ""))
        if todo:
            written += _segment_on_cluster(
                args, card, options, todo, len(targets), qc_files, manifest, json_lines, failures, flagged
            )
    except BaseException:
        # Already failing (a full disk, a signal): save what the manifest can, but a second failure while writing
        # it (the same full disk) must not hide the first, which names what could not be written.
        if manifest:
            with contextlib.suppress(AbdomenSegError, OSError):
                manifest.write()
        raise
    if manifest:
        manifest.write()
    for name in elsewhere:  # the other run's result checks, for the cases it has finished by now, stay in qc.csv
        qc_files.add_existing(name)
    for path in qc_files.finish():
        _log(f"result check: {path}")
    if batch:
        assert manifest is not None
        _log(f"manifest: {manifest.path}")
        shared = f"{len(elsewhere)} left to another run, " if elsewhere else ""
        _log(f"{written} written ({len(flagged)} with warnings), {skipped} skipped, {shared}{len(failures)} failed")
        if elsewhere and not written and not failures:
            _log(f"this run segmented no case: another run is segmenting {len(elsewhere)}; the manifest gets its rows")
    if failures:
        return 1
    return EXIT_FLAGGED if flagged else 0


def _file_stamp(path) -> tuple | None:
    """(inode, modification time) of a file, None when there is none: tells whether this run replaced it."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _on_cluster(args, batch) -> bool:
    """--workers / --scheduler / --scheduler-file: the cases go to a Dask cluster (cohort/cluster.py)."""
    # Not through cohort/cluster.py: importing it loads Dask (0.14 s), which a run on this machine alone never needs.
    if not (
        getattr(args, "workers", None) or getattr(args, "scheduler", None) or getattr(args, "scheduler_file", None)
    ):
        return False
    if not batch:
        raise AbdomenSegError(
            "--workers and --scheduler run a set of cases on a Dask cluster, but the input is one " "scan",
            "give a folder or a quoted glob of scans, or leave them out for one scan",
        )
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise AbdomenSegError(
            "--workers and --scheduler need Dask (the `distributed` package)",
            'install it with `pip install "dask[distributed]"`',
        ) from None
    return True


def _segment_on_cluster(args, card, options, todo, total, qc_files, manifest, json_lines, failures, flagged) -> int:
    """The cases of `todo` [(index, name, input, output)] on a Dask cluster; each worker writes its outputs and
    result checks, the client records the manifest rows it sends back. Returns the number written."""
    from AbdomenSegLib.cohort.cluster import segment_cases
    from AbdomenSegLib.cohort.manifest import case_row

    written, finished = [0], [0]

    def on_result(index, name, src, dst, outcome):
        kind, value = outcome
        tag = f"[{index}/{total}] {name}"
        finished[0] += 1
        if json_lines:
            json_lines.emit(progress=round(finished[0] / len(todo), 4), message=f"{finished[0]}/{len(todo)} cases")
        row = (
            value["row"]
            if kind == "ok"
            else case_row(
                name, src, dst, "failed", worker="", error=value, model=card.name, sha256=card.get("sha256", "")
            )
        )
        manifest.record(row)
        if row["status"] != "done":
            failures.append(name)
            return [f"{tag}: error: {row['error']}"], False
        written[0] += 1
        warnings = qc_files.add_existing(name)  # the result check the worker wrote, into qc.csv and the index
        if warnings:
            flagged.append(name)
        if json_lines:
            json_lines.flags += [f"{name}: {w}" for w in value.get("warnings", [])]
            json_lines.qc.append(value.get("qc"))
        return value["log"] + [
            f"{tag} -> {dst} ({float(row['seconds'] or 0):.1f} s on {row['worker']})" + (" FLAGGED" if warnings else "")
        ], True

    segment_cases(
        args, card, options, todo, qc_folder=qc_files.folder, pictures=qc_files.pictures, on_result=on_result, log=_log
    )
    return written[0]


def _check_qc_paths(args, batch, inputs):
    """--qc / --qc-png name files of the right kind that replace no input; checked before any work."""
    from AbdomenSegLib.io.files import prepare_folder, prepare_output

    if batch:  # the result check's folder: a file of that name in its place is refused now, not after the first case
        prepare_folder(Path(args.qc) if args.qc else Path(args.output) / "qc", "the result check's folder")
    if batch and args.qc_png:
        raise AbdomenSegError(
            "--qc-png names one picture but the input is a set of cases",
            "leave it out: folder runs draw one picture per case into the --qc folder",
        )
    named = [(args.qc, ".json", "--qc")] if not batch else []
    named += [(args.qc_png, ".png", "--qc-png")]
    taken = {Path(p).resolve() for p in inputs if Path(p).exists()}
    for path, suffix, option in named:
        if not path:
            continue
        if not str(path).lower().endswith(suffix):
            raise AbdomenSegError(f"{option} '{path}' does not end in {suffix}", f"name a {suffix} file")
        if Path(path).exists() and Path(path).resolve() in taken:
            raise AbdomenSegError(f"{option} '{path}' is the input", "choose another name")
        prepare_output(path, overwrite=args.overwrite)


def _qc_files(args, output, batch):
    """Folder runs: qc/ beside the outputs (per case JSON and picture, qc.csv, an index); single files: the
    paths --qc and --qc-png name."""
    from AbdomenSegLib.qc.outputs import QCFiles

    if batch:
        return QCFiles(Path(args.qc) if args.qc else output / "qc", pictures=not args.no_qc_png)
    return QCFiles(json_path=args.qc, png_path=args.qc_png)


# -- evaluate -----------------------------------------------------------------------------------
def _evaluate(args) -> int:
    import math

    from AbdomenSegLib.cohort.batch import expand_inputs, find_reference
    from AbdomenSegLib.evaluation.metrics import check_convention, format_table, write_csv
    from AbdomenSegLib.evaluation.reports import (
        REPORT_FIELDS,
        SUMMARY_FIELDS,
        evaluate_case,
        flagged_text,
        outside_text,
        source_organs,
        summarize_apart,
    )
    from AbdomenSegLib.io.images import read_image

    if not math.isfinite(args.tolerance) or args.tolerance <= 0:
        raise AbdomenSegError(
            f"--tolerance {args.tolerance:g} is not a positive distance",
            "give the surface Dice tolerance in mm, e.g. --tolerance 2",
        )
    organs = _organ_names(args.organs)
    if args.reference_labels:
        check_convention(args.reference_labels)
    check_convention(args.prediction_labels)
    predictions, batch = expand_inputs(args.prediction)
    distributed = _on_cluster(args, batch)
    ref = Path(args.reference)
    if batch and not ref.is_dir():
        raise AbdomenSegError(
            "the prediction is a set of cases but the reference is not a folder",
            "give a reference folder with label maps named like the predictions",
        )
    if not batch and not ref.exists():
        raise AbdomenSegError(f"reference '{ref}' does not exist", "check the path and spelling")
    csv_paths = _check_csv_outputs(args, [p for _, p in predictions] + [ref])
    pairs = [(name, path, find_reference(ref, name) if batch else ref) for name, path in predictions]
    # The references' numbering is named or detected (evaluation/conventions.py) before any case is scored.
    args.reference_labels = _reference_convention(args, [r for _, _, r in pairs if r is not None])
    if organs is None:
        from AbdomenSegLib.core.organs import CONVENTIONS

        defined = set(CONVENTIONS[args.reference_labels].values())
        organs = [o for o in source_organs(args.prediction, args.prediction_labels) if o in defined]
    rows, failures, jobs = [], [], []
    from AbdomenSegLib.evaluation.reports import CaseClock

    clock = CaseClock(len(pairs))
    for index, (name, path, ref_path) in enumerate(pairs, start=1):
        tag = f"[{index}/{len(pairs)}] {name}"
        if ref_path is None:
            _log(f"{tag}: no reference in {ref}, skipped")
            continue
        if distributed:
            jobs.append((index, name, path, ref_path))
            continue
        try:
            case_rows = evaluate_case(read_image(path), read_image(ref_path), **_evaluate_settings(args, organs, name))
        except AbdomenSegError as exc:
            if not batch:
                raise
            failures.append(name)
            _log(f"{tag}: error: {exc}")
            continue
        rows += case_rows
        _log(clock.line(index, f"{name} evaluated") + flagged_text(case_rows))
        if outside_text(case_rows):
            _log(outside_text(case_rows))
        if not batch:
            print(format_table(case_rows))
    if jobs:
        rows += _evaluate_on_cluster(args, jobs, len(predictions), organs, failures)
    if not rows:
        raise AbdomenSegError(
            "no prediction could be evaluated against a reference",
            "name references like the predictions" + (" and fix the errors above" if failures else ""),
        )
    summary = summarize_apart(rows)
    if batch:
        print("organ                      n  missed  extra  flagged  Dice mean±sd   HD95 mm   NSD")
        for s in summary:
            scores = (
                f"{s['dice_mean']:.3f}±{s['dice_std']:.3f}  {s['hd95_mm_mean']:8.1f}  {s['surface_dice_mean']:.3f}"
                if s["n"]
                else f"{'-':11s}  {'-':>8s}  -"
            )
            print(f"{s['organ']:22s} {s['n']:5d}  {s['missed']:6d}  {s['extra']:5d}  {s['flagged']:7d}  {scores}")
    if csv_paths:
        write_csv(rows, csv_paths[0], fields=list(REPORT_FIELDS))
        write_csv(summary, csv_paths[1], fields=list(SUMMARY_FIELDS))
        _log(f"metrics: {csv_paths[0]}, summary: {csv_paths[1]}")
    if failures:
        _log(f"{len(failures)} case(s) failed: {', '.join(failures)}")
        return 1
    return 0


def _reference_convention(args, references) -> str:
    """--reference-labels, or the convention the first reference shows (refused when it shows none or several)."""
    from AbdomenSegLib.evaluation.conventions import read_as_ours, resolve_convention
    from AbdomenSegLib.io.images import read_image

    if args.reference_labels or not references:
        return args.reference_labels or "abdomenseg"
    if all(read_as_ours(r) for r in references):  # DICOM SEG references are read into our organ table
        return "abdomenseg"
    return resolve_convention(read_image(references[0]), None, "reference", "--reference-labels", log=_log)


def _evaluate_settings(args, organs, name) -> dict:
    return {
        "reference_convention": args.reference_labels,
        "prediction_convention": args.prediction_labels,
        "organs": organs,
        "tolerance_mm": args.tolerance,
        "case": name,
        "model": args.model_name,
    }


def _evaluate_case(prediction, reference, settings) -> list:
    """One case's metric rows, on a Dask worker (cohort/cluster.py): it reads both label maps itself."""
    from AbdomenSegLib.evaluation.reports import evaluate_case
    from AbdomenSegLib.io.images import read_image

    return evaluate_case(read_image(prediction), read_image(reference), **settings)


def _evaluate_on_cluster(args, jobs, total, organs, failures) -> list:
    """`evaluate --workers/--scheduler`: one task per case [(index, name, prediction, reference)]; the rows come
    back in the cases' order, as a sequential run gives them."""
    from AbdomenSegLib.cohort.cluster import map_cases
    from AbdomenSegLib.evaluation.reports import outside_text

    results = {}
    items = [
        (str(Path(p).resolve()), str(Path(r).resolve()), _evaluate_settings(args, organs, name))
        for _, name, p, r in jobs
    ]

    def on_result(i, outcome):
        index, name = jobs[i][:2]
        kind, value = outcome
        if kind != "ok":
            failures.append(name)
            return [f"[{index}/{total}] {name}: error: {value}"], False
        results[i] = value
        return [f"[{index}/{total}] {name} evaluated", *([outside_text(value)] if outside_text(value) else [])], True

    map_cases(args, _evaluate_case, items, names=[j[1] for j in jobs], desc="evaluate", on_result=on_result, log=_log)
    return [row for i in sorted(results) for row in results[i]]


def _check_csv_outputs(args, inputs) -> list:
    """The metrics CSV and its summary: .csv files that replace no input and, unasked, no existing file."""
    from AbdomenSegLib.io.files import prepare_output

    if not args.csv:
        return []
    path = Path(args.csv)
    if path.suffix.lower() != ".csv":
        raise AbdomenSegError(f"--csv '{path}' does not end in .csv", "name the metrics file e.g. metrics.csv")
    paths = [path, path.with_name(path.stem + "_summary.csv")]
    taken = {Path(p).resolve() for p in inputs if Path(p).exists()}
    for p in paths:
        if p.exists() and p.resolve() in taken:
            raise AbdomenSegError(f"metrics file '{p}' is one of the inputs", "choose another --csv name")
        prepare_output(p, overwrite=args.overwrite)
    return paths


# -- models / phantom / train -------------------------------------------------------------------
def _models(args) -> int:
    from AbdomenSegLib.models.packages import (
        catalog_with_problems,
        default_model_name,
        model_purposes,
        recommended_models,
    )

    cards, broken = catalog_with_problems()
    if args.json:
        listing = {name: card.data for name, card in cards.items()}
        listing.update({name: {"broken": str(err)} for name, err in broken.items()})
        print(json.dumps(listing, indent=2))  # JSON escapes control characters itself
        return 0
    if not cards and not broken:
        _say("no models installed")
        return 1
    default = default_model_name()
    purposes = model_purposes()
    recommended = [n for n in recommended_models() if n in cards]
    if recommended:  # what to use, one line each, before the full cards
        width = max(len(n) for n in recommended) + len(" (default)")
        _say("Recommended:")
        for name in recommended:
            label = name + (" (default)" if name == default else "")
            _say(f"  {label:<{width}}  {purposes.get(name) or cards[name].get('title', '')}")
        _say()
    for name in sorted(cards, key=lambda n: (n not in recommended, recommended.index(n) if n in recommended else 0)):
        card = cards[name]
        line = f"\n  for: {purposes[name]}" if purposes.get(name) else ""
        _say(card.summary() + line + ("\n  (default)" if name == default else ""))
    from AbdomenSegLib.models.locations import installed_folder
    from AbdomenSegLib.models.store import downloadable, terms_of

    published = downloadable()
    for name, err in broken.items():
        entry = published.get(name)
        if entry is not None and installed_folder(entry) is None:  # published apart, not installed here
            size = entry["download"].get("size") or 0
            terms = terms_of(entry).get("licence", "not stated")
            _say(f"{name}\n  not installed: `abdomenseg models install {name}` ({size / 1e6:.0f} MB; terms: {terms})")
        else:
            _say(f"{name}\n  broken: {err}")
    return 0 if cards else 1


def _models_install(args) -> int:
    from AbdomenSegLib.models.store import install

    def progress(done: int, total) -> None:
        share = f" ({100 * done // total} %)" if total else ""
        end = "\n" if total and done >= total else ""
        print(f"\r{done / 1e6:.1f} MB{share}", end=end, file=sys.stderr, flush=True)

    install(args.source, accept_terms=args.accept_terms, overwrite=args.overwrite, progress=progress, log=_log)
    return 0


def _models_pack(args) -> int:
    from AbdomenSegLib.models.store import pack

    path, block = pack(args.package, args.out)
    _log(f"wrote {path}; publish it and put this block, with its address as url, in the catalog entry:")
    print(json.dumps({"download": block}, indent=2))
    return 0


def _phantom(args) -> int:
    from AbdomenSegLib.io.images import write_image
    from AbdomenSegLib.io.phantom import make_phantom

    for path in filter(None, (args.output, args.labels)):
        if Path(path).exists() and not args.overwrite:
            raise AbdomenSegError(f"'{path}' exists", "pass --overwrite to replace it")
    ct, labels = make_phantom(size=tuple(args.size), spacing=tuple(args.spacing), seed=args.seed)
    write_image(ct, args.output)
    if args.labels:
        write_image(labels, args.labels)
    _log(f"wrote SYNTHETIC phantom CT {args.output}" + (f" and its labels {args.labels}" if args.labels else ""))
    return 0


def _compare(args) -> int:
    from AbdomenSegLib.evaluation.compare import OUTPUTS, compare_predictions, markdown_table, run_comparison

    if bool(args.models) == bool(args.predictions):
        raise AbdomenSegError(
            "compare needs either --models (segment a dataset with our models) or --predictions (score existing "
            "outputs)",
            "give one of them: --models a,b --data DIR, or --predictions NAME=DIR[:convention] ... --reference DIR",
        )
    if args.predictions:
        if not args.reference or args.data or args.keep_predictions:
            raise AbdomenSegError(
                "--predictions scores existing outputs against --reference (and takes no --data or "
                "--keep-predictions)",
                "give --reference DIR[:convention] with --predictions",
            )
        summary = compare_predictions(args.predictions, args.reference, args.out, overwrite=args.overwrite, log=_log)
    else:
        if not args.data:
            raise AbdomenSegError("--models needs --data", "give the dataset folder (images/ + labels/) with --data")
        summary = run_comparison(
            [m.strip() for m in args.models.split(",")],
            args.data,
            args.labels,
            args.out,
            cases=args.cases.split(",") if args.cases else None,
            cases_from=args.cases_from,
            input_intensity=args.input_intensity,
            device=args.device,
            overwrite=args.overwrite,
            tta=args.tta,
            keep_predictions=args.keep_predictions,
            log=_log,
            mapper=_cluster_mapper(args) if _on_cluster(args, True) else None,
        )
    from AbdomenSegLib.evaluation.reports import wide_markdown

    print(wide_markdown(summary), end="")
    print(markdown_table(summary), end="")
    _log(f"written: {', '.join(f'{args.out}/{name}' for name in OUTPUTS)}")
    return 0


def _cluster_mapper(args):
    """`compare --workers/--scheduler`: each (model, case) pair one task; any failure fails the comparison, as it
    does when run here, but only once every pair has ended."""
    from AbdomenSegLib.cohort.cluster import map_cases

    def mapper(fn, items, names):
        results, errors = {}, []

        def on_result(i, outcome):
            kind, value = outcome
            if kind != "ok":
                errors.append(f"{names[i]}: {value}")
                return [f"{names[i]}: error: {value}"], False
            results[i] = value
            return [names[i]], True

        map_cases(args, fn, items, names=names, desc="compare", on_result=on_result, settings={"torch": True}, log=_log)
        if errors:
            raise AbdomenSegError(
                f"{len(errors)} of {len(items)} model/case pairs failed (first: {errors[0]})",
                "fix the errors above and run again",
            )
        return [results[i] for i in range(len(items))]

    return mapper


def _train(args) -> int:
    from AbdomenSegLib.training.run import train_and_export

    train_and_export(
        args.config,
        out=args.out,
        device=args.device,
        resume=args.resume,
        export_only=args.export_only,
        export_to=args.export,
        make_default=args.make_default,
        log=lambda m: print(m, flush=True),
    )
    return 0


def _workers(text) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of worker processes (1 or more)")
    return value


def _cluster_options(p):
    """Folders and globs of cases on a Dask cluster (cohort/cluster.py); without these, one case after another here."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="run the cases on a local Dask cluster of N worker processes, each loading the model once "
        "(with --device cuda: one worker per GPU, each pinned to its GPU)",
    )
    group.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="send the cases to a running Dask cluster, e.g. tcp://node01:8786 (workers must see the "
        "same paths: a shared filesystem)",
    )
    group.add_argument(
        "--scheduler-file",
        metavar="FILE",
        help="like --scheduler, with the JSON file `dask scheduler --scheduler-file` wrote",
    )


def _tta_option(p):
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the probabilities of the scan and its mirror images along the axes "
        "the model was trained to mirror (2**k passes: that much slower); refused for models trained without",
    )


def _program_name() -> str:
    """How the user called us: the `abdomenseg` command of an installed package, or `python -m AbdomenSegLib`."""
    called = Path(sys.argv[0]).stem.lower() if sys.argv and sys.argv[0] else ""
    return "abdomenseg" if called == "abdomenseg" else "python -m AbdomenSegLib"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_program_name(), description="AbdomenSeg: abdominal organ segmentation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment a volume (file, DICOM folder), a folder of volumes or a glob")
    p.add_argument("input", help="image file, DICOM series folder, folder of images, or quoted glob")
    p.add_argument("output", help="output label map (.nii.gz, .nrrd, .seg.nrrd), or a folder for several inputs")
    p.add_argument(
        "--model",
        help="installed model name or model package folder (default: the catalog's default); several joined by "
        "'+' (a+b) run as an ensemble, their probabilities averaged",
    )
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="CPU arithmetic: bf16 about halves the network's time on CPUs with bf16 instructions "
        "(avx512_bf16/amx); auto uses it there when the model's card records a bf16 validation",
    )
    p.add_argument(
        "--input-intensity",
        default="native",
        choices=INPUT_INTENSITIES,
        help="how input values are stored: native (HU/MR signal) or BTCV's 0-255 window",
    )
    p.add_argument("--organs", help="comma-separated organ names to keep (default: all)")
    p.add_argument(
        "--largest-component",
        default="model",
        choices=LARGEST_COMPONENT,
        help="keep only the largest connected piece of: the organs the model's card names (model, the "
        "default: organs that are one piece by anatomy), every organ (all), or none (raw output)",
    )
    p.add_argument("--fill-holes", action="store_true", help="fill enclosed holes inside each organ")
    _tta_option(p)
    p.add_argument(
        "--quality",
        default="standard",
        choices=QUALITIES,
        help="high: after the model, its fine second-stage model (installed, trained behind it) re-segments the box "
        "around the small organs (pancreas, adrenals, gallbladder, ...) at a finer spacing: slower",
    )
    p.add_argument("--format", default=".nii.gz", choices=OUTPUT_FORMATS, help="output type for folder/glob inputs")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never the input)")
    p.add_argument(
        "--qc",
        help="result check report: a JSON file (single input) or a folder (default for several "
        "inputs: <output>/qc with one JSON and picture per case, qc.csv and index.html)",
    )
    p.add_argument(
        "--qc-png",
        help="single input: also draw the result check's picture (slices, outlines, volumes, " "flags) into this PNG",
    )
    p.add_argument("--no-qc-png", action="store_true", help="several inputs: skip the pictures (about 1 s per case)")
    p.add_argument(
        "--progress-json",
        action="store_true",
        help="print progress and the outcome as JSON lines on stdout (for the Slicer module's background run)",
    )
    _cluster_options(p)
    p.set_defaults(func=_segment)

    p = sub.add_parser("evaluate", help="per-organ Dice, IoU, volumes, HD95, ASSD, surface Dice")
    p.add_argument("prediction", help="predicted label map, or folder/glob of them")
    p.add_argument("reference", help="reference label map, or folder of them (matched by case name)")
    p.add_argument(
        "--reference-labels",
        default=None,
        help="label convention of the reference: abdomenseg, btcv, chaos, totalseg, totalseg_mr (default: "
        "detected from its values and its organs' places; refused when several or none fit)",
    )
    p.add_argument("--prediction-labels", default="abdomenseg", help="label convention of the prediction")
    p.add_argument("--organs", help="comma-separated organs to report (default: all the reference can hold)")
    p.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    p.add_argument("--csv", help="write one row per case and organ here (+ <name>_summary.csv)")
    p.add_argument("--model-name", default="", help="value of the CSV's model column")
    p.add_argument("--overwrite", action="store_true")
    _cluster_options(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "compare",
        help="score several models or tools on the same cases: tables (CSV, Markdown), paired tests, box plot",
    )
    p.add_argument(
        "--models",
        help="segment --data with these: comma-separated model names or package folders; a+b is an ensemble of a "
        "and b, compared as one model",
    )
    p.add_argument(
        "--predictions",
        action="append",
        metavar="NAME=DIR[:convention]",
        help="score existing outputs of any tool (repeat per source): label maps named like the reference's cases "
        "(ours, nnU-Net, TotalSegmentator --ml, DICOM SEG), or per case a folder of one mask per structure "
        "(TotalSegmentator's default); the convention is detected when not named",
    )
    p.add_argument("--reference", help="with --predictions: reference label maps, DIR[:convention] or one file")
    p.add_argument("--data", help="with --models: dataset folder with images/ + labels/ (or imagesTr/ + labelsTr/)")
    p.add_argument(
        "--labels",
        help="label convention of the dataset's labels: abdomenseg, btcv, chaos, totalseg, totalseg_mr (default: "
        "detected; refused when several or none fit)",
    )
    p.add_argument(
        "--keep-predictions",
        action="store_true",
        help="with --models: also write each model's labels to <out>/predictions/<model>/<case>.nii.gz",
    )
    p.add_argument(
        "--out",
        required=True,
        help="folder for metrics.csv, comparison.csv/.md, comparison_wide.csv, paired_tests.csv, dice_boxplot.png",
    )
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--cases-from", help="use this model's validation split (recorded in its card)")
    p.add_argument("--input-intensity", default="native", choices=INPUT_INTENSITIES)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--overwrite", action="store_true")
    _tta_option(p)
    _cluster_options(p)
    p.set_defaults(func=_compare)

    p = sub.add_parser("models", help="list installed models with their metadata; install or pack packages")
    p.add_argument("--json", action="store_true", help="print the full model cards as JSON")
    p.set_defaults(func=_models)
    models_sub = p.add_subparsers(dest="models_command")
    q = models_sub.add_parser(
        "install",
        help="install a model package the catalog names (by name, URL or .zip) into the user's model folder "
        "(ABDOMENSEG_MODELS, else a per-user data folder); its sha256 is checked",
    )
    q.add_argument("source", help="model name (see `models`), http(s) URL of its .zip, or a downloaded .zip")
    q.add_argument("--accept-terms", action="store_true", help="accept the package's non-permissive terms")
    q.add_argument("--overwrite", action="store_true", help="replace an installed package of the same name")
    q.set_defaults(func=_models_install)
    q = models_sub.add_parser("pack", help="zip a model package for publishing; prints its catalog download block")
    q.add_argument("package", help="model package folder")
    q.add_argument("--out", required=True, help="folder for <name>.zip")
    q.set_defaults(func=_models_pack)

    p = sub.add_parser("phantom", help="write a SYNTHETIC abdominal CT phantom with known organ labels")
    p.add_argument("output", help="phantom CT file, e.g. synthetic_phantom_ct.nii.gz")
    p.add_argument("--labels", help="also write its organ label map here")
    p.add_argument("--size", type=int, nargs=3, default=(128, 104, 80), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=(3.0, 3.0, 4.0), metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("train", help="train a model from a JSON config and export a model package")
    p.add_argument("config", help="training config (JSON), e.g. Resources/configs/btcv_ct_3d.json")
    p.add_argument("--out", help="run folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--export", help="models folder to export the package into (default: the run folder)")
    p.add_argument(
        "--export-only",
        action="store_true",
        help="export (and validate) the run folder's best weights without training further",
    )
    p.add_argument("--make-default", action="store_true", help="make the exported model the catalog default")
    p.set_defaults(func=_train)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that it takes the same way out: output locks and
    temporary files removed, the manifest written with every case finished (the finally blocks on the way)."""


def _sigterm_as_interrupt():
    """Handle SIGTERM like SIGINT while a command runs; returns what puts the previous handler back (the Slicer
    engine worker calls `main` once per request). Only the main thread may set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: a second must not cut the clean-up short
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _cancelled(exc: BaseException) -> int:
    """The exit status of a cancelled command, as a shell reports a process a signal ended: 130 (128 + SIGINT) for
    Ctrl-C, 143 (128 + SIGTERM) for SIGTERM. A Dask run turns the interrupt into Cancelled on its way out."""
    terminated = isinstance(exc, _Terminated) or isinstance(exc.__context__, _Terminated)
    print("cancelled (SIGTERM)" if terminated else "cancelled", file=sys.stderr, flush=True)
    return 143 if terminated else 130


def main(argv=None) -> int:
    from AbdomenSegLib.io.files import NO_SPACE, no_space_error

    args = build_parser().parse_args(argv)
    json_lines = args.json_lines = _JsonLines() if getattr(args, "progress_json", False) else None
    restore_sigterm = _sigterm_as_interrupt()
    try:
        code = args.func(args)
        if json_lines:
            json_lines.emit(
                done=True,
                output=str(args.output),
                flags=json_lines.flags,
                exit=code,
                model=json_lines.model,
                device=json_lines.device,
                qc=json_lines.qc,
            )
        return code
    except AbdomenSegError as exc:
        print(f"error: {printable_lines(str(exc))}", file=sys.stderr)
        if json_lines:
            json_lines.emit(error=str(exc))
        return 2
    except Cancelled as exc:
        return _cancelled(exc)
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:  # a write outside io/files.py's guarded ones
            error = no_space_error("the output", exc.filename or "its folder", exc)
            print(f"error: {printable_lines(str(error))}", file=sys.stderr)
            if json_lines:
                json_lines.emit(error=str(error))
            return 2
        if json_lines:
            json_lines.emit(error=f"unexpected {type(exc).__name__}: {exc}. See the log (stderr) for details")
        raise
    finally:
        restore_sigterm()


def run() -> None:
    """The command's entry point (`abdomenseg`, `python -m AbdomenSegLib`): `main()`, then, once every output is
    written and closed and the streams are flushed, leave without the interpreter's tear-down. That tear-down
    (freeing torch and its thread pools) took ~0.4 s of a 4 s segment run here, and writes nothing. An unexpected
    exception still leaves the ordinary way, with its traceback."""
    try:
        code = main()
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: locks, temporary files and manifest were seen to on the way
        code = _cancelled(exc)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None under pythonw
                stream.flush()
        except (BrokenPipeError, OSError):  # a reader that left early (`abdomenseg models | head -1`)
            pass
    os._exit(code)
