"""A long-lived engine process for the Slicer panel: the second Segment skips start-up and model loading.

A fresh `python -m AbdomenSegLib segment ...` spends ~1.5 s importing torch and the engine and loading the
network before it reads a voxel; in a Slicer session where a user segments one scan after another that is
paid again on every click. This process pays it once and then serves requests, one at a time:

    python -m AbdomenSegLib.worker [--idle-exit SECONDS]

stdin, one JSON object per line (from background.EngineWorker):
    {"argv": ["segment", IN, OUT, "--progress-json", ...], "log": LOG_PATH}   run one CLI command in-process
    {"quit": true}                                                           exit
stdout: {"ready": true, "pid": N} once the engine is imported, then for each request exactly the lines that
`segment --progress-json` prints (cli._JsonLines), ending with its outcome line ({"done": ...} or {"error": ...}).
The request's stderr (log, progress bar, warnings) goes to its LOG_PATH, so each run's log stays its own.

It exits when stdin closes (the parent, Slicer, went away: no orphan keeps the model in memory), on "quit", and
after --idle-exit seconds without a request (default 15 min) so that an idle session gives its memory back.
Requests run in this process's main thread; a cancel is a kill of this process by the parent (background.py):
nothing half-done can leak into the next request, which then starts a fresh worker.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import queue
import sys
import threading
import traceback

DEFAULT_IDLE_EXIT_S = 900.0


def _emit(**fields) -> None:
    print(json.dumps(fields), file=sys.stdout, flush=True)


def _give_memory_back() -> None:
    """After a request: free the large arrays now and return freed heap pages to the system (glibc keeps them
    otherwise, and an idle worker would look like it holds a whole volume's worth of memory)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _lines(stream, out: queue.Queue) -> None:
    """Reader thread: stdin lines into a queue (a timed get is portable; select() on pipes is not, on Windows)."""
    for line in stream:
        out.put(line)
    out.put(None)  # EOF: the parent closed our stdin or died


def _serve_one(request: dict) -> None:
    from AbdomenSegLib import cli

    argv = request.get("argv")
    if not (isinstance(argv, list) and argv and argv[0] == "segment" and "--progress-json" in argv):
        _emit(error=f"the worker was sent an unknown request {request!r}. Report this as a bug")
        return
    log_path = request.get("log")
    with contextlib.ExitStack() as stack:
        if log_path:
            log = stack.enter_context(open(log_path, "a", encoding="utf-8", errors="replace"))
            stack.enter_context(contextlib.redirect_stderr(log))
        try:
            code = cli.main([str(a) for a in argv])  # prints its own outcome line for every error it knows
            if code == 130:  # cli.main prints no outcome line for a cancel (none can reach it here, but be sure)
                _emit(error="segmentation cancelled")
        except BaseException as exc:  # noqa: BLE001 - the worker must answer and stay up for the next request
            traceback.print_exc()
            # cli.main emitted the {"error"} line already for anything but a SystemExit from argparse.
            if isinstance(exc, SystemExit):
                _emit(error=f"the worker could not parse the request ({exc}). Report this as a bug")
            if isinstance(exc, KeyboardInterrupt):
                raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m AbdomenSegLib.worker", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=DEFAULT_IDLE_EXIT_S,
        help="exit after this many seconds without a request (default %(default)g)",
    )
    args = parser.parse_args(argv)

    # Import what every request needs now, while the user has not clicked yet (or before the first request's
    # bytes are read): torch and the inference engine.
    from AbdomenSegLib.inference import segmenter as inference  # noqa: F401

    requests: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(sys.stdin, requests), name="stdin reader", daemon=True).start()
    _emit(ready=True, pid=os.getpid())
    while True:
        try:
            line = requests.get(timeout=args.idle_exit)
        except queue.Empty:
            return 0  # idle: give the memory back; the parent starts a new worker for the next request
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
        except ValueError:
            _emit(error=f"the worker was sent a line that is not JSON ({line[:80]!r}). Report this as a bug")
            continue
        if request.get("quit"):
            return 0
        _serve_one(request)
        _give_memory_back()


if __name__ == "__main__":
    sys.exit(main())
