"""Progress and cancellation for long work: the callbacks of core.options, scaled and checked in one place."""

from __future__ import annotations

from AbdomenSegLib.core.errors import Cancelled
from AbdomenSegLib.core.options import CancelCallback, ProgressCallback


def check_cancel(cancel: CancelCallback | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled()


def progress_span(
    progress: ProgressCallback | None,
    low: float,
    high: float,
    prefix: str = "",
    inner: tuple[float, float] = (0.0, 1.0),
) -> ProgressCallback | None:
    """`progress` for one part of a run (a mirror pass, an ensemble member, a cascade stage): the part's own
    fractions from inner[0] to inner[1] land on low..high of the whole, its messages get `prefix`; None stays None."""
    if progress is None:
        return None
    start, stop = inner

    def report(fraction: float, message: str) -> None:
        part = min(max((float(fraction) - start) / (stop - start), 0.0), 1.0)
        progress(low + (high - low) * part, prefix + message)

    return report
