"""Peers: established registration tools as registration methods of the one registry
(:mod:`dinoreg_core.pipeline.methods`), so benchmarks compare them with the project's path on equal terms.

* ``ants`` — ANTs SyN after an affine stage through antspyx (:mod:`.ants`), run in a separate Python.
* ``convexadam_official`` — the official ``convexadam`` package with MIND-SSC (:mod:`.convexadam_official`).
* ``unigradicon`` — the uniGradICON foundation model when its package and weights are present (:mod:`.unigradicon`).

Each peer module defines ``run(fixed, moving, *, fixed_modality, moving_modality, device, options)`` on two
:class:`~dinoreg_core.io.Volume` of one grid, ``check(options)`` and its options dataclass, and registers them at
import. Use them through the registry::

    from dinoreg_core.pipeline import align, get_registration_method
    disp = get_registration_method("ants").register(align(fixed, moving), {"preset": "fast"})

Peers need the optional extra ``pip install 'dinoreg[peers]'`` (antspyx goes into its own environment, see
:mod:`.ants`); a missing package or weights file gives a one-sentence :class:`DinoregError` from ``check`` and
``register``. The names below are re-exported from :mod:`dinoreg_core.pipeline.methods` for older callers.
"""

from __future__ import annotations

from .. import io
from ..errors import DinoregError
from ..pipeline.methods import (RegistrationMethod, RegistrationOutput, available_registration_methods,
                                get_registration_method, register_registration_method)

__all__ = ["RegistrationMethod", "RegistrationOutput", "available_registration_methods", "get_registration_method",
           "register_registration_method", "check_same_grid"]


def check_same_grid(fixed, moving, method: str) -> None:
    """Raise :class:`DinoregError` unless the two volumes share shape and affine (a method's ``run`` works on one
    grid; :meth:`RegistrationMethod.register` of an aligned pair always satisfies this)."""
    if not io.same_grid(fixed, moving):
        raise DinoregError(f"The {method} method needs the moving scan resampled onto the fixed grid first "
                           f"(got shapes {tuple(moving.shape)} and {tuple(fixed.shape)} or different affines).")
