"""Stage 2: the one registry of registration methods, and :func:`register_pair` (an aligned pair -> a field).

A registration method registers a fixed and a moving scan that share one grid and returns a displacement in the
project's convention. Two kinds, one interface:

* ``features`` — every extractor of :mod:`dinoreg_core.features.registry` (``intensity``, ``mind``, ``dino3d``,
  ``dinov2``, and any registered later): features -> joint PCA -> our ConvexAdam (:mod:`.feature_path`);
  options :class:`~dinoreg_core.pipeline.feature_path.FeaturePathOptions`.
* ``peer`` — established outside tools (:mod:`dinoreg_core.peers`: ``ants``, ``convexadam_official``,
  ``unigradicon``), each with its own options dataclass.

Each :class:`RegistrationMethod` has ``options`` (its dataclass), ``check(options) -> None | str`` (None when it can
run here, else one sentence saying what is missing) and ``run(fixed, moving, *, fixed_modality, moving_modality,
device, options) -> RegistrationOutput`` on two :class:`~dinoreg_core.io.Volume` of one grid (raw intensities; the
method normalises as it needs). :meth:`RegistrationMethod.register` runs it on an
:class:`~dinoreg_core.pipeline.align.AlignedPair`: on the covered box, the field extended outside by replicating
its border values, returned as a :class:`Displacement`.
"""

from __future__ import annotations

import importlib

from ..errors import DinoregError
from ..features.registry import available_feature_methods, get_feature_method
from .displacement import Displacement, RegistrationMethod, RegistrationOutput, embed, zero_displacement
from .feature_path import feature_registration_method

__all__ = ["Displacement", "RegistrationMethod", "RegistrationOutput", "embed", "zero_displacement",
           "register_registration_method", "available_registration_methods", "get_registration_method",
           "method_status"]


_REGISTRY: dict[str, RegistrationMethod] = {}

# peer name -> module that registers it on import
_PEERS: dict[str, str] = {
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
    return sorted(set(available_feature_methods()) | set(_PEERS) | set(_REGISTRY))


def get_registration_method(name: str) -> RegistrationMethod:
    """Look a method up by name; raises :class:`DinoregError` naming the known ones if unknown."""
    if name not in _REGISTRY and name in _PEERS:
        importlib.import_module(_PEERS[name])
    if name not in _REGISTRY and name in available_feature_methods():
        get_feature_method(name)
        register_registration_method(feature_registration_method(name))
    if name not in _REGISTRY:
        raise DinoregError(f"Unknown registration method '{name}'; known: {', '.join(available_registration_methods())}.")
    return _REGISTRY[name]


def method_status(methods, options: dict | None = None) -> dict[str, str | None]:
    """For each method: None when it can run here, else one sentence why not (``options``: {method: options})."""
    out = {}
    for m in methods:
        try:
            why = get_registration_method(m).check(dict((options or {}).get(m, {})))
        except (DinoregError, ImportError) as e:
            why = str(e)
        out[m] = " ".join(why.split()) if why else None
    return out
