"""Training, as the command line and older code import it: the config (training/config.py), the trainer
(trainer.py, its recipe's parts in training/recipe.py) and the export of a validated package (training/export.py)."""

from __future__ import annotations

from AbdomenSegLib.training.config import DEFAULT_CONFIG, check_config, load_config, read_config
from AbdomenSegLib.training.export import train_and_export, validate_package, validation_rows
from AbdomenSegLib.training.trainer import Trainer

__all__ = [
    "DEFAULT_CONFIG",
    "Trainer",
    "check_config",
    "load_config",
    "read_config",
    "train_and_export",
    "validate_package",
    "validation_rows",
]
