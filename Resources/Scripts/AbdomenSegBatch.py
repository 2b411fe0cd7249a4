"""Batch segmentation with 3D Slicer, no GUI:

    Slicer --no-main-window --python-script <AbdomenSeg>/Resources/Scripts/AbdomenSegBatch.py --input DIR --output DIR [--reference DIR] [--accept-terms]

Writes <case>.seg.nrrd per input (and metrics.csv with --reference); exits non-zero if any case failed.

This script lives under Resources/Scripts, not beside the module: Slicer instantiates every .py file in
a module folder as a module (Slicer v5.10.0 Base/QTCore/qSlicerAbstractModuleFactoryManager.cxx:279,
`entryInfoList(QDir::Files)`, not recursive), and a file without a class of its own name fails to load
and fails every test run under --testing. MONAIAuto3DSeg keeps its worker script under Scripts/ too.
"""

import os
import sys
import traceback

import slicer

# Source checkout: <repo>/Resources/Scripts; built extension: qt-scripted-modules/Resources/Scripts. The
# engine (AbdomenSegLib) sits two folders up in both.
_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.path.isdir(os.path.join(_root, "AbdomenSegLib")) and _root not in sys.path:
    sys.path.insert(0, _root)

if __name__ == "__main__":
    from AbdomenSegLib.core.errors import AbdomenSegError
    from AbdomenSegLib.slicer.batch import run
    from AbdomenSegLib.slicer.install import ensure_dependencies

    try:
        ensure_dependencies(confirm=None)
        code = run(sys.argv[1:], slicer.mrmlScene)
    except AbdomenSegError as exc:  # a problem the user can fix: one line says which
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except Exception:  # anything else is a bug: the whole traceback, for the report
        traceback.print_exc()
        code = 1
    slicer.util.exit(code)
