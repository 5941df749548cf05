"""The values of stage 2: :class:`RegistrationMethod` (what the registry holds), :class:`RegistrationOutput`
(what a method's ``run`` returns on one grid) and :class:`Displacement` (a field on an aligned pair's fixed grid).

See :mod:`dinoreg_core.pipeline.methods` for the registry and the method interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

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
