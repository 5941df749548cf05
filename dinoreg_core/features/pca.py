"""Joint PCA of fixed and moving feature volumes, upsampling to the image grid, and an RGB view.

:func:`joint_project` fits ONE basis on the tokens (voxels) of both volumes, so fixed and moving features live
in the same k-dimensional space (what SSD in ConvexAdam needs):

* centring: the joint mean of all tokens of both volumes (or of the random sample);
* basis: the exact eigen-decomposition (``torch.linalg.eigh``, float64) of the C x C joint covariance,
  accumulated in chunks, so it is deterministic and cheap for C up to a few thousand (the authors use the
  randomised ``torch.pca_lowrank`` on uncentred projections; the subspace is the same up to round-off);
* sign: each component is flipped so that its largest-magnitude loading is positive (deterministic);
* scaling: every component is divided by the standard deviation of the first component, so channel 0 has unit
  variance and the others keep their relative variances (the SSD cost then weighs channels by importance);
* ``k`` larger than C is clipped to C.

``sample`` (an int) fits the basis on that many tokens drawn at random (``seed``) from both volumes together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DinoregError


@dataclass
class PCABasis:
    """mean (C,), components (k, C) with rows of unit norm, scale (1/std of component 0), variances (k,)."""

    mean: torch.Tensor
    components: torch.Tensor
    scale: float
    variances: torch.Tensor

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(1,C,d,h,w) -> (1,k,d,h,w) float32: ((x - mean) @ components.T) * scale."""
        B, C = features.shape[:2]
        x = features.reshape(B, C, -1).to(torch.float64)
        m = self.mean.to(x.device)[None, :, None]
        W = self.components.to(x.device)
        y = torch.einsum("kc,bcn->bkn", W, x - m) * self.scale
        return y.to(torch.float32).reshape((B, W.shape[0]) + tuple(features.shape[2:]))


def _tokens(f: torch.Tensor) -> torch.Tensor:
    if f.ndim != 5 or f.shape[0] != 1:
        raise DinoregError(f"Expected features of shape (1,C,d,h,w), got {tuple(f.shape)}.")
    return f[0].reshape(f.shape[1], -1).T        # (N, C), a view


def fit_pca(tokens: list[torch.Tensor], k: int, *, sample: int | None = None, seed: int = 0,
            chunk: int = 65536) -> PCABasis:
    """Fit a PCA basis on the rows of the (N_i, C) token matrices in ``tokens`` taken together."""
    C = tokens[0].shape[1]
    if any(t.shape[1] != C for t in tokens):
        raise DinoregError(f"Feature volumes have different channel counts: {[t.shape[1] for t in tokens]}.")
    if k < 1:
        raise DinoregError(f"PCA needs k >= 1 components, got {k}.")
    k = min(int(k), C)
    if sample is not None:
        n = [t.shape[0] for t in tokens]
        total = sum(n)
        if sample < total:
            g = torch.Generator().manual_seed(int(seed))
            idx = torch.randperm(total, generator=g)[: int(sample)].sort().values
            cuts = np.cumsum([0] + n)
            tokens = [t[(idx[(idx >= a) & (idx < b)] - a).to(t.device)] for t, a, b in zip(tokens, cuts[:-1], cuts[1:])]
    dev = tokens[0].device
    count = sum(t.shape[0] for t in tokens)
    if count < 2:
        raise DinoregError("PCA needs at least two feature vectors.")
    s1 = torch.zeros(C, dtype=torch.float64, device=dev)
    s2 = torch.zeros(C, C, dtype=torch.float64, device=dev)
    for t in tokens:
        for i in range(0, t.shape[0], chunk):
            x = t[i:i + chunk].to(torch.float64)
            s1 += x.sum(0)
            s2 += x.T @ x
    mean = s1 / count
    cov = (s2 - count * torch.outer(mean, mean)) / (count - 1)
    evals, evecs = torch.linalg.eigh(cov)                  # ascending
    evals = evals.flip(0)[:k].clamp_min(0.0)
    comps = evecs.flip(1)[:, :k].T.contiguous()            # (k, C)
    big = comps.abs().argmax(dim=1)
    signs = torch.sign(comps[torch.arange(k, device=dev), big])
    comps = comps * signs[:, None]
    std0 = float(evals[0].sqrt())
    scale = 1.0 / std0 if std0 > 0 else 1.0
    return PCABasis(mean=mean, components=comps, scale=scale, variances=evals)


def joint_project(fixed: torch.Tensor, moving: torch.Tensor, k: int = 12, *, sample: int | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Project fixed (1,C,d,h,w) and moving (1,C,d2,h2,w2) onto one joint PCA basis -> (1,k,...) each, float32."""
    basis = fit_pca([_tokens(fixed), _tokens(moving)], k, sample=sample, seed=seed)
    return basis.project(fixed), basis.project(moving)


def upsample(features: torch.Tensor, size) -> torch.Tensor:
    """Trilinear resize (align_corners=False) of (B,C,d,h,w) to spatial ``size`` (D,H,W): extent onto extent."""
    size = tuple(int(s) for s in size)
    if tuple(features.shape[2:]) == size:
        return features
    return F.interpolate(features, size=size, mode="trilinear", align_corners=False)


def pca_rgb(features: torch.Tensor, *, seed: int = 0) -> np.ndarray:
    """First three PCA components of (1,C,d,h,w) or (C,d,h,w) features as an RGB volume (d,h,w,3) in [0,1].

    Each channel is mapped linearly from its 1st..99th percentile to [0,1] and clipped. Fewer than three
    channels are repeated.
    """
    f = features if features.ndim == 5 else features[None]
    basis = fit_pca([_tokens(f)], 3, sample=200_000, seed=seed)
    y = basis.project(f)[0]                                  # (k,d,h,w)
    if y.shape[0] < 3:
        y = torch.cat([y] + [y[-1:]] * (3 - y.shape[0]), dim=0)
    flat = y.reshape(3, -1).cpu()
    lo = torch.quantile(flat[:, :: max(1, flat.shape[1] // 100_000)], 0.01, dim=1)
    hi = torch.quantile(flat[:, :: max(1, flat.shape[1] // 100_000)], 0.99, dim=1)
    rgb = ((y.cpu() - lo[:, None, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None, None]).clamp(0, 1)
    return rgb.permute(1, 2, 3, 0).numpy().astype(np.float32)
