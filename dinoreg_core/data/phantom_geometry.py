"""Implicit-shape toolkit of the synthetic phantom: coordinate fields, smooth random fields, distance functions.

Every anatomical structure of the phantom is an (approximate) signed distance function (SDF, mm; negative
inside) evaluated at the *atlas* coordinates of each voxel. Deforming a subject (anatomy variation, breathing,
pose) therefore only changes the coordinate field, never resamples a label map, so labels stay crisp.

Conventions: coordinates are millimetres in the body frame x = patient Right, y = Anterior, z = Superior
(RAS, like the canonical voxel axes of :mod:`dinoreg_core.io`). Coordinate fields are float32 torch tensors
of shape (3, D, H, W) (channel = x, y, z). Shapes and random fields are built in numpy (few values), then
rasterised with torch (many voxels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------- rotations

def rotation_matrix(angles_deg) -> np.ndarray:
    """(3,3) rotation R = Rz @ Ry @ Rx for angles (about x, about y, about z) in degrees."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# ------------------------------------------------------------------------------------- coordinate field

class CoordField:
    """Atlas coordinates of every voxel, with cheap bounding-box crops.

    Args:
        atlas: (3,D,H,W) float32 tensor, atlas (body-frame) mm coordinates of each voxel centre.
        world: (3,D,H,W) float32 tensor, scanner mm coordinates of each voxel centre (gravity acts along -y).
        spacing: voxel size in mm.
        step: subsampling of the coarse copy used to find crops.
    """

    def __init__(self, atlas: torch.Tensor, world: torch.Tensor, spacing: float, step: int = 4):
        self.atlas = atlas
        self.world = world
        self.spacing = float(spacing)
        self.step = int(step)
        self.shape = tuple(atlas.shape[1:])
        self._coarse = atlas[:, ::step, ::step, ::step].contiguous()
        # atlas distance between neighbouring coarse samples (deformations stretch it a little)
        self._pad = 1.6 * step * self.spacing + 2.0

    def crop(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering every voxel whose atlas point lies in the box [lo, hi] (mm); None if empty."""
        lo_t = torch.as_tensor(np.asarray(lo, np.float32) - self._pad).view(3, 1, 1, 1)
        hi_t = torch.as_tensor(np.asarray(hi, np.float32) + self._pad).view(3, 1, 1, 1)
        inside = ((self._coarse >= lo_t) & (self._coarse <= hi_t)).all(dim=0)
        if not bool(inside.any()):
            return None
        sl = []
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            hit = torch.nonzero(inside.any(dim=other)).flatten()
            a0 = max(int(hit[0]) * self.step - self.step, 0)
            a1 = min(int(hit[-1]) * self.step + self.step + 1, self.shape[ax])
            sl.append(slice(a0, a1))
        return tuple(sl)

    def points(self, sl) -> torch.Tensor:
        """Atlas coordinates (3,d,h,w) of the crop ``sl``."""
        return self.atlas[(slice(None),) + tuple(sl)]

    def world_points(self, sl) -> torch.Tensor:
        """Scanner coordinates (3,d,h,w) of the crop ``sl``."""
        return self.world[(slice(None),) + tuple(sl)]


# ------------------------------------------------------------------------------------ smooth random fields

def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(np.ceil(2.5 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(vol: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C,D,H,W) float32 tensor (sigma in voxels; replicate padding)."""
    if sigma_vox <= 0:
        return vol
    k = _gauss_kernel(sigma_vox)
    r = (k.numel() - 1) // 2
    c = vol.shape[0]
    x = vol[None]
    for ax in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + ax] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = r
        x = F.pad(x, pad, mode="replicate")
        x = F.conv3d(x, k.view(shape).expand(c, 1, *shape[2:]).contiguous(), groups=c)
    return x[0]


