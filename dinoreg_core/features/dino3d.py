"""The ``dino3d`` feature method: dense features of a DINO-pretrained 3D ViT (reduced by joint PCA downstream).

Options (``options`` dict of the registry call; all optional):

* ``weights``: our exported backbone ``X.safetensors`` (with ``X.json`` beside it; see
  :mod:`dinoreg_core.models.checkpoint`), or an authors' checkpoint (``.ckpt`` / ``.pt`` / ``.pth``, mapped by
  :mod:`dinoreg_core.models.primus_keys`, student backbone). Default: the demo weights
  ``dinoreg_core/weights/dino3d_demo.safetensors`` when they exist.
* ``blocks``: block index or indices (int, list, or a string such as ``"-1"`` / ``"-2,-1"``); default the last.
* ``memory_budget_gb`` (default 4.0), ``window`` (voxels), ``overlap`` (0: windows tile the volume), ``blend`` ("gaussian"),
  ``fit`` ("resample"), ``progress`` (True): see :class:`dinoreg_core.features.extract.ExtractConfig`.
* Spacing awareness (:func:`spacing_aware_input`): ``spacing_mm`` — the image's voxel size (mm; one number or
  three, "2" or "2,2,3"); ``spacing_aware`` (default False, :data:`DEFAULT_SPACING_AWARE`) — when it is on, the
  image spacing is known and the weights record the spacing they were trained at (``train_spacing_mm`` in ``X.json``, else
  ``provenance.pretrain_config.spacing_mm``; ``options['train_spacing_mm']`` overrides both), the normalised
  image is resampled (trilinear, extent onto extent) to that spacing, rounded up to whole patches, before the
  backbone runs. The token grid then covers the image's extent, so the pipeline's trilinear upsampling
  (``align_corners=False``) maps it back onto the image grid. Without ``spacing_mm``, or with
  ``spacing_aware`` off (the default: it lowered Dice on 2 mm protocol pairs), the image meets the model at its own
  voxel size.
* ``cache_dir``: a folder for the on-disk feature cache (:mod:`dinoreg_core.features.cache`): features are
  keyed by the image content, the weights file (path, size, mtime), the options and the training spacing,
  and loaded instead of recomputed on a hit.

The image is the (1,1,D,H,W) intensity volume normalised to [0,1]; the modality is not used (one backbone for
CT and MR). Loaded models are cached per (weights file, modification time, device), so the fixed and moving
images of a pair share one loaded model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DinoregError
from ..models.checkpoint import checkpoint_paths, load_backbone, read_backbone_meta
from .extract import ExtractConfig, extract_features
from .registry import FeatureMethod, register_feature_method

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "dino3d_demo.safetensors"
AUTHORS_SUFFIXES = (".ckpt", ".pt", ".pth")
_CACHE: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
_CACHE_SIZE = 2
ROUND_TOL = 1e-6  # token counts within this of an integer are not rounded up to the next one


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
    for name in ("window", "blend", "fit", "progress", "amp", "mode", "window_batch"):
        if options.get(name) is not None:
            setattr(e, name, options[name])
    return e


def _spacing3(value, what: str) -> tuple | None:
    """None, 2, "2", "2,2,3", [2, 2, 3] -> (3,) floats > 0 (or None); a clear error otherwise."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            vals = [float(v) for v in value.replace(" ", "").split(",") if v]
        elif isinstance(value, (int, float)):
            vals = [float(value)]
        else:
            vals = [float(v) for v in value]
    except (TypeError, ValueError):
        raise DinoregError(f"dino3d option {what}={value!r} is not a spacing in mm (one number or three).") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(v > 0 and v < float("inf") for v in vals):
        raise DinoregError(f"dino3d option {what}={value!r} must be one or three positive spacings in mm.")
    return tuple(vals)


