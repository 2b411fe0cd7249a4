"""`manifest.csv` in the output folder of a folder run: one row per case, for the sequential and the Dask path alike.

Columns: case, input, output, status, seconds, worker (host:pid of the process that segmented it), device, model,
sha256 (of the model's weights), error, quality and options (what the run was asked for, as JSON), then the result check's counts and flags and each organ's volume (mL) and
confidence. Status is one of:

- done: the output was written by this run, or by an earlier run this manifest recorded (its row is kept);
- skipped: the output existed and no run recorded here made it; it was left alone (--overwrite replaces it);
- failed: `error` says why; the other cases went on, and the next run retries it.

Re-running resumes: existing outputs are skipped (their rows stay), failed and missing cases are done again. A
re-run with another model, weights, quality or options into the same folder is refused before any work
(`check_same_run`): the folder would mix two models' outputs under one manifest.
Rows of cases that are not part of a run (another glob into the same folder) are kept. The file is written
whole or not at all (temp file + rename), every few seconds during a run and at its end.

Two runs may write one folder at once (cohort/sharing.py): each write is a read-modify-write under a short lock
(`.manifest.csv.lock`, O_EXCL, removed at once): the rows on disk, with this run's own rows laid over them. Neither run
loses the other's rows, and a `skipped` row of this run never hides the other run's `done` row for that output.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import time
from pathlib import Path

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.untrusted import load_json
from AbdomenSegLib.io.files import atomic_output, lock_holder, lock_path, try_lock

NAME = "manifest.csv"
FIELDS = (
    "case",
    "input",
    "output",
    "status",
    "seconds",
    "worker",
    "device",
    "model",
    "sha256",
    "error",
    "quality",
    "options",
)
STATUSES = ("done", "skipped", "failed")
_QC_FIELDS = ("qc_warnings", "qc_notes", "qc_flags")


def this_process() -> str:
    """The `worker` column: the host and process that segmented a case."""
    return f"{socket.gethostname()}:{os.getpid()}"


def device_label(device: str) -> str:
    """`cuda (GPU 2)` when the process was pinned to one GPU with CUDA_VISIBLE_DEVICES, else the device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if str(device).startswith("cuda") and visible:
        return f"{device} (GPU {visible})"
    return str(device)


def case_row(
    case,
    src,
    dst,
    status,
    *,
    seconds=None,
    worker=None,
    device="",
    model="",
    sha256="",
    error="",
    qc_columns=None,
    quality="",
    options="",
) -> dict:
    """One manifest row; `qc_columns` are the result check's flat columns (QCReport.columns())."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    row = {
        "case": case,
        "input": str(src),
        "output": str(dst),
        "status": status,
        "seconds": "" if seconds is None else round(float(seconds), 2),
        "worker": this_process() if worker is None else worker,
        "device": device,
        "model": model,
        "sha256": sha256,
        "error": error,
        "quality": quality,
        "options": options,
    }
    row.update(qc_columns or {})
    return row


def run_options(options) -> str:
    """The `options` column: the choices that change a run's labels (an inference.Options), as sorted JSON."""
    from dataclasses import asdict

    return json.dumps(asdict(options), sort_keys=True)


def check_same_run(folder, *, model: str, sha256: str, quality: str, options: str) -> None:
    """Refuse a folder run whose earlier outputs (rows `done` in its manifest) another model, weights, quality or
    options made: skipping them would leave one model's outputs under the other's name. Columns an older manifest
    lacks are not compared."""
    asked = {"model": model, "weights (sha256)": sha256, "quality": quality, "options": options}
    for row in read_manifest(Path(folder) / NAME).values():
        if row.get("status") != "done":
            continue
        had = {
            "model": row.get("model", "").split(">")[0],
            "weights (sha256)": row.get("sha256", "").split(">")[0],
            "quality": row.get("quality", ""),
            "options": row.get("options", ""),
        }
        differ = [k for k, v in had.items() if v and asked[k] and not _same(k, v, asked[k])]
        if differ:
            shown = ", ".join(f"{k} {had[k]!r} there, {asked[k]!r} now" for k in differ)
            raise AbdomenSegError(
                f"'{folder}' holds outputs of another run ({row['case']}: {shown})",
                "pass --overwrite to replace them, or choose another output folder",
            )


def _same(key: str, had: str, asked: str) -> bool:
    """Options are compared choice by choice, on the choices both runs record (a newer engine may record more)."""
    if key != "options":
        return had == asked
    try:
        a, b = json.loads(had), json.loads(asked)
    except ValueError:
        return had == asked
    return all(a[k] == b[k] for k in set(a) & set(b))


