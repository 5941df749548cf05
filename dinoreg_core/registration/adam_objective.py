"""The objective of ConvexAdam's Adam stage and its gradient, written out (no autograd).

Objective of a displacement parameter ``p`` (1,3,n0,n1,n2) on the Adam grid (voxels of that grid):

    u    = S(p)                                  S = three zero-padded 3^3 box filters
    cost = cost_scale * mean_{c,x} (mov_c(x + u(x)) - fix_c(x))^2      trilinear, zero outside
    reg  = lambda * sum_axes mean((forward difference of u along the axis)^2)

Its gradient is ``S(dcost/du + dreg/du)``: every 1D zero-padded box pass is a symmetric matrix, so S is
self-adjoint. ``dcost/du`` needs the sampled features and their spatial derivative at the same points;
:class:`TrilinearSSD` computes both from one gather of the 8 corners per point, in chunks of points with
buffers allocated once (channels last, so the 12 channels of a corner are one contiguous read).
``dreg/du`` is the adjoint of the forward difference applied to the difference itself.

This equals ``torch.autograd`` through ``grid_sample(align_corners=True, padding_mode="zeros")`` and
``box_filter`` to float rounding (tests/test_adam_objective.py) at a fraction of the time and memory on CPU, also
at sample points that lie exactly on a voxel. There trilinear interpolation has a kink and its derivative is the
forward or the backward difference depending on which side of the integer the coordinate falls. grid_sample does
not see the voxel coordinate ``c`` itself but ``((2c/(n-1) - 1) + 1)/2 * (n-1)`` in float32 (the normalisation of
:func:`..warp.voxel_to_normalized`, then grid_sample's own), which for some integers lands one ulp below them (for
n = 16: c = 1, 2, 3), so grid_sample takes the backward difference there. :func:`grid_sample_coordinates_` applies
the same round trip before the interpolation, so both take the same side. (Without it the written-out gradient
differed from autograd by up to 58 % of its largest entry when all points were on voxels, the usual first
iteration after a zero discrete field, and Adam's sign-like first steps turned that into a different result.)
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_POINTS = 16384  # points per chunk on CPU: the chunk's gathered corners (16384 x 96 floats) stay in cache
DEFAULT_CHUNK_POINTS_CUDA = 1 << 18  # on a GPU: 4 chunks for a 192x160x256 pair (96 x 80 x 128 Adam grid), ~100 MB buffers
_PAD_LO = 2  # zero cells before index 0: a coordinate clamped to -2 has both corners in the zero border
_PAD_HI = 3  # after index n-1: clamped to n, the corners n and n+1 are zero; +1 for the table's upper corners


def grid_sample_coordinates_(coords: torch.Tensor, scale: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """In place: voxel coordinates (3,P) -> the voxel coordinates grid_sample(align_corners=True) interpolates at.

    The float32 operations of :func:`..warp.voxel_to_normalized` (``2c / scale - 1``, scale = max(n-1, 1)) followed
    by grid_sample's unnormalisation (``(x + 1) / 2 * (n - 1)``). The result equals ``coords`` to an ulp, but an
    integer may come back just below itself, which decides the one-sided derivative there.

    Args:
        coords: (3,P) float32 voxel coordinates, channel c = array axis c; overwritten.
        scale, span: (3,1) float32, max(n_c - 1, 1) and n_c - 1 for the sampled grid's sizes n_c.
    """
    return coords.mul_(2.0).div_(scale).sub_(1.0).add_(1.0).mul_(0.5).mul_(span)


class TrilinearSSD:
    """SSD between fixed features and trilinearly sampled moving features, and its gradient w.r.t. the points.

    Args:
        mov: (1,C,n0,n1,n2) moving features (sampled; zero outside the volume).
        fix: (1,C,d0,d1,d2) fixed features, one per sampling point (P = d0*d1*d2 points).
        storage_dtype: dtype of the stored moving corners and fixed features (e.g. torch.bfloat16 on CUDA to
            halve their memory); arithmetic is float32.
        chunk: points per chunk (default: 16384 on CPU, 2^18 on CUDA).

    Memory: a corner table of (n0+5)(n1+5)(n2+5) x 4C values (4 corners in the last two axes per cell) plus the
    fixed features channels last (P x C) and the chunk buffers.
    """

    def __init__(self, mov: torch.Tensor, fix: torch.Tensor, *, storage_dtype: torch.dtype | None = None,
                 chunk: int | None = None):
        if mov.dim() != 5 or mov.shape[0] != 1 or fix.dim() != 5 or fix.shape[:2] != mov.shape[:2]:
            raise ValueError(f"TrilinearSSD expects (1,C,...) moving and fixed features, got "
                             f"{tuple(mov.shape)} and {tuple(fix.shape)}")
        dev = mov.device
        sdt = storage_dtype or torch.float32
        c = mov.shape[1]
        self.channels = c
        self.size = tuple(mov.shape[2:])
        self.points = fix[0, 0].numel()
        lo, hi = _PAD_LO, _PAD_HI
        padded = torch.nn.functional.pad(mov[0].float(), (lo, hi) * 3)  # (C, n0+5, n1+5, n2+5)
        q0, q1, q2 = (s + lo + hi - 1 for s in self.size)  # cells that have an upper neighbour in axes 1 and 2
        corners = [padded[:, :q0, a:a + q1 - 1, b:b + q2 - 1] for a in (0, 1) for b in (0, 1)]
        # table row (i,j,k) = the 4 corners (j,k),(j,k+1),(j+1,k),(j+1,k+1) of slab i, channels last: (rows, 4C)
        self.table = torch.stack(corners, 0).permute(2, 3, 4, 0, 1).reshape(-1, 4 * c).to(sdt).contiguous()
        del padded, corners
        self.strides = ((q1 - 1) * (q2 - 1), q2 - 1, 1)
        self.fix = fix[0].reshape(c, -1).t().to(sdt).contiguous()  # (P, C)
        self.lo = torch.full((3, 1), -float(lo), device=dev)
        self.hi = torch.tensor([[float(s)] for s in self.size], device=dev)
        self.scale = torch.tensor([[float(max(s - 1, 1))] for s in self.size], device=dev)
        self.span = torch.tensor([[float(s - 1)] for s in self.size], device=dev)
        self.flat_axes = [a for a, s in enumerate(self.size) if s == 1]  # grid_sample: index 0, zero gradient
        n = chunk or (DEFAULT_CHUNK_POINTS_CUDA if dev.type == "cuda" else DEFAULT_CHUNK_POINTS)
        self.chunk = n = max(1, min(n, self.points))
        f32 = dict(device=dev, dtype=torch.float32)
        self._c = torch.empty(3, n, **f32)  # clamped coordinates, then fractions
        self._f = torch.empty(3, n, **f32)  # floors
        self._i = torch.empty(3, n, device=dev, dtype=torch.int64)
        self._idx = torch.empty(n, 2, device=dev, dtype=torch.int64)  # rows of slabs x0 and x0+1, interleaved
        self._v = torch.empty(2 * n, 4 * c, device=dev, dtype=sdt)  # gathered corners, viewed (n, 8, C)
        self._v32 = None if sdt == torch.float32 else torch.empty(2 * n, 4 * c, **f32)
        self._w = torch.empty(n, 8, **f32)  # trilinear weights of the 8 corners
        self._g = torch.empty(3, n, **f32)  # 1 - fractions
        self._val = torch.empty(n, 1, c, **f32)  # sampled features, then residual
        self._s = torch.empty(n, 8, 1, **f32)  # residual . corner features
        self._t = torch.empty(6, n, **f32)

    def __call__(self, coords: torch.Tensor, grad_scale: float, out: torch.Tensor | None = None
                 ) -> tuple[float, torch.Tensor]:
        """Sum of squared differences and ``grad_scale`` x its gradient w.r.t. the coordinates.

        Args:
            coords: (3,P) sampling coordinates in voxels of the moving grid (channel c = array axis c); they
                are interpolated where grid_sample would (:func:`grid_sample_coordinates_`).
            grad_scale: factor applied to the gradient (e.g. cost_scale / (C*P) to get the gradient of a mean).
            out: optional (3,P) float32 tensor receiving the gradient.

        Returns:
            (sum over points and channels of (mov(coords) - fix)^2, (3,P) gradient in the same units).
        """
        grad = torch.empty_like(coords) if out is None else out
        total = torch.zeros((), device=coords.device, dtype=torch.float64)
        c, n_all = self.channels, self.points
        s0, s1, _ = self.strides
        for start in range(0, n_all, self.chunk):
            n = min(self.chunk, n_all - start)
            cc, fl, ii = self._c[:, :n], self._f[:, :n], self._i[:, :n]
            grid_sample_coordinates_(cc.copy_(coords[:, start:start + n]), self.scale, self.span)
            torch.clamp(cc, self.lo, self.hi, out=cc)
            torch.floor(cc, out=fl)
            cc.sub_(fl)  # fractions (3,n)
            ii.copy_(fl)
            ii.add_(_PAD_LO)
            idx = self._idx[:n]
            i0 = idx[:, 0]
            torch.mul(ii[0], s0, out=i0)
            i0.add_(ii[1], alpha=s1).add_(ii[2])
            torch.add(i0, s0, out=idx[:, 1])
            v = self._v[:2 * n]
            torch.index_select(self.table, 0, idx.view(-1), out=v)
            if self._v32 is not None:
                v = self._v32[:2 * n].copy_(v)
            v = v.view(n, 8, c)
            fx, fy, fz = cc[0], cc[1], cc[2]
            g = self._g[:, :n]
            torch.sub(1.0, cc, out=g)
            gx, gy, gz = g[0], g[1], g[2]
            t = self._t[:, :n]
            wyz = self._w[:n, :4]
            torch.mul(gy, gz, out=wyz[:, 0]), torch.mul(gy, fz, out=wyz[:, 1])
            torch.mul(fy, gz, out=wyz[:, 2]), torch.mul(fy, fz, out=wyz[:, 3])
            w = self._w[:n]
            torch.mul(wyz, fx[:, None], out=w[:, 4:])
            wyz.mul_(gx[:, None])
            val = self._val[:n]
            vv = val.view(n, c)
            torch.mul(v[:, 0], w[:, 0:1], out=vv)  # trilinear sample (n,C): 8 weighted corners
            for k in range(1, 8):
                vv.addcmul_(v[:, k], w[:, k:k + 1])
            val.sub_(self.fix[start:start + n].view(n, 1, c))  # residual
            total += torch.linalg.vecdot(val.view(-1), val.view(-1)).double()
            s = self._s[:n]
            torch.bmm(v, val.view(n, c, 1), out=s)  # (n,8,1): residual . corner features
            s = s.view(n, 2, 4)  # [x corner, yz corner]
            sa, sb = s[:, 0], s[:, 1]
            # d/dx: the yz-bilinear weights times (slab x0+1 - slab x0); undo the gx factor folded into w
            d = t[:4].t()  # (n,4) scratch
            torch.sub(sb, sa, out=d)
            torch.mul(d[:, 0], gy * gz, out=grad[0, start:start + n])
            gxn = grad[0, start:start + n]
            gxn.addcmul_(d[:, 1], gy * fz).addcmul_(d[:, 2], fy * gz).addcmul_(d[:, 3], fy * fz)
            # x-interpolated corner products, then d/dy and d/dz of the bilinear weights
            torch.mul(sa, gx[:, None], out=d)
            d.addcmul_(sb, fx[:, None])
            gyn, gzn = grad[1, start:start + n], grad[2, start:start + n]
            torch.sub(d[:, 2], d[:, 0], out=gyn)
            gyn.mul_(gz).addcmul_(d[:, 3] - d[:, 1], fz)
            torch.sub(d[:, 1], d[:, 0], out=gzn)
            gzn.mul_(gy).addcmul_(d[:, 3] - d[:, 2], fy)
        # (beyond the clamp both corners lie in the zero border: value and gradient are exactly 0, as in grid_sample)
        grad.mul_(2.0 * grad_scale)
        for a in self.flat_axes:  # an axis of one voxel: grid_sample maps every coordinate to 0 (span 0)
            grad[a].zero_()
        return float(total), grad


def box3_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """In place zero-padded 3^3 mean filter of a (B,C,D,H,W) tensor (``tmp``: a buffer of the same shape).

    Equals :func:`dinoreg_core.filters.box_filter` (k=3, zeros) to float rounding; allocates nothing.
    """
    for dim in (2, 3, 4):
        n = x.shape[dim]
        tmp.copy_(x)
        x.narrow(dim, 1, n - 1).add_(tmp.narrow(dim, 0, n - 1))
        x.narrow(dim, 0, n - 1).add_(tmp.narrow(dim, 1, n - 1))
    return x.mul_(1.0 / 27.0)


def smooth3_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Three in-place zero-padded 3^3 box filters (the B-spline-like parametrisation of the Adam stage)."""
    for _ in range(3):
        box3_(x, tmp)
    return x


def diffusion_(u: torch.Tensor, grad: torch.Tensor, weight: float, tmp: torch.Tensor) -> float:
    """Diffusion regulariser ``weight * sum_axes mean(forward difference^2)`` of u (1,3,...); its gradient is
    added to ``grad`` in place. Returns the regulariser's value."""
    value = 0.0
    for dim in (2, 3, 4):
        n = u.shape[dim]
        if n < 2:
            continue
        d = tmp.narrow(dim, 0, n - 1)
        torch.sub(u.narrow(dim, 1, n - 1), u.narrow(dim, 0, n - 1), out=d)
        k = d.numel()
        value += weight * float(torch.linalg.vecdot(d.reshape(-1), d.reshape(-1))) / k
        c = 2.0 * weight / k
        grad.narrow(dim, 1, n - 1).add_(d, alpha=c)
        grad.narrow(dim, 0, n - 1).sub_(d, alpha=c)
    return value
