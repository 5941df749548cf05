"""The ``intensity`` method: the normalised image itself as a one-channel feature (SSD on intensities)."""

from __future__ import annotations

import torch

from .registry import FeatureMethod, register_feature_method


def intensity_features(image: torch.Tensor, *, modality: str = "ct", device=None, options=None) -> torch.Tensor:
    """Return the normalised image (1,1,D,H,W) unchanged as features (on ``device``)."""
    return image.to(device or image.device, torch.float32)


register_feature_method(FeatureMethod(
    "intensity", intensity_features, joint_pca=False,
    description="normalised intensities (SSD); a baseline that only makes sense within one modality"))
