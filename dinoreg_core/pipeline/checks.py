"""Checks of one registration's settings and volume, run before any work starts (the pipeline's layer).

:func:`check_register_config` — ConvexAdam ranges and caps (:meth:`ConvexAdamConfig.validate`), ``pca_dim``, the
method's feature options (unknown keys refused by the registry, ranges here), and options that do not apply to the
method: ``--weights`` for a method without weights is refused, ``pca_dim`` for a method without joint PCA is warned
about in one line. :func:`check_volume_size` — the registered box against ConvexAdam's grids.
Every check raises :class:`~dinoreg_core.errors.DinoregError` with one sentence naming the value.
"""

from __future__ import annotations

import logging
from dataclasses import fields

from ..errors import DinoregError
from ..features.registry import checked_options, get_feature_method, options_class
from ..validate import in_range
from .config import RegisterConfig
from .feature_path import FeaturePathOptions
from .methods import get_registration_method

log = logging.getLogger("dinoreg")

MAX_PCA_DIM = 256  # joint PCA channels; ConvexAdam's cost grows linearly with them and features rarely exceed 1024
MIND_R_RANGE = (1, 5)  # MIND-SSC patch radius (voxels); the official default 1; 5 already blurs 11^3 patches
MIND_D_RANGE = (1, 8)  # MIND-SSC neighbour dilation (voxels); the official default 2
MIN_AXIS_VOXELS = 8  # every axis of the registered volume: the Learn2Reg SDlogJ crops 2 voxels per side and
#                     the Jacobian needs neighbours, so fewer voxels give undefined field metrics
MIN_COARSE_CELLS = 2  # every axis must span at least this many cells of the coarse grid (grid_sp) and the Adam
#                       grid (grid_sp_adam); a one-cell grid has no displacement to search or regularise


def check_feature_options(method: str, options: dict) -> None:
    """Ranges of the built-in feature options (``feat.NAME``); keys and types are checked by the registry."""
    if method == "mind":
        if "mind_r" in options:
            in_range(options["mind_r"], *MIND_R_RANGE, "feat.mind_r")
        if "mind_d" in options:
            in_range(options["mind_d"], *MIND_D_RANGE, "feat.mind_d")
    elif method == "dino3d":
        if options.get("overlap") is not None:
            in_range(options["overlap"], 0.0, 0.95, "feat.overlap")
        if options.get("memory_budget_gb") is not None:
            in_range(options["memory_budget_gb"], 0.01, 4096.0, "feat.memory_budget_gb")


def check_weights_apply(features: str, weights) -> None:
    """Refuse ``--weights`` for a feature method whose options have no weights (e.g. ``mind``), in one sentence."""
    if get_registration_method(features).kind != "features":
        return
    ocls = options_class(features)
    if ocls is not None and "weights" not in {f.name for f in fields(ocls)}:
        raise DinoregError(f"--weights {weights} applies to learned features (dino3d, dinov2), not to "
                           f"--features {features}.")


def check_register_config(cfg) -> None:
    """Validate a :class:`~dinoreg_core.pipeline.config.RegisterConfig` before anything is loaded or written:
    ConvexAdam ranges, ``pca_dim``, the method's feature options (unknown keys refused), and options that do not
    apply to the method (refused: ``--weights`` for a method without weights; warned in one line: ``pca_dim`` for a
    method without joint PCA)."""
    method = get_registration_method(cfg.features)
    if method.kind != "features":
        return
    cfg.convex.validate()
    in_range(cfg.pca_dim, 1, MAX_PCA_DIM, "pca_dim")
    opts = dict(cfg.feature_options)
    if "weights" in opts:
        check_weights_apply(cfg.features, opts["weights"])
    FeaturePathOptions.parse(cfg.features, cfg.method_options())
    check_feature_options(cfg.features, checked_options(cfg.features, opts))
    default_pca = next(f.default for f in fields(RegisterConfig) if f.name == "pca_dim")
    if cfg.pca_dim != default_pca and not get_feature_method(cfg.features).joint_pca:
        log.warning(f"dinoreg: warning: pca_dim={cfg.pca_dim} does not apply to --features {cfg.features} "
                    f"(no joint PCA); ignored.")


def check_volume_size(shape, convex, what: str) -> None:
    """Raise unless every axis of ``shape`` (D,H,W) holds :data:`MIN_AXIS_VOXELS` voxels and
    :data:`MIN_COARSE_CELLS` cells of ConvexAdam's grids (``convex.grid_sp`` and ``convex.grid_sp_adam``)."""
    need = max(MIN_AXIS_VOXELS, MIN_COARSE_CELLS * int(convex.grid_sp), MIN_COARSE_CELLS * int(convex.grid_sp_adam))
    if min(shape) < need:
        raise DinoregError(f"The {what} has shape {tuple(int(s) for s in shape)}; ConvexAdam with grid_sp="
                           f"{convex.grid_sp} and grid_sp_adam={convex.grid_sp_adam} needs at least {need} voxels "
                           f"per axis.")


