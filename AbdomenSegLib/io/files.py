"""Outputs that are whole or absent: atomic writes, per-output locks, and the sweeping of abandoned temporary files.

Every file the engine writes goes through `atomic_output` (temp file + rename), so an interrupted run never leaves a
half-written file that a later `--overwrite`-less run would skip; `claim_output` holds an output for one process.
A full disk or used-up quota (ENOSPC, EDQUOT) while writing is `DiskFull`, naming what was being written, with the
temporary file removed; folders are probed by writing into them before any work, not by creating them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from AbdomenSegLib.core.errors import AbdomenSegError, DiskFull
from AbdomenSegLib.core.untrusted import printable

# The umask can only be read by setting it; do that once at import, not during writes that may run on a
# worker thread (Slicer) while other threads create files.
_UMASK = os.umask(0)
os.umask(_UMASK)

# Temporary files carry this host and process so that a later run can tell an abandoned one (writer
# killed with -9, power cut) from one being written right now, and remove only the former.
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
PARTIAL_PREFIX = ".part-"
_ABANDONED_AFTER_S = 24 * 3600  # any host: nothing takes a day to write


def _partial_prefix() -> str:
    return f"{PARTIAL_PREFIX}{_HOST_TAG}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap check: rely on age alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_gone(host_tag: str, pid: int) -> bool:
    return host_tag == _HOST_TAG and pid != os.getpid() and not _pid_alive(pid)


def sweep_partials(folder) -> list:
    """Remove temporary files in `folder` left by writers that no longer run; returns what was removed."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.glob(PARTIAL_PREFIX + "*"):
        parts = path.name[len(PARTIAL_PREFIX) :].split("-")
        try:
            gone = len(parts) >= 3 and _owner_gone(parts[0], int(parts[1]))
            if gone or time.time() - path.stat().st_mtime > _ABANDONED_AFTER_S:
                path.unlink()
                removed.append(path)
        except (ValueError, OSError):
            continue
    return removed


# -- full disks and writability ---------------------------------------------------------------------
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_PROBE_BYTES = 4096  # one page: a folder that cannot take it cannot take any output
_SPACE_PROBE_BYTES = 1 << 20  # after a failed write: room for this much means the failure was not a full disk
_WHAT = {  # what a full disk stopped, told by the file's name or suffix
    "manifest.csv": "the manifest",
    "qc.csv": "the result check's table",
    "index.html": "the picture index",
    ".png": "the picture",
    ".json": "the report",
    ".csv": "the table",
    ".html": "the index page",
    ".md": "the report",
    ".dcm": "the DICOM SEG",
    ".lock": "the lock file",
}


def no_space_error(what: str, path: object, exc: OSError) -> DiskFull:
    """The error a full disk (ENOSPC) or used-up quota (EDQUOT) while writing `what` at `path` becomes."""
    cause = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
    return DiskFull(
        f"{cause} while writing {what} ('{printable(str(path))}'); nothing was left half-written",
        "free space there or choose another output folder, then run again",
    )


def _write_probe(folder: Path, size: int, sync: bool) -> None:
    """Write `size` bytes into a new temporary file in `folder`, then remove it; raises the OSError of a failure."""
    fd, probe = tempfile.mkstemp(prefix=_partial_prefix(), suffix=".probe", dir=folder)
    try:
        block = bytes(min(size, 1 << 16))
        written = 0
        while written < size:
            written += os.write(fd, block[: size - written])
        if sync:  # network file systems report a full disk at the flush only
            os.fsync(fd)
    finally:
        try:
            os.close(fd)  # (where a network file system reports the full disk)
        finally:
            os.unlink(probe)


def space_left_error(folder) -> OSError | None:
    """After a write failed in `folder`: the ENOSPC/EDQUOT error that writing 1 MiB there raises now, else None."""
    try:
        _write_probe(Path(folder), _SPACE_PROBE_BYTES, sync=True)
    except OSError as exc:
        return exc if exc.errno in NO_SPACE else None
    return None


