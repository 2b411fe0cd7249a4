"""Cohorts on a Dask cluster: one task per case, on worker processes that each load the model once and keep it.

`--workers N` starts a local cluster of N worker processes (with CUDA: one per GPU, each pinned to its GPU with
CUDA_VISIBLE_DEVICES); `--scheduler ADDRESS` or `--scheduler-file FILE` sends the same tasks to a Dask cluster
that is already running (`dask scheduler` + `dask worker`, or dask-jobqueue on SLURM/PBS/SGE).

Workers read their inputs and write their outputs themselves, on a filesystem they share with the client, through
the same code as a sequential run (`runner.segment_one`: the per-output lock, the atomic write). The client passes
paths and small dicts and gets back one manifest row per case; volumes never travel. A worker that dies mid-case
(killed, out of memory, a lost node) leaves at most a lock and a temporary file: Dask runs the case again on
another worker, which takes over the dead worker's lock, and the run removes the temporary files at its end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from AbdomenSegLib.core.errors import AbdomenSegError, Cancelled
from AbdomenSegLib.core.options import LogCallback
from AbdomenSegLib.core.untrusted import load_json

_logger = logging.getLogger("abdomenseg.cohort")
_CONNECT_TIMEOUT_S = 30
_HANDSHAKE_TIMEOUT_S = 5.0


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_gpus(device: str) -> list:
    """The GPUs a local cluster pins its workers to: those CUDA_VISIBLE_DEVICES lists (or all), none on the CPU."""
    if device == "cpu":
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return (visible or [str(i) for i in range(count)])[:count]


# -- the cluster ---------------------------------------------------------------------------------------------------
def _available_memory() -> float | None:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - unknown: no cap by memory
        return None


def capped_workers(asked: int, worker_bytes: float | None = None, *, cpus=None, memory=None) -> tuple:
    """(worker processes to start, why fewer than asked or ""): at most one per CPU core this process may use, and
    no more than the available memory holds at `worker_bytes` each (a model copy and a case in memory)."""
    cpus = available_cpus() if cpus is None else cpus
    count, why = asked, ""
    if count > cpus:
        count, why = cpus, f"this process may use {cpus} CPU core(s)"
    memory = _available_memory() if memory is None else memory
    if worker_bytes and memory:
        fit = max(1, int(memory // worker_bytes))
        if fit < count:
            count = fit
            why = f"each worker may need about {worker_bytes / 1e9:.1f} GB and {memory / 1e9:.1f} GB are available"
    return count, why


def worker_memory(card, sources, most: int = 50) -> float | None:
    """Estimated peak bytes of one worker: the largest of the first `most` cases (from their headers, limits.py) plus
    what the model needs whatever the input (models/footprint.py: weights held twice while loading, one batch of
    windows, the network's activations), the same estimate a single run is refused by; None when no header can be
    read."""
    import SimpleITK as sitk

    from AbdomenSegLib.core import limits

    need = []
    for src in list(sources)[:most]:
        try:
            if Path(src).is_dir() or not Path(src).is_file():
                continue
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(src))
            reader.ReadImageInformation()
            size, spacing = reader.GetSize()[:3], reader.GetSpacing()[:3]
            need.append(limits.estimate_memory(size, spacing, card["spacing"], card.out_channels))
        except Exception:  # noqa: BLE001 - an unreadable case is refused by its own task
            continue
    if not need:
        return None
    from AbdomenSegLib.models.footprint import model_bytes

    try:
        weights = sum(p.stat().st_size for p in Path(card.path).glob("*.safetensors"))
    except (OSError, TypeError):
        weights = 0
    # The weights files count too: an architecture footprint.py does not estimate (0 there) still loads them twice.
    return max(need) + max(model_bytes(card), 2.0 * weights)


@contextlib.contextmanager
def connect(
    *,
    workers=None,
    scheduler=None,
    scheduler_file=None,
    device="auto",
    gpus=None,
    worker_bytes=None,
    log: LogCallback = print,
):
    """A `distributed.Client`: on a local cluster of `workers` processes, or on the running cluster that `scheduler`
    (an address) or `scheduler_file` names. Yields (client, settings for the workers: torch threads, pinning).
    A local cluster has at most one worker per CPU core and as many as the memory holds at `worker_bytes` each."""
    from distributed import Client, LocalCluster

    if scheduler or scheduler_file:
        if scheduler_file and not os.path.lexists(scheduler_file):  # a FIFO or folder: the loader says what it is
            raise AbdomenSegError(
                f"scheduler file '{scheduler_file}' does not exist",
                "start the scheduler first (dask scheduler --scheduler-file FILE) on a shared "
                "filesystem, or give its address with --scheduler",
            )
        where = scheduler or scheduler_file
        if scheduler_file:  # read here, bounded (Dask's own reading failed with an AssertionError on bad JSON)
            scheduler = _scheduler_file_address(scheduler_file)
        _check_is_scheduler(scheduler, where)
        try:
            client = Client(scheduler, timeout=f"{_CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise AbdomenSegError(
                f"cannot reach the Dask scheduler at {where} ({str(exc).splitlines()[0][:200]})",
                "start it first (dask scheduler), or check the address or scheduler file",
            ) from None
        try:
            count = len(client.scheduler_info().get("workers", {}))
            log(
                f"Dask cluster {client.scheduler.address}: {count} worker(s)"
                + ("; the cases wait until workers join" if not count else "")
            )
            _log_dashboard(client, log)
            yield client, {"torch_threads": None}
        finally:
            client.close()
        return

    if workers is None or workers < 1:
        raise AbdomenSegError(f"--workers {workers} is not a number of worker processes", "give --workers 1 or more")
    gpus = local_gpus(device) if gpus is None else list(gpus)
    if gpus and workers > len(gpus):
        raise AbdomenSegError(
            f"--workers {workers} but this machine has {len(gpus)} GPU(s)",
            f"use --workers {len(gpus)} or fewer: one worker per GPU (or --device cpu)",
        )
    if not gpus:  # `--workers 12` on 2 cores started 12 model copies
        count, why = capped_workers(workers, worker_bytes)
        if count < workers:
            log(f"--workers {workers}: starting {count}, as {why}")
            workers = count
    cpus = available_cpus()
    threads = max(1, cpus // workers)
    dashboard = ":0" if _has_dashboard() else None
    cluster = LocalCluster(
        n_workers=0 if gpus else workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=dashboard,
        silence_logs=logging.ERROR,
        host="127.0.0.1",
        memory_limit=_memory_per_worker(workers),
    )
    try:
        if gpus:  # one worker per GPU, each seeing only its own (set before its process starts)
            for i, gpu in enumerate(gpus[:workers]):
                options = dict(cluster.new_spec["options"], env={"CUDA_VISIBLE_DEVICES": gpu})
                cluster.worker_spec[i] = {"cls": cluster.new_spec["cls"], "options": options}
            cluster.scale(workers)
        client = Client(cluster)
        try:
            client.wait_for_workers(workers, timeout=120)
            log(
                f"local Dask cluster: {workers} worker process(es), {threads} torch thread(s) each"
                + (f", pinned to GPU {', '.join(gpus[:workers])}" if gpus else "")
            )
            _log_dashboard(client, log)
            yield client, {"torch_threads": threads}
        finally:
            client.close()
    finally:
        cluster.close()


_SCHEDULER_FILE_FIX = (
    "give the JSON file that `dask scheduler --scheduler-file FILE` wrote, or the address with --scheduler"
)


def _scheduler_file_address(path) -> str:
    info = load_json(path, "scheduler file", _SCHEDULER_FILE_FIX, max_bytes=1024 * 1024)
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, str) or not address:
        raise AbdomenSegError(f"scheduler file '{path}' holds no scheduler address", _SCHEDULER_FILE_FIX)
    return address


def _check_is_scheduler(address: str, where: str) -> None:
    """A Dask scheduler speaks first: on a new connection it sends its handshake, a message framed as
    <total bytes, uint64><number of frames, uint64>... (distributed/comm/tcp.py). Anything else listening there (a web
    server waits for a request) would leave Dask's handshake waiting without a time limit, so this probe, bounded by
    _HANDSHAKE_TIMEOUT_S, refuses it first. Only plain TCP addresses are probed (tls:// and others go to Dask as they are)."""
    text = address.strip()
    if "://" in text:
        protocol, text = text.split("://", 1)
        if protocol != "tcp":
            return
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return  # Dask says what is wrong with the address
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S) as sock:
            sock.settimeout(_HANDSHAKE_TIMEOUT_S)
            head = b""
            deadline = time.monotonic() + _HANDSHAKE_TIMEOUT_S
            while len(head) < 16 and time.monotonic() < deadline:
                chunk = sock.recv(16 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        head = b""
    except OSError as exc:
        raise AbdomenSegError(
            f"cannot reach the Dask scheduler at {where} ({exc.strerror or exc})",
            "start it first (dask scheduler), or check the address or scheduler file",
        ) from None
    total, frames = struct.unpack("<QQ", head) if len(head) == 16 else (0, 0)
    if not (0 < total < 2**24 and 0 < frames < 2**16):
        said = f": it answered {head[:16]!r}" if head else f": it sent no handshake within {_HANDSHAKE_TIMEOUT_S:g} s"
        raise AbdomenSegError(
            f"the service at {address} is not a Dask scheduler{said}",
            "check the address and port (the scheduler listens on 8786 by default), or start it with dask scheduler",
        )


def _has_dashboard() -> bool:
    try:
        import bokeh  # noqa: F401 - Dask's dashboard needs it
    except ImportError:
        return False
    return True


def _memory_per_worker(workers: int):
    try:
        import psutil

        return int(psutil.virtual_memory().total / workers)
    except Exception:  # noqa: BLE001 - let Dask decide
        return "auto"


def _log_dashboard(client, log):
    services = client.scheduler_info().get("services", {})
    if "dashboard" in services:
        log(f"Dask dashboard: {client.dashboard_link}")


try:
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # Dask is only needed for --workers / --scheduler
    _WorkerPlugin = object  # type: ignore[misc,assignment]  # a plain base class when Dask is not installed


class AbdomenSegWorker(_WorkerPlugin):
    """Loads the model when a worker starts (or joins later) and keeps it for the run's cases; a model that cannot
    load fails the registration, so the run stops before its first case."""

    def __init__(self, settings):
        self.settings = settings

    def setup(self, worker):
        nthreads = getattr(getattr(worker, "state", None), "nthreads", None)
        if self.settings.get("model"):
            _segmenter(self.settings, nthreads=nthreads)
        elif self.settings.get("torch"):  # models loaded by the tasks themselves (compare)
            _set_threads(self.settings.get("torch_threads") or nthreads)


def register(client, settings) -> str:
    """Register the worker plugin (model loaded on every worker, present and future); returns its name."""
    name = f"abdomenseg-{uuid.uuid4().hex[:12]}"
    try:
        client.register_plugin(AbdomenSegWorker(settings), name=name)
    except AbdomenSegError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. the package cannot be imported on the workers
        raise AbdomenSegError(
            f"the Dask workers could not start AbdomenSeg ({type(exc).__name__}: {exc})",
            "install AbdomenSeg where the workers run (or put it on their PYTHONPATH) and make "
            "the model and the data reachable at the same paths",
        ) from None
    return name


# -- on the workers ------------------------------------------------------------------------------------------------
_SEGMENTERS: dict = {}
_ONE_CASE = threading.Lock()  # one case at a time per worker process, however many threads Dask gives it
_THREADS_SET = [False]


def _set_threads(threads):
    if threads and not _THREADS_SET[0]:
        import torch

        torch.set_num_threads(int(threads))
        _THREADS_SET[0] = True


def _segmenter(settings, nthreads=None):
    """This process's segmenter for the run's model and device, loaded once and kept."""
    from AbdomenSegLib.inference.predictor import get_segmenter
    from AbdomenSegLib.models.packages import find_model

    key = (settings["model"], settings["device"])
    if key not in _SEGMENTERS:
        _set_threads(settings.get("torch_threads") or nthreads or _worker_threads())
        segmenter = get_segmenter(find_model(settings["model"]), settings["device"], log=_logger.warning)
        if settings.get("options"):  # a refused bf16 fails here, when the worker starts, not in every case
            from AbdomenSegLib.core.precision import resolve_precision

            resolve_precision(settings["options"].get("precision", "auto"), segmenter.device, segmenter.card)
        _SEGMENTERS[key] = segmenter
    return _SEGMENTERS[key]


def _worker_threads():
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return None


def segment_case(name: str, src: str, dst: str, settings: dict) -> dict:
    """One case on a worker: {"row": manifest row, "log": lines for the client, "qc": the result check}."""
    from AbdomenSegLib.cohort.manifest import case_row, device_label

    start = time.time()
    common = {"model": settings["model_name"], "sha256": settings["sha256"], "quality": settings.get("quality", "")}
    common["options"] = json.dumps(settings["options"], sort_keys=True) if settings.get("options") else ""
    device = ""
    try:
        segmenter = _segmenter(settings)
        device = device_label(segmenter.device)
        with _ONE_CASE:
            start = time.time()
            return _segment_case(segmenter, name, Path(src), Path(dst), settings, device, common)
    except AbdomenSegError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - a failed case never stops the others
        _logger.error("case %s failed:\n%s", name, traceback.format_exc())
        error = f"unexpected {type(exc).__name__}: {exc}"
    return {
        "row": case_row(name, src, dst, "failed", seconds=time.time() - start, device=device, error=error, **common),
        "log": [],
        "qc": None,
    }


def _segment_case(segmenter, name, src, dst, settings, device, common):
    from AbdomenSegLib.cohort.manifest import case_row, this_process
    from AbdomenSegLib.cohort.runner import segment_one
    from AbdomenSegLib.inference.segmenter import Options
    from AbdomenSegLib.qc.check import QCReport
    from AbdomenSegLib.qc.outputs import QCFiles, check_and_record, summary_lines

    qc_folder = Path(settings["qc_folder"])
    qc_json = qc_folder / f"{name}.json"
    overwrite = settings["overwrite"]
    if dst.exists() and not overwrite:
        # The client saw no output when it sent the case: an earlier attempt on a worker that died after publishing
        # it wrote it. Take over its lock if it left one, and report the case from its result check.
        _take_over_lock(dst, settings)
        with contextlib.suppress(AbdomenSegError):
            with _claimed(dst):
                pass
        data = _read_json(qc_json) or {}
        columns = QCReport.from_dict(data).columns() if data else {}
        return {
            "row": case_row(
                name,
                src,
                dst,
                "done",
                seconds=data.get("seconds"),
                worker=data.get("worker"),
                device=data.get("device", device),
                qc_columns=columns,
                **common,
            ),
            "log": [f"{name}: written by an earlier attempt whose worker was lost"],
            "qc": data or None,
        }
    options = Options(**settings["options"])
    start = time.time()
    result = {}

    def check_then_publish(image, labels):
        # The result check is written before the output takes its name: an output never exists without it.
        files = QCFiles(qc_folder, pictures=settings["pictures"])
        result["report"], result["qc"] = check_and_record(
            files,
            segmenter,
            name,
            image,
            labels,
            options,
            output=dst,
            started=start,
            worker=this_process(),
            device=device,
        )

    _take_over_lock(dst, settings)
    segment_one(segmenter, src, dst, options, overwrite, name, bar=False, before_write=check_then_publish)
    report = result["report"]
    return {
        "row": case_row(
            name, src, dst, "done", seconds=time.time() - start, device=device, qc_columns=report.columns(), **common
        ),
        "log": summary_lines(name, report),
        "qc": result["qc"],
        "warnings": [str(f) for f in report.warnings],
    }


@contextlib.contextmanager
def _claimed(dst):
    from AbdomenSegLib.io.files import claim_output

    with claim_output(dst, overwrite=True) as path:
        yield path


def _take_over_lock(dst: Path, settings: dict) -> None:
    """Remove the lock a lost worker of this run left on `dst`. Dask runs a task on one worker at a time, so a lock
    on this case's output is either an earlier attempt's, whose worker died, or another run's. io.claim_output
    already takes over locks of dead processes on this host; here also (a) a dead process not yet reaped by its
    nanny (a zombie) and (b) a process on another host that is not a worker of this cluster and took the lock after
    this run began: a node that was lost."""
    from AbdomenSegLib.io.files import lock_path

    lock = lock_path(dst)
    try:
        fields = lock.read_text(encoding="utf-8").split()
        pid, host = int(fields[1]), fields[2]
        taken = lock.stat().st_mtime
    except (OSError, ValueError, IndexError):
        return
    if host == socket.gethostname():
        stale = pid != os.getpid() and _zombie(pid)
    else:
        live = _cluster_processes()
        stale = taken >= settings["started"] - 1 and live is not None and (host, pid) not in live
    if stale:
        _logger.warning("removing %s, left by a lost worker (process %s on %s)", lock, pid, host)
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _zombie(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - gone, or no psutil: io's own check decides
        return False


def _cluster_processes():
    """(hostname, pid) of every worker of the cluster this task runs on; None when that cannot be told."""
    try:
        from distributed import get_client

        answers = get_client().run(_identity)
        return {tuple(v) for v in answers.values()}
    except Exception:  # noqa: BLE001 - cannot tell: the lock stays
        return None


def _identity():
    return socket.gethostname(), os.getpid()


def _read_json(path):
    try:
        return load_json(path, "result check", "")
    except AbdomenSegError:
        return None


def call(fn, *args):
    """A task that returns ("ok", value) or ("error", AbdomenSegError text): evaluate and compare tasks."""
    try:
        return ("ok", fn(*args))
    except AbdomenSegError as exc:
        return ("error", (exc.problem, exc.fix))


# -- on the client -------------------------------------------------------------------------------------------------
class _Progress:
    """Cases done / failed / remaining and the rate, on one tqdm line on stderr."""

    def __init__(self, total, desc="cases"):
        from tqdm import tqdm

        self.done = self.failed = 0
        self.total, self.desc = total, desc
        self.started = time.monotonic()
        # Where stderr is not a terminal (a log file, a script), no bar redraws: one line per case (`write`).
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(
            disable=not self.interactive,
            total=total,
            unit="case",
            file=sys.stderr,
            dynamic_ncols=True,
            bar_format="{desc} |{bar:20}| [{elapsed}<{remaining}, {rate_fmt}]",
        )
        self._describe()

    def _describe(self):
        self.bar.set_description_str(
            f"{self.desc}: done {self.done}, failed {self.failed}, " f"left {self.total - self.done - self.failed}",
            refresh=False,
        )

    def update(self, ok: bool):
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self._describe()
        self.bar.update(1)

    def write(self, line):
        if self.interactive:
            self.bar.write(line, file=sys.stderr)
            return
        finished = self.done + self.failed + 1  # the case this line reports is counted right after it
        elapsed = time.monotonic() - self.started
        left = elapsed / finished * (self.total - finished)
        print(f"{line} (elapsed {elapsed:.0f} s, about {left:.0f} s left)", file=sys.stderr, flush=True)

    def close(self):
        self.bar.close()


def run_cases(client, fn, items, *, keys, desc="cases", on_result=None, log: LogCallback = print):
    """Submit fn(*item) per item (one task each), hand each result to on_result(index, future_outcome) as cases end,
    in the order they end. An outcome is ("ok", value) or ("lost", message) when the workers that ran it kept dying
    (Dask gives up after `distributed.scheduler.allowed-failures` deaths) or ("error", message)."""
    from distributed import as_completed

    futures = [client.submit(fn, *item, key=key, pure=False) for item, key in zip(items, keys)]
    index = {f.key: i for i, f in enumerate(futures)}
    bar = _Progress(len(futures), desc)
    try:
        for future in as_completed(futures):
            try:
                outcome = ("ok", future.result())
            except Exception as exc:  # noqa: BLE001 - KilledWorker, a worker that could not unpickle, ...
                name = type(exc).__name__
                if name == "KilledWorker":
                    outcome = (
                        "lost",
                        "the workers running this case died each time (out of memory?): see the " "workers' logs",
                    )
                else:
                    outcome = ("error", f"unexpected {name}: {exc}")
            lines, ok = on_result(index[future.key], outcome) if on_result else ([], outcome[0] == "ok")
            for line in lines:
                bar.write(line)
            bar.update(ok)
            future.release()
    except KeyboardInterrupt:
        bar.close()
        client.cancel(futures)
        raise Cancelled() from None
    finally:
        bar.close()


def sweep_workers(client, folder) -> list:
    """Temporary files of dead writers, removed by each worker on its own host (and by the client on its)."""
    from AbdomenSegLib.io.files import sweep_partials

    removed = [str(p) for p in sweep_partials(folder)]
    try:
        for paths in client.run(_sweep, str(folder)).values():
            removed += paths
    except Exception:  # noqa: BLE001 - no workers left: the next run sweeps
        pass
    return sorted(set(removed))


def _sweep(folder):
    from AbdomenSegLib.io.files import sweep_partials

    return [str(p) for p in sweep_partials(folder)]


def segment_cases(args, card, options, todo, *, qc_folder, pictures, on_result, log: LogCallback = print):
    """Segment `todo` [(index, name, src, dst)] on the cluster `args` names; on_result(index, name, src, dst,
    outcome) -> (log lines, ok) for each as it ends."""
    from dataclasses import asdict

    settings = {
        "model": str(Path(card.path).resolve()),
        "model_name": card.name,
        "sha256": card.get("sha256", ""),
        "device": args.device,
        "options": asdict(options),
        "quality": args.quality,
        "overwrite": args.overwrite,
        "qc_folder": str(Path(qc_folder).resolve()),
        "pictures": pictures,
        "started": time.time(),
    }
    output = Path(args.output)
    with connect(
        workers=args.workers,
        scheduler=args.scheduler,
        scheduler_file=args.scheduler_file,
        device=args.device,
        worker_bytes=worker_memory(card, [src for _, _, src, _ in todo]) if args.workers else None,
        log=log,
    ) as (client, cluster_settings):
        settings.update(cluster_settings)
        plugin = register(client, settings)
        try:
            token = uuid.uuid4().hex[:8]
            items = [(name, str(Path(src).resolve()), str(Path(dst).resolve()), settings) for _, name, src, dst in todo]
            keys = [f"segment-{name}-{token}" for _, name, _, _ in todo]
            run_cases(
                client,
                segment_case,
                items,
                keys=keys,
                on_result=lambda i, outcome: on_result(*todo[i], outcome),
                log=log,
            )
            for path in sweep_workers(client, output):
                log(f"removed {Path(path).name}, left by a lost worker")
        finally:
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(plugin)


def map_cases(args, fn, items, *, names, desc, on_result, settings=None, log: LogCallback = print):
    """Evaluate/compare over a cluster: fn(*item) per item, results to on_result(index, outcome) as they end."""
    settings = dict(settings or {})
    with connect(
        workers=args.workers,
        scheduler=args.scheduler,
        scheduler_file=args.scheduler_file,
        device=getattr(args, "device", "cpu"),
        log=log,
    ) as (client, cluster_settings):
        settings.update(cluster_settings)
        plugin = register(client, settings)

        def unwrap(i, outcome):
            kind, value = outcome
            if kind == "ok":
                kind, value = value
                if kind == "error":
                    value = str(AbdomenSegError(*value))
            return on_result(i, (kind, value))

        try:
            token = uuid.uuid4().hex[:8]
            keys = [f"{desc}-{i}-{n}-{token}" for i, n in enumerate(names)]
            run_cases(client, call, [(fn, *item) for item in items], keys=keys, desc=desc, on_result=unwrap, log=log)
        finally:
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(plugin)
