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

from ..errors import DinoregError
from ..features.registry import available_feature_methods
from ..lazy_registry import LazyRegistry
from .displacement import Displacement, RegistrationMethod, RegistrationOutput, embed, zero_displacement
from .feature_path import feature_registration_method

__all__ = ["Displacement", "RegistrationMethod", "RegistrationOutput", "embed", "zero_displacement",
           "register_registration_method", "available_registration_methods", "get_registration_method",
           "method_status"]


# peer name -> module that registers it on import; every feature method is a registration method too
_PEERS: dict[str, str] = {
    "ants": "dinoreg_core.peers.ants",
    "convexadam_official": "dinoreg_core.peers.convexadam_official",
    "unigradicon": "dinoreg_core.peers.unigradicon",
}
_REGISTRY = LazyRegistry("registration method", _PEERS, extra_names=available_feature_methods,
                         make=feature_registration_method)


def register_registration_method(method: RegistrationMethod) -> RegistrationMethod:
    """Add ``method`` to the registry (replacing a method of the same name)."""
    return _REGISTRY.add(method)


def available_registration_methods() -> list[str]:
    """Names of all methods that can be looked up (whether or not their packages/weights are present)."""
    return _REGISTRY.names()


def get_registration_method(name: str) -> RegistrationMethod:
    """Look a method up by name; raises :class:`DinoregError` naming the known ones if unknown."""
    return _REGISTRY.get(name)


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
