"""The project's own path as registration methods: ``intensity``, ``mind``, ``dino3d``, ``dinov2``.

Each is features (:mod:`dinoreg_core.features.registry`) -> joint PCA (when the method asks for it) -> our
ConvexAdam, exactly as :func:`dinoreg_core.api.register` runs it (same :func:`dinoreg_core.api.compute_features`,
same :class:`dinoreg_core.api.RegisterConfig`), but on two volumes that already share a grid.

Options: :class:`RegisterConfig` settings by name, as the CLI's ``--set`` (``grid_sp``, ``disp_hw``,
``lambda_weight``, ``iterations``, ``pca_dim``, ``seed``, ``feat.weights``, ``feat.mind_r``, ...).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch

from ..api import RegisterConfig, compute_features
from ..errors import DinoregError
from ..preprocess import normalize_intensity
from ..registration.convex_adam import ConvexAdamTimings, convex_adam
from . import RegistrationMethod, RegistrationOutput, check_same_grid, register_registration_method

FEATURE_METHODS = ("intensity", "mind", "dino3d", "dinov2")


def make_config(features: str, options: dict | None) -> RegisterConfig:
    """A :class:`RegisterConfig` for ``features`` with ``options`` applied by name (values as in ``--set``)."""
    cfg = RegisterConfig(features=features)
    for k, v in (options or {}).items():
        if isinstance(v, dict) and k in ("feature_options", "feat"):
            cfg.feature_options.update(v)
        else:
            cfg.set(str(k), str(v) if not isinstance(v, (list, tuple)) else ",".join(map(str, v)))
    cfg.convex.validate()
    return cfg


def _register(features: str):
    def register(fixed, moving, *, fixed_modality: str, moving_modality: str, device=torch.device("cpu"),
                 options: dict | None = None) -> RegistrationOutput:
        """Features + ConvexAdam on one grid -> (1,3,D,H,W) fixed-voxel displacement."""
        check_same_grid(fixed, moving, features)
        cfg = make_config(features, options)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        t = time.perf_counter()
        fn = normalize_intensity(fixed.array, fixed_modality)
        mn = normalize_intensity(moving.array, moving_modality)
        ff, mf = compute_features(features, fn, mn, fixed_modality=fixed_modality, moving_modality=moving_modality,
                                  device=torch.device(device), pca_dim=cfg.pca_dim, options=cfg.feature_options,
                                  seed=cfg.seed)
        t_feat = time.perf_counter() - t
        t = time.perf_counter()
        ct = ConvexAdamTimings()
        disp = convex_adam(ff, mf, cfg.convex, ct)
        t_reg = time.perf_counter() - t
        settings = asdict(cfg)
        settings.pop("device", None)
        settings.update(fixed_modality=fixed_modality, moving_modality=moving_modality)
        return RegistrationOutput(disp.float().cpu(), settings, {"features_s": t_feat, "convex_adam_s": t_reg})

    return register


def _check(features: str):
    def check(options: dict | None = None) -> str | None:
        """None when the feature method can run (weights found), else the one-sentence reason."""
        cfg = make_config(features, options)
        try:
            if features == "dino3d":
                from ..features.dino3d import resolve_weights

                resolve_weights(cfg.feature_options)
            elif features == "dinov2":
                from ..models.dinov2_slices import Dinov2SliceConfig, load_backbone

                load_backbone(Dinov2SliceConfig.from_options(cfg.feature_options))
        except DinoregError as e:
            return str(e)
        return None

    return check


_DESCRIPTIONS = {
    "intensity": "normalised intensities + our ConvexAdam",
    "mind": "MIND-SSC features + our ConvexAdam",
    "dino3d": "3D DINO ViT features (joint PCA) + our ConvexAdam",
    "dinov2": "2D DINOv2 slice features (joint PCA) + our ConvexAdam",
}

for _name in FEATURE_METHODS:
    register_registration_method(RegistrationMethod(_name, _register(_name), _check(_name), "features",
                                                    _DESCRIPTIONS[_name]))
