"""One case of a folder run: read, segment, write while holding the output's lock.

The command line's sequential loop and the Dask workers (cluster.py) both run each case through `segment_one`, so
a case is done the same way wherever it runs: the per-output lock, the atomic write, the same DICOM SEG identity.
"""

from __future__ import annotations

import sys


def interactive() -> bool:
    """stderr is a terminal: progress bars may redraw there. Otherwise (a log file, a pipe, a script) only whole
    lines are written: one per case, with its time, the time elapsed and an estimate of the time left."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressBar:
    """Progress bar on stderr (tqdm), fed by the engine's progress(fraction, message) callback; nothing where
    stderr is not a terminal (`interactive`)."""

    def __init__(self, desc):
        self.bar = None
        if not interactive():
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=100,
            desc=desc,
            file=sys.stderr,
            leave=False,
            bar_format="{desc}: {percentage:3.0f}%|{bar:30}| {postfix}",
        )

    def __call__(self, fraction, message):
        if self.bar is not None:
            self.bar.n = int(round(fraction * 100))
            self.bar.set_postfix_str(message, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def model_identity(segmenter):
    """The card a DICOM SEG names as its algorithm; a two-stage run names both models ("first>fine")."""
    from AbdomenSegLib.inference.cascade import made_by

    name, sha256 = made_by(segmenter)
    if name == segmenter.card.name:
        return segmenter.card
    return {"name": name, "sha256": sha256, "version": segmenter.card.get("version")}


def segment_one(
    segmenter, src, dst, options, overwrite, tag, report=None, *, bar=True, before_write=None, read=None
) -> tuple:
    """Read, segment, write one case while holding its output; returns (image, labels). Dask workers
    (cohort/cluster.py) draw no bar and write the result check in `before_write(image, labels)`, before the output.
    `read(src)`: where the scan (and its preparation for the model, or None) comes from
    (read_ahead.ReadAhead.get_prepared), else read here."""
    from AbdomenSegLib.io.files import claim_output
    from AbdomenSegLib.io.images import check_output_can_hold, read_image, write_labels

    with claim_output(dst, overwrite=overwrite):
        image, prepared = read(src) if read else (read_image(src, segmentation_ok=False), None)
        check_output_can_hold(image.GetDirection(), dst)
        bar = ProgressBar(tag) if bar else None

        def progress(fraction, message):
            if bar:
                bar(fraction, message)
            if report:
                report(fraction, message)

        try:
            labels = segmenter.segment(image, options, progress=progress, prepared=prepared)
        finally:
            if bar:
                bar.close()
        if before_write:
            before_write(image, labels)
        write_labels(labels, dst, protect=[src], overwrite=overwrite, source=src, model=model_identity(segmenter))
    return image, labels
