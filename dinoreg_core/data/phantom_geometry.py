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
        self._coarse = atlas[:, ::step, ::step, ::step].numpy().copy()
        # atlas distance between neighbouring coarse samples (deformations stretch it a little)
        self._pad = 1.1 * step * self.spacing + 1.0

    def crop(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering every voxel whose atlas point lies in the box [lo, hi] (mm); None if empty."""
        lo = (np.asarray(lo, np.float32) - self._pad).reshape(3, 1, 1, 1)
        hi = (np.asarray(hi, np.float32) + self._pad).reshape(3, 1, 1, 1)
        c = self._coarse
        inside = ((c >= lo) & (c <= hi)).all(axis=0)
        if not inside.any():
            return None
        sl = []
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            hit = np.flatnonzero(inside.any(axis=other))
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

    def sample(self, pts: torch.Tensor, channel: int | None = None, stride: int = 2) -> torch.Tensor:
        """Field values at points (3,d,h,w) -> (C,d,h,w) (or (d,h,w) for one ``channel``).

        The points of a voxel grid vary smoothly, and so does the field: it is sampled every ``stride`` voxels
        and interpolated trilinearly in between (``stride=1`` samples every point).
        """
        lat = self.lattice if channel is None else self.lattice[:, channel:channel + 1]
        size = tuple(pts.shape[1:])
        if stride > 1 and min(size) > stride:
            # extend each axis linearly so that it ends on a sample, then take every stride-th point
            full = [((n - 1 + stride - 1) // stride) * stride + 1 for n in size]
            ext = pts
            for ax, (n, m) in enumerate(zip(size, full)):
                if m > n:
                    last = ext.narrow(ax + 1, n - 1, 1)
                    step = last - ext.narrow(ax + 1, n - 2, 1)
                    k = torch.arange(1, m - n + 1, dtype=pts.dtype).view([-1 if i == ax + 1 else 1 for i in range(4)])
                    ext = torch.cat([ext, last + k * step], dim=ax + 1)
            sub = ext[:, ::stride, ::stride, ::stride]
            out = self._grid_sample(lat, sub)
            out = F.interpolate(out[None], size=tuple(full), mode="trilinear", align_corners=True)[0]
            out = out[:, :size[0], :size[1], :size[2]]
        else:
            out = self._grid_sample(lat, pts)
        return out[0] if channel is not None else out

    def _grid_sample(self, lat: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        lo = torch.as_tensor(self.lo, dtype=torch.float32).view(3, 1, 1, 1)
        ext = torch.as_tensor(self.hi - self.lo, dtype=torch.float32).view(3, 1, 1, 1)
        norm = 2.0 * (pts - lo) / ext - 1.0
        # grid_sample wants (x=W, y=H, z=D) order: lattice dims are (nx, ny, nz) = (D, H, W)
        grid = norm.flip(0).permute(1, 2, 3, 0)[None]
        return F.grid_sample(lat, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def upsampled_noise(rng: np.random.Generator, shape, spacing_mm: float, scale_mm: float, channels: int = 1) -> torch.Tensor:
    """Unit-variance smooth noise directly on a voxel grid: (C,D,H,W) float32 varying on about ``scale_mm``."""
    n = [max(2, int(np.ceil(s * spacing_mm / scale_mm)) + 2) for s in shape]
    g = torch.as_tensor(rng.standard_normal((channels, *n)).astype(np.float32))
    g = gaussian_blur(g, 0.7)
    g = F.interpolate(g[None], size=tuple(shape), mode="trilinear", align_corners=True)[0]
    g = g - g.mean(dim=(1, 2, 3), keepdim=True)
    return g / g.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


# ----------------------------------------------------------------------------------------- shapes (SDFs)

FAR = 1.0e3  # "far outside" value of SDFs evaluated on sub-boxes


def _intersect(sl, sub):
    """Local slices (relative to crop ``sl``) of the overlap of two global crops; None when disjoint."""
    if sub is None:
        return None
    loc = []
    for g, s in zip(sl, sub):
        a, b = max(g.start, s.start), min(g.stop, s.stop)
        if a >= b:
            return None
        loc.append(slice(a - g.start, b - g.start))
    return tuple(loc)


def shape_sdf(shape, f: "CoordField", sl, pad: float) -> torch.Tensor:
    """SDF of any shape on the crop ``sl`` of coordinate field ``f`` (exact within ``pad`` mm of the surface)."""
    if hasattr(shape, "sdf_in"):
        return shape.sdf_in(f, sl, pad)
    return shape.sdf(f.points(sl))


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
        c = np.asarray(self.c, np.float64)
        R = np.eye(3) if self.R is None else np.asarray(self.R, np.float64)
        a = np.asarray(self.a, np.float64)
        d = [pts[i] - float(c[i]) for i in range(3)]
        r2 = g2 = None
        for k in range(3):  # local coordinate k = (R^T d)_k
            qk = d[0] * float(R[0, k]) + d[1] * float(R[1, k]) + d[2] * float(R[2, k])
            uk = qk * (1.0 / float(a[k]))
            r2 = uk * uk if r2 is None else r2.addcmul_(uk, uk)
            vk = uk * (1.0 / float(a[k]))
            g2 = vk * vk if g2 is None else g2.addcmul_(vk, vk)
        r = r2.sqrt_()
        g = g2.sqrt_()
        eps = 1e-3
        return (r - 1.0) * (r + eps) / (g + eps / float(a.min()))


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

    def _segments(self):
        p = np.asarray(self.p, np.float64)
        r = np.asarray(self.r, np.float64)
        return [(p[i], p[i + 1], float(r[i]), float(r[i + 1])) for i in range(len(p) - 1)]

    @staticmethod
    def _segment_sdf(pts: torch.Tensor, a, b, ra: float, rb: float) -> torch.Tensor:
        ab = b - a
        L2 = float(ab @ ab)
        dx, dy, dz = pts[0] - float(a[0]), pts[1] - float(a[1]), pts[2] - float(a[2])
        if L2 < 1e-9:
            t = torch.zeros_like(dx)
        else:
            t = ((dx * float(ab[0]) + dy * float(ab[1]) + dz * float(ab[2])) * (1.0 / L2)).clamp_(0.0, 1.0)
        ex, ey, ez = dx - t * float(ab[0]), dy - t * float(ab[1]), dz - t * float(ab[2])
        return (ex * ex + ey * ey + ez * ez).sqrt_() - (ra + t * (rb - ra))

    def sdf(self, pts: torch.Tensor) -> torch.Tensor:
        best = None
        for a, b, ra, rb in self._segments():
            d = self._segment_sdf(pts, a, b, ra, rb)
            best = d if best is None else torch.minimum(best, d)
        return best

    def sdf_in(self, f: "CoordField", sl, pad: float) -> torch.Tensor:
        """SDF on the crop ``sl`` of ``f``, exact within ``pad`` mm of the tube and >= ``pad`` farther away.

        Each segment is evaluated only inside its own bounding box (much cheaper for long, curved tubes)."""
        shape = tuple(s.stop - s.start for s in sl)
        out = torch.full(shape, FAR)
        for a, b, ra, rb in self._segments():
            e = max(ra, rb) + pad
            sub = f.crop(np.minimum(a, b) - e, np.maximum(a, b) + e)
            loc = _intersect(sl, sub)
            if loc is None:
                continue
            pts = f.atlas[(slice(None),) + tuple(slice(g.start + l.start, g.start + l.stop) for g, l in zip(sl, loc))]
            view = out[loc]
            torch.minimum(view, self._segment_sdf(pts, a, b, ra, rb), out=view)
        return out


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

    def sdf_in(self, f, sl, pad):
        d = shape_sdf(self.parts[0], f, sl, pad + self.k)
        for s in self.parts[1:]:
            d = smin(d, shape_sdf(s, f, sl, pad + self.k), self.k)
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

    def sdf_in(self, f, sl, pad):
        return -smin(-shape_sdf(self.base, f, sl, pad + self.k), shape_sdf(self.cut, f, sl, pad + self.k), self.k)


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