def probe_writable(folder, what: str = "the output folder") -> None:
    """Refuse, before any work, a folder no file can be written into: read-only mounts, missing permission, a full
    disk. Tested by writing a page into a temporary file (creating the folder proves nothing: mkdir of an existing
    folder succeeds on a read-only file system). A folder not yet made is judged by the nearest one that exists,
    where it will be made."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    if existing is None:
        return
    try:
        _write_probe(existing, _PROBE_BYTES, sync=False)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space_error(f"a test file into {what}", existing, exc) from None
        raise AbdomenSegError(
            f"cannot write in {what} '{printable(str(existing))}' ({exc.strerror})",
            "choose a folder you can write to",
        ) from None


def check_not_symlink(path) -> None:
    """An output name that is a symbolic link is refused before any work: writing it would either go through the link
    to a file the user did not name, or (the link dangling) fail at the end as "another process wrote it"."""
    path = Path(path)
    if not path.is_symlink():
        return
    target = os.readlink(path)
    dangling = "" if path.exists() else ", which does not exist"
    raise AbdomenSegError(
        f"output '{printable(str(path))}' is a symbolic link to '{printable(target)}'{dangling}",
        "to write there, give that path as the output; otherwise remove the link or choose another name",
    )


# The longest file name (in bytes) of ext4, XFS, btrfs, APFS and NTFS (255 UTF-16 units there).
NAME_MAX_BYTES = 255


def check_name_length(path) -> None:
    """An output whose name the file system cannot hold is refused before any work (it was an OSError at the end)."""
    name = Path(path).name
    size = len(os.fsencode(name))
    if size > NAME_MAX_BYTES:
        raise AbdomenSegError(
            f"output name '{printable(name[:40])}...' is {size} bytes long, more than the {NAME_MAX_BYTES} a file "
            "name can have",
            "choose a shorter output name",
        )


def lock_path(path) -> Path:
    """The lock file that claims `path`: `.<name>.lock` beside it, or, for a name too long to carry the prefix and
    suffix, `.<start of the name>-<hash>.lock` (the hash of the whole name keeps two long names apart)."""
    path = Path(path)
    lock = f".{path.name}.lock"
    if len(os.fsencode(lock)) <= NAME_MAX_BYTES:
        return path.parent / lock
    digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]
    start = os.fsencode(path.name)[:100].decode("utf-8", "ignore")
    return path.parent / f".{start}-{digest}.lock"


def prepare_folder(path, what: str) -> Path:
    """A folder the run will write into (the result check's qc/): refused before any work when a file is in its
    place."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AbdomenSegError(
            f"{what} '{printable(str(path))}' is a file, not a folder",
            "move that file away, or name another folder",
        )
    probe_writable(path, what)
    return path


