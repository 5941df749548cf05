"""Small synthetic test images shared by several test modules."""

from __future__ import annotations

import torch

from dinoreg_core.registration import warp as W


def blobs(shape, seed: int = 0, n: int = 12) -> torch.Tensor:
    """A smooth random image (1,1,D,H,W) in [0,1]: a sum of ``n`` Gaussian blobs (sigma 2-6 voxels)."""
    g = torch.Generator().manual_seed(seed)
    grid = W.identity_grid(shape)[0]
    img = torch.zeros(shape)
    for _ in range(n):
        c = torch.rand(3, generator=g) * torch.tensor(shape, dtype=torch.float32)
        s = 2.0 + 4.0 * torch.rand(1, generator=g)
        img += torch.exp(-((grid - c.view(3, 1, 1, 1)) ** 2).sum(0) / (2 * s * s))
    return (img / img.max())[None, None]
