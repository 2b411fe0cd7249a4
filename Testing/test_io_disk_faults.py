"""A full disk, a used-up quota or a read-only folder at every write of a run: `error: no space left on device while
writing <what> (<path>) ...` (or `cannot write in ...`) with exit 2, and nothing half-written: no `.part-*` temporary
file, no lock, no cut final file.

The full disk is simulated in-process at the lowest write points (`os.write`, the file objects `open` returns, and
`SimpleITK.WriteImage`, which on a real full disk fills the free space, says nothing for NIfTI and raises for NRRD:
measured on a 256 KiB tmpfs with SimpleITK 2.5.7). From the first write to a file that a stage's `trigger` picks,
every later write under the output folder fails with ENOSPC, as it does on a real disk. Where this process may make
mount namespaces (`unshare -rm`), a real tiny tmpfs and a real read-only mount are tested too.
"""

import builtins
import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.io.files import probe_writable
from AbdomenSegLib.io.images import read_image
from AbdomenSegLib.io.phantom import make_phantom
from helpers import ROOT

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds a descriptor's file in /proc")


def _fd_path(fd: int) -> Path:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return Path("/")


class FullDisk:
    """The disk under `root` fills up at the first write to a file `trigger(path)` picks; from then on every write
    there fails with `code` (ENOSPC or EDQUOT), whichever layer writes."""

    def __init__(self, monkeypatch, root: Path, trigger, code=errno.ENOSPC):
        self.root, self.trigger, self.code, self.full = root.resolve(), trigger, code, False
        real_write, real_open, real_write_image = os.write, builtins.open, sitk.WriteImage

        def os_write(fd, data):
            if self._fails(_fd_path(fd)):
                self._raise()
            return real_write(fd, data)

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+"):
                return _FailingFile(handle, self, Path(file))
            return handle

        def write_image(image, filename, *args, **kwargs):
            path = Path(str(filename))
            if not self._fails(path):
                return real_write_image(image, filename, *args, **kwargs)
            real_write_image(image, filename, *args, **kwargs)  # then cut to what a full disk let through
            with real_open(path, "r+b") as handle:
                handle.truncate(min(4096, path.stat().st_size // 2))
            if not path.name.lower().endswith((".nii", ".nii.gz")):  # ITK's NRRD and MetaImage writers raise
                raise RuntimeError(f"Exception thrown in SimpleITK ImageFileWriter_Execute: {os.strerror(self.code)}")
            return None  # ITK's NIfTI writer says nothing

        monkeypatch.setattr(os, "write", os_write)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(sitk, "WriteImage", write_image)

    def _fails(self, path: Path) -> bool:
        try:
            inside = path.resolve().is_relative_to(self.root)
        except OSError:
            inside = False
        if inside and not self.full and self.trigger(path):
            self.full = True
        return inside and self.full

    def _raise(self):
        raise OSError(self.code, os.strerror(self.code))


class _FailingFile:
    """A file object whose writes fail once the disk is full."""

    def __init__(self, handle, disk: FullDisk, path: Path):
        self._handle, self._disk, self._path = handle, disk, path

    def write(self, data):
        if self._disk._fails(self._path):
            self._disk._raise()
        return self._handle.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __iter__(self):
        return iter(self._handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()
        return False


def _whole(path: Path) -> None:
    """Every final file in `path` reads completely (label maps pass the integrity check)."""
    for file in path.rglob("*"):
        if not file.is_file():
            continue
        name = file.name.lower()
        if name.endswith((".nii.gz", ".nii", ".nrrd")):
            read_image(file)
        elif name.endswith(".json"):
            json.loads(file.read_text(encoding="utf-8"))
        elif name.endswith(".csv"):
            with open(file, newline="", encoding="utf-8") as handle:
                assert list(csv.reader(handle)), file
        elif name.endswith(".png"):
            from PIL import Image

            with Image.open(file) as picture:
                picture.load()
        elif name.endswith(".html"):
            assert file.read_text(encoding="utf-8").rstrip().endswith("</html>"), file


def _nothing_half_written(out: Path) -> None:
    assert not list(out.rglob(".part-*")), list(out.rglob(".part-*"))
    assert not list(out.rglob("*.lock")), list(out.rglob("*.lock"))
    _whole(out)


def _phantom_ct(folder: Path, name="ct.nii.gz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    sitk.WriteImage(ct, str(folder / name))
    return folder / name


def _partial(suffix):
    return lambda p: p.name.startswith(".part-") and p.name.endswith(suffix)


# (stage, trigger, what the message names, the final file that must not exist)
SINGLE_STAGES = [
    ("lock", lambda p: p.name.endswith(".lock"), "the lock file", "labels.nii.gz"),
    ("label map", _partial(".nii.gz"), "the label map", "labels.nii.gz"),
    ("label map nrrd", _partial(".nrrd"), "the label map", "labels.nrrd"),
    ("report", _partial(".json"), "the report", "qc.json"),
    ("picture", _partial(".png"), "the picture", "qc.png"),
]


@pytest.mark.parametrize("stage,trigger,what,absent", SINGLE_STAGES, ids=[s[0] for s in SINGLE_STAGES])
def test_full_disk_at_each_write_of_one_case(tmp_path, tiny_package, monkeypatch, capsys, stage, trigger, what, absent):
    src = _phantom_ct(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    output = out / ("labels.nrrd" if stage.endswith("nrrd") else "labels.nii.gz")
    argv = ["segment", str(src), str(output), "--model", str(tiny_package.path)]
    argv += ["--qc", str(out / "qc.json"), "--qc-png", str(out / "qc.png")]
    disk = FullDisk(monkeypatch, out, trigger)
    code = main(argv)
    monkeypatch.undo()  # the checks below write nothing, but read with the real functions
    err = capsys.readouterr().err.strip().splitlines()
    assert disk.full, f"the {stage} was never written"
    assert code == 2, err
    assert err[-1].startswith(f"error: no space left on device while writing {what} ("), err[-1]
    assert "free space there or choose another output folder" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (out / absent).exists()
    _nothing_half_written(out)


FOLDER_STAGES = [
    ("lock", lambda p: p.name.endswith(".lock"), "the lock file", "ct.nii.gz"),
    ("label map", _partial(".nii.gz"), "the label map", "ct.nii.gz"),
    ("report", _partial(".json"), "the report", "qc/ct.json"),
    ("picture", _partial(".png"), "the picture", "qc/ct.png"),
    ("manifest", lambda p: _partial(".csv")(p) and p.parent.name == "out", "the manifest", "manifest.csv"),
    ("qc table", lambda p: _partial(".csv")(p) and p.parent.name == "qc", "the result check's table", "qc/qc.csv"),
    ("index", _partial(".html"), "the picture index", "qc/index.html"),
]


@pytest.mark.parametrize("stage,trigger,what,absent", FOLDER_STAGES, ids=[s[0] for s in FOLDER_STAGES])
def test_full_disk_at_each_write_of_a_folder_run(
    tmp_path, tiny_package, monkeypatch, capsys, stage, trigger, what, absent
):
    cases = tmp_path / "cases"
    _phantom_ct(cases)
    out = tmp_path / "out"
    disk = FullDisk(monkeypatch, tmp_path, lambda p: "out" in p.parts and trigger(p))
    code = main(["segment", str(cases), str(out), "--model", str(tiny_package.path)])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert disk.full, f"the {stage} was never written"
    assert code == 2, err
    assert err[-1].startswith("error: no space left on device while writing "), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert f"error: no space left on device while writing {what} (" in "\n".join(err)
    assert not (out / absent).exists()
    _nothing_half_written(out)


def test_a_folder_run_stops_at_the_first_full_disk(tmp_path, tiny_package, monkeypatch, capsys):
    """Every later case would fail the same way, after its inference: the run stops at the first."""
    cases = tmp_path / "cases"
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        _phantom_ct(cases, name)
    out = tmp_path / "out"
    FullDisk(monkeypatch, tmp_path, lambda p: "out" in p.parts and _partial(".nii.gz")(p))
    code = main(["segment", str(cases), str(out), "--model", str(tiny_package.path)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2
    assert "[2/3]" not in err and "[3/3]" not in err, err
    _nothing_half_written(out)


def test_a_used_up_quota_is_named(tmp_path, tiny_package, monkeypatch, capsys):
    src = _phantom_ct(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    FullDisk(monkeypatch, out, _partial(".nii.gz"), code=errno.EDQUOT)
    assert main(["segment", str(src), str(out / "labels.nii.gz"), "--model", str(tiny_package.path)]) == 2
    monkeypatch.undo()
    assert "error: disk quota exceeded while writing the label map (" in capsys.readouterr().err
    _nothing_half_written(out)


def test_a_full_disk_is_refused_before_any_work(tmp_path, tiny_package, monkeypatch, capsys):
    """Full from the start: the writability probe (a page written into the output folder) refuses the run before the
    model is loaded."""
    import AbdomenSegLib.models.choice as choice

    cases = tmp_path / "cases"
    _phantom_ct(cases)
    out = tmp_path / "out"
    out.mkdir()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was resolved on a full disk")

    monkeypatch.setattr(choice, "resolve", no_model)
    FullDisk(monkeypatch, out, lambda p: True)
    code = main(["segment", str(cases), str(out), "--model", str(tiny_package.path)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2
    assert "error: no space left on device while writing a test file into the output folder" in err
    assert list(out.iterdir()) == []


def test_phantom_on_a_full_disk(tmp_path, monkeypatch, capsys):
    FullDisk(monkeypatch, tmp_path, _partial(".nii.gz"))
    assert main(["phantom", str(tmp_path / "ct.nii.gz")]) == 2
    monkeypatch.undo()
    assert "no space left on device while writing the image (" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unguarded_write_on_a_full_disk_is_one_error_line(monkeypatch, capsys):
    """A write outside io/files.py (a download, a training checkpoint) that runs out of space: still one line."""
    import AbdomenSegLib.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/runs/model.pt")

    monkeypatch.setattr(cli, "_train", full)
    assert main(["train", "config.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: no space left on device while writing the output ('/data/runs/model.pt'); nothing was left "
        "half-written. free space there or choose another output folder, then run again"
    ]


def test_a_write_that_fails_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """The space is probed by writing after a failed write: an ITK failure on a disk with room is named as such."""
    from AbdomenSegLib.core.errors import AbdomenSegError, DiskFull
    from AbdomenSegLib.io.images import write_image

    def broken(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"")
        raise RuntimeError("ITK ERROR: some other failure")

    monkeypatch.setattr(sitk, "WriteImage", broken)
    with pytest.raises(AbdomenSegError, match="could not be written completely") as caught:
        write_image(make_phantom(size=(16, 16, 8))[0], tmp_path / "ct.nrrd")
    assert not isinstance(caught.value, DiskFull)
    assert list(tmp_path.iterdir()) == []


# -- read-only folders: probed by writing ---------------------------------------------------------------
def test_probe_writable_refuses_a_folder_it_cannot_write(tmp_path, monkeypatch):
    """mkdir of an existing folder succeeds on a read-only file system: the probe writes."""
    from AbdomenSegLib.core.errors import AbdomenSegError

    real_mkstemp = __import__("tempfile").mkstemp

    def read_only(*args, **kwargs):
        if Path(kwargs.get("dir", "")).resolve() == tmp_path.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(AbdomenSegError, match="cannot write in the output folder .* \\(Read-only file system\\)"):
        probe_writable(tmp_path / "not" / "made" / "yet")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder; see the mount-namespace test")
def test_read_only_output_folder_of_a_folder_run_by_permissions(tmp_path, tiny_package, capsys):
    cases = tmp_path / "cases"
    _phantom_ct(cases)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        start = time.perf_counter()
        assert main(["segment", str(cases), str(out), "--model", str(tiny_package.path)]) == 2
        assert "cannot write in the output folder" in capsys.readouterr().err
        assert time.perf_counter() - start < 10
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def _in_mount_namespace(script: str, timeout=240) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a new user and mount namespace, where this user may mount: a tmpfs or a read-only bind
    exists for that shell only. Skips where unprivileged namespaces are not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here ({probe.stderr.decode(errors='replace').strip()})")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=timeout
    )


def _cli(*args) -> str:
    return " ".join([sys.executable, "-m", "AbdomenSegLib", *[f"'{a}'" for a in args]])


def test_read_only_output_folder_of_a_folder_run_is_refused_before_any_work(tmp_path, tiny_package):
    """A real read-only mount (a bind mount remounted ro, in a mount namespace): root cannot write there either. The
    folder run was refused only at each case's lock, after the model had loaded."""
    cases = tmp_path / "cases"
    _phantom_ct(cases)
    out = tmp_path / "out"
    out.mkdir()
    run = _in_mount_namespace(
        f"mount --bind '{out}' '{out}' && mount -o remount,bind,ro '{out}' && "
        f"{_cli('segment', cases, out, '--model', tiny_package.path)}; echo exit=$?; "
        f"{_cli('segment', cases / 'ct.nii.gz', out / 'one.nii.gz', '--model', tiny_package.path)}; echo exit=$?; "
        f"{_cli('segment', cases, tmp_path / 'elsewhere', '--qc', out / 'qc', '--model', tiny_package.path)}; "
        "echo exit=$?"
    )
    assert run.stdout.splitlines() == ["exit=2"] * 3, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and all("(Read-only file system)" in e for e in errors), run.stderr
    assert errors[0].startswith("error: cannot write in the output folder") and "result check's folder" in errors[2]
    assert "model " not in run.stderr  # no model was loaded
    assert list(out.iterdir()) == []


def test_real_full_tmpfs(tmp_path, tiny_package):
    """A real 64 KiB tmpfs: room for the probe and the lock, not for the label map. ITK's NIfTI writer fills the free
    space and reports success; the written file is checked complete, the space probed, and the run fails with the
    disk named; nothing is left there. A tmpfs filled to the last page refuses the run before any work."""
    src = _phantom_ct(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    run = _in_mount_namespace(
        f"mount -t tmpfs -o size=64k tmpfs '{out}' && "
        f"{_cli('segment', src, out / 'labels.nii', '--model', tiny_package.path)}; echo exit=$?; ls -A '{out}'; "
        f"dd if=/dev/zero of='{out}/filler' bs=4k count=100 2>/dev/null; "
        f"{_cli('segment', src, out / 'labels.nii', '--model', tiny_package.path)}; echo exit=$?; ls -A '{out}'"
    )
    assert run.stdout.splitlines() == ["exit=2", "exit=2", "filler"], run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: no space left on device while writing the label map ("), run.stderr
    assert errors[1].startswith("error: no space left on device while writing a test file into the output folder")
    assert "Traceback" not in run.stderr


def test_written_outputs_pass_their_own_check(tmp_path):
    """The completeness check that now runs on every output before it takes its name accepts ITK's own files."""
    from AbdomenSegLib.io.images import write_image, write_labels

    ct, labels = make_phantom(size=(32, 28, 12))
    for name in ("ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha"):
        write_image(ct, tmp_path / name)
        assert np.array_equal(sitk.GetArrayViewFromImage(read_image(tmp_path / name)), sitk.GetArrayViewFromImage(ct))
    write_labels(labels, tmp_path / "labels.seg.nrrd")
    assert read_image(tmp_path / "labels.seg.nrrd").GetSize() == labels.GetSize()


def test_full_disk_at_the_metrics_csv_of_evaluate(tmp_path, monkeypatch, capsys):
    _, labels = make_phantom(size=(32, 28, 12))
    sitk.WriteImage(labels, str(tmp_path / "pred.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "ref.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    FullDisk(monkeypatch, out, _partial(".csv"))
    argv = ["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "--csv", str(out / "m.csv")]
    assert main(argv) == 2
    monkeypatch.undo()
    assert "error: no space left on device while writing the table (" in capsys.readouterr().err
    assert list(out.iterdir()) == []
