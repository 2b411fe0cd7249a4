"""Where installed model packages live beyond the shipped ones: the user's model folder.

Packages published apart from the extension (store.py installs them) land in `models_home()`; packages.py looks a
catalog entry up there when its shipped folder is absent. Both import this module, so it imports neither.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from AbdomenSegLib.models.card import inside


def models_home() -> Path:
    """Where installed packages go: ABDOMENSEG_MODELS if set, else the per-user data folder
    (%LOCALAPPDATA%\\AbdomenSeg\\models, ~/Library/Application Support/AbdomenSeg/models,
    $XDG_DATA_HOME/abdomenseg/models or ~/.local/share/abdomenseg/models)."""
    if os.environ.get("ABDOMENSEG_MODELS"):
        return Path(os.environ["ABDOMENSEG_MODELS"])
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "AbdomenSeg" / "models"
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "AbdomenSeg" / "models"
    return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "abdomenseg" / "models"


def installed_folder(entry: dict[str, Any]) -> Path | None:
    """Where models_home() holds a catalog entry's package, or None."""
    home = models_home()
    folder = home / entry.get("path", entry["name"])
    if not (folder / "card.json").is_file():
        return None
    return inside(folder, home, f"package of model '{entry['name']}'")
