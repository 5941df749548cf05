"""The ``dino3d`` feature method: dense features of a DINO-pretrained 3D ViT (reduced by joint PCA downstream).

Options (``options`` dict of the registry call; all optional):

* ``weights``: our exported backbone ``X.safetensors`` (with ``X.json`` beside it; see
  :mod:`dinoreg_core.models.checkpoint`), or an authors' checkpoint (``.ckpt`` / ``.pt`` / ``.pth``, mapped by
  :mod:`dinoreg_core.models.primus_keys`, student backbone). Default: the demo weights
  ``dinoreg_core/weights/dino3d_demo.safetensors`` when they exist.
* ``blocks``: block index or indices (int, list, or a string such as ``"-1"`` / ``"-2,-1"``); default the last.
* ``memory_budget_gb`` (default 4.0), ``window`` (voxels), ``overlap`` (0.5), ``blend`` ("gaussian"),
  ``fit`` ("resample"), ``progress`` (True): see :class:`dinoreg_core.features.extract.ExtractConfig`.

The image is the (1,1,D,H,W) intensity volume normalised to [0,1]; the modality is not used (one backbone for
CT and MR). Loaded models are cached per (weights file, modification time, device), so the fixed and moving
images of a pair share one loaded model.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import DinoregError
from ..models.checkpoint import checkpoint_paths, load_backbone
from .extract import ExtractConfig, extract_features
from .registry import FeatureMethod, register_feature_method

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "dino3d_demo.safetensors"
AUTHORS_SUFFIXES = (".ckpt", ".pt", ".pth")
_CACHE: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
_CACHE_SIZE = 2


def resolve_weights(options: dict) -> Path:
    """The weights file named in ``options['weights']``, else the demo weights; a clear error if missing."""
    w = options.get("weights")
    if w:
        p = Path(w).expanduser()
        if p.suffix in AUTHORS_SUFFIXES:
            if not p.is_file():
                raise DinoregError(f"dino3d weights file {p} does not exist.")
            return p
        weights, meta = checkpoint_paths(p)
        if not weights.is_file():
            raise DinoregError(f"dino3d weights file {weights} does not exist.")
        return weights
    weights, meta = checkpoint_paths(DEFAULT_WEIGHTS)
    if not (weights.is_file() and meta.is_file()):
        raise DinoregError(
            f"No dino3d weights were given and the default demo weights {weights} (with {meta.name} beside it) "
            "do not exist: create them with `dinoreg pretrain` (see `dinoreg pretrain --help`) or pass "
            "options={'weights': 'path/to/backbone.safetensors'}.")
    return weights


def load_cached(weights: Path, device) -> torch.nn.Module:
    """Load (or reuse) the backbone in ``weights`` on ``device``."""
    device = torch.device(device)
    key = (str(weights.resolve()), weights.stat().st_mtime_ns, str(device))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    if weights.suffix in AUTHORS_SUFFIXES:
        from ..models.primus_keys import load_authors_checkpoint
        model, _, _ = load_authors_checkpoint(weights, device)
    else:
        model, _, _ = load_backbone(weights, device)
    _CACHE[key] = model
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return model


def parse_blocks(value) -> tuple:
    """-1, [-2, -1], "-2,-1" -> a tuple of ints."""
    if value is None:
        return (-1,)
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError:
            raise DinoregError(f"dino3d option blocks='{value}' is not a comma-separated list of integers.") from None
    return tuple(int(v) for v in value)


def extract_config(options: dict) -> ExtractConfig:
    """ExtractConfig from the dino3d options dict."""
    e = ExtractConfig(blocks=parse_blocks(options.get("blocks")))
    for name in ("memory_budget_gb", "overlap"):
        if options.get(name) is not None:
            setattr(e, name, float(options[name]))
    for name in ("window", "blend", "fit", "progress", "amp"):
        if options.get(name) is not None:
            setattr(e, name, options[name])
    return e


def dino3d_features(image: torch.Tensor, *, modality: str = "ct", device=None, options=None) -> torch.Tensor:
    """Dense DINO features (1, C, ceil(D/p), ceil(H/p), ceil(W/p)) float32 on ``device`` (see module docstring)."""
    options = dict(options or {})
    device = torch.device(device) if device is not None else image.device
    model = load_cached(resolve_weights(options), device)
    return extract_features(model, image, extract_config(options), device=device)


register_feature_method(FeatureMethod(
    "dino3d", dino3d_features, joint_pca=True,
    description="dense features of a DINO/iBOT-pretrained 3D ViT (patch 4), joint PCA to pca_dim channels"))
