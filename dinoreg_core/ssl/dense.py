"""Dense cross-view correspondence loss: the same anatomical point in two global crops gets the same feature.

An addition of ours to DINO + iBOT (off by default, ``contrast_weight`` in the training config), in the spirit
of pixel-level contrastive learning for anatomical correspondence (Yan et al., "SAM: Self-supervised Learning
of Pixel-wise Anatomical Embeddings in Radiological Images", IEEE TMI 2022). Registration needs exactly this
from a feature: a point of the fixed image must find *its* point in the moving image, under another intensity
mapping (MR vs CT), and no other point nearby.

The two global crops of a sample come from one region of the volume (``augment.region_size``) at different
positions and scales, so they overlap. For the student's view ``a`` (augmented, intensity-remapped, flipped
back onto its crop's token grid) and the teacher's view ``b`` (clean) of the same sample:

* every token of ``a`` has a centre in volume voxels (:func:`token_centres`, from the crop box);
* where that centre lies inside crop ``b``, the *positive* is the teacher's projected feature of ``b``
  interpolated trilinearly at that point;
* the *negatives* are the teacher's tokens of ``b`` (same sample) whose centres are at least ``exclude``
  voxels away from the point: other anatomy of the same region. Other samples are not used as negatives, so
  the same organ of two subjects is never pushed apart (that is what inter-patient registration needs);
* InfoNCE with temperature ``temp`` over (positive, negatives) of L2-normalised features.

Position embeddings cannot solve it alone: the crops differ in position and scale, so a token's place in its
crop does not say where its partner sits in the other crop.

Shapes: G global views of B samples, stacked view-major as everywhere in :mod:`dinoreg_core.ssl` (rows
``v*B .. v*B+B-1`` are view ``v``); N = d*h*w tokens per view in raster order.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DenseProjector(nn.Module):
    """Two-layer MLP from backbone patch tokens (..., C) to L2-normalised embeddings (..., out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)


def token_centres(boxes: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Volume-voxel coordinates of the token centres of crops.

    Args:
        boxes: (V, 2, 3) per crop its (start, size) in volume voxels along (D,H,W) (as drawn by
            :mod:`dinoreg_core.data.augment`; the crop's voxel centres spread evenly over the box).
        grid: token grid (d,h,w) of each crop.

    Returns:
        (V, N, 3) float, N = d*h*w in raster order: ``start + (i + 0.5) / d * size`` per axis.
    """
    axes = [(torch.arange(n, dtype=torch.float32, device=boxes.device) + 0.5) / n for n in grid]
    u = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)      # (N, 3) in (0,1)
    start, size = boxes[:, 0].float(), boxes[:, 1].float()
    return start[:, None, :] + u[None] * size[:, None, :]


def to_token_coords(points: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`token_centres`: volume voxels (V, M, 3) -> fractional token indices (V, M, 3) of the
    crops ``boxes`` (V, 2, 3); token i's centre maps to i, the crop covers [-0.5, n-0.5]."""
    n = torch.tensor(grid, dtype=torch.float32, device=points.device)
    start, size = boxes[:, 0].float(), boxes[:, 1].float()
    return (points - start[:, None, :]) / size[:, None, :] * n - 0.5


def sample_tokens(tokens: torch.Tensor, coords: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear interpolation of token features at fractional token indices.

    tokens (V, N, C) raster-ordered on ``grid``; coords (V, M, 3) token indices along (d,h,w), each within
    [0, n-1] -> (V, M, C).
    """
    V, N, C = tokens.shape
    vol = tokens.transpose(1, 2).reshape(V, C, *grid)
    n = torch.tensor(grid, dtype=coords.dtype, device=coords.device)
    norm = 2.0 * coords / (n - 1).clamp(min=1) - 1.0                   # align_corners=True convention
    g = norm.flip(-1)[:, :, None, None, :]                             # grid_sample wants (x=w, y=h, z=d)
    out = F.grid_sample(vol, g.to(vol.dtype), mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, :, :, 0, 0].transpose(1, 2)


def dense_correspondence_loss(student: torch.Tensor, teacher: torch.Tensor, boxes: torch.Tensor,
                              grid: tuple[int, int, int], n_views: int, *, valid: torch.Tensor | None = None,
                              temp: float = 0.2, exclude: float = 6.0) -> tuple[torch.Tensor, dict]:
    """InfoNCE between the student's tokens of one view and the teacher's tokens of the other views (module doc).

    Args:
        student: (G*B, N, E) L2-normalised student embeddings, token grid of the crop (flips undone).
        teacher: (G*B, N, E) L2-normalised teacher embeddings (no gradient needed).
        boxes: (G*B, 2, 3) crop boxes (start, size) in volume voxels of each view's sample.
        grid: (d,h,w) token grid of the global views.
        n_views: G.
        valid: optional (G*B, N) bool, the student tokens used as queries (e.g. the unmasked ones).
        temp: InfoNCE temperature.
        exclude: negatives closer than this (volume voxels) to the query point are left out.

    Returns:
        (scalar loss: mean over the queries that lie inside the other crop and have at least one negative,
        stats dict with "queries" (int) and "top1" (fraction of queries whose positive beats every negative)).
    """
    G = int(n_views)
    B = student.shape[0] // G
    centres = token_centres(boxes, grid)                               # (G*B, N, 3)
    n_max = torch.tensor(grid, dtype=torch.float32, device=student.device) - 1
    total, count, hits = student.new_zeros(()), 0, 0
    for a in range(G):
        sa = slice(a * B, (a + 1) * B)
        for b in range(G):
            if a == b:
                continue
            sb = slice(b * B, (b + 1) * B)
            coords = to_token_coords(centres[sa], boxes[sb], grid)     # (B, N, 3) in crop b
            inside = ((coords >= 0) & (coords <= n_max)).all(-1)       # (B, N)
            if valid is not None:
                inside = inside & valid[sa]
            pos = sample_tokens(teacher[sb].float(), coords.clamp(min=0).minimum(n_max), grid)   # (B, N, E)
            pos = F.normalize(pos, dim=-1, eps=1e-6)
            q = student[sa].float()
            l_pos = (q * pos).sum(-1, keepdim=True)                    # (B, N, 1)
            l_neg = q @ teacher[sb].float().transpose(1, 2)            # (B, N, N)
            far = torch.cdist(centres[sa], centres[sb]) >= exclude     # (B, N, N)
            l_neg = l_neg.masked_fill(~far, float("-inf"))
            use = inside & far.any(-1)
            if not bool(use.any()):
                continue
            logits = torch.cat([l_pos, l_neg], dim=-1)[use] / temp     # (M, 1+N)
            total = total + F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long,
                                                                device=logits.device), reduction="sum")
            count += int(use.sum())
            hits += int((logits[:, 0:1] > logits[:, 1:]).all(-1).sum())
    loss = total / max(count, 1)
    return loss, {"queries": count, "top1": hits / max(count, 1)}
