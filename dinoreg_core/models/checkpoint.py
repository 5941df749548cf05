"""Save and load a :class:`~dinoreg_core.models.vit3d.ViT3D` backbone: safetensors weights + a JSON beside them.

Format (``X`` = the path without suffix)::

    X.safetensors   the backbone state dict (float tensors, names as in ``ViT3D.state_dict()``)
    X.json          {"format": "dinoreg-vit3d/1", "model": asdict(ViT3DConfig), "provenance": {...}}

Both files are written atomically (temporary file + rename). ``provenance`` is what the caller passes (data,
steps, seed, ...) plus, where absent, ``created`` (UTC ISO time), ``git_commit`` of this repository when it
can be determined, ``torch`` version and ``num_parameters``.

Loading never unpickles anything (safetensors + JSON only) and checks the weights against the config:
a missing file, an unreadable (truncated / corrupt) file, an unknown config field, or a tensor whose name or
shape does not match the model built from the config each raise a one-sentence :class:`DinoregError`.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..atomic import atomic_path, write_json_atomic
from ..errors import DinoregError
from .vit3d import ViT3D, ViT3DConfig

FORMAT = "dinoreg-vit3d/1"


def checkpoint_paths(path) -> tuple[Path, Path]:
    """(weights ``X.safetensors``, config ``X.json``) for ``X``, ``X.safetensors`` or ``X.json``."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _git_commit() -> str | None:
    """The checkout's commit, or None (also for an installed package: it must not report an unrelated repository)."""
    if not (Path(__file__).resolve().parents[2] / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_backbone(model: torch.nn.Module, cfg: ViT3DConfig, path, provenance: dict | None = None) -> Path:
    """Write ``X.safetensors`` and ``X.json`` for ``model`` (a ViT3D built from ``cfg``); returns the weights path.

    ``path`` may be ``X`` or ``X.safetensors``; parent folders are created.
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    weights, meta_path = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    prov = dict(provenance or {})
    prov.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    prov.setdefault("git_commit", _git_commit())
    prov.setdefault("torch", torch.__version__)
    prov.setdefault("num_parameters", int(sum(v.numel() for v in state.values())))
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    write_json_atomic(meta_path, {"format": FORMAT, "model": asdict(cfg), "provenance": prov})
    return weights


def config_from_dict(d: dict, source: str = "the config") -> ViT3DConfig:
    """Build a :class:`ViT3DConfig` from a dict, rejecting unknown fields with a clear error."""
    known = {f.name for f in fields(ViT3DConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise DinoregError(f"{source} has unknown model field '{unknown[0]}' (known: {', '.join(sorted(known))}).")
    try:
        return ViT3DConfig(**d)
    except (TypeError, ValueError) as e:
        raise DinoregError(f"{source} holds an invalid model config ({e}).") from None


def check_state_dict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Raise a one-sentence DinoregError at the first key or shape in ``state`` that ``model`` does not expect."""
    expected = model.state_dict()
    for k, v in expected.items():
        if k not in state:
            raise DinoregError(f"{source} lacks tensor '{k}' (shape {tuple(v.shape)}) that the config requires.")
        if tuple(state[k].shape) != tuple(v.shape):
            raise DinoregError(f"{source} does not match its config: tensor '{k}' has shape "
                               f"{tuple(state[k].shape)} in the file but {tuple(v.shape)} in the model.")
    for k in state:
        if k not in expected:
            raise DinoregError(f"{source} holds tensor '{k}' that a ViT3D with this config does not have.")


def read_backbone_meta(path) -> dict:
    """Read and validate ``X.json`` (returns the parsed dict)."""
    weights, meta_path = checkpoint_paths(path)
    if not meta_path.is_file():
        raise DinoregError(f"Backbone config {meta_path} (expected beside {weights.name}) does not exist.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DinoregError(f"Backbone config {meta_path} is not valid JSON ({e.__class__.__name__}).") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise DinoregError(f"Backbone config {meta_path} has no 'model' section.")
    return meta


def load_backbone(path, device="cpu") -> tuple[ViT3D, ViT3DConfig, dict]:
    """Load ``X.safetensors`` + ``X.json`` -> (model in eval mode on ``device``, config, meta dict).

    ``meta`` is the parsed JSON ({"format", "model", "provenance"}) plus "weights_path".
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, meta_path = checkpoint_paths(path)
    if not weights.is_file():
        raise DinoregError(f"Backbone weights file {weights} does not exist.")
    meta = read_backbone_meta(weights)
    cfg = config_from_dict(meta["model"], source=str(meta_path))
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DinoregError(f"Backbone weights file {weights} is unreadable (truncated or corrupt: {e}).") from None
    try:
        model = ViT3D(cfg)
    except ValueError as e:
        raise DinoregError(f"Backbone config {meta_path} is inconsistent ({e}).") from None
    check_state_dict(model, state, source=str(weights))
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    meta = dict(meta, weights_path=str(weights))
    return model, cfg, meta
