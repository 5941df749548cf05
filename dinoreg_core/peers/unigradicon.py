"""The ``unigradicon`` peer: the uniGradICON foundation model (Tian et al.), when its package and weights are local.

Nothing is downloaded: uniGradICON fetches its weights from the internet when no weights location is given, so
this adapter always passes one and stops with a clear message when the file is missing. Provide:

* the package, in its own environment (``pip install unigradicon`` pulls a CUDA torch 2.14 through torchvision
  unless ``torchvision==0.28.0`` and a torch 2.13 build are pinned; never into the project's environment)::

      python -m venv .venv-ugi && .venv-ugi/bin/pip install torch==2.13.0 torchvision==0.28.0 unigradicon

  then ``DINOREG_UNIGRADICON_PYTHON=.venv-ugi/bin/python`` (or install it into ``.venv-peers``);
* the weights ``Step_2_final.trch`` of the uniGradICON 1.0 release (the file the package would download), at
  ``options["weights"]``, ``$DINOREG_UNIGRADICON_WEIGHTS`` or ``dinoreg_core/weights/unigradicon/Step_2_final.trch``.

What runs (:mod:`.unigradicon_worker`, in that environment): the package's documented path — model from its zoo,
its own intensity preprocessing (CT [-1000, 1000] HU, MR min..99th percentile, to [0, 1]), then
``icon_registration.itk_wrapper.register_pair(net, moving, fixed)`` on the raw volumes (it resamples both to the
network's fixed 175^3 input). Its transform ``phi_AB`` (fixed -> moving physical points) is evaluated on the fixed
grid and expressed in fixed voxels. The network (70.7 M parameters) takes about 26 s per forward pass on 2 CPU
cores, and register_pair runs it in both directions; instance optimisation (``io_iterations``, the package's
command-line default is 50) multiplies that by about 3 per step, so it is off by default on CPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import settings
from ..errors import DinoregError
from . import RegistrationMethod, RegistrationOutput, check_same_grid, register_registration_method
from ._worker import find_python, run_worker

WORKER = Path(__file__).resolve().parent / "workers" / "unigradicon_worker.py"
ENV_PYTHON = "DINOREG_UNIGRADICON_PYTHON"
ENV_WEIGHTS = "DINOREG_UNIGRADICON_WEIGHTS"
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "unigradicon" / "Step_2_final.trch"


@dataclass
class UniGradICONConfig:
    """Settings of the uniGradICON peer."""

    weights: str | None = None  # Step_2_final.trch; None: $DINOREG_UNIGRADICON_WEIGHTS, then DEFAULT_WEIGHTS
    model: str = "unigradicon"  # unigradicon | multigradicon (weights must match)
    io_iterations: int | None = None  # instance-optimisation steps (None: none; the package CLI default is 50)
    io_lr: float = 2e-5  # instance-optimisation learning rate (package default)
    io_sim: str = "lncc"  # similarity of instance optimisation: lncc | lncc2 | mind
    threads: int = 2
    timeout_s: float | None = None
    seed: int = 0

    @classmethod
    def from_options(cls, options: dict | None) -> "UniGradICONConfig":
        settings.check_keys(options, cls, what="unigradicon")
        return settings.from_dict(cls, options, prefix="unigradicon.")


def weights_path(cfg: UniGradICONConfig) -> Path:
    """The weights file to use, or a :class:`DinoregError` saying how to provide it."""
    w = cfg.weights or os.environ.get(ENV_WEIGHTS)
    p = Path(w).expanduser() if w else DEFAULT_WEIGHTS
    if not p.is_file():
        raise DinoregError(
            f"The unigradicon method needs the uniGradICON weights file {p}, which does not exist, and they are "
            f"never downloaded here: copy Step_2_final.trch of the uniGradICON 1.0 release there, set {ENV_WEIGHTS}, "
            f"or pass options={{'weights': PATH}}.")
    return p


def unigradicon_python() -> str:
    """The interpreter that imports unigradicon (and itk), or a :class:`DinoregError` saying how to provide one."""
    py, tried = find_python("unigradicon", ENV_PYTHON, probe=(str(WORKER), "--probe"))
    if py is None:
        raise DinoregError(
            f"The unigradicon method needs the unigradicon package, which none of {', '.join(tried)} can import: "
            f"install it in its own environment with torch pinned (python -m venv .venv-ugi && .venv-ugi/bin/pip "
            f"install torch==2.13.0 torchvision==0.28.0 unigradicon) and set {ENV_PYTHON}=.venv-ugi/bin/python.")
    return py


def check(options: dict | None = None) -> str | None:
    """None when package and weights are present, else the one-sentence reason (weights are checked first)."""
    try:
        cfg = UniGradICONConfig.from_options(options)
        weights_path(cfg)
        unigradicon_python()
    except DinoregError as e:
        return str(e)
    return None


def run(fixed, moving, *, fixed_modality: str, moving_modality: str, device=torch.device("cpu"),
             options: dict | None = None) -> RegistrationOutput:
    """uniGradICON of ``moving`` to ``fixed`` (one grid, raw intensities) -> (1,3,D,H,W) fixed-voxel displacement."""
    check_same_grid(fixed, moving, "unigradicon")
    cfg = UniGradICONConfig.from_options(options)
    weights = weights_path(cfg)
    py = unigradicon_python()
    mods = {"ct": "ct", "mr": "mri"}
    settings = asdict(cfg)
    settings.update(weights=str(weights), fixed_modality=mods[fixed_modality], moving_modality=mods[moving_modality],
                    device=str(device))
    arrays = {"fixed": np.asarray(fixed.array, np.float32), "moving": np.asarray(moving.array, np.float32),
              "affine": np.asarray(fixed.affine)}
    t = time.perf_counter()
    out, info = run_worker(py, WORKER, arrays, {"settings": settings}, what="uniGradICON registration",
                           threads=cfg.threads, timeout_s=cfg.timeout_s)
    settings["python"] = py
    settings["torchvision_stub"] = info.get("torchvision_stub")
    timings = {"load_s": info.get("load_s"), "registration_s": info.get("registration_s"),
               "worker_total_s": time.perf_counter() - t, "worker_peak_rss_mb": info.get("peak_rss_mb")}
    return RegistrationOutput(torch.from_numpy(out["disp"]).float()[None], settings, timings)


register_registration_method(RegistrationMethod(
    "unigradicon", run, check, "peer", "uniGradICON foundation model (needs local package and weights)",
    options=UniGradICONConfig))
