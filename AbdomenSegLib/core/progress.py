"""Progress and cancellation for long work: the callbacks of core.options, scaled and checked in one place."""

from __future__ import annotations

from AbdomenSegLib.core.errors import Cancelled


def check_cancel(cancel) -> None:
    if cancel is not None and cancel():
        raise Cancelled()


def progress_span(progress, low: float, high: float, prefix: str = "", inner=(0.0, 1.0)):
    """`progress` for one part of a run (a mirror pass, an ensemble member, a cascade stage): the part's own
    fractions from inner[0] to inner[1] land on low..high of the whole, its messages get `prefix`; None stays None."""
    if progress is None:
        return None
    start, stop = inner

    def report(fraction, message):
        part = min(max((float(fraction) - start) / (stop - start), 0.0), 1.0)
        progress(low + (high - low) * part, prefix + message)

    return report
