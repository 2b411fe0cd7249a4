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

A request line the worker cannot serve (not JSON, too large or too deep, not an object, no argv, an argv that is not
a list of strings or not such a segment command, a log path in a missing folder or that is a folder) is answered with
one {"error": "<problem>. <fix>"} line (parse_request) and the worker reads the next one.

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


MAX_REQUEST_BYTES = 1024 * 1024  # a request is a command line and a log path
_REQUEST_FIX = (
    'send one JSON object a line: {"argv": ["segment", IN, OUT, "--progress-json", ...], "log": LOG_PATH} '
    'or {"quit": true}'
)


def parse_request(line: str) -> dict:
    """The one gate every request line passes: a JSON object that is {"quit": true}, or a `segment ... --progress-json`
    command line (a list of strings) with an optional log file in a folder that exists. Anything else raises
    AbdomenSegError, which the loop answers with one {"error"} line before it reads the next request. The request can
    write only where it names: its log file (appended to, never a folder created for it) and what `segment` writes
    for the output it names."""
    from AbdomenSegLib.core.errors import AbdomenSegError
    from AbdomenSegLib.core.untrusted import loads_json, printable

    request = loads_json(line, "the request", _REQUEST_FIX, max_bytes=MAX_REQUEST_BYTES)
    if not isinstance(request, dict):
        kind = {list: "a JSON list", str: "a JSON string", bool: "a JSON boolean"}.get(type(request), "a JSON number")
        kind = "null" if request is None else kind
        raise AbdomenSegError(f"the request is {kind}, not a JSON object", _REQUEST_FIX)
    if request.get("quit") is True:
        return request
    argv = request.get("argv")
    if argv is None:
        raise AbdomenSegError("the request has no argv", _REQUEST_FIX)
    if not (isinstance(argv, list) and all(isinstance(a, str) and "\0" not in a for a in argv)):
        raise AbdomenSegError("the request's argv is not a list of strings", _REQUEST_FIX)
    if not (argv and argv[0] == "segment" and "--progress-json" in argv):
        raise AbdomenSegError(
            "the request's argv is not a `segment ... --progress-json` command", "the worker runs only those"
        )
    if {"-h", "--help", "--version"} & set(argv):  # argparse would print text into the JSON lines of stdout
        raise AbdomenSegError("the request's argv asks for help or the version", "run `abdomenseg segment --help`")
    log = request.get("log")
    if log is not None:
        if not isinstance(log, str) or not log or "\0" in log:
            raise AbdomenSegError("the request's log is not a file path", "give the log file's path as a string")
        path = os.path.abspath(log)
        shown = printable(log)
        if not os.path.isdir(os.path.dirname(path)):
            raise AbdomenSegError(
                f"the request's log '{shown}' is in a folder that does not exist",
                "give a log path in an existing folder",
            )
        if os.path.isdir(path):
            raise AbdomenSegError(f"the request's log '{shown}' is a folder", "give the path of a log file")
        if os.path.lexists(path) and not (os.path.isfile(path) and not os.path.islink(path)):
            raise AbdomenSegError(
                f"the request's log '{shown}' is not a regular file", "give the path of a new or plain log file"
            )
    return request


def _serve_one(request: dict) -> None:
    from AbdomenSegLib import cli

    argv = request["argv"]
    log_path = request.get("log")
    with contextlib.ExitStack() as stack:
        if log_path:
            try:
                log = stack.enter_context(open(log_path, "a", encoding="utf-8", errors="replace"))
            except OSError as exc:
                _emit(
                    error=f"the request's log cannot be opened ({exc.strerror or exc}). Give a log file you can write"
                )
                return
            stack.enter_context(contextlib.redirect_stderr(log))
        try:
            code = cli.main(list(argv))  # prints its own outcome line for every error it knows
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
    from AbdomenSegLib.core.errors import AbdomenSegError
    from AbdomenSegLib.inference import segmenter as inference  # noqa: F401

    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 must not end the reader thread
        sys.stdin.reconfigure(errors="replace")
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
            request = parse_request(line)
        except Exception as exc:  # noqa: BLE001 - AbdomenSegError, or anything else: answer and stay up
            _emit(
                error=str(exc) if isinstance(exc, AbdomenSegError) else f"the request failed ({exc!r}). {_REQUEST_FIX}"
            )
            continue
        if request.get("quit") is True:
            return 0
        _serve_one(request)
        _give_memory_back()


if __name__ == "__main__":
    sys.exit(main())
