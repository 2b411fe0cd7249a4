"""Two folder runs into one output folder at once.

Runs on this machine alone share the folder: each case is claimed by its output's lock (io.files.claim_output), so
a case the other run holds is left to it ("being segmented by another run") and each case is done once; the
manifest merges both runs' rows (manifest.py). A Dask run does not share: its workers take over output locks of
processes that are not workers of its cluster (cluster.py `_take_over_lock`, for nodes that were lost), which would
take another run's live locks. So a Dask run refuses a folder another run is writing, and a run refuses a folder a
Dask run is writing, at once and before the model is loaded.

Each folder run announces itself with `.abdomenseg-run-<random>.lock` in the output folder (its host, process and
kind), removed when it ends; one left by a killed process of this host is removed by the next run.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.untrusted import printable
from AbdomenSegLib.io.files import lock_holder, try_lock

RUN_LOCK_PREFIX = ".abdomenseg-run-"
_CLUSTER, _LOCAL = "dask", "local"


@contextlib.contextmanager
def share_folder(folder, *, cluster: bool) -> Iterator[list]:
    """Announce this run in `folder` while it runs; yields the other live runs writing it ("process <pid> on
    <host>"). Refused (AbdomenSegError) when this or another of them is a Dask run."""
    folder = Path(folder)
    mine = folder / f"{RUN_LOCK_PREFIX}{uuid.uuid4().hex[:12]}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        announced = try_lock(mine, _CLUSTER if cluster else _LOCAL)
    except OSError as exc:  # read-only: the first file this run writes there (a full disk is DiskFull: try_lock)
        raise AbdomenSegError(
            f"cannot write in the output folder '{printable(str(folder))}' ({exc.strerror or exc})",
            "choose an output folder you can write to",
        ) from None
    if not announced:  # a random name taken: cannot happen but by a copy of this very file
        raise AbdomenSegError(f"cannot announce this run in '{printable(str(folder))}'", "run it again")
    try:
        yield _others(folder, mine, cluster)
    finally:
        with contextlib.suppress(OSError):
            mine.unlink()


def _others(folder: Path, mine: Path, cluster: bool) -> list:
    """The other live runs of `folder`; refuses when they cannot share it with this one. Our own announcement is
    made first, so of two runs starting together at least one sees the other."""
    others = []
    for lock in sorted(folder.glob(f"{RUN_LOCK_PREFIX}*.lock")):
        if lock == mine:
            continue
        live, owner, kind = lock_holder(lock)
        if not live:
            continue
        if cluster or kind != _LOCAL:
            raise AbdomenSegError(
                f"another AbdomenSeg run ({owner}{', on a Dask cluster' if kind == _CLUSTER else ''}) is writing "
                f"the output folder '{printable(str(folder))}', and a Dask run cannot share a folder",
                f"wait for it to finish or choose another output folder; if no such run exists, delete '{lock}'",
            )
        others.append(owner)
    return others
