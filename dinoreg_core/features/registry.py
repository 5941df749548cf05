"""One registry from a method name to a dense feature extractor.

The CLI (``--features NAME``), the Python API, the notebooks and the benchmarks all look methods up here,
so they run the same code path.

A feature extractor is a callable::

    extract(image, *, modality, device, options) -> features

    image:    torch.float32 (1,1,D,H,W), intensities normalised by
              :func:`dinoreg_core.preprocess.normalize_intensity` (roughly [0,1]).
    modality: "ct" or "mr".
    device:   torch.device to compute on.
    options:  dict of method-specific options (e.g. {"weights": path}), checked against the method's declared
              options dataclass by :func:`checked_options` (unknown keys and wrong types are errors).
    features: torch.float32 (1,C,d,h,w) on ``device``; d,h,w may be coarser than D,H,W (the pipeline
              upsamples trilinearly to the image grid).

If ``joint_pca`` is true the pipeline reduces fixed and moving features to ``pca_dim`` channels with one
basis fitted on both (:func:`dinoreg_core.features.pca.joint_project`).

This is the table of *extractors*. The one registry of *registration methods*
(:mod:`dinoreg_core.pipeline.methods`) turns every extractor into a registration method (features -> PCA ->
ConvexAdam), beside the peers.

Built-in methods are imported lazily from the modules listed in ``_BUILTIN``; each such module calls
:func:`register_feature_method` at import time. Their options dataclasses are in ``_BUILTIN_OPTIONS``.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Callable

from .. import settings
from ..errors import DinoregError


@dataclass(frozen=True)
class FeatureMethod:
    """A named dense feature extractor (see the module docstring for the call signature)."""

    name: str
    extract: Callable
    joint_pca: bool
    description: str
    options: type | None = None  # dataclass of the method's options (None: not declared, keys not checked)


_REGISTRY: dict[str, FeatureMethod] = {}

# method name -> module that registers it on import
_BUILTIN: dict[str, str] = {
    "intensity": "dinoreg_core.features.intensity",
    "mind": "dinoreg_core.features.mind",
    "dinov2": "dinoreg_core.features.dinov2",
    "dino3d": "dinoreg_core.features.dino3d",
    "dino3d+mind": "dinoreg_core.features.hybrid",
    "dinov2+mind": "dinoreg_core.features.hybrid",
}


# method name -> "module:class" of its options dataclass
_BUILTIN_OPTIONS: dict[str, str] = {
    "intensity": "dinoreg_core.features.options:IntensityOptions",
    "mind": "dinoreg_core.features.options:MindOptions",
    "dinov2": "dinoreg_core.models.dinov2_slices:Dinov2SliceConfig",
    "dino3d": "dinoreg_core.features.options:Dino3DOptions",
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


def options_class(name: str) -> type | None:
    """The options dataclass of feature method ``name`` (None when the method declares none)."""
    method = get_feature_method(name)
    if method.options is not None:
        return method.options
    spec = _BUILTIN_OPTIONS.get(name)
    if spec is None:
        return None
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def checked_options(name: str, options: dict | None) -> dict:
    """``options`` of feature method ``name`` checked against its dataclass: unknown keys and wrong types raise
    :class:`DinoregError`; returns the given entries converted to their declared types (nothing added)."""
    opts = dict(options or {})
    cls = options_class(name)
    if cls is None:
        return opts
    settings.check_keys(opts, cls, what=f"{name} feature")
    converted = asdict(settings.from_dict(cls, opts, prefix="feat."))
    return {k: converted[k] for k in opts}
