"""Hybrid feature methods ``dino3d+mind`` and ``dinov2+mind``: learned PCA channels beside MIND-SSC channels.

For a fixed and a moving image on one grid (both (1,1,D,H,W), normalised to [0,1]) the hybrid features are::

    [ mind_weight * MIND(x) ,  dino_weight * sigma_mind * P(x) ]          (1, 12 + k, D, H, W) each

* ``MIND``: MIND-SSC (``mind_r``, ``mind_d``; 12 channels, full resolution), as the ``mind`` method;
* ``P``: the learned extractor's features (``dino3d`` or ``dinov2``, with its own options), reduced by ONE joint
  PCA of the fixed and moving learned features only (:func:`dinoreg_core.features.pca.joint_project`, ``pca_dim``
  channels, channel 0 at unit standard deviation) and upsampled trilinearly to the image grid;
* ``sigma_mind``: the standard deviation of the MIND channels over both images (pooled over channels), so
  ``dino_weight / mind_weight`` is the ratio of the two parts' scales: with 0.5 the first learned channel has
  half the spread of a MIND channel.

Weights are options (``mind_weight`` default 1, ``dino_weight`` default 0.5; a preset value later); a weight
below 0 (or both 0, or not finite) is a one-sentence :class:`DinoregError`.

Interface. The registry's per-image ``extract(image, ...)`` cannot fit a PCA on both images, and the registry's
``joint_pca`` flag would reduce the whole output (MIND included). So a hybrid is a :class:`PairFeatureMethod`:
a :class:`FeatureMethod` with one more field, ``extract_pair(fixed, moving, *, fixed_modality,
moving_modality, device, options, pca_dim, seed) -> (fixed_features, moving_features)`` returning features
already on the image grid, ready for ConvexAdam. The pipeline calls ``extract_pair`` when a method has it
(:func:`compute_pair_features` is that dispatch); the per-image ``extract`` raises a one-sentence error
saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import DinoregError
from .mind import mind_ssc
from .pca import joint_project
from .registry import FeatureMethod, get_feature_method, register_feature_method

DEFAULT_MIND_WEIGHT = 1.0
DEFAULT_DINO_WEIGHT = 0.5
MIND_OPTIONS = ("mind_r", "mind_d")
HYBRID_OPTIONS = ("mind_weight", "dino_weight") + MIND_OPTIONS


@dataclass(frozen=True)
class PairFeatureMethod(FeatureMethod):
    """A feature method that needs both images at once (see the module docstring)."""

    extract_pair: Callable = None  # type: ignore[assignment]
    learned: str = ""  # registry name of the learned part ("dino3d", "dinov2"); its options pass through


def hybrid_weights(options: dict) -> tuple[float, float]:
    """(mind_weight, dino_weight) from ``options``, validated: finite, >= 0, not both 0."""
    out = []
    for name, default in (("mind_weight", DEFAULT_MIND_WEIGHT), ("dino_weight", DEFAULT_DINO_WEIGHT)):
        v = options.get(name, default)
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise DinoregError(f"The hybrid option {name}={v!r} is not a number.") from None
        if not math.isfinite(v) or v < 0:
            raise DinoregError(f"The hybrid option {name}={v} must be a finite number >= 0.")
        out.append(v)
    if out[0] == 0 and out[1] == 0:
        raise DinoregError("The hybrid options mind_weight and dino_weight are both 0, which leaves no features.")
    return out[0], out[1]


def hybrid_pair(learned: str, fixed: torch.Tensor, moving: torch.Tensor, *, fixed_modality: str = "ct",
                moving_modality: str = "ct", device=None, options: dict | None = None, pca_dim: int = 12,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid features of ``fixed`` and ``moving`` (1,1,D,H,W) on one grid -> (1, 12 + k, D, H, W) float32 each.

    ``learned`` is the registry name of the learned extractor ("dino3d" or "dinov2"); ``options`` holds the
    hybrid options (module docstring) and the learned extractor's options (passed through unchanged).
    """
    opts = dict(options or {})
    w_mind, w_dino = hybrid_weights(opts)
    if tuple(fixed.shape) != tuple(moving.shape):
        raise DinoregError(f"Hybrid features need both images on one grid, got {tuple(fixed.shape)} and "
                           f"{tuple(moving.shape)}.")
    device = torch.device(device) if device is not None else fixed.device
    size = tuple(fixed.shape[2:])
    r, d = int(opts.get("mind_r", 1)), int(opts.get("mind_d", 2))
    with torch.no_grad():
        mf = mind_ssc(fixed.to(device), r, d)
        mm = mind_ssc(moving.to(device), r, d)
        sigma = float(torch.cat([mf, mm], 0).std())
        parts_f, parts_m = [w_mind * mf], [w_mind * mm]
        if w_dino > 0:
            method = get_feature_method(learned)
            lopts = {k: v for k, v in opts.items() if k not in HYBRID_OPTIONS}
            lf = method.extract(fixed.to(device), modality=fixed_modality, device=device, options=lopts)
            lm = method.extract(moving.to(device), modality=moving_modality, device=device, options=lopts)
            pf, pm = joint_project(lf, lm, k=pca_dim, seed=seed)
            pf = F.interpolate(pf, size=size, mode="trilinear", align_corners=False)
            pm = F.interpolate(pm, size=size, mode="trilinear", align_corners=False)
            parts_f.append(w_dino * sigma * pf)
            parts_m.append(w_dino * sigma * pm)
    return torch.cat(parts_f, 1).float(), torch.cat(parts_m, 1).float()


def compute_pair_features(method_name: str, fixed: torch.Tensor, moving: torch.Tensor, **kw):
    """Features of a pair through the registry: ``extract_pair`` when the method has one (hybrids), else the
    per-image ``extract`` on each image plus joint PCA when the method asks for it (what the pipeline does).
    Returns (1,C,d,h,w) each (the pipeline upsamples to the image grid when d,h,w are coarser)."""
    method = get_feature_method(method_name)
    if getattr(method, "extract_pair", None) is not None:
        return method.extract_pair(fixed, moving, **kw)
    opts = kw.get("options") or {}
    ff = method.extract(fixed, modality=kw.get("fixed_modality", "ct"), device=kw.get("device"), options=opts)
    mf = method.extract(moving, modality=kw.get("moving_modality", "ct"), device=kw.get("device"), options=opts)
    if method.joint_pca:
        ff, mf = joint_project(ff, mf, k=kw.get("pca_dim", 12), seed=kw.get("seed", 0))
    return ff, mf


def _per_image_refusal(name: str):
    def extract(image, *, modality="ct", device=None, options=None):
        raise DinoregError(f"The feature method '{name}' needs both images at once (a joint PCA of its learned "
                           "part): call its extract_pair, as the registration pipeline does.")
    return extract


for _learned in ("dino3d", "dinov2"):
    _name = f"{_learned}+mind"
    register_feature_method(PairFeatureMethod(
        _name, _per_image_refusal(_name), joint_pca=False,
        description=f"MIND-SSC (12 ch) beside {_learned} joint-PCA channels, weighted by mind_weight / "
                    "dino_weight (x std of MIND)",
        extract_pair=lambda fixed, moving, _l=_learned, **kw: hybrid_pair(_l, fixed, moving, **kw),
        learned=_learned))
