"""One registry from a method name to a *registration* method: the project's feature-based path and peers.

Every method registers a fixed and a moving scan that already share one grid and returns a displacement in the
project's convention, so benchmarks compare them on equal terms::

    method = get_registration_method("ants")
    reason = method.check(options)          # None when usable, else one sentence saying what is missing
    out = method.register(fixed, moving, fixed_modality="ct", moving_modality="mr", device=torch.device("cpu"),
                          options={...})

    fixed, moving: :class:`dinoreg_core.io.Volume` on the *same* grid (same shape and affine), raw intensities
                   (CT in HU, MR in scanner units); each method normalises them as it needs.
    out:           :class:`RegistrationOutput` with ``displacement`` (1,3,D,H,W) float32 torch tensor in voxels of
                   the fixed grid, channel c = array axis c, backward: ``warped(x) = moving(x + u(x))``; and the
                   resolved ``settings`` (a JSON-compatible dict) and ``timings`` (seconds).

Methods (built-in, imported lazily):

* ``intensity``, ``mind``, ``dino3d``, ``dinov2`` — the project's path: features (:mod:`dinoreg_core.features`),
  joint PCA, our ConvexAdam (:mod:`.features_path`). Options are :class:`dinoreg_core.api.RegisterConfig`
  settings by name (``grid_sp``, ``lambda_weight``, ``feat.weights``, ...).
* ``ants`` — ANTs SyN after an affine stage through antspyx (:mod:`.ants`), run in a separate Python.
* ``convexadam_official`` — the official ``convexadam`` package with MIND-SSC (:mod:`.convexadam_official`).
* ``unigradicon`` — the uniGradICON foundation model when its package and weights are present (:mod:`.unigradicon`).

Peers need the optional extra ``pip install 'dinoreg[peers]'`` (antspyx goes into its own environment, see
:mod:`.ants`); a missing package or weights file gives a one-sentence :class:`DinoregError` from ``check`` and
``register``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import DinoregError


@dataclass
class RegistrationOutput:
    """What a registration method returns (see the module docstring)."""

    displacement: torch.Tensor  # (1,3,D,H,W) float32, fixed voxels, backward
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RegistrationMethod:
    """A named registration method.

    Attributes:
        name: registry name.
        register: ``register(fixed, moving, *, fixed_modality, moving_modality, device, options) -> RegistrationOutput``.
        check: ``check(options) -> None | str``: None when the method can run, else why not (one sentence).
        kind: "features" (the project's feature + ConvexAdam path) or "peer" (an established outside tool).
        description: one line.
    """

    name: str
    register: Callable
    check: Callable
    kind: str
    description: str


_REGISTRY: dict[str, RegistrationMethod] = {}

# method name -> module that registers it on import
_BUILTIN: dict[str, str] = {
    "intensity": "dinoreg_core.peers.features_path",
    "mind": "dinoreg_core.peers.features_path",
    "dino3d": "dinoreg_core.peers.features_path",
    "dinov2": "dinoreg_core.peers.features_path",
    "ants": "dinoreg_core.peers.ants",
    "convexadam_official": "dinoreg_core.peers.convexadam_official",
    "unigradicon": "dinoreg_core.peers.unigradicon",
}


def register_registration_method(method: RegistrationMethod) -> RegistrationMethod:
    """Add ``method`` to the registry (replacing a method of the same name)."""
    _REGISTRY[method.name] = method
    return method


def available_registration_methods() -> list[str]:
    """Names of all methods that can be looked up (whether or not their packages/weights are present)."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_registration_method(name: str) -> RegistrationMethod:
    """Look a method up by name; raises :class:`DinoregError` naming the known ones if unknown."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise DinoregError(f"Unknown registration method '{name}'; known: {', '.join(available_registration_methods())}.")
    return _REGISTRY[name]


def check_same_grid(fixed, moving, method: str) -> None:
    """Raise :class:`DinoregError` unless the two volumes share shape and affine (peers work on one grid)."""
    import numpy as np

    if tuple(fixed.shape) != tuple(moving.shape) or not np.allclose(fixed.affine, moving.affine, atol=1e-3):
        raise DinoregError(f"The {method} method needs the moving scan resampled onto the fixed grid first "
                           f"(got shapes {tuple(moving.shape)} and {tuple(fixed.shape)} or different affines).")
