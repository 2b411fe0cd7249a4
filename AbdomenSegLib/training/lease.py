"""What a GPU lease needs on both sides of it: the travel size, the compact training cache, the weights that
come back in parts, and the run's size in steps (bench/gpu_lease.py drives them).

A lease sends the checkout (tracked files present, untracked files git does not ignore, and the ignored paths
named in `carry`), at most 64 MiB; at most 8 files of 16 MiB come back. So the data travel as one compact cache
(the trainer's own uint8 arrays, LZMA-compressed: about 47 MiB for the 24 BTCV cases against 61 MiB as the
trainer's npz), the shipped weights stay behind, and weights come back as float32 in sha256-checked parts.
Nothing here imports SimpleITK: the device machine does not have it.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import subprocess
from pathlib import Path

import numpy as np

from AbdomenSegLib.core.errors import AbdomenSegError

MIB = 2**20
TRAVEL_LIMIT = 64 * MIB
PART_LIMIT = 16 * MIB  # one file that comes back from $OUT
LEASE_DIR = ".lease"  # the carried folder, ignored through .git/info/exclude


def atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


def atomic_json(path: Path, value) -> None:
    atomic_bytes(path, (json.dumps(value, indent=1) + "\n").encode())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


# -- what travels -------------------------------------------------------------------------------------------------
def _git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _files(repo: Path, *args) -> list:
    return [name for name in _git(repo, "ls-files", "-z", *args).split("\0") if name]


def _size(path: Path) -> int:
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def travel_size(repo, carry=()) -> dict:
    """Bytes that a device call sends from `repo`: tracked files present in the checkout, untracked files git does
    not ignore, and the `carry` paths (relative to the repo)."""
    repo = Path(repo)
    tracked = sum(_size(repo / name) for name in _files(repo))
    untracked = sum(_size(repo / name) for name in _files(repo, "--others", "--exclude-standard"))
    carried = {c: _size(repo / c) for c in carry}
    return {
        "tracked": tracked,
        "untracked": untracked,
        "carry": carried,
        "total": tracked + untracked + sum(carried.values()),
    }


def check_travel(size: dict, limit: int = TRAVEL_LIMIT) -> None:
    if size["total"] > limit:
        raise AbdomenSegError(
            f"{size['total'] / MIB:.1f} MiB would travel (tracked {size['tracked'] / MIB:.1f}, untracked "
            f"{size['untracked'] / MIB:.1f}, carried {sum(size['carry'].values()) / MIB:.1f}), over the "
            f"{limit / MIB:.0f} MiB a device call takes",
            "move more tracked weights aside (prepare --aside), or carry fewer cases",
        )


def exclude(repo, entry: str) -> None:
    """Add `entry` to the repository's own ignore list (.git/info/exclude, never committed) unless it is there."""
    path = Path(repo) / _git(Path(repo), "rev-parse", "--git-path", "info/exclude").strip()
    lines = path.read_text().splitlines() if path.is_file() else []
    if entry not in lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines + [entry]) + "\n")


def move_aside(repo, paths, aside) -> list:
    """Move the tracked files `paths` (relative) out of the checkout into `aside` (outside it) and record them in
    aside/moved.json, so that `restore` can put them back; returns the paths moved."""
    repo, aside = Path(repo).resolve(), Path(aside).resolve()
    if aside == repo or repo in aside.parents:
        raise AbdomenSegError(f"the aside folder '{aside}' is inside the repository", "give a folder outside it")
    record = aside / "moved.json"
    moved = json.loads(record.read_text()) if record.is_file() else []
    for rel in paths:
        source = repo / rel
        if not source.is_file():
            continue
        target = aside / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        moved.append({"path": rel, "sha256": sha256(source)})
        atomic_json(record, moved)  # recorded before the move: an interruption never loses track of a file
        _move(source, target)
    return [m["path"] for m in moved]


def _move(source: Path, target: Path) -> None:
    """A rename, or across file systems a copy under a temporary name, renamed, then the source removed."""
    import shutil

    try:
        os.replace(source, target)
    except OSError:
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(source, tmp)
        tmp.replace(target)
        source.unlink()


