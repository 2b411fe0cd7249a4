"""Segmentation in a background process, so that Slicer's panel stays usable while a model runs.

This is the pattern of the established Slicer AI extensions, without Qt so that it is testable (and usable from
scripts) outside Slicer:

* SlicerMONAIAuto3DSeg (github.com/lassoan/SlicerMONAIAuto3DSeg @ 9cdf2df4e8b3a5351ad11a3f934b0c13ffb15cca):
  MONAIAuto3DSeg/MONAIAuto3DSeg.py:1296-1345 writes the input volume uncompressed into
  `slicer.util.tempDirectory()`, launches `[shutil.which("PythonSlicer"), script, --image-file, --result-file]`
  through `slicer.util.launchConsoleProcess`, and MONAIAuto3DSegLib/process.py:124-151 reads stdout lines on a
  `threading.Thread` into a `queue.Queue` that the main thread drains from a `qt.QTimer.singleShot` every 1000 ms;
  process.py:104-116 cancels by killing the process *and its children* with psutil ("proc.kill() does not work,
  that would only stop the launcher": PythonSlicer is a CTK launcher that starts the real interpreter as a child);
  MONAIAuto3DSeg.py:1403-1407 removes the temp folder once the result is imported (or the run failed).
* SlicerTotalSegmentator (github.com/lassoan/SlicerTotalSegmentator @ 6a82370b44a864bc855fcde7abf683c5191df011):
  TotalSegmentator/TotalSegmentator.py:1076 + 1116-1122 the same temp folder and `PythonSlicer` + script command,
  1236-1237 `launchConsoleProcess` then `logProcessOutput` (955-984), a *blocking* readline loop whose log
  callback calls `slicer.app.processEvents()` (298-302) to keep the GUI alive; 1160-1164 `shutil.rmtree(tempFolder)`.
* Slicer (github.com/Slicer/Slicer @ 583e9b37d50ead7daf7b783dce465ccaecec8809, v5.12.0-87):
  Base/Python/slicer/util.py:4203-4289 `launchConsoleProcess`: `subprocess.Popen(args, stdout=PIPE,
  stderr=STDOUT, universal_newlines=True)`, on Windows with `STARTUPINFO(dwFlags=1 [STARTF_USESHOWWINDOW],
  wShowWindow=0 [SW_HIDE])` to hide the console window, environment `startupEnvironment()` (400: the
  environment Slicer was started with, without its launcher settings; PythonSlicer re-applies its own);
  util.py:4292-4356 (non-blocking mode, Slicer >= 5.12) a daemon reader thread + queue polled by a 100 ms QTimer;
  util.py:4437-4453 `executePythonModule`: inside Slicer `shutil.which("PythonSlicer")`, from a console
  `dirname(sys.executable) + "/PythonSlicer"[.exe]`; Base/QTCore/qSlicerCoreApplication.cxx:1381-1383 sets
  `sys.executable` to `QStandardPaths::findExecutable("PythonSlicer")` inside Slicer.

Here the child is this package's own CLI, `python -m AbdomenSegLib segment in.nrrd out.nrrd --progress-json ...`,
which prints one JSON object per stdout line (see cli._JsonLines); its stderr (log, tqdm bar) goes to a file in
the temp folder, so that neither pipe can fill up and stall it. Nothing here touches Qt or MRML: the reader
thread only parses lines into a queue, and the caller's main thread drains it with `poll()`.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError


class Engine(Protocol):
    """What a run asks of a long-lived engine process (engine_worker.EngineWorker, which imports this module, so
    the run knows it by this interface only)."""

    def submit(self, run: SegmentationProcess, cli_args: list, log_path, *, python=None, env=None) -> None: ...

    def serving(self, run: SegmentationProcess) -> bool: ...

    def stop(self, timeout: float = 2.0, *, kill: bool = False) -> None: ...


# The folder that holds the AbdomenSegLib package: the checkout's root, or, in a packaged extension,
# qt-scripted-modules/ (AbdomenSegLib/CMakeLists.txt installs the engine there WITH_SUBDIR).
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
INPUT_NAME, OUTPUT_NAME, LOG_NAME = "input.nrrd", "labels.nrrd", "segment.log"
_WINDOWS = os.name == "nt"


def python_executable() -> str:
    """The interpreter to run the engine in: Slicer's `PythonSlicer` inside Slicer, else this Python.

    Same logic as Slicer's own `slicer.util.executePythonModule` (util.py:4437-4453 @ 583e9b37), and the
    `shutil.which("PythonSlicer")` of SlicerTotalSegmentator (TotalSegmentator.py:1119) and SlicerMONAIAuto3DSeg
    (MONAIAuto3DSeg.py:1300): Slicer puts PythonSlicer on PATH. Inside Slicer `sys.executable` is set to it as
    well (qSlicerCoreApplication.cxx:1383), the fallback if PATH was changed; never the Slicer GUI binary.
    Outside Slicer, executePythonModule takes PythonSlicer beside `sys.executable`; here it is `sys.executable`
    itself (a plain venv, or PythonSlicer when a script runs in it), which has the engine's dependencies.
    """
    # "Inside the Slicer application" = `slicer.app` exists (util.py:4439-4442 tries `from slicer import app`).
    # Looked up without importing: the slicer-core wheel outside Slicer is a heavy import and has no `app`.
    slicer = sys.modules.get("slicer")
    if getattr(slicer, "app", None) is None:
        return sys.executable
    found = shutil.which("PythonSlicer")
    if found:
        return found
    if Path(sys.executable).name.lower().startswith("pythonslicer"):
        return sys.executable
    raise AbdomenSegError(
        "Slicer's Python interpreter (PythonSlicer) was not found on PATH",
        "reinstall 3D Slicer, or pass python=<path to PythonSlicer>",
    )


def build_command(
    python,
    input_path,
    output_path,
    *,
    model=None,
    device="auto",
    organs=None,
    largest_component="model",
    fill_holes=False,
    input_intensity="native",
    tta=False,
    quality="standard",
) -> list:
    """The documented command line of a background run."""
    command = [
        str(python),
        "-m",
        "AbdomenSegLib",
        "segment",
        str(input_path),
        str(output_path),
        "--progress-json",
        "--device",
        device,
        "--largest-component",
        largest_component,
        "--input-intensity",
        input_intensity,
    ]
    if model:
        command += ["--model", str(model)]
    if organs:
        command += ["--organs", ",".join(organs)]
    if fill_holes:
        command.append("--fill-holes")
    if tta:
        command.append("--tta")
    if quality != "standard":
        command += ["--quality", quality]
    return command


def launch_engine(command: list, log_path, env=None, *, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """Start an engine process (`command`) the way Slicer's extensions start theirs: its stdout a text pipe of
    JSON lines, its stderr into `log_path`, no console window on Windows, and its own process group elsewhere."""
    env = dict(os.environ if env is None else env)
    # `python -m` finds the package through the working directory; PYTHONPATH as well, in case the
    # interpreter runs in safe-path mode. PythonSlicer's launcher adds its own paths to these.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    kwargs: dict[str, Any] = {}
    if _WINDOWS and sys.platform == "win32":  # the same test twice: type checkers see Windows' names only there
        # Hide the console window: Slicer's launchConsoleProcess uses STARTUPINFO with SW_HIDE
        # (util.py:4275-4280); CREATE_NO_WINDOW keeps a console from being created at all.
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        kwargs.update(startupinfo=info, creationflags=subprocess.CREATE_NO_WINDOW)
    else:
        # Its own process group, so that a cancel also reaches the interpreter PythonSlicer's launcher starts.
        kwargs.update(start_new_session=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            cwd=str(PACKAGE_PARENT),
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )


class SegmentationProcess:
    """One segmentation run in a child process (one object per run).

        run = SegmentationProcess().start(image, model="btcv-ct-3d", device="auto")
        while run.running:                     # in Slicer: a QTimer calling poll() every 100 ms instead
            for event in run.poll():           # {"progress": 0.42, "message": "segmenting (3/12)"}, ...
                ...
            time.sleep(0.1)
        run.poll()                             # events that came with the outcome
        labels = run.result() if run.succeeded else None   # run.error says why not ('<problem>. <fix>')
        run.cleanup()                          # always (also after errors): removes the temp folder

    Events are the child's JSON lines, in order: {"progress", "message"} while working, then one outcome,
    {"done": true, "output", "flags", "exit", "model", "device"} or {"error": text}; a line that is not JSON
    comes as {"log": line}. A child that dies without an outcome line (crash, killed) gets a synthesized
    {"error": ...} with the end of its log. The run is over (`running` False) at the outcome line: the result
    file is complete by then, and the interpreter's exit (1-3 s of torch/MONAI teardown) is not waited for;
    cleanup() ends it if it is still exiting. `cancel()` ends the process tree within `timeout` s and removes
    every file.
    """

    def __init__(self, worker: Engine | None = None):
        # With a worker, the run is a request to that long-lived engine process (no start-up, model kept
        # loaded); without, a process of its own. Events, outcome, cancel and cleanup are the same.
        self._worker = worker
        self.command: list | None = None
        self.temp_dir: Path | None = None
        self.returncode: int | None = None  # the process's exit status, once it has exited
        self.exit_code: int | None = None  # the CLI's status from its outcome line (0 written, 3 written+flagged)
        self.flags: list = []
        self.qc: dict | None = None  # the result check's report (qc.QCReport.as_dict) of the case
        self.model: str | None = None
        self.device: str | None = None
        self.progress = 0.0
        self.message = ""
        self.cancelled = False
        self.log_tail = ""
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._outcome = threading.Event()  # an outcome line was read, or the process ended without one
        self._exited = threading.Event()  # the process has exited and all its output is read
        self._lock = threading.Lock()
        self._error: str | None = None
        # the input's (size, spacing, origin, direction); not the pixels, which can be large
        self._grid: tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None = None
        self._started: float | None = None

    # -- starting -------------------------------------------------------------------------------
    def start(
        self,
        image: sitk.Image,
        *,
        model=None,
        device="auto",
        organs=None,
        largest_component="model",
        fill_holes=False,
        input_intensity="native",
        tta=False,
        quality="standard",
        python=None,
        env=None,
        temp_root=None,
    ):
        """Write `image` to a fresh temp folder and launch the segmentation; returns self at once.

        `python`: the interpreter (default python_executable()). `env`: the child's environment (default this
        process's; in Slicer, `slicer.util.startupEnvironment()` as launchConsoleProcess uses). `temp_root`:
        where the temp folder is made (default the system's; in Slicer `slicer.app.temporaryPath`).
        """
        if self._process is not None or self.temp_dir is not None or self._started is not None:
            raise RuntimeError("this SegmentationProcess was already started; make a new one per run")
        self.temp_dir = Path(tempfile.mkdtemp(prefix="AbdomenSeg-", dir=temp_root))
        try:
            input_path = self.temp_dir / INPUT_NAME
            # Uncompressed, as the Slicer extensions write theirs (fast); NRRD holds the full direction matrix,
            # so the geometry round-trips exactly.
            sitk.WriteImage(image, str(input_path), useCompression=False)
            self._grid = (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
            self.command = build_command(
                python or python_executable(),
                input_path,
                self.temp_dir / OUTPUT_NAME,
                model=model,
                device=device,
                organs=organs,
                largest_component=largest_component,
                fill_holes=fill_holes,
                input_intensity=input_intensity,
                tta=tta,
                quality=quality,
            )
            if self._worker is not None:
                self._started = time.monotonic()
                # The CLI's arguments after `python -m AbdomenSegLib`; its stderr into this run's own log.
                self._worker.submit(self, self.command[3:], self.temp_dir / LOG_NAME, python=python, env=env)
            else:
                self._launch(env)
        except BaseException:
            self.cleanup()
            self._started = None  # not running: it never started
            raise
        return self

    def _launch(self, env):
        self._process = launch_engine(self.command, self.temp_dir / LOG_NAME, env, stdin=subprocess.DEVNULL)
        self._started = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="AbdomenSeg output reader", daemon=True)
        self._reader.start()

    # -- the reader thread: parse lines into the queue; never Qt or MRML ------------------------
    def _read(self):
        process = self._process
        try:
            for line in process.stdout:
                self._on_line(line)
        except (OSError, ValueError):  # the pipe was closed under us (cleanup of a process still exiting)
            pass
        finally:
            self._on_end(process.wait())

    def _on_line(self, line: str) -> None:
        """One stdout line of the child (its own process, or the shared worker's while this run is its request)."""
        line = line.strip()
        if not line:
            return
        try:
            event = json.loads(line)
            if not isinstance(event, dict):
                raise ValueError(line)
        except ValueError:
            event = {"log": line}
        if ("done" in event or "error" in event) and not self._outcome.is_set():
            with self._lock:
                if "done" in event:
                    self.exit_code = event.get("exit")
                    self.flags = list(event.get("flags") or [])
                    self.qc = (event.get("qc") or [None])[0]
                    self.model, self.device = event.get("model"), event.get("device")
                else:
                    self._error = str(event["error"])
            self._events.put(event)
            self._outcome.set()
            if self._worker is not None:  # nothing of this run is left to exit: the worker goes on
                self._exited.set()
            return
        self._events.put(event)

    def _on_end(self, returncode, extra_log: str = "") -> None:
        """The process that ran this request ended (all its output read)."""
        with self._lock:
            self.returncode = returncode
            self.log_tail = self._read_log_tail() or extra_log
            crashed = not self._outcome.is_set() and not self.cancelled
            if crashed:
                lines = self.log_tail.strip().splitlines()
                self._error = (
                    f"the segmentation process stopped with exit code {returncode} without a result "
                    f"({lines[-1] if lines else 'no log'}). See the log for details"
                )
        if crashed:
            self._events.put({"error": self._error})
        self._outcome.set()
        self._exited.set()

    def _read_log_tail(self, lines=20) -> str:
        folder = self.temp_dir
        try:
            text = (folder / LOG_NAME).read_text(encoding="utf-8", errors="replace") if folder else ""
        except OSError:
            return ""
        # tqdm redraws its bar with carriage returns; keep the real log lines.
        kept = [part.split("\r")[-1].rstrip() for part in text.split("\n")]
        return "\n".join([line for line in kept if line][-lines:])

    # -- the caller's (main) thread -------------------------------------------------------------
    def poll(self) -> list:
        """All events that arrived since the last call; never blocks."""
        events: list[dict] = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            if "progress" in event:
                self.progress, self.message = float(event["progress"]), str(event.get("message", ""))
            events.append(event)

    @property
    def running(self) -> bool:
        """Started, and neither an outcome nor the process's end has come yet."""
        return self._started is not None and not self._outcome.is_set()

    @property
    def finished(self) -> bool:
        """The run is over: its outcome (result, error) is known; `not running` once started."""
        return self._outcome.is_set()

    @property
    def exited(self) -> bool:
        """The process has exited (and been reaped)."""
        return self._exited.is_set()

    def wait(self, timeout=None) -> bool:
        """Block until the run has its outcome (True) or `timeout` s have passed (False); for scripts."""
        if self._started is None:
            raise RuntimeError("the run was not started")
        return self._outcome.wait(timeout)

    @property
    def succeeded(self) -> bool:
        """The child reported its result written (exit 0, or 3: written but flagged), and it is still here."""
        return (
            self._outcome.is_set()
            and self.error is None
            and self.temp_dir is not None
            and (self.temp_dir / OUTPUT_NAME).is_file()
        )

    @property
    def error(self) -> str | None:
        """Why the run has no result ('<problem>. <fix>'); None while running and after success."""
        with self._lock:
            if self.cancelled:
                return "segmentation cancelled"
            if self._error:
                return self._error
            if not self._outcome.is_set():
                return None
            if self.exit_code not in (0, 3):
                return f"the segmentation ended with exit code {self.exit_code}. See the log for details"
            return None

    def result(self) -> sitk.Image:
        """The label map, in the input's exact grid (call after success, before cleanup())."""
        if not self.succeeded:
            raise AbdomenSegError(
                self.error or "the segmentation has no result (yet)",
                "wait until it has finished, and read the result before cleanup()",
            )
        assert self.temp_dir is not None and self._grid is not None  # set by start(), kept until cleanup()
        labels = sitk.ReadImage(str(self.temp_dir / OUTPUT_NAME))
        size, spacing, origin, direction = self._grid
        if tuple(labels.GetSize()) != tuple(size):
            raise AbdomenSegError(
                f"the result's size {labels.GetSize()} differs from the input's {size}", "report this as a bug"
            )
        # The CLI refuses to write off the input's grid (io.write_image reads the header back); hand back the
        # input's exact header values rather than their round-trip through text.
        labels.SetSpacing(spacing)
        labels.SetOrigin(origin)
        labels.SetDirection(direction)
        return labels

    @property
    def elapsed(self) -> float:
        return 0.0 if self._started is None else time.monotonic() - self._started

    # -- ending ---------------------------------------------------------------------------------
    def cancel(self, timeout: float = 1.0) -> None:
        """Stop the run and remove every file: terminate the process tree, wait up to `timeout` s, then kill.

        Returns once the process has exited and been reaped. A run that already has its outcome is only cleaned
        up (its result is discarded).
        """
        with self._lock:
            if self._started is not None and not self._outcome.is_set():
                self.cancelled = True
        self._end_process(timeout)
        self.cleanup()

    def _end_process(self, timeout):
        if self._worker is not None:
            # A worker's request cannot be interrupted half-way and leave the worker sound: end the worker (the
            # next run starts a fresh one). A finished request leaves the worker alone.
            if self._worker.serving(self) and not self._outcome.is_set():
                self._worker.stop(timeout, kill=True)
                self._exited.wait(5.0)
            return
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            self._signal_tree(process, kill=False)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_tree(process, kill=True)
                process.wait()
            if not _WINDOWS:  # whatever of its group is left (a launcher's child); only now, while its id is fresh
                self._signal_tree(process, kill=True)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5.0)

    @staticmethod
    def _signal_tree(process, kill):
        if _WINDOWS:
            # TerminateProcess alone would stop only PythonSlicer's launcher (SlicerMONAIAuto3DSeg process.py:106,
            # which kills the children with psutil): kill the whole tree. Windows has no gentler signal to wait on.
            try:
                import psutil
            except ImportError:
                subprocess.run(
                    ["taskkill", "/F", "/T", "/PID", str(process.pid)],
                    capture_output=True,
                    creationflags=subprocess.CREATE_NO_WINDOW,
                )
            else:
                try:
                    parent = psutil.Process(process.pid)
                    for child in parent.children(recursive=True):
                        child.kill()
                    parent.kill()
                except psutil.Error:
                    pass
            if process.poll() is None:
                process.kill()
            return
        try:
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup(self) -> None:
        """Remove the temp folder (input, output, log), ending the process first if it still runs or exits.
        Safe to call at any time and more than once; call it after every run, failed or not."""
        self._end_process(1.0)
        if self._process is not None and self._process.stdout is not None:
            try:
                self._process.stdout.close()
            except (OSError, ValueError):
                pass
        folder, self.temp_dir = self.temp_dir, None
        if folder is None:
            return
        for attempt in range(10):  # Windows can hold a just-killed process's files for a moment
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                return
            time.sleep(0.05 * (attempt + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def __del__(self):
        try:
            if self._process is not None and self._process.poll() is None or self.temp_dir is not None:
                self.cleanup()
        except Exception:
            pass
