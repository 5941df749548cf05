"""Shared by the benchmark scripts: append result rows to a CSV table (header written when the file is new)."""

from __future__ import annotations

import csv
from pathlib import Path


def append_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Append ``rows`` (dicts; missing columns left empty) to the CSV ``path``, creating it with a header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        if new:
            w.writeheader()
        w.writerows(rows)
