"""The ``ants`` peer: ANTs SyN (after an affine stage) through antspyx, converted to our displacement convention.

Where antspyx runs. antspyx 0.6.3 pins numpy < 2.4 and scipy < 1.16; installing it into the project's environment
would downgrade numpy 2.4 / scipy 1.17 under every other module. So it is kept in its own environment and run as a
subprocess (:mod:`.ants_worker`, which needs only numpy and ants)::

    python -m venv .venv-peers && .venv-peers/bin/pip install antspyx==0.6.3

The interpreter is ``$DINOREG_ANTS_PYTHON`` when set, else this Python if it imports ``ants``, else
``.venv-peers/bin/python`` in the repository.

What runs. ``ants.registration(fixed, moving, type_of_transform="SyN")``: an affine stage (Mattes MI, antspyx's
fixed 2100x1200x1200x0 schedule on shrink factors 4x2x2x1, initialised by aligning the centres of intensity mass),
then SyN with ``metric`` on shrink factors 2^(n-1)..1 for the n levels of ``reg_iterations``. Inputs are the
project's normalised intensities (CT window / MR percentiles, :func:`dinoreg_core.preprocess.normalize_intensity`)
on the fixed grid, in physical space (spacing respected).

Settings. antspyx's defaults (MI, 40x20x0) barely move abdominal organs (measured here before). ``metric="auto"``
takes CC (radius 2, the local cross-correlation ANTs recommends for same-modality deformable registration) for
CT-CT and Mattes MI (32 bins) for MR-CT, where CC does not apply. Schedules (``preset``):

* ``fast`` (the benchmark default): 100x70x0 — the full-resolution level is skipped, so the SyN field is optimised
  at 1/4 and 1/2 resolution; several times cheaper than ``strong``.
* ``strong``: 100x70x50 — the schedule of ANTs' own scripts, about 350 s for 122x101x112 voxels on 2 cores.
* ``antspy_default``: 40x20x0 with MI — antspyx's defaults, for reference.

``reg_iterations`` (a tuple) overrides the preset's schedule; ``metric`` overrides its metric.

Conversion. :mod:`.ants_worker` evaluates the forward transforms (SyN warp then affine) at every fixed voxel with
``antsApplyTransforms`` (composite displacement field, LPS mm) and expresses the vectors in fixed voxel units.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import settings
from ..errors import DinoregError
from ..preprocess import normalize_intensity
from . import RegistrationMethod, RegistrationOutput, check_same_grid, register_registration_method
from ._worker import find_python, run_worker

WORKER = Path(__file__).resolve().parent / "workers" / "ants_worker.py"
ENV_VAR = "DINOREG_ANTS_PYTHON"

PRESETS = {
    "fast": {"reg_iterations": (100, 70, 0), "metric": "auto"},
    "strong": {"reg_iterations": (100, 70, 50), "metric": "auto"},
    "antspy_default": {"reg_iterations": (40, 20, 0), "metric": "mattes"},
}


@dataclass
class AntsConfig:
    """Settings of the ANTs peer (see the module docstring)."""

    preset: str = "fast"  # fast | strong | antspy_default: the SyN schedule and metric
    type_of_transform: str = "SyN"  # "SyN" = affine stage + SyN; "SyNOnly" skips the affine stage
    metric: str | None = None  # auto | CC | mattes (MI) | meansquares; None: the preset's
    reg_iterations: tuple | None = None  # SyN iterations per level, coarse to fine; None: the preset's
    cc_radius: int = 2  # CC neighbourhood radius (voxels)
    mi_bins: int = 32  # Mattes MI histogram bins
    grad_step: float = 0.2  # SyN gradient step
    flow_sigma: float = 3.0  # smoothing of the update field (voxels)
    total_sigma: float = 0.0  # smoothing of the total field (voxels)
    aff_metric: str = "mattes"  # metric of the affine stage
    aff_sampling: int = 32  # its MI bins
    aff_random_sampling_rate: float = 0.2  # fraction of voxels the affine metric samples
    threads: int = 2  # ITK threads in the worker
    seed: int = 0  # antsRegistration --random-seed
    timeout_s: float | None = None  # stop the worker after this many seconds

    @classmethod
    def from_options(cls, options: dict | None) -> "AntsConfig":
        settings.check_keys(options, cls, what="ants")
        cfg = settings.from_dict(cls, options, prefix="ants.")
        if cfg.preset not in PRESETS:
            raise DinoregError(f"Unknown ants preset '{cfg.preset}'; use one of {', '.join(PRESETS)}.")
        if cfg.type_of_transform not in ("SyN", "SyNOnly"):
            raise DinoregError(f"ants type_of_transform '{cfg.type_of_transform}' is not supported; use SyN or SyNOnly.")
        return cfg

    def resolved(self, fixed_modality: str, moving_modality: str) -> dict:
        """Every setting with the preset and ``metric="auto"`` resolved, as the worker gets it."""
        d = asdict(self)
        p = PRESETS[self.preset]
        d["reg_iterations"] = [int(i) for i in (self.reg_iterations or p["reg_iterations"])]
        metric = self.metric or p["metric"]
        if str(metric).lower() == "auto":
            metric = "CC" if fixed_modality == moving_modality else "mattes"
        if str(metric).lower() not in ("cc", "mattes", "mi", "meansquares", "msq"):
            raise DinoregError(f"Unknown ants metric '{metric}'; use auto, CC, mattes or meansquares.")
        d["metric"] = metric
        d.pop("timeout_s")
        return d


def ants_python() -> str:
    """The interpreter that runs antspyx, or a :class:`DinoregError` saying how to provide one."""
    py, tried = find_python("ants", ENV_VAR)
    if py is None:
        raise DinoregError(
            f"The ants method needs antspyx, which none of {', '.join(tried)} can import: install it in its own "
            f"environment (python -m venv .venv-peers && .venv-peers/bin/pip install antspyx==0.6.3; it would "
            f"downgrade numpy/scipy here) or set {ENV_VAR} to a Python that has it.")
    return py


def check(options: dict | None = None) -> str | None:
    """None when ANTs can run, else the one-sentence reason."""
    try:
        AntsConfig.from_options(options)
        ants_python()
    except DinoregError as e:
        return str(e)
    return None


def run(fixed, moving, *, fixed_modality: str, moving_modality: str, device=torch.device("cpu"),
             options: dict | None = None) -> RegistrationOutput:
    """ANTs affine + SyN of ``moving`` to ``fixed`` (one grid) -> (1,3,D,H,W) fixed-voxel displacement."""
    check_same_grid(fixed, moving, "ants")
    cfg = AntsConfig.from_options(options)
    settings = cfg.resolved(fixed_modality, moving_modality)
    py = ants_python()
    arrays = {"fixed": normalize_intensity(fixed.array, fixed_modality),
              "moving": normalize_intensity(moving.array, moving_modality), "affine": np.asarray(fixed.affine)}
    t = time.perf_counter()
    out, info = run_worker(py, WORKER, arrays, {"mode": "register", "settings": settings}, what="ANTs registration",
                           threads=cfg.threads, timeout_s=cfg.timeout_s)
    total = time.perf_counter() - t
    disp = torch.from_numpy(out["disp"]).float()[None]
    settings["python"] = py
    settings["ants_version"] = info.get("ants_version")
    timings = {"registration_s": info.get("registration_s"), "conversion_s": info.get("conversion_s"),
               "worker_total_s": total, "worker_peak_rss_mb": info.get("peak_rss_mb")}
    return RegistrationOutput(disp, settings, timings)


def transforms_to_displacement(fixed, transforms: list, *, moving=None) -> tuple[torch.Tensor, np.ndarray]:
    """Evaluate ANTs/ITK transform files (fixed -> moving points, as ``fwdtransforms``) on ``fixed``'s grid.

    Returns the (1,3,D,H,W) fixed-voxel displacement and ANTs' own resampling of ``moving`` (default: ``fixed``)
    through the same transforms, for checking the conversion.
    """
    py = ants_python()
    mov = fixed if moving is None else moving
    arrays = {"fixed": np.asarray(fixed.array, np.float32), "moving": np.asarray(mov.array, np.float32),
              "affine": np.asarray(fixed.affine)}
    out, _ = run_worker(py, WORKER, arrays, {"mode": "field", "transforms": [str(p) for p in transforms]},
                        what="ANTs transform evaluation", threads=2)
    return torch.from_numpy(out["disp"]).float()[None], out["warped"]


register_registration_method(RegistrationMethod(
    "ants", run, check, "peer", "ANTs affine + SyN (antspyx), CC for CT-CT / MI for MR-CT",
    options=AntsConfig))
