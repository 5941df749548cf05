"""The ``dinov2`` feature method: slice-wise 2D DINOv2 features stacked to 3D (a baseline).

The model, the weight-key mapping and the slicing live in :mod:`dinoreg_core.models.dinov2_slices`; this module
only registers its extractor, so ``models/`` never reaches up into ``features/``.
"""

from __future__ import annotations

from ..models.dinov2_slices import Dinov2SliceConfig, extract_dinov2_features
from .registry import FeatureMethod, register_feature_method

register_feature_method(FeatureMethod(
    "dinov2", extract_dinov2_features, joint_pca=True,
    description="2D DINOv2 (natural images) applied slice by slice, patch tokens stacked to 3D (baseline)",
    options=Dinov2SliceConfig))
