"""One registry from a method name to a dense feature extractor.

The CLI (``--features NAME``), the Python API, the notebooks and the benchmarks all look methods up here,
so they run the same code path.

A feature extractor is a callable::

    extract(image, *, modality, device, options) -> features

    image:    torch.float32 (1,1,D,H,W), intensities normalised by
              :func:`dinoreg_core.preprocess.normalize_intensity` (roughly [0,1]).
    modality: "ct" or "mr".
    device:   torch.device to compute on.
    options:  dict of method-specific options (e.g. {"weights": path}); unknown keys are ignored.
    features: torch.float32 (1,C,d,h,w) on ``device``; d,h,w may be coarser than D,H,W (the pipeline
              upsamples trilinearly to the image grid).

If ``joint_pca`` is true the pipeline reduces fixed and moving features to ``pca_dim`` channels with one
basis fitted on both (:func:`dinoreg_core.features.pca.joint_project`).

Built-in methods are imported lazily from the modules listed in ``_BUILTIN``; each such module calls
:func:`register_feature_method` at import time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..errors import DinoregError


@dataclass(frozen=True)
class FeatureMethod:
    """A named dense feature extractor (see the module docstring for the call signature)."""

    name: str
    extract: Callable
    joint_pca: bool
    description: str


_REGISTRY: dict[str, FeatureMethod] = {}

# method name -> module that registers it on import
_BUILTIN: dict[str, str] = {
    "intensity": "dinoreg_core.features.intensity",
    "mind": "dinoreg_core.features.mind",
    "dinov2": "dinoreg_core.models.dinov2_slices",
    "dino3d": "dinoreg_core.features.dino3d",
    "dino3d+mind": "dinoreg_core.features.hybrid",
    "dinov2+mind": "dinoreg_core.features.hybrid",
}


def register_feature_method(method: FeatureMethod) -> FeatureMethod:
    """Add ``method`` to the registry (replacing a method of the same name)."""
    _REGISTRY[method.name] = method
    return method


def available_feature_methods() -> list[str]:
    """Names of all methods that can be looked up (built-in and registered)."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_feature_method(name: str) -> FeatureMethod:
    """Look a method up by name; raises :class:`DinoregError` naming the available ones if unknown."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise DinoregError(
            f"Unknown feature method '{name}'; available: {', '.join(available_feature_methods())}.")
    return _REGISTRY[name]
