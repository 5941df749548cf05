"""The 3D DINO weights a run uses: given, the shipped demo weights, or trained here (:func:`pretrain_or_shipped`).

Notebook 01 and ``dinoreg reproduce`` call this; training itself is :func:`dinoreg_core.ssl.train.train`, the same
call ``dinoreg pretrain`` makes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..errors import DinoregError

logger = logging.getLogger("dinoreg")


def shipped_weights() -> Path | None:
    """The shipped demo weights ``dinoreg_core/weights/dino3d_demo.safetensors`` when they (and their json) exist."""
    from ..features.dino3d import DEFAULT_WEIGHTS
    from ..models.checkpoint import checkpoint_paths

    w, meta = checkpoint_paths(DEFAULT_WEIGHTS)
    return w if w.is_file() and meta.is_file() else None


def shipped_log() -> Path | None:
    """A pretraining log shipped beside the demo weights (``dino3d_demo*.csv``), if any."""
    from ..features.dino3d import DEFAULT_WEIGHTS

    found = sorted(DEFAULT_WEIGHTS.parent.glob(DEFAULT_WEIGHTS.stem + "*.csv"))
    return found[0] if found else None


def pretrain_or_shipped(mode: str, data, run_dir, *, config: str | None = "demo", overrides=(), weights: str | None = None,
                        progress: bool = True) -> dict:
    """The dino3d weights for the rest of the suite.

    ``config``: a packaged pretraining config name (``demo``), a JSON/YAML file, or None (the
    :class:`~dinoreg_core.ssl.train.PretrainConfig` defaults: the paper's model).
    ``mode``: ``"auto"`` — ``weights`` when given, else the shipped demo weights when present, else pretrain;
    ``"train"`` — always pretrain (``dinoreg pretrain --config CONFIG --data DATA --out RUN_DIR/pretrain --set ...``;
    an interrupted run resumes); ``"skip"`` — ``weights`` or the shipped weights, an error when neither exists.
    Returns {"weights", "source" ("given" | "shipped" | "trained"), "log" (log.csv or None), "message", "seconds"}.
    """
    if mode not in ("auto", "train", "skip"):
        raise DinoregError(f"train must be 'auto', 'train' or 'skip', got '{mode}'.")
    t0 = time.perf_counter()
    if mode != "train":
        if weights:
            from ..features.dino3d import resolve_weights

            w = resolve_weights({"weights": weights})
            return {"weights": str(w), "source": "given", "log": None, "seconds": 0.0,
                    "message": f"using the given dino3d weights {w} (no pretraining)"}
        w = shipped_weights()
        if w is not None:
            shipped_csv = shipped_log()  # not "log": that name is the module's logger, used below
            return {"weights": str(w), "source": "shipped", "log": str(shipped_csv) if shipped_csv else None,
                    "seconds": 0.0,
                    "message": f"using the shipped demo weights {w} (no pretraining)"}
        if mode == "skip":
            raise DinoregError("train='skip' needs dino3d weights, but none were given and the shipped demo weights "
                               "dinoreg_core/weights/dino3d_demo.safetensors do not exist; use train='auto'.")
    from . import dist
    from .train import config_to_dict, load_config, resolve_config_path, train

    out = Path(run_dir) / "pretrain"
    done = out / "teacher_backbone.safetensors"
    cfg_path = resolve_config_path(config, out, False)
    cfg = load_config(cfg_path, list(overrides) + ([] if progress else ["progress=false"]))
    why = "the shipped demo weights do not exist" if mode == "auto" else "train='train'"
    saved = out / "config.json"
    same = lambda d: {k: v for k, v in d.items() if k != "progress"}  # noqa: E731
    if done.is_file() and saved.is_file() and \
            same(json.loads(saved.read_text())) == same(json.loads(json.dumps(config_to_dict(cfg)))):
        return {"weights": str(done), "source": "trained", "log": str(out / "log.csv"), "seconds": 0.0,
                "message": f"{why}; using the finished pretraining run {out} ({cfg.steps} steps, same config)"}
    import torch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    logger.info(f"pretraining 3D DINO ({why}): config {config or 'paper defaults'}, {cfg.steps} steps on {data} -> {out}")
    resume = (out / "checkpoint.pt").exists()
    try:
        res = train(cfg, data, out, resume=resume)
    finally:
        dist.cleanup()
    if not done.is_file():
        raise DinoregError(f"Pretraining stopped at step {res.get('step')} of {cfg.steps} without exporting {done}.")
    return {"weights": str(done), "source": "trained", "log": str(out / "log.csv"),
            "seconds": round(time.perf_counter() - t0, 1),
            "message": f"{why}, so 3D DINO was pretrained for {cfg.steps} steps ({time.perf_counter() - t0:.0f} s on "
                       f"{device}): {done}"}


def pretraining_needed(mode: str, weights: str | None = None) -> bool:
    """Whether :func:`pretrain_or_shipped` will train (so notebook 01 only builds a corpus when it is used)."""
    return mode == "train" or (mode == "auto" and not weights and shipped_weights() is None)
