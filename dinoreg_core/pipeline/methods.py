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
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import DinoregError
from ..features.registry import available_feature_methods, get_feature_method
from .align import AlignedPair


@dataclass
class RegistrationOutput:
    """What a method's ``run`` returns."""

    displacement: torch.Tensor  # (1,3,D,H,W) float32, fixed voxels, backward: warped(x) = moving(x + u(x))
    settings: dict = field(default_factory=dict)  # resolved settings, JSON-compatible
    timings: dict = field(default_factory=dict)  # seconds


@dataclass
class Displacement:
    """Stage 2's value: a field on the whole fixed grid of an :class:`AlignedPair`.

    ``field`` is (1,3,D,H,W) float32 in fixed voxels, channel c = array axis c, backward
    (``warped(x) = moving_on_fixed(x + u(x))``); it was computed on ``box`` and replicates its border outside.
    """

    field: torch.Tensor
    box: tuple
    method: str
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def on_box(self) -> torch.Tensor:
        """The field on the box it was computed on: (1,3,d,h,w), contiguous."""
        (lo, hi) = self.box
        return self.field[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].contiguous()

    def numpy(self):
        """(3,D,H,W) float32 numpy array on the CPU."""
        return self.field[0].cpu().numpy().astype("float32")


@dataclass(frozen=True)
class RegistrationMethod:
    """A named registration method (see the module docstring)."""

    name: str
    run: Callable  # run(fixed, moving, *, fixed_modality, moving_modality, device, options) -> RegistrationOutput
    check: Callable  # check(options) -> None | str
    kind: str  # "features" | "peer"
    description: str
    options: type | None = None  # the options dataclass

    def register(self, pair: AlignedPair, options: dict | None = None, *, device="cpu") -> Displacement:
        """Register ``pair`` on its covered box -> :class:`Displacement` on the whole fixed grid."""
        fixed, moving = pair.cropped()
        out = self.run(fixed, moving, fixed_modality=pair.fixed_modality, moving_modality=pair.moving_modality,
                       device=torch.device(device), options=options)
        return Displacement(embed(out.displacement, pair.box, pair.fixed.shape), tuple(pair.box), self.name,
                            out.settings, out.timings)


def embed(disp: torch.Tensor, box, shape) -> torch.Tensor:
    """Place a (1,3,d,h,w) field computed on ``box`` into the full grid ``shape``, replicating its border outside."""
    lo, hi = box
    if tuple(lo) == (0, 0, 0) and tuple(hi) == tuple(shape):
        return disp
    pads = []
    for a in (2, 1, 0):
        pads += [lo[a], shape[a] - hi[a]]
    return F.pad(disp, pads, mode="replicate")


def zero_displacement(pair: AlignedPair) -> Displacement:
    """The identity (no registration): the reference row ``initial`` of the tables."""
    return Displacement(torch.zeros((1, 3, *pair.fixed.shape)), tuple(pair.box), "initial")


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
        from .feature_path import feature_registration_method

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


def timed_register(method: str, pair: AlignedPair, options: dict | None = None, *, device="cpu") -> Displacement:
    """:meth:`RegistrationMethod.register` of ``method`` with its wall time in ``timings["register_s"]``."""
    t = time.perf_counter()
    disp = get_registration_method(method).register(pair, options, device=device)
    disp.timings["register_s"] = time.perf_counter() - t
    return disp
