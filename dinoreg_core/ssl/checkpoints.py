"""Pretraining checkpoints that survive faults: two kept, each verified before a resume touches anything.

* :func:`save` writes ``checkpoint.pt`` atomically and keeps the one before it as ``checkpoint.prev.pt``, so a
  checkpoint damaged after it was written (a bad disk, a copy cut short) still leaves a good one to resume from.
* :func:`load_verified` reads ``checkpoint.pt`` with ``torch.load(weights_only=True)`` (no code in a pickle runs) and
  checks it: every key of :data:`KEYS` present with the right kind of value, and a ``config`` that can resume the
  run that is asked for (:func:`check_config`: the fields that fix tensor shapes or the data stream's meaning,
  :data:`FIXED_FIELDS`, must be unchanged). A damaged or truncated file falls back to ``checkpoint.prev.pt`` with
  one warning line; a config that cannot resume is refused in one sentence naming the field and both values.
* :func:`check_shapes` compares the checkpoint's tensors with the freshly built networks, so a change the field
  list does not name is still caught before training starts.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import DinoregError

NAME = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
KEYS = {"step": int, "samples": int, "config": dict, "student": dict, "teacher": dict, "dino_center": dict,
        "ibot_center": dict, "optimizer": dict, "scaler": dict, "rng": list}
# PretrainConfig fields a resume may not change: they fix parameter shapes or what a step means
FIXED_FIELDS = ("model", "model_overrides", "head_out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers",
                "ibot_separate_head", "contrast_weight", "contrast_dim")
TEMP_STEMS = ("checkpoint", "config", "teacher_backbone", "log", "val_log")  # atomic-write temp files of these are swept on start


def save(state: dict, run_dir: str | os.PathLike) -> Path:
    """Write ``state`` as ``run_dir/checkpoint.pt`` (atomically), the previous one kept as ``checkpoint.prev.pt``."""
    run_dir = Path(run_dir)
    path = run_dir / NAME
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if path.exists():
            os.replace(path, run_dir / PREVIOUS)  # a kill here leaves .prev (good) and the temp (swept)
    return path


def sweep(run_dir: str | os.PathLike) -> list[str]:
    """Remove atomic-write temp files (:mod:`dinoreg_core.atomic`) of a killed run from ``run_dir``; their names."""
    from ..outputs import TEMP_PATTERN

    run_dir = Path(run_dir)
    gone = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = TEMP_PATTERN.match(p.name)
            if m and m.group("stem") in TEMP_STEMS and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def _read(path: Path) -> dict:
    """The checkpoint at ``path`` with its keys checked; DinoregError "damaged or truncated" otherwise."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses anyway
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF, unsupported global: all mean the file is unusable
        reason = " ".join(str(e).split()).split(". ")[0][:120].rstrip(".")
        raise DinoregError(f"The checkpoint {path} is damaged or truncated ({type(e).__name__}: {reason}).") from None
    if not isinstance(ck, dict):
        raise DinoregError(f"The checkpoint {path} is damaged: it holds a {type(ck).__name__}, not a dict.")
    for key, kind in KEYS.items():
        if key not in ck:
            raise DinoregError(f"The checkpoint {path} is damaged: the key '{key}' is missing.")
        if not isinstance(ck[key], kind) or isinstance(ck[key], bool):
            raise DinoregError(f"The checkpoint {path} is damaged: '{key}' is a {type(ck[key]).__name__}.")
    return ck


def load_verified(run_dir: str | os.PathLike) -> tuple[dict, Path]:
    """The newest readable, complete checkpoint of ``run_dir`` and its path (falls back to ``checkpoint.prev.pt``
    with a warning); DinoregError when neither is usable."""
    run_dir = Path(run_dir)
    first, prev = run_dir / NAME, run_dir / PREVIOUS
    errors = []
    for p in (first, prev):
        if not p.exists():
            continue
        try:
            ck = _read(p)
        except DinoregError as e:
            errors.append(str(e))
            continue
        if errors:
            print(f"dinoreg pretrain: warning: {errors[0]} Resuming from the previous checkpoint {p} "
                  f"(step {ck['step']}).", file=sys.stderr)
        return ck, p
    if errors:
        raise DinoregError(errors[0].rstrip(".") + "; no earlier good checkpoint to fall back to.")
    raise DinoregError(f"There is no checkpoint in {run_dir} to resume.")


def check_config(saved: dict, cfg_dict: dict, path: Path) -> None:
    """Refuse a resume whose config changes one of :data:`FIXED_FIELDS` (one sentence naming it)."""
    for name in FIXED_FIELDS:
        if name in saved and saved[name] != cfg_dict.get(name):
            raise DinoregError(f"--resume cannot change {name} (the checkpoint {path} was trained with {name}="
                               f"{saved[name]!r}, now {cfg_dict.get(name)!r}); keep it or start a new --out.")


def check_shapes(ck: dict, modules: dict, path: Path) -> None:
    """Refuse a checkpoint whose state dicts do not match ``modules`` ({key: nn.Module}) key for key and shape for
    shape."""
    for key, module in modules.items():
        want = module.state_dict()
        got = ck[key]
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing or extra:
            name = (missing or extra)[0]
            raise DinoregError(f"The checkpoint {path} does not fit this model: '{key}' {'lacks' if missing else 'has an extra'} "
                               f"tensor '{name}'.")
        for name, t in want.items():
            g = got[name]
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(t.shape):
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise DinoregError(f"The checkpoint {path} does not fit this model: '{key}.{name}' has shape {shape} "
                                   f"there, {tuple(t.shape)} now.")
