"""AbdomenSeg engine: abdominal organ segmentation and evaluation, importable without Slicer.

The one-call API (api.py): `segment`, `evaluate`, `compare`, `list_models`, `default_model`. The subpackages, lowest
layer first: core, io, models, preprocessing, inference, qc, cohort, evaluation, training, slicer; the command line
(cli.py) and the engine worker (worker.py) sit on top (Testing/test_architecture.py keeps the imports in that order).
"""

from AbdomenSegLib.api import compare, default_model, evaluate, list_models, segment
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.version import __version__

__all__ = ["AbdomenSegError", "__version__", "compare", "default_model", "evaluate", "list_models", "segment"]
