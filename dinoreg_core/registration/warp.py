"""Warping, composition and Jacobians of dense displacement fields.

Convention (DESIGN.md): a displacement ``u`` is a (B,3,D,H,W) float tensor in voxel units of the fixed
grid, channel c = array axis c, backward: ``warped(x) = moving(x + u(x))``. Sampling uses
``grid_sample(..., align_corners=True)``, where voxel index 0 is the centre of the first voxel, so a
voxel-unit field maps exactly onto array indices (the Learn2Reg ``map_coordinates(moving, identity + u)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel: (1,3,D,H,W), channel c = index along array axis c."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


def voxel_to_normalized(coords: torch.Tensor, shape) -> torch.Tensor:
    """Turn (B,3,D,H,W) voxel coordinates (of a grid of size ``shape``) into a grid_sample grid (B,D,H,W,3).

    grid_sample wants (x,y,z) = (axis 2, axis 1, axis 0) in [-1,1] with align_corners=True.
    """
    scale = torch.tensor([max(s - 1, 1) for s in shape], device=coords.device, dtype=coords.dtype).view(1, 3, 1, 1, 1)
    norm = 2.0 * coords / scale - 1.0
    return norm.flip(1).permute(0, 2, 3, 4, 1)


def sample(volume: torch.Tensor, coords: torch.Tensor, *, mode: str = "bilinear",
           padding_mode: str = "border") -> torch.Tensor:
    """Sample a (B,C,D,H,W) volume at voxel coordinates (B,3,d,h,w) -> (B,C,d,h,w).

    ``mode``: "bilinear" (trilinear in 3D) or "nearest". ``padding_mode``: "border" or "zeros".
    """
    grid = voxel_to_normalized(coords.to(volume.dtype), volume.shape[2:])
    return F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp(moving: torch.Tensor, disp: torch.Tensor, *, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Backward warp: ``out(x) = moving(x + disp(x))``.

    Args:
        moving: (B,C,D,H,W) float volume on the fixed grid.
        disp: (B,3,D,H,W) voxel displacement.
    """
    coords = identity_grid(disp.shape[2:], disp.device, disp.dtype) + disp
    return sample(moving, coords, mode=mode, padding_mode=padding_mode)


def warp_labels(labels: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp of an integer label map (B,1,D,H,W) -> same shape and dtype.

    Same as the Learn2Reg evaluation, ``map_coordinates(labels, identity + disp, order=0)`` (mode "constant"):
    points outside [0, n-1] along any axis get label 0 (background).
    """
    coords = identity_grid(disp.shape[2:], disp.device, torch.float32) + disp.float()
    out = sample(labels.float(), coords, mode="nearest", padding_mode="zeros")
    upper = torch.tensor([s - 1 for s in disp.shape[2:]], device=disp.device, dtype=torch.float32).view(1, 3, 1, 1, 1)
    outside = ((coords < 0) | (coords > upper)).any(dim=1, keepdim=True)
    return out.masked_fill(outside, 0).round().to(labels.dtype)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Compose two backward displacements: apply ``first``, then ``second``.

    ``warp(warp(m, first), second) == warp(m, compose(first, second))`` (up to interpolation):
    ``u(x) = second(x) + first(x + second(x))``. Shapes (B,3,D,H,W), voxel units.
    """
    coords = identity_grid(second.shape[2:], second.device, second.dtype) + second
    return second + sample(first, coords, mode="bilinear", padding_mode="border")


def invert(disp: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Inverse of a smooth displacement by fixed-point iteration ``v(x) = -u(x + v(x))``.

    Converges for fields whose Jacobian stays well away from folding; (B,3,D,H,W) voxel units.
    """
    inv = -disp.clone()
    grid = identity_grid(disp.shape[2:], disp.device, disp.dtype)
    for _ in range(iterations):
        inv = -sample(disp, grid + inv, mode="bilinear", padding_mode="border")
    return inv


def jacobian_determinant(disp: torch.Tensor, spacing=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Jacobian determinant of ``x -> x + disp(x)``: (B,3,D,H,W) -> (B,D,H,W).

    Derivatives are central differences in the interior and one-sided at the borders (``torch.gradient``).
    The displacement is in voxels; ``spacing`` only matters when it is anisotropic and the field is meant in
    mm (it is not, by convention, so the default (1,1,1) gives the determinant in voxel space, which is equal
    for an isotropic or anisotropic grid because both numerator and denominator are voxels).
    """
    grads = []
    for c in range(3):
        g = torch.gradient(disp[:, c], dim=(1, 2, 3))
        grads.append(torch.stack(g, dim=1))  # (B,3,D,H,W): d u_c / d x_k
    j = torch.stack(grads, dim=1)  # (B,3(c),3(k),D,H,W)
    eye = torch.eye(3, device=disp.device, dtype=disp.dtype).view(1, 3, 3, 1, 1, 1)
    j = j + eye
    j = j.permute(0, 3, 4, 5, 1, 2)
    return torch.linalg.det(j)


def smooth_random_field(shape, *, max_disp: float, control_spacing: int = 8, seed: int = 0,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """A smooth random displacement (1,3,D,H,W) in voxels whose largest vector length is ``max_disp``.

    Gaussian noise on a coarse control grid (one point every ``control_spacing`` voxels) is upsampled with
    cubic B-spline-like smoothness (trilinear upsampling followed by box smoothing) and rescaled so that
    ``max |u| == max_disp`` (over ``mask`` when given, (D,H,W) bool).
    """
    g = torch.Generator().manual_seed(int(seed))
    coarse = [max(2, int(round(s / control_spacing)) + 1) for s in shape]
    u = torch.randn((1, 3, *coarse), generator=g)
    u = F.interpolate(u, size=tuple(shape), mode="trilinear", align_corners=True)
    k = max(3, (control_spacing // 2) * 2 + 1)
    for _ in range(2):
        u = F.avg_pool3d(F.pad(u, (k // 2,) * 6, mode="replicate"), k, stride=1)
    norm = u.norm(dim=1)
    peak = norm[mask[None]].max() if mask is not None else norm.max()
    return u * (max_disp / peak.clamp_min(1e-8))