def train_spacing(weights: Path, options: dict) -> tuple | None:
    """Voxel size (mm, (3,)) the backbone was trained at: ``options['train_spacing_mm']``, else the weights'
    JSON ``train_spacing_mm``, else its ``provenance.pretrain_config.spacing_mm``; None when unknown (authors'
    checkpoints carry no JSON)."""
    if options.get("train_spacing_mm") is not None:
        return _spacing3(options["train_spacing_mm"], "train_spacing_mm")
    if weights.suffix in AUTHORS_SUFFIXES:
        return None
    meta = read_backbone_meta(weights)
    if meta.get("train_spacing_mm") is not None:
        return _spacing3(meta["train_spacing_mm"], f"train_spacing_mm of {weights.with_suffix('.json').name}")
    sp = (meta.get("provenance") or {}).get("pretrain_config", {}).get("spacing_mm")
    return _spacing3(sp, "provenance.pretrain_config.spacing_mm") if sp is not None else None


def spacing_target_size(shape, spacing_mm, train_spacing_mm, patch_size: int) -> tuple:
    """Size (D',H',W') of the image resampled to ``train_spacing_mm``: extent / train spacing, rounded up to a
    whole number (>= 1) of patches per axis, as the plain extraction rounds the image up to whole patches (so
    an image already at the training spacing gets exactly the plain extraction's input)."""
    out = []
    for n, s, t in zip(shape, spacing_mm, train_spacing_mm):
        tokens = max(1, math.ceil(n * s / (t * patch_size) - ROUND_TOL))
        out.append(tokens * patch_size)
    return tuple(out)


# Off by default: on the 2 mm evaluation protocol (v4 weights trained at 3 mm, 10 pairs per task) resampling to the
# training spacing lowered Dice on CT-CT from 0.585 to 0.541 (paired Wilcoxon p 0.002) and on MR-MR from 0.516 to
# 0.480 (p 0.0098; results/protocol/2mm/versus_untagged.md).
DEFAULT_SPACING_AWARE = False


def spacing_aware(options: dict) -> bool:
    """Whether ``options`` ask for spacing-aware extraction (``spacing_aware``: bool or "true"/"false"/"1"/"0"/...;
    default :data:`DEFAULT_SPACING_AWARE`)."""
    aware = options.get("spacing_aware")
    if aware is None:
        return DEFAULT_SPACING_AWARE
    if isinstance(aware, str):
        return aware.strip().lower() not in ("false", "0", "no", "off")
    return bool(aware)


def spacing_aware_input(image: torch.Tensor, options: dict, weights: Path, patch_size: int) -> torch.Tensor:
    """The backbone input: ``image`` (1,1,D,H,W) resampled to the training spacing when spacing-aware (see the
    module docstring), else ``image`` itself."""
    spacing = _spacing3(options.get("spacing_mm"), "spacing_mm")
    if not spacing_aware(options) or spacing is None:
        return image
    train = train_spacing(weights, options)
    if train is None:
        return image
    size = spacing_target_size(image.shape[2:], spacing, train, patch_size)
    if size == tuple(image.shape[2:]):
        return image
    return F.interpolate(image, size=size, mode="trilinear", align_corners=False)


def dino3d_features(image: torch.Tensor, *, modality: str = "ct", device=None, options=None) -> torch.Tensor:
    """Dense DINO features (1, C, d, h, w) float32 on ``device`` (see module docstring): d = ceil(D/p) etc., or,
    spacing-aware, the token grid of the image resampled to the training spacing (same extent)."""
    options = dict(options or {})
    device = torch.device(device) if device is not None else image.device
    weights = resolve_weights(options)

    def compute() -> torch.Tensor:
        model = load_cached(weights, device)
        x = spacing_aware_input(image.to(device, torch.float32), options, weights, model.cfg.patch_size)
        return extract_features(model, x, extract_config(options), device=device)

    if not options.get("cache_dir"):
        return compute()
    from .cache import FeatureCache

    keyed = {**options, "weights": str(weights), "train_spacing_mm": train_spacing(weights, options),
             "spacing_aware": spacing_aware(options)}
    return FeatureCache(options["cache_dir"]).get_or_compute(image, compute, method="dino3d", modality=modality,
                                                             weights=weights, options=keyed, device=device)


register_feature_method(FeatureMethod(
    "dino3d", dino3d_features, joint_pca=True,
    description="dense features of a DINO/iBOT-pretrained 3D ViT (patch 4), joint PCA to pca_dim channels"))