def prepare_output(path, *, overwrite: bool) -> Path:
    """Check, before any work, that `path` can be written: a name the file system can hold, no file in the way of
    its folders, a folder we may write in, and (without `overwrite`) no existing file of that name."""
    path = Path(path)
    check_name_length(path)
    check_not_symlink(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AbdomenSegError(
                    f"cannot write '{path}': '{parent}' is a file, not a folder",
                    "choose an output path inside a folder",
                )
            break
    if path.is_dir():
        raise AbdomenSegError(f"output '{path}' is a folder", "give an output file name such as organs.nii.gz")
    if path.exists() and not overwrite:
        raise AbdomenSegError(f"output '{path}' exists", "pass --overwrite to replace it, or choose another name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AbdomenSegError(
            f"cannot create the output folder '{path.parent}' ({exc.strerror})",
            "choose an output folder you can write to",
        ) from None
    probe_writable(path.parent)
    return path


@contextlib.contextmanager
def claim_output(path, *, overwrite: bool = False):
    """Hold `path` for this process while it is computed: a lock file beside it, created atomically
    (O_EXCL), so that a second run aimed at the same output refuses at once instead of both writing it.
    Creating the lock also proves, before any work, that the folder is writable."""
    path = prepare_output(path, overwrite=overwrite)
    lock = lock_path(path)
    try:
        claimed = try_lock(lock)
    except OSError as exc:  # a full disk is DiskFull already (try_lock)
        raise AbdomenSegError(
            f"cannot write in the output folder '{path.parent}' ({exc.strerror})",
            "choose an output folder you can write to",
        ) from None
    if not claimed:
        owner = _lock_owner(lock)
        raise OutputClaimed(
            f"output '{path}' is being written by another AbdomenSeg run ({owner})",
            f"wait for it to finish or choose another output name; if no such run exists, delete '{lock}'",
            owner=owner,
        )
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


class OutputClaimed(AbdomenSegError):
    """The output is held by another live run (its lock): a folder run leaves that case to it."""

    def __init__(self, problem: str, fix: str = "", owner: str = ""):
        super().__init__(problem, fix)
        self.owner = owner  # "process <pid> on <host>"


def _lock_owner(lock: Path) -> str:
    try:
        tag, pid, host = lock.read_text(encoding="utf-8").split()[:3]
        return f"process {pid} on {host}"
    except (OSError, ValueError):
        return "owner unknown"


def _remove_stale_lock(lock: Path) -> bool:
    try:
        tag, pid = lock.read_text(encoding="utf-8").split()[:2]
        stale = _owner_gone(tag, int(pid)) or time.time() - lock.stat().st_mtime > _ABANDONED_AFTER_S
    except (OSError, ValueError):
        return False
    if stale:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
    return stale


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], suffix: str = "", *, overwrite: bool = True, what: str = ""
) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it becomes `path` in one step, else it is removed.

    With `overwrite=False` the last step is a hard link, which fails if `path` appeared meanwhile, so an
    existing file is never replaced unasked, even by a race. mkstemp creates files readable by their owner
    only; outputs get the permissions any new file would (0666 minus the umask) so colleagues sharing a
    results folder can read them. A full disk while writing (ENOSPC, EDQUOT, from any writer in the block)
    becomes `DiskFull` naming `what` (by default told by the suffix: "the picture", "the table", ...).
    """
    path = Path(path)
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(), suffix=suffix, dir=path.parent)
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space_error(
                what or _WHAT.get(path.name) or _WHAT.get((suffix or path.suffix).lower(), "the file"), path, exc
            ) from None
        raise
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def _publish_new(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise AbdomenSegError(
            f"output '{path}' appeared while this run was working (another process wrote it)",
            "pass --overwrite to replace it, or choose another name",
        ) from None
    except OSError:  # file systems without hard links (FAT, some network shares)
        if path.exists():
            raise AbdomenSegError(
                f"output '{path}' appeared while this run was working",
                "pass --overwrite to replace it, or choose another name",
            ) from None
        os.replace(tmp, path)


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """A JSON file (cards, catalogs) written whole or not at all."""
    with atomic_output(path, ".json") as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def try_lock(lock: Path, note: str = "", what: str = "the lock file") -> bool:
    """Create `lock` (O_EXCL) naming this host and process (and `note`); False while another live process holds it.
    A lock left by a dead process of this host is removed and taken. The caller removes it when done. A full disk
    raises DiskFull naming `what`; other OSErrors (a read-only folder) are the caller's to word."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _remove_stale_lock(lock):
                return False
            continue
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise no_space_error(what, lock, exc) from None
            raise
        try:
            os.write(fd, f"{_HOST_TAG} {os.getpid()} {socket.gethostname()} {note}".rstrip().encode() + b"\n")
        except BaseException as exc:  # a full disk, a signal: no empty lock left that nobody could tell as stale
            with contextlib.suppress(OSError):
                lock.unlink()
            if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                raise no_space_error(what, lock, exc) from None
            raise
        finally:
            os.close(fd)
        return True
    return False


def lock_holder(lock: Path) -> tuple:
    """(live, "process <pid> on <host>", note) of an existing lock; a lock of a dead process of this host is removed
    (live False). One that cannot be read yet (its writer between create and write) counts as live."""
    if _remove_stale_lock(lock):
        return False, _lock_owner(lock), ""
    try:
        note = " ".join(lock.read_text(encoding="utf-8").split()[3:])
    except OSError:
        return False, "", ""  # gone meanwhile
    return True, _lock_owner(lock), note