def restore(repo, aside) -> list:
    """Put back what `move_aside` moved; a file that meanwhile reappeared in the checkout is left as it is unless
    it is the same file (sha256), so nothing of the user's is overwritten."""
    repo, aside = Path(repo).resolve(), Path(aside).resolve()
    record = aside / "moved.json"
    if not record.is_file():
        return []
    back, kept = [], []
    for entry in json.loads(record.read_text()):
        source, target = aside / entry["path"], repo / entry["path"]
        if not source.is_file():
            continue
        if target.exists():
            if sha256(target) != entry["sha256"]:
                kept.append(entry)
                continue
            source.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            _move(source, target)
        back.append(entry["path"])
    if kept:
        atomic_json(record, kept)
        raise AbdomenSegError(
            f"{', '.join(k['path'] for k in kept)} changed in the checkout since prepare; the originals stay in {aside}",
            "compare them and move back by hand the ones you want",
        )
    record.unlink()
    return back


# -- the compact cache ----------------------------------------------------------------------------------------------
def write_compact_cache(arrays: dict, path, names=None) -> int:
    """The trainer's cache arrays (datasets.build_cache: settings, image/<case>, label/<case>), limited to the cases
    `names`, as one LZMA-compressed npz; returns its size in bytes."""
    keep = {
        k: np.asarray(v)  # not ascontiguousarray: it makes the 0-d settings string 1-d
        for k, v in arrays.items()
        if k == "settings" or names is None or k.split("/", 1)[1] in names
    }
    buffer = io.BytesIO()
    np.savez(buffer, **keep)  # type: ignore[arg-type]  # numpy's stub reads **kwds as its allow_pickle
    data = lzma.compress(buffer.getvalue(), preset=6)
    atomic_bytes(Path(path), data)
    return len(data)


def read_compact_cache(path) -> dict:
    with np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())), allow_pickle=False) as cached:
        return {k: cached[k] for k in cached.files}


# -- weights that come back -----------------------------------------------------------------------------------------
def split_file(path, out_dir, part_bytes: int = PART_LIMIT - MIB, stem: str = "best") -> dict:
    """`path` as parts `<stem>.partN` of at most `part_bytes` in `out_dir`, and `<stem>.manifest.json` with the
    sha256 of the whole and of each part; returns the manifest."""
    path, out_dir = Path(path), Path(out_dir)
    data = path.read_bytes()
    parts = []
    for i, start in enumerate(range(0, max(len(data), 1), part_bytes)):
        chunk = data[start : start + part_bytes]
        atomic_bytes(out_dir / f"{stem}.part{i}", chunk)
        parts.append({"file": f"{stem}.part{i}", "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "parts": parts}
    atomic_json(out_dir / f"{stem}.manifest.json", manifest)
    return manifest


def reassemble(manifest_path, dest) -> Path:
    """The file of a `split_file` manifest rebuilt at `dest`, every part and the whole checked by sha256."""
    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    chunks = []
    for part in manifest["parts"]:
        chunk_path = manifest_path.parent / part["file"]
        if not chunk_path.is_file():
            raise AbdomenSegError(f"weights part '{chunk_path}' is missing", "fetch all the files the lease returned")
        chunk = chunk_path.read_bytes()
        if hashlib.sha256(chunk).hexdigest() != part["sha256"]:
            raise AbdomenSegError(f"weights part '{chunk_path}' fails its sha256", "fetch the lease's files again")
        chunks.append(chunk)
    data = b"".join(chunks)
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise AbdomenSegError("the reassembled weights fail their sha256", "fetch the lease's files again")
    atomic_bytes(Path(dest), data)
    return Path(dest)


# -- the run's size ---------------------------------------------------------------------------------------------------
def plan_steps(seconds_left: float, step_rate: float, validations: int, validation_s: float, reserve_s: float) -> int:
    """Training steps that fit in `seconds_left`, after `validations` validations of `validation_s` each and
    `reserve_s` for writing the results; 0 when nothing fits."""
    usable = seconds_left - validations * validation_s - reserve_s
    return max(0, int(usable * step_rate))
