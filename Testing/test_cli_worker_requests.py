"""The engine worker (worker.py) answers every request line it cannot serve with one {"error": "<problem>. <fix>"} line
and stays up for the next one; a bad request writes nothing anywhere. Real worker process throughout, one per module.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from AbdomenSegLib.io.phantom import make_phantom
from helpers import ROOT

ANSWER_TIMEOUT_S = 90


class Worker:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "AbdomenSegLib.worker", "--idle-exit", "300"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.ready = json.loads(self.process.stdout.readline())

    def send(self, raw: bytes) -> None:
        self.process.stdin.write(raw + b"\n")
        self.process.stdin.flush()

    def answer(self) -> dict:
        line = self.process.stdout.readline()
        assert line, f"the worker ended (exit {self.process.poll()})"
        return json.loads(line)

    def outcome(self) -> dict:
        while True:
            event = self.answer()
            if "done" in event or "error" in event:
                return event


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.process.kill()
    w.process.wait()


def _segment(tmp, *extra):
    return ["segment", str(tmp / "in.nrrd"), str(tmp / "out.nrrd"), "--progress-json", *extra]


# -- rows: (tmp_path) -> the raw request line; the expected words of the error -----------------------------------------
BAD_REQUESTS = [
    ("a_list", lambda tmp: b'["segment"]', "is a JSON list, not a JSON object"),
    ("null", lambda tmp: b"null", "is null, not a JSON object"),
    ("a_string", lambda tmp: b'"segment"', "is a JSON string, not a JSON object"),
    ("a_number", lambda tmp: b"42", "is a JSON number, not a JSON object"),
    ("no_argv", lambda tmp: b'{"log": "x.log"}', "has no argv"),
    ("argv_a_string", lambda tmp: json.dumps({"argv": "segment a b"}).encode(), "not a list of strings"),
    ("argv_numbers", lambda tmp: json.dumps({"argv": ["segment", 1, 2]}).encode(), "not a list of strings"),
    ("argv_not_segment", lambda tmp: json.dumps({"argv": ["models", "--progress-json"]}).encode(), "segment"),
    ("argv_help", lambda tmp: json.dumps({"argv": ["segment", "--help", "--progress-json"]}).encode(), "help"),
    ("invalid_json", lambda tmp: b'{"argv": ["segment", ', "is not valid JSON"),
    ("not_utf8", lambda tmp: b'{"argv": "\xff\xfe"}', "not a list of strings"),
    ("nested_deep", lambda tmp: b"[" * 100_000 + b"]" * 100_000, "levels deep"),
    (
        "log_in_missing_folder",
        lambda tmp: json.dumps({"argv": _segment(tmp), "log": str(tmp / "no" / "such" / "run.log")}).encode(),
        "in a folder that does not exist",
    ),
    (
        "log_is_a_folder",
        lambda tmp: json.dumps({"argv": _segment(tmp), "log": str(tmp)}).encode(),
        "is a folder",
    ),
    ("quit_not_true", lambda tmp: b'{"quit": "no"}', "has no argv"),
]


@pytest.mark.parametrize("make,message", [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS])
def test_a_bad_request_is_one_error_line_and_the_worker_stays_up(tmp_path, worker, make, message):
    before = sorted(tmp_path.rglob("*"))
    worker.send(make(tmp_path))
    answer = worker.answer()
    assert list(answer) == ["error"], answer
    assert message in answer["error"] and ". " in answer["error"], answer
    assert "\n" not in answer["error"]
    assert worker.process.poll() is None, "the worker died"
    assert sorted(tmp_path.rglob("*")) == before  # no log, no folder, no output, no lock


def test_after_the_bad_requests_a_valid_one_is_served_by_the_same_process(tmp_path, worker, tiny_package):
    phantom, _ = make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0))
    sitk.WriteImage(phantom, str(tmp_path / "in.nrrd"))
    for raw in (b"[]", b"null", b"{", b"7"):  # whatever came before, this worker answers
        worker.send(raw)
        assert "error" in worker.answer()
    pid = worker.ready["pid"]
    log = tmp_path / "run.log"
    worker.send(
        json.dumps(
            {"argv": _segment(tmp_path, "--model", str(tiny_package.path), "--device", "cpu"), "log": str(log)}
        ).encode()
    )
    outcome = worker.outcome()
    assert outcome.get("done") and outcome["exit"] in (0, 3), outcome
    assert (tmp_path / "out.nrrd").is_file() and "model tiny-test on cpu" in log.read_text()
    assert worker.process.poll() is None and worker.process.pid == pid
    # it wrote where it was told and nowhere else: no lock, no temporary file, nothing beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nrrd", "out.nrrd", "run.log"]


def test_a_request_with_a_nul_byte_in_a_path_is_refused(tmp_path, worker):
    worker.send(json.dumps({"argv": ["segment", "a\u0000b", "out.nrrd", "--progress-json"]}).encode())
    assert "not a list of strings" in worker.answer()["error"]
    worker.send(json.dumps({"argv": _segment(tmp_path), "log": str(tmp_path / "a\u0000.log")}).encode())
    assert "not a file path" in worker.answer()["error"]
    assert worker.process.poll() is None and not list(Path(tmp_path).iterdir())
