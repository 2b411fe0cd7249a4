"""The parent's side of the long-lived engine process (AbdomenSegLib/worker.py): start it, hand it one run at a
time, route its output to that run, end it.

    worker = EngineWorker()
    run = SegmentationProcess(worker=worker).start(image, model=...)   # as without a worker (background.py)
    ...
    worker.stop()                                                       # when the module closes

The first run pays the start-up and the model load as a run of its own process does; later runs skip both (the
worker keeps each (model, device) it has loaded, inference.predictor.get_segmenter). A run that is cancelled, or a worker
that crashed, idled out (worker.py --idle-exit) or was killed, is simply replaced by a fresh worker at the next
run. Like background.py, nothing here touches Qt or MRML: one daemon thread reads the worker's stdout and hands
each line to the run it belongs to.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from AbdomenSegLib.slicer.background import _WINDOWS, SegmentationProcess, launch_engine, python_executable

WORKER_LOG = "worker.log"


class EngineWorker:
    def __init__(self, *, idle_exit_s: float = 900.0, temp_root=None):
        self.idle_exit_s = float(idle_exit_s)
        self.temp_root = temp_root
        self.starts = 0  # how many processes this worker has started (tests, and the log)
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._folder: Path | None = None  # the worker's own log lives here
        self._current: SegmentationProcess | None = None
        self._last_request_end = 0.0
        self._lock = threading.RLock()

    # -- state ----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._current is not None

    def serving(self, run) -> bool:
        """`run` is the request the worker is working on now."""
        with self._lock:
            return self._current is run

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self.alive else None

    # -- requests -------------------------------------------------------------------------------
    def submit(self, run: SegmentationProcess, cli_args: list, log_path, *, python=None, env=None) -> None:
        """Send one run's CLI arguments (after `python -m AbdomenSegLib`) to the worker, starting it if needed.
        The run then receives the worker's lines until its outcome line; only one run at a time."""
        if self.busy:
            raise RuntimeError("the engine worker is busy with another run; start this one without a worker")
        # Close to its idle exit the worker may be leaving just as the request is written, and the request would
        # be lost: replace it instead (the model is loaded again, once). Stopping joins the reader thread, so it
        # happens outside the lock that thread takes.
        near_idle_exit = (time.monotonic() - self._last_request_end) > self.idle_exit_s - 30.0
        if self.alive and near_idle_exit:
            self.stop()
        if not self.alive:
            self._start(python, env)
        with self._lock:
            self._current = run
        request = json.dumps({"argv": [str(a) for a in cli_args], "log": str(log_path)}) + "\n"
        assert self._process is not None and self._process.stdin is not None  # _start() made it with a stdin pipe
        try:
            self._process.stdin.write(request)
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            # It died between the check and the write: the reader thread ends the run with the worker's log.
            pass

    def start(self, *, python=None, env=None) -> EngineWorker:
        """Start the process now (it imports the engine while nothing waits for it); else the first run does."""
        if not self.alive:
            self._start(python, env)
        return self

    def _start(self, python, env) -> None:
        self.stop()
        self._folder = Path(tempfile.mkdtemp(prefix="AbdomenSeg-worker-", dir=self.temp_root))
        command = [
            str(python or python_executable()),
            "-m",
            "AbdomenSegLib.worker",
            "--idle-exit",
            f"{self.idle_exit_s:g}",
        ]
        self._process = launch_engine(command, self._folder / WORKER_LOG, env, stdin=subprocess.PIPE)
        self.starts += 1
        self._last_request_end = time.monotonic()
        self._reader = threading.Thread(
            target=self._read, args=(self._process,), name="AbdomenSeg worker reader", daemon=True
        )
        self._reader.start()

    # -- the reader thread ----------------------------------------------------------------------
    def _read(self, process: subprocess.Popen) -> None:
        try:
            assert process.stdout is not None  # launch_engine pipes it
            for line in process.stdout:
                with self._lock:
                    run = self._current if self._process is process else None
                if run is None:
                    continue  # {"ready"}, or lines of a worker already replaced
                run._on_line(line)
                if run.finished:
                    with self._lock:
                        if self._current is run:
                            self._current = None
                            self._last_request_end = time.monotonic()
        except (OSError, ValueError):
            pass
        finally:
            returncode = process.wait()
            with self._lock:
                run = self._current if self._process is process else None
                if run is not None:
                    self._current = None
            if run is not None:  # the worker ended in the middle of this run: crash, kill, or cancel
                run._on_end(returncode, extra_log=self._log_tail())

    def _log_tail(self, lines=20) -> str:
        if self._folder is None:
            return ""  # never started
        try:
            text = (self._folder / WORKER_LOG).read_text(encoding="utf-8", errors="replace")
        except (OSError, TypeError):
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    # -- ending ---------------------------------------------------------------------------------
    def stop(self, timeout: float = 2.0, *, kill: bool = False) -> None:
        """End the worker: ask it to quit (closing its stdin), or with kill=True (a cancel) signal its process
        tree at once; wait up to `timeout` s, then kill. Safe to call at any time and more than once."""
        process, folder = self._process, self._folder
        if process is not None:
            if process.poll() is None:
                if kill:
                    SegmentationProcess._signal_tree(process, kill=False)
                else:
                    assert process.stdin is not None  # _start() made it with a stdin pipe
                    try:
                        process.stdin.close()  # worker.py exits at EOF
                    except (OSError, ValueError):
                        pass
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    SegmentationProcess._signal_tree(process, kill=True)
                    process.wait()
            if not _WINDOWS:  # whatever of its process group is left (PythonSlicer's launched interpreter)
                SegmentationProcess._signal_tree(process, kill=True)
            if self._reader is not None and self._reader is not threading.current_thread():
                self._reader.join(5.0)
            for stream in (process.stdin, process.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except (OSError, ValueError):
                    pass
        with self._lock:
            if self._process is process:
                self._process, self._folder = None, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def __del__(self):
        try:
            self.stop(0.5)
        except Exception:
            pass
