"""Checkpoint selection by registration: the teacher that registers the validation pairs best is the one to ship.

As the authors do (ConvexAdam Dice on validation pairs, every 25 epochs), pretraining can score its current
teacher every ``val_every`` steps (:class:`ValConfig`): the teacher backbone is exported to
``RUN_DIR/snapshots/step_NNNNNN.*``, and each validation pair (inter-patient CT-CT, MR-MR and MR-CT of the
*validation* cohort, :mod:`dinoreg_core.data.cohorts`; small volumes so it is cheap) is registered with the public
:func:`dinoreg_core.api.register` using ``features="dino3d"`` and those weights. The mean Dice over organs of each
pair, averaged per task and then over tasks (``val_dice``), is logged beside the losses; the best step's weights
are copied to ``RUN_DIR/best_backbone.*``. :func:`evaluate_snapshots` does the same afterwards for a run's saved
snapshots.

Selection rule (:func:`best_step`): the highest ``val_dice``; ties go to the earlier step; rows without a score
(NaN or empty) are skipped.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_path
from ..errors import DinoregError

VAL_TASKS = ("ctct", "mrmr", "mrct")
VAL_FIELDS = ["step", "val_dice", *[f"val_dice_{t}" for t in VAL_TASKS], "val_pairs", "val_seconds", "weights"]


@dataclass
class ValConfig:
    """Validation by registration during pretraining (0 steps: off)."""

    every: int = 0                          # steps between validations (0: none)
    data: str = ""                          # a role cohort (dataset json or its folder), dinoreg_core.data.cohorts
    pairs_per_task: int = 2                 # the first pairs of each task
    register: dict = field(default_factory=dict)   # extra dinoreg_core.api.register settings (e.g. {"grid_sp": 4})

    def check(self) -> None:
        if self.every < 0 or self.pairs_per_task < 1:
            raise DinoregError(f"val.every={self.every} must be >= 0 and val.pairs_per_task={self.pairs_per_task} >= 1.")
        if self.every > 0 and not self.data:
            raise DinoregError("val.every > 0 needs val.data: a validation cohort (dinoreg_core.data.cohorts).")


def validation_pairs(cfg: ValConfig) -> list[dict]:
    """The validation pair entries (absolute paths) of ``cfg.data``."""
    from ..data.cohorts import load_pairs

    return load_pairs(cfg.data, VAL_TASKS, cfg.pairs_per_task)


def pair_dice(weights: str | Path, pair: dict, register_settings: dict | None = None) -> float:
    """Mean Dice over organs after registering ``pair`` with dino3d features from ``weights``."""
    from ..api import register

    res = register(pair["fixed"], pair["moving"], fixed_labels=pair["fixed_label"],
                   moving_labels=pair["moving_label"], features="dino3d",
                   feature_options={"weights": str(weights)}, **(register_settings or {}))
    return float(res.metrics["summary"]["dice"])


def validation_dice(weights: str | Path, pairs: list[dict], register_settings: dict | None = None) -> dict:
    """Score one backbone on the validation pairs: {"val_dice", "val_dice_<task>", "val_pairs", "val_seconds"}.

    ``val_dice`` is the mean of the per-task means (each task counts the same however many pairs it has).
    """
    t0 = time.perf_counter()
    per_task: dict[str, list[float]] = {}
    for p in pairs:
        per_task.setdefault(p["task"], []).append(pair_dice(weights, p, register_settings))
    means = {t: sum(v) / len(v) for t, v in per_task.items()}
    row = {f"val_dice_{t}": means.get(t, float("nan")) for t in VAL_TASKS}
    row["val_dice"] = sum(means.values()) / len(means) if means else float("nan")
    row["val_pairs"] = len(pairs)
    row["val_seconds"] = time.perf_counter() - t0
    return row


def _score(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


def best_step(rows: list[dict], key: str = "val_dice") -> int:
    """The step of the highest ``key`` among logged rows (ties: the earlier step); DinoregError if none is scored."""
    best, best_val = None, -math.inf
    for r in sorted(rows, key=lambda r: int(float(r["step"]))):
        v = _score(r.get(key))
        if not math.isnan(v) and v > best_val:
            best, best_val = int(float(r["step"])), v
    if best is None:
        raise DinoregError(f"No logged row has a '{key}' score to select a checkpoint by.")
    return best


def copy_backbone(src: str | Path, dst_stem: str | Path) -> Path:
    """Copy an exported backbone (``X.safetensors`` + ``X.json``) to ``dst_stem.*``; returns the weights path."""
    from ..models.checkpoint import checkpoint_paths

    sw, sj = checkpoint_paths(src)
    dw, dj = checkpoint_paths(dst_stem)
    for a, b in ((sw, dw), (sj, dj)):
        with atomic_path(b) as tmp:
            shutil.copyfile(a, tmp)
    return dw


class ValLog:
    """``RUN_DIR/val_log.csv``: one row per validated step (append-only; on resume the rows after the resumed
    step are dropped, as in the training log)."""

    def __init__(self, path: Path, start_step: int | None = 0):
        """``start_step``: keep the rows up to this step (0: start afresh; None: keep every row)."""
        self.path = Path(path)
        rows = self.read() if start_step is None or start_step > 0 else []
        rows = [r for r in rows if start_step is None or int(float(r["step"])) <= start_step]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=VAL_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=VAL_FIELDS).writerow({k: row.get(k, "") for k in VAL_FIELDS})


def validate_and_select(run_dir: Path, step: int, weights: Path, pairs: list[dict], log: ValLog,
                        register_settings: dict | None = None) -> dict:
    """Score ``weights`` (the teacher at ``step``), log the row, and copy the best step so far to
    ``run_dir/best_backbone.*``. Returns the row (with "best_step")."""
    row = {"step": step, "weights": str(weights), **validation_dice(weights, pairs, register_settings)}
    log.write(row)
    rows = log.read()
    best = best_step(rows)
    if best == step:
        copy_backbone(weights, Path(run_dir) / "best_backbone")
    row["best_step"] = best
    return row


def evaluate_snapshots(run_dir: str | Path, cfg: ValConfig, *, steps: list[int] | None = None,
                       progress: bool = True) -> list[dict]:
    """Validate a finished (or running) run's saved snapshots afterwards, with the same scoring; rows are appended
    to ``run_dir/val_log.csv`` (snapshots already scored there are skipped) and the best is copied to
    ``run_dir/best_backbone.*``."""
    run_dir = Path(run_dir)
    snaps = sorted((run_dir / "snapshots").glob("step_*.safetensors"))
    if not snaps:
        raise DinoregError(f"The run folder {run_dir} has no snapshots (run with snapshot_every or val.every > 0).")
    pairs = validation_pairs(cfg)
    log_path = run_dir / "val_log.csv"
    log = ValLog(log_path, start_step=None)
    done = {int(float(r["step"])) for r in log.read()}
    out = []
    for w in snaps:
        step = int(w.stem.split("_")[1])
        if step in done or (steps is not None and step not in steps):
            continue
        row = validate_and_select(run_dir, step, w, pairs, log, cfg.register)
        if progress:
            print(f"step {step}: val_dice {row['val_dice']:.4f} (" + ", ".join(
                f"{t} {row[f'val_dice_{t}']:.3f}" for t in VAL_TASKS) + f"), best step {row['best_step']}", flush=True)
        out.append(row)
    return out
