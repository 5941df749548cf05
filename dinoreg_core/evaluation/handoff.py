"""Hand-over files between the notebooks: ``RUN_DIR/handoff/<name>.json`` (the one way they are written and read)."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_json_atomic
from ..errors import DinoregError


def write_handoff(run_dir, name: str, obj: dict) -> Path:
    """Write ``RUN_DIR/handoff/<name>.json`` atomically (what a later notebook reads)."""
    p = Path(run_dir) / "handoff" / f"{name}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, obj)
    return p


def read_handoff(run_dir, name: str, *, producer: str = "an earlier notebook") -> dict:
    """Read ``RUN_DIR/handoff/<name>.json``; one sentence naming the notebook to run first when it is missing."""
    p = Path(run_dir) / "handoff" / f"{name}.json"
    if not p.is_file():
        raise DinoregError(f"{p} does not exist; run {producer} with the same run_dir first.")
    return json.loads(p.read_text())


def find_handoff(run_dir, name: str) -> dict | None:
    """``RUN_DIR/handoff/<name>.json`` when it exists, else None."""
    p = Path(run_dir) / "handoff" / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None
