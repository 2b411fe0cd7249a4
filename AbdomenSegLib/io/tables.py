"""Tables written as CSV, atomically (temp file + rename): a reader never sees half a table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from AbdomenSegLib.io.files import atomic_output


def write_table(rows: list, path, fields: list) -> Path:
    """`rows` (dicts) under the columns `fields`; finite floats to 6 significant digits, other keys ignored."""
    path = Path(path)
    with atomic_output(path, ".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
            )
    return path