def read_manifest(path) -> dict:
    """{case: row} of an existing manifest (values as text); {} when there is none."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"case", "status", "output"} <= set(reader.fieldnames):
                raise ValueError("no case, status and output columns")
            rows = {
                row["case"]: {k: (v if v is not None else "") for k, v in row.items() if k is not None}
                for row in reader
                if row.get("case")
            }
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise AbdomenSegError(
            f"the run's manifest '{path}' cannot be read ({exc})",
            "fix it, or move it away to start a new one (outputs that exist are still skipped)",
        ) from None
    return rows


def _column_order(rows) -> list:
    """The fixed columns, then the result check's, then per organ (in the organ table's order), then any other."""
    from AbdomenSegLib.core.organs import ORGANS

    seen = []
    for row in rows:
        seen += [k for k in row if k not in seen and k not in FIELDS]
    organ_rank = {o.name: i for i, o in enumerate(ORGANS)}

    def rank(key):
        if key in _QC_FIELDS:
            return (0, _QC_FIELDS.index(key), key)
        organ, _, kind = key.rpartition("_")
        if organ in organ_rank:
            return (1, organ_rank[organ], kind)
        return (2, 0, key)

    return list(FIELDS) + sorted(seen, key=rank)


class Manifest:
    """The manifest of a folder run: earlier rows read at the start, rows recorded as cases end, written atomically
    at most every `flush_s` seconds and by `write()`, each time merged with what another run wrote meanwhile."""

    def __init__(self, folder, *, flush_s: float = 5.0, lock_wait_s: float = 30.0):
        self.path = Path(folder) / NAME
        self.rows = read_manifest(self.path)
        self.flush_s, self.lock_wait_s = flush_s, lock_wait_s
        self._mine: set = set()  # the cases this run recorded: only these override the rows on disk
        self._written = time.monotonic()
        self._dirty = False

    def record(self, row: dict) -> dict:
        self.rows[row["case"]] = row
        self._mine.add(row["case"])
        self._dirty = True
        if time.monotonic() - self._written >= self.flush_s:
            self.write()
        return row

    def skipped(self, case, src, dst, qc_json=None) -> dict:
        """A case whose output exists: an earlier `done` row for that output stays as it is; otherwise the row
        says `skipped`, with the volumes of its earlier result check when one exists."""
        earlier = self.rows.get(case)
        if earlier and earlier.get("status") == "done" and earlier.get("output") == str(dst):
            return earlier
        extra, columns = {}, {}
        data = _read_json(qc_json)
        if data:
            from AbdomenSegLib.qc.check import QCReport

            try:
                columns = QCReport.from_dict(data).columns()
            except (KeyError, TypeError, ValueError):
                columns = {}
            extra = {k: data.get(k, "") for k in ("model",)}
        return self.record(
            case_row(case, src, dst, "skipped", worker="", model=extra.get("model", ""), qc_columns=columns)
        )

    def counts(self, cases=None) -> dict:
        rows = [r for c, r in self.rows.items() if cases is None or c in cases]
        return {s: sum(r.get("status") == s for r in rows) for s in STATUSES}

    def write(self) -> Path | None:
        """Write the manifest whole (temp file + rename), merged under the lock with the rows another run wrote
        since this one read it; nothing when no row was ever recorded."""
        if not self.rows:
            return None
        with self._locked():
            self.rows = _merge(read_manifest(self.path), self.rows, self._mine)
            rows = [self.rows[c] for c in sorted(self.rows)]
            fields = _column_order(rows)
            with atomic_output(self.path, ".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore", restval="")
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        self._written, self._dirty = time.monotonic(), False
        return self.path

    @contextlib.contextmanager
    def _locked(self):
        """Hold `.manifest.csv.lock` for one read-modify-write (milliseconds); wait up to `lock_wait_s` for another
        run's, and take over one whose process is gone."""
        lock = lock_path(self.path)
        deadline = time.monotonic() + self.lock_wait_s
        while not try_lock(lock, what="the manifest's lock file"):
            if time.monotonic() > deadline:
                _, owner, _ = lock_holder(lock)
                raise AbdomenSegError(
                    f"the manifest '{self.path}' stayed locked by another run ({owner}) for {self.lock_wait_s:g} s",
                    f"if no such run exists, delete '{lock}' and run again (finished outputs are skipped)",
                )
            time.sleep(0.02)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()


def _merge(on_disk: dict, rows: dict, mine: set) -> dict:
    """The rows on disk, with the rows this run recorded (`mine`) laid over them; rows this run only read keep what
    the disk says now. A `skipped` row of ours (the output was there when we looked) yields to a `done` row for the
    same output: another run wrote it while we ran."""
    merged = dict(on_disk)
    for case in mine:
        ours, theirs = rows[case], on_disk.get(case)
        keep_theirs = (
            ours.get("status") == "skipped"
            and theirs is not None
            and theirs.get("status") == "done"
            and theirs.get("output") == str(ours.get("output"))
        )
        if not keep_theirs:
            merged[case] = ours
    for case, row in rows.items():  # read at our start, since gone from the file (moved away): kept
        merged.setdefault(case, row)
    return merged


def _read_json(path):
    if not path:
        return None
    try:
        return load_json(path, "run record", "")
    except AbdomenSegError:
        return None
