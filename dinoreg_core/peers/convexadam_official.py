"""The ``convexadam_official`` peer: the official ConvexAdam package (PyPI ``convexadam`` 0.2.0) with MIND-SSC.

Calls ``convexAdam.convex_adam_MIND.convex_adam_pt(img_fixed, img_moving, mind_r, mind_d, lambda_weight, grid_sp,
disp_hw, selected_niter, selected_smooth, grid_sp_adam, ic, use_mask=False, device=...)`` on the two normalised
images (:func:`dinoreg_core.preprocess.normalize_intensity`; both on one grid, as the package requires). It returns
a (D,H,W,3) float64 field in voxels of that grid, backward, channel k = array axis k — our convention up to the
axis order, so the conversion is a transpose.

One adaptation: the package silently drops the voxels beyond the last multiple of ``grid_sp`` / ``grid_sp_adam``
(its coarse grids use ``D // grid_sp``) and then stretches the coarse field over the whole volume, which misplaces
it slightly. The images are therefore padded (edge values) to a multiple of lcm(grid_sp, grid_sp_adam) before the
call and the field is cropped back; on sizes that already are multiples nothing changes.

Options: the package's own argument names (defaults = the package defaults, DESIGN.md section 4):
``mind_r=1, mind_d=2, lambda_weight=1.25, grid_sp=6, disp_hw=4, selected_niter=80, selected_smooth=0,
grid_sp_adam=2, ic=True``, plus ``pad`` (True: the padding above).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io as _io
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import settings
from ..errors import DinoregError
from ..preprocess import normalize_intensity
from . import RegistrationMethod, RegistrationOutput, check_same_grid, register_registration_method


@dataclass
class OfficialConvexAdamConfig:
    """Arguments of ``convex_adam_pt`` (package defaults) and the padding switch."""

    mind_r: int = 1
    mind_d: int = 2
    lambda_weight: float = 1.25
    grid_sp: int = 6
    disp_hw: int = 4
    selected_niter: int = 80
    selected_smooth: int = 0
    grid_sp_adam: int = 2
    ic: bool = True
    pad: bool = True  # pad to a multiple of lcm(grid_sp, grid_sp_adam) (edge values), crop the field back

    @classmethod
    def from_options(cls, options: dict | None) -> "OfficialConvexAdamConfig":
        settings.check_keys(options, cls, what="convexadam_official")
        return settings.from_dict(cls, options, prefix="convexadam_official.")


def _missing() -> str | None:
    if importlib.util.find_spec("convexAdam") is None:
        return ("The convexadam_official method needs the official ConvexAdam package, which is not installed: "
                "pip install convexadam==0.2.0 (or pip install 'dinoreg[peers]').")
    return None


def check(options: dict | None = None) -> str | None:
    """None when the package is importable, else the one-sentence reason."""
    try:
        OfficialConvexAdamConfig.from_options(options)
    except DinoregError as e:
        return str(e)
    return _missing()


def official_field(fixed: np.ndarray, moving: np.ndarray, cfg: OfficialConvexAdamConfig,
                   device=torch.device("cpu")) -> torch.Tensor:
    """Run the package on two (D,H,W) normalised images on one grid -> (1,3,D,H,W) float32 voxel displacement."""
    reason = _missing()
    if reason:
        raise DinoregError(reason)
    from convexAdam.convex_adam_MIND import convex_adam_pt

    shape = fixed.shape
    pads = [(0, 0)] * 3
    if cfg.pad:
        m = cfg.grid_sp * cfg.grid_sp_adam // math.gcd(cfg.grid_sp, cfg.grid_sp_adam)
        pads = [(0, (-s) % m) for s in shape]
        fixed, moving = np.pad(fixed, pads, mode="edge"), np.pad(moving, pads, mode="edge")
    kw = {k: v for k, v in asdict(cfg).items() if k != "pad"}
    with contextlib.redirect_stdout(_io.StringIO()):  # it prints a float16-on-CPU warning
        d = convex_adam_pt(torch.from_numpy(np.ascontiguousarray(fixed, np.float32)),
                           torch.from_numpy(np.ascontiguousarray(moving, np.float32)), device=torch.device(device), **kw)
    d = d[: shape[0], : shape[1], : shape[2]]
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(d, -1, 0), dtype=np.float32))[None]


def run(fixed, moving, *, fixed_modality: str, moving_modality: str, device=torch.device("cpu"),
             options: dict | None = None) -> RegistrationOutput:
    """Official ConvexAdam + MIND of ``moving`` to ``fixed`` (one grid) -> (1,3,D,H,W) fixed-voxel displacement."""
    check_same_grid(fixed, moving, "convexadam_official")
    cfg = OfficialConvexAdamConfig.from_options(options)
    fn = normalize_intensity(fixed.array, fixed_modality)
    mn = normalize_intensity(moving.array, moving_modality)
    t = time.perf_counter()
    disp = official_field(fn, mn, cfg, device)
    settings = asdict(cfg)
    try:
        from importlib.metadata import version

        settings["package_version"] = version("convexAdam")
    except Exception:  # noqa: BLE001 - the version is informative only
        settings["package_version"] = None
    return RegistrationOutput(disp, settings, {"registration_s": time.perf_counter() - t})


register_registration_method(RegistrationMethod(
    "convexadam_official", run, check, "peer", "official ConvexAdam package (convexadam 0.2.0) with MIND-SSC",
    options=OfficialConvexAdamConfig))