class NoiseField:
    """Smooth random field(s) on a box of the atlas frame, sampled anywhere by trilinear interpolation.

    White noise on a lattice of spacing ``spacing_mm`` is blurred (sigma ``smooth`` lattice cells) and scaled to
    unit standard deviation, so the field varies on a length scale of about ``spacing_mm * (1 + smooth)``.

    Args:
        rng: numpy random generator.
        lo, hi: (3,) corners of the box in mm (points outside see the border values).
        spacing_mm: lattice spacing.
        channels: number of independent fields.
        smooth: blur of the lattice in cells.
    """

    def __init__(self, rng: np.random.Generator, lo, hi, spacing_mm: float, channels: int = 1, smooth: float = 1.0):
        self.lo = np.asarray(lo, np.float64)
        self.hi = np.asarray(hi, np.float64)
        n = np.maximum(np.ceil((self.hi - self.lo) / spacing_mm).astype(int) + 1, 2)
        self.hi = self.lo + (n - 1) * spacing_mm
        g = torch.as_tensor(rng.standard_normal((channels, *n)).astype(np.float32))
        g = gaussian_blur(g, smooth)
        g = g - g.mean(dim=(1, 2, 3), keepdim=True)
        g = g / g.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        self.lattice = g[None].contiguous()  # (1,C,nx,ny,nz)

    def sample(self, pts: torch.Tensor, channel: int | None = None) -> torch.Tensor:
        """Field values at points (3,d,h,w) -> (C,d,h,w) (or (d,h,w) for one ``channel``)."""
        lat = self.lattice if channel is None else self.lattice[:, channel:channel + 1]
        lo = torch.as_tensor(self.lo, dtype=torch.float32).view(3, 1, 1, 1)
        ext = torch.as_tensor(self.hi - self.lo, dtype=torch.float32).view(3, 1, 1, 1)
        norm = 2.0 * (pts - lo) / ext - 1.0
        # grid_sample wants (x=W, y=H, z=D) order: lattice dims are (nx, ny, nz) = (D, H, W)
        grid = norm.flip(0).permute(1, 2, 3, 0)[None]
        out = F.grid_sample(lat, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        return out[0] if channel is not None else out


def upsampled_noise(rng: np.random.Generator, shape, spacing_mm: float, scale_mm: float, channels: int = 1) -> torch.Tensor:
    """Unit-variance smooth noise directly on a voxel grid: (C,D,H,W) float32 varying on about ``scale_mm``."""
    n = [max(2, int(np.ceil(s * spacing_mm / scale_mm)) + 2) for s in shape]
    g = torch.as_tensor(rng.standard_normal((channels, *n)).astype(np.float32))
    g = gaussian_blur(g, 0.7)
    g = F.interpolate(g[None], size=tuple(shape), mode="trilinear", align_corners=True)[0]
    g = g - g.mean(dim=(1, 2, 3), keepdim=True)
    return g / g.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


# ----------------------------------------------------------------------------------------- shapes (SDFs)

def smin(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    """Smooth minimum (union of SDFs) with blending width ``k`` mm; plain min for k <= 0."""
    if k <= 0:
        return torch.minimum(a, b)
    h = (k - (a - b).abs()).clamp_min(0.0) / k
    return torch.minimum(a, b) - h * h * (k * 0.25)


@dataclass
class Ellipsoid:
    """Ellipsoid with centre ``c`` (mm), semi-axes ``a`` (mm, in its own frame) and rotation ``R`` (3,3).

    ``sdf`` is the first-order distance (r-1)/|grad r| (exact on the surface, a smooth approximation elsewhere).
    """

    c: np.ndarray
    a: np.ndarray
    R: np.ndarray | None = None

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        if self.R is None:
            ext = np.asarray(self.a, np.float64)
        else:
            ext = np.abs(self.R) @ np.asarray(self.a, np.float64)
        return np.asarray(self.c) - ext, np.asarray(self.c) + ext

    def sdf(self, pts: torch.Tensor) -> torch.Tensor:
        q = pts - torch.as_tensor(np.asarray(self.c, np.float32)).view(3, 1, 1, 1)
        if self.R is not None:
            q = torch.einsum("ji,j...->i...", torch.as_tensor(np.asarray(self.R, np.float32)), q)
        a = torch.as_tensor(np.asarray(self.a, np.float32)).view(3, 1, 1, 1)
        u = q / a
        r = u.square().sum(0).sqrt()
        g = (u / a).square().sum(0).sqrt()
        eps = 1e-3
        return (r - 1.0) * (r + eps) / (g + eps / float(np.min(self.a)))


@dataclass
class Tube:
    """Tube around a polyline: control points ``p`` (n,3) mm with radii ``r`` (n,) mm (capsule chain).

    ``sdf`` is exact for each capsule with linearly varying radius (up to the usual cone approximation).
    """

    p: np.ndarray
    r: np.ndarray

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        rmax = float(np.max(self.r))
        return np.min(self.p, 0) - rmax, np.max(self.p, 0) + rmax

    def sdf(self, pts: torch.Tensor) -> torch.Tensor:
        p = np.asarray(self.p, np.float32)
        r = np.asarray(self.r, np.float32)
        best = None
        for i in range(len(p) - 1):
            a = torch.as_tensor(p[i]).view(3, 1, 1, 1)
            ab_np = p[i + 1] - p[i]
            L2 = float(ab_np @ ab_np)
            ab = torch.as_tensor(ab_np).view(3, 1, 1, 1)
            ap = pts - a
            if L2 < 1e-9:
                t = torch.zeros_like(ap[0])
            else:
                t = ((ap * ab).sum(0) / L2).clamp(0.0, 1.0)
            d = (ap - t[None] * ab).square().sum(0).sqrt() - (r[i] + t * (r[i + 1] - r[i]))
            best = d if best is None else torch.minimum(best, d)
        return best


@dataclass
class Union:
    """Smooth union of shapes with blending width ``k`` mm."""

    parts: list
    k: float = 0.0

    def bbox(self):
        los, his = zip(*(s.bbox() for s in self.parts))
        return np.min(los, 0), np.max(his, 0)

    def sdf(self, pts):
        d = self.parts[0].sdf(pts)
        for s in self.parts[1:]:
            d = smin(d, s.sdf(pts), self.k)
        return d


@dataclass
class Subtract:
    """``base`` minus ``cut`` (smooth with width ``k`` mm)."""

    base: object
    cut: object
    k: float = 0.0

    def bbox(self):
        return self.base.bbox()

    def sdf(self, pts):
        return -smin(-self.base.sdf(pts), self.cut.sdf(pts), self.k)


def smooth_path(points, radii, n_sub: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Catmull-Rom subdivision of a polyline (n,3) with radii (n,): returns a smoother, denser polyline."""
    p = np.asarray(points, np.float64)
    r = np.asarray(radii, np.float64)
    if len(p) < 3 or n_sub <= 1:
        return p, r
    pp = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    rr = np.concatenate([[r[0]], r, [r[-1]]])
    out_p, out_r = [], []
    for i in range(1, len(pp) - 2):
        for s in range(n_sub):
            t = s / n_sub
            t2, t3 = t * t, t * t * t
            w = np.array([-t3 + 2 * t2 - t, 3 * t3 - 5 * t2 + 2, -3 * t3 + 4 * t2 + t, t3 - t2]) * 0.5
            out_p.append(w @ pp[i - 1:i + 3])
            out_r.append(rr[i] + t * (rr[i + 1] - rr[i]))
    out_p.append(p[-1])
    out_r.append(r[-1])
    return np.asarray(out_p), np.asarray(out_r)
