"""Global alignment of scans that share only PART of their field of view (a chest CT against an abdomen CT, an
MR slab against a full CT), on MIND-SSC descriptors so it works across CT and MR.

Transforms map *fixed world* points to *moving world* points (mm, RAS): ``y = A x + b`` (see
:mod:`dinoreg_core.registration.initial`).

Three pure steps, each on coarse isotropic grids:

1. :func:`candidate_grid` — for one candidate linear part ``L`` (a rotation times a scale) the moving scan is
   resampled on an axis-aligned grid of the frame ``z = L^-1 y``, so the remaining unknown is a translation.
2. :func:`overlap_translation_search` — every integer shift at once (FFT cross-correlations), scored by the
   mean MIND SSD over the *overlap only*: the moving body inside the fixed field of view plus the fixed body
   inside the moving field of view, each normalised by its voxel count. A shift is admissible when the two
   bodies share at least ``min_overlap`` of the smaller body. Nothing assumes the two scans cover the same
   region.
3. :func:`refine_affine` — Adam on the same overlap-normalised MIND SSD over the 12 affine parameters
   (weights re-estimated at every step and not differentiated), with a penalty on the linear part's scaling
   and shear away from the start's scale, ``|A^T A / s0^2 - I|^2`` (rotations are free: a thin slab leaves
   scale and shear poorly determined, rotations much less so).

:func:`overlap_score` is the concordance correlation (Lin) of the fixed and moving descriptors on the overlap:
1 for identical descriptors, about 0 for unrelated ones; it decides between candidates and whether a plausible
overlap exists at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..features.mind import mind_ssc
from ..io import Volume
from ..preprocess import foreground_mask, normalize_intensity, resample_spacing, resample_to
from .adam_update import AdamUpdate
from .warp import sample


@dataclass
class CoarseScan:
    """A scan on a coarse isotropic grid: MIND (12,D,H,W), body mask and field-of-view mask (D,H,W) float32."""

    vol: Volume           # normalised intensities on the coarse grid (affine: voxel -> world of its frame)
    feat: torch.Tensor
    body: torch.Tensor
    fov: torch.Tensor


def coarse_scan(vol: Volume, modality: str, spacing_mm: float, mind_r: int, mind_d: int) -> CoarseScan:
    """Resample ``vol`` to ``spacing_mm`` isotropic and compute MIND-SSC, body mask and FOV (all ones)."""
    c = resample_spacing(vol, spacing_mm)
    norm = normalize_intensity(c.array, modality)
    feat = mind_ssc(torch.from_numpy(norm)[None, None], mind_r, mind_d)[0]
    body = torch.from_numpy(foreground_mask(c.array, modality).astype(np.float32))
    return CoarseScan(c.like(norm), feat, body, torch.ones(c.shape))


def rotation_matrix(degrees) -> np.ndarray:
    """(3,3) rotation R = Rz @ Ry @ Rx for angles (about world axes x, y, z) in degrees."""
    ax, ay, az = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def candidate_grid(moving: CoarseScan, linear: np.ndarray, spacing_mm: float, mind_r: int, mind_d: int) -> CoarseScan:
    """The moving scan seen in the frame ``z = L^-1 y`` (``L`` = ``linear``, (3,3)), on an axis-aligned grid.

    The returned grid's affine maps its voxels to z; a point z corresponds to moving world ``y = L z``.
    Features are recomputed from the resampled intensities (MIND is not rotation invariant).
    """
    L = np.asarray(linear, dtype=np.float64)
    if np.allclose(L, np.eye(3)):
        return moving
    mv = moving.vol
    corners = np.array([[i, j, k] for i in (0, mv.shape[0] - 1) for j in (0, mv.shape[1] - 1)
                        for k in (0, mv.shape[2] - 1)], dtype=np.float64)
    world = corners @ mv.affine[:3, :3].T + mv.affine[:3, 3]
    z = world @ np.linalg.inv(L).T
    lo, hi = z.min(0), z.max(0)
    shape = tuple(int(np.floor((h - l) / spacing_mm)) + 1 for l, h in zip(lo, hi))
    aff = np.eye(4)
    aff[:3, :3] = np.eye(3) * spacing_mm
    aff[:3, 3] = lo
    target = Volume(np.zeros(shape, np.float32), aff)
    t = np.eye(4)
    t[:3, :3] = L                                      # target "world" z -> moving world y
    arr = resample_to(mv, target, world_transform=t, cval=0.0)
    fov = resample_to(Volume(np.ones(mv.shape, np.float32), mv.affine), target, world_transform=t, cval=0.0)
    body = resample_to(Volume(moving.body.numpy(), mv.affine), target, world_transform=t, cval=0.0)
    fov = torch.from_numpy((fov > 0.5).astype(np.float32))
    # MIND of the resampled normalised intensities (outside the FOV it is meaningless; fov = 0 there)
    feat = mind_ssc(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None], mind_r, mind_d)[0]
    return CoarseScan(target.like(arr), feat, torch.from_numpy((body > 0.5).astype(np.float32)) * fov, fov)


def _spectrum(x: torch.Tensor, full) -> torch.Tensor:
    return torch.fft.rfftn(x, s=full, dim=(-3, -2, -1))


def fixed_spectra(fixed: CoarseScan, full) -> dict:
    """FFTs of the fixed-side terms of :func:`overlap_translation_search` on the padded size ``full``
    (reused for every moving candidate whose grid fits: moving shape <= full - fixed shape)."""
    F_, fb, ff = fixed.feat, fixed.body, fixed.fov
    f2 = (F_ ** 2).sum(0)
    return {"full": tuple(full), "ff": _spectrum(ff, full), "fb": _spectrum(fb, full),
            "ff_f2": _spectrum(ff * f2, full), "fb_f2": _spectrum(fb * f2, full),
            "ff_F": _spectrum(ff[None] * F_, full), "fb_F": _spectrum(fb[None] * F_, full)}


@dataclass
class ShiftCandidate:
    """One local minimum of the translation search: shift (coarse voxels), mean SSD, shared body fraction."""

    shift: np.ndarray
    cost: float
    shared: float


def overlap_translation_search(fixed: CoarseScan, moving: CoarseScan, min_overlap: float, top_k: int = 3,
                               min_separation: int = 3, spectra: dict | None = None) -> list[ShiftCandidate]:
    """Best integer shifts s (moving voxel j <-> fixed voxel j + s) by overlap-normalised MIND SSD.

    Weight of voxel pair (j, j+s): mb(j) ff(j+s) + mf(j) fb(j+s) (b = body, f = field of view), so the cost
    compares the moving body with whatever the fixed scan holds there and vice versa, only where both scans
    have data. Every term is a cross-correlation sum_j a(j) b(j+s), computed for all s with FFTs.
    Admissible: shared body voxels >= ``min_overlap`` x the smaller body. Returns up to ``top_k`` shifts, at
    least ``min_separation`` voxels apart (Chebyshev), lowest cost first; empty when none is admissible.
    ``spectra``: :func:`fixed_spectra` of ``fixed`` (computed here when None).
    """
    fs, ms = fixed.feat.shape[1:], moving.feat.shape[1:]
    if spectra is None:
        spectra = fixed_spectra(fixed, tuple(f + m for f, m in zip(fs, ms)))
    full = spectra["full"]
    if any(m > fu - f for f, m, fu in zip(fs, ms, full)):
        raise ValueError(f"moving grid {tuple(ms)} does not fit the padded size {full} of the fixed spectra")
    M_, mb, mf = moving.feat, moving.body, moving.fov
    m2 = (M_ ** 2).sum(0)

    def corr(*terms):  # sum over (moving spectrum, fixed spectrum) of the cross-correlation
        acc = sum((a.conj() * b).sum(0) if a.dim() == 4 else a.conj() * b for a, b in terms)
        return torch.fft.irfftn(acc, s=full, dim=(-3, -2, -1))

    s_mb, s_mf = _spectrum(mb, full), _spectrum(mf, full)
    n = corr((s_mb, spectra["ff"]), (s_mf, spectra["fb"]))
    sq_f = corr((s_mb, spectra["ff_f2"]), (s_mf, spectra["fb_f2"]))
    sq_m = corr((_spectrum(mb * m2, full), spectra["ff"]), (_spectrum(mf * m2, full), spectra["fb"]))
    cross = corr((_spectrum(mb[None] * M_, full), spectra["ff_F"]), (_spectrum(mf[None] * M_, full), spectra["fb_F"]))
    shared = corr((s_mb, spectra["fb"]))
    cost = (sq_f - 2 * cross + sq_m) / n.clamp_min(1.0)
    smaller = float(min(fixed.body.sum(), mb.sum()))
    frac = shared / max(smaller, 1.0)
    # shifts are indexed modulo `full`; those with no overlap at all (n = 0) are not real positions
    ok = (frac >= min_overlap) & (n > 0.5) & torch.isfinite(cost)
    cost = torch.where(ok, cost, torch.full_like(cost, float("inf")))
    out: list[ShiftCandidate] = []
    order = torch.argsort(cost.reshape(-1))
    fsz, fl = np.array(fs), np.array(full)
    for flat in order.tolist():
        c = float(cost.reshape(-1)[flat])
        if not np.isfinite(c) or len(out) >= top_k:
            break
        idx = np.array(np.unravel_index(flat, full))
        idx = np.where(idx >= fsz, idx - fl, idx)
        if any(np.abs(idx - o.shift).max() < min_separation for o in out):
            continue
        out.append(ShiftCandidate(idx, c, float(frac.reshape(-1)[flat])))
    return out


def shift_to_transform(fixed: CoarseScan, cand: CoarseScan, linear: np.ndarray, shift) -> np.ndarray:
    """(4,4) fixed world -> moving world for a search result: z = x + d (d from the shift), y = L z."""
    fw = fixed.vol.affine[:3, :3] @ np.asarray(shift, dtype=np.float64) + fixed.vol.affine[:3, 3]
    d = cand.vol.affine[:3, 3] - fw                    # world(fixed j+s) -> frame point of candidate voxel j
    t = np.eye(4)
    t[:3, :3] = linear
    t[:3, 3] = np.asarray(linear) @ d
    return t


def _fixed_points(fixed: CoarseScan):
    shape = fixed.vol.shape
    axes = [torch.arange(s, dtype=torch.float32) for s in shape]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).reshape(3, -1)
    return x, fixed.feat.reshape(fixed.feat.shape[0], -1), fixed.body.reshape(-1)


def _sample_moving(moving: CoarseScan, vox_a: torch.Tensor, vox_b: torch.Tensor, x: torch.Tensor):
    """Moving features, body and FOV at fixed voxels x (3,N) mapped by moving voxel = A x + b: (C+2, N).

    Only the features carry gradients (body and FOV only set the weights)."""
    y = (vox_a @ x + vox_b[:, None]).reshape(1, 3, -1, 1, 1)
    feat = sample(moving.feat[None], y, padding_mode="zeros")[0, :, :, 0, 0]
    with torch.no_grad():
        masks = sample(torch.stack([moving.body, moving.fov])[None], y.detach(), padding_mode="zeros")[0, :, :, 0, 0]
    return torch.cat([feat, masks], 0)


def _weights(fbody: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    """Overlap weights (N,): (fixed body + moving body) inside the moving FOV (the fixed FOV is the grid)."""
    return (fbody + mv[-2]).clamp(max=1.0) * (mv[-1] > 0.5).float() * mv[-1]


def overlap_score(fixed: CoarseScan, moving: CoarseScan, t_world: np.ndarray) -> tuple[float, float]:
    """(concordance correlation of MIND on the overlap, shared body fraction of the smaller body) for ``t_world``."""
    vox = np.linalg.inv(moving.vol.affine) @ t_world @ fixed.vol.affine
    x, ff, fb = _fixed_points(fixed)
    with torch.no_grad():
        mv = _sample_moving(moving, torch.tensor(vox[:3, :3], dtype=torch.float32),
                            torch.tensor(vox[:3, 3], dtype=torch.float32), x)
    w = _weights(fb, mv)
    # volumes in mm^3 of the fixed world: the moving body's volume changes by 1/|det| of the world map
    vf = float(np.prod(fixed.vol.spacing))
    vm = float(np.prod(moving.vol.spacing)) / abs(float(np.linalg.det(t_world[:3, :3])))
    shared = vf * float((fb * (mv[-2] > 0.5).float() * (mv[-1] > 0.5).float()).sum())
    frac = min(1.0, shared / max(vf, min(vf * float(fb.sum()), vm * float(moving.body.sum()))))
    if float(w.sum()) < 1.0:
        return 0.0, frac
    wn = w / w.sum()
    fm = (ff * wn).sum(1, keepdim=True)
    mm = (mv[:-2] * wn).sum(1, keepdim=True)
    var_f = ((ff - fm) ** 2 * wn).sum()
    var_m = ((mv[:-2] - mm) ** 2 * wn).sum()
    ssd = ((ff - mv[:-2]) ** 2 * wn).sum()
    denom = float(var_f + var_m + ((fm - mm) ** 2).sum())
    return (1.0 - float(ssd) / denom if denom > 0 else 0.0), frac


def refine_affine(fixed: CoarseScan, moving: CoarseScan, t_world: np.ndarray, iterations: int, lr: float,
                  linear_penalty: float, n_points: int | None = None, seed: int = 0) -> np.ndarray:
    """Adam on the overlap-normalised MIND SSD over the 12 affine parameters (fixed world -> moving world).

    ``fixed`` and ``moving`` must share one isotropic spacing (then the voxel map's linear part is the world
    one). ``linear_penalty`` weighs ``|A^T A / s0^2 - I|^2`` (s0: the start's scale).

    ``n_points``: fixed voxels drawn at random (``seed``) per iteration (all when None or larger than the grid).
    """
    vox = np.linalg.inv(moving.vol.affine) @ t_world @ fixed.vol.affine
    x, ff, fb = _fixed_points(fixed)
    centre = x[:, fb > 0].mean(1) if fb.any() else x.mean(1)
    a0 = torch.tensor(vox[:3, :3], dtype=torch.float32)
    b0 = torch.tensor(vox[:3, :3], dtype=torch.float32) @ centre + torch.tensor(vox[:3, 3], dtype=torch.float32)
    lin = torch.zeros(3, 3, requires_grad=True)
    dt = torch.zeros(3, requires_grad=True)
    opt = AdamUpdate([lin, dt], lr=lr)
    scale_t = float(np.mean(fixed.vol.shape))
    eye = torch.eye(3)
    gram0 = float((a0.T @ a0).diagonal().mean())   # squared scale of the start (both grids share one spacing)
    gen = torch.Generator().manual_seed(int(seed))
    n_all = x.shape[1]
    for _ in range(iterations):
        lin.grad, dt.grad = None, None
        a = a0 @ (torch.eye(3) + lin)
        b = b0 + dt * scale_t - a @ centre
        if n_points is not None and n_points < n_all:
            pick = torch.randint(0, n_all, (int(n_points),), generator=gen)
            xs, ffs, fbs = x[:, pick], ff[:, pick], fb[pick]
        else:
            xs, ffs, fbs = x, ff, fb
        mv = _sample_moving(moving, a, b, xs)
        w = _weights(fbs, mv).detach()
        ssd = (((mv[:-2] - ffs) ** 2).sum(0) * w).sum() / w.sum().clamp_min(1.0)
        # rotations are free; scaling and shear away from the start's (isotropic) scale are penalised
        loss = ssd + linear_penalty * ((a.T @ a / gram0 - eye) ** 2).sum()
        loss.backward()
        opt.step([lin.grad, dt.grad])
    with torch.no_grad():
        a = (a0 @ (torch.eye(3) + lin)).double().numpy()
        b = (b0 + dt * scale_t).double().numpy() - a @ centre.double().numpy()
    v = np.eye(4)
    v[:3, :3], v[:3, 3] = a, b
    return moving.vol.affine @ v @ np.linalg.inv(fixed.vol.affine)
