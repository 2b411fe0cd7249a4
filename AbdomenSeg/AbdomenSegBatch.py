"""Batch segmentation with 3D Slicer, no GUI:

    Slicer --no-main-window --python-script AbdomenSeg/AbdomenSegBatch.py --input DIR --output DIR [--reference DIR]

Writes <case>.seg.nrrd per input (and metrics.csv with --reference); exits non-zero if any case failed.
"""
import os
import sys

import slicer

_here = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_here, os.path.dirname(_here)):
    if os.path.isdir(os.path.join(_candidate, "AbdomenSegLib")):
        sys.path.insert(0, _candidate)
        break

if __name__ == "__main__":
    from AbdomenSegLib.install import ensure_dependencies
    from AbdomenSegLib.slicer_batch import run
    try:
        ensure_dependencies(confirm=None)
        code = run(sys.argv[1:], slicer.mrmlScene)
    except Exception as exc:  # report the real cause, then a non-zero exit for the calling script
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    slicer.util.exit(code)
