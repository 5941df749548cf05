"""Initial (global) alignment of scans whose world coordinates are unrelated.

Every function returns a (4,4) matrix ``T`` mapping *fixed world* points (mm, RAS) to *moving world* points,
so the moving image resampled onto the fixed grid is ``moving(T @ world(x))``
(:func:`dinoreg_core.preprocess.resample_to` with ``world_transform=T``).

Methods:

* ``none`` — identity: trust the scanners' world coordinates.
* ``com`` — translation that superimposes the centres of mass of the two body masks.
* ``affine`` — (1) an exhaustive translation search: MIND-SSC SSD between the two scans on a coarse isotropic
  grid (``search_mm``) for *every* integer shift, computed at once with FFT cross-correlations and restricted to
  shifts where most of the moving body overlaps the fixed field of view; then (2) an affine refinement of the
  best shift by Adam on the same MIND SSD (trilinear sampling), with a weak penalty keeping the linear part near
  a rotation/identity (``linear_penalty``). MIND makes both steps work across MR and CT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DinoregError
from ..features.mind import mind_ssc
from ..io import Volume
from ..preprocess import foreground_mask, guess_modality, normalize_intensity, resample_spacing
from .warp import sample


@dataclass
class InitConfig:
    """Settings of the affine initial alignment."""

    search_mm: float = 6.0  # grid spacing of the translation search and the affine refinement (mm)
    min_overlap: float = 0.6  # fraction of the moving body that must fall inside the fixed field of view
    iterations: int = 150  # Adam iterations of the affine refinement
    lr: float = 0.01  # Adam learning rate (normalised units)
    linear_penalty: float = 1.0  # weight of |A - I|^2 on the linear part
    mind_r: int = 1
    mind_d: int = 1


def _com_world(vol: Volume, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return vol.affine[:3, :3] @ idx + vol.affine[:3, 3]


def translation(v: np.ndarray) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = v
    return t


def com_alignment(fixed: Volume, moving: Volume, fixed_modality: str, moving_modality: str) -> np.ndarray:
    """Translation superimposing the body-mask centres of mass (fixed world -> moving world)."""
    mf = foreground_mask(fixed.array, fixed_modality)
    mm = foreground_mask(moving.array, moving_modality)
    if not mf.any() or not mm.any():
        raise DinoregError("The centre-of-mass alignment found no body in one of the scans.")
    return translation(_com_world(moving, mm) - _com_world(fixed, mf))


def _coarse(vol: Volume, modality: str, mm: float, cfg: InitConfig):
    """Resample to ``mm`` isotropic; return (Volume, MIND (1,12,...), body mask (bool array))."""
    c = resample_spacing(vol, mm)
    norm = normalize_intensity(c.array, modality)
    feat = mind_ssc(torch.from_numpy(norm)[None, None], cfg.mind_r, cfg.mind_d)
    body = foreground_mask(c.array, modality)
    return c, feat, body


def _xcorr(a: torch.Tensor, b: torch.Tensor, full) -> torch.Tensor:
    """Cross-correlation sum_j a(j) b(j + s) for all shifts s, via FFT: (C,*A), (C,*B) -> (*full)."""
    fa = torch.fft.rfftn(a, s=full, dim=(-3, -2, -1))
    fb = torch.fft.rfftn(b, s=full, dim=(-3, -2, -1))
    return torch.fft.irfftn(fa.conj() * fb, s=full, dim=(-3, -2, -1)).sum(0)


def translation_search(fixed_feat, fixed_valid, moving_feat, moving_body, min_overlap: float) -> np.ndarray:
    """Best integer shift s (coarse voxels) with moving voxel j <-> fixed voxel j + s, by mean MIND SSD.

    Args:
        fixed_feat: (C,*F) features of the fixed scan; fixed_valid: (*F) weights (1 inside the fixed scan).
        moving_feat: (C,*M) features; moving_body: (*M) body mask of the moving scan (where the cost is taken).
    Returns:
        (3,) integer shift in coarse voxels.
    """
    fs, ms = fixed_feat.shape[1:], moving_feat.shape[1:]
    full = tuple(f + m for f, m in zip(fs, ms))
    mk = moving_body.float()
    w = fixed_valid.float()
    # S(s) = sum_j mk(j) w(j+s) [ |F(j+s)|^2 - 2 F(j+s).M(j) + |M(j)|^2 ]
    # shifts are indexed modulo `full`: s in [-(M-1), F-1]
    t1 = _xcorr(mk[None], (w * (fixed_feat ** 2).sum(0))[None], full)
    t2 = _xcorr(mk[None] * moving_feat, w[None] * fixed_feat, full)
    t3 = _xcorr((mk * (moving_feat ** 2).sum(0))[None], w[None], full)
    n = _xcorr(mk[None], w[None], full)
    cost = (t1 - 2 * t2 + t3) / n.clamp_min(1.0)
    ok = n >= min_overlap * mk.sum()
    if not ok.any():
        raise DinoregError("The translation search found no position where the moving scan overlaps the fixed scan.")
    cost[~ok] = float("inf")
    flat = int(torch.argmin(cost))
    idx = np.array(np.unravel_index(flat, full))
    idx = np.where(idx >= np.array(fs), idx - np.array(full), idx)
    return idx


def _affine_refine(fc: Volume, ffeat, fbody, mc: Volume, mfeat, t_world: np.ndarray, cfg: InitConfig) -> np.ndarray:
    """Refine a fixed-world -> moving-world transform by Adam on MIND SSD over the fixed body (coarse grids)."""
    vox = np.linalg.inv(mc.affine) @ t_world @ fc.affine  # fixed coarse voxel -> moving coarse voxel
    centre = np.argwhere(fbody).mean(0) if fbody.any() else (np.array(fc.shape) - 1) / 2
    # parametrise around the fixed body centre: y = A (x - c) + A0 c + b0 + dt
    a0 = torch.tensor(vox[:3, :3], dtype=torch.float32)
    b0 = torch.tensor(vox[:3, :3] @ centre + vox[:3, 3], dtype=torch.float32)
    c = torch.tensor(centre, dtype=torch.float32)
    lin = torch.zeros(3, 3, requires_grad=True)
    dt = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([lin, dt], lr=cfg.lr)
    shape = fc.shape
    axes = [torch.arange(s, dtype=torch.float32) for s in shape]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).reshape(3, -1)
    mask = torch.from_numpy(fbody.reshape(-1))
    x = x[:, mask]
    ff = ffeat[0].reshape(ffeat.shape[1], -1)[:, mask]
    valid_m = torch.ones((1, 1, *mc.shape))
    scale_t = float(np.mean(shape))
    for _ in range(cfg.iterations):
        opt.zero_grad()
        a = a0 @ (torch.eye(3) + lin)
        y = a @ (x - c[:, None]) + (b0 + dt * scale_t)[:, None]
        coords = y.reshape(1, 3, -1, 1, 1)
        mv = sample(torch.cat([mfeat, valid_m], 1), coords, padding_mode="zeros")[0, :, :, 0, 0]
        wv = mv[-1]
        ssd = (((mv[:-1] - ff) ** 2).sum(0) * wv).sum() / wv.sum().clamp_min(1.0)
        out_pen = (1 - wv).mean()
        loss = ssd + cfg.linear_penalty * (lin ** 2).sum() + out_pen
        loss.backward()
        opt.step()
    with torch.no_grad():
        a = (a0 @ (torch.eye(3) + lin)).double().numpy()
        b = (b0 + dt * scale_t).double().numpy() - a @ centre
    vox_new = np.eye(4)
    vox_new[:3, :3], vox_new[:3, 3] = a, b
    return mc.affine @ vox_new @ np.linalg.inv(fc.affine)


def affine_alignment(fixed: Volume, moving: Volume, fixed_modality: str, moving_modality: str,
                     cfg: InitConfig | None = None) -> np.ndarray:
    """Translation search + affine refinement on MIND-SSC (fixed world -> moving world)."""
    cfg = cfg or InitConfig()
    fc, ffeat, fbody = _coarse(fixed, fixed_modality, cfg.search_mm, cfg)
    mc, mfeat, mbody = _coarse(moving, moving_modality, cfg.search_mm, cfg)
    if not mbody.any():
        raise DinoregError("The affine alignment found no body in the moving scan.")
    shift = translation_search(ffeat[0], torch.ones(fc.shape), mfeat[0], torch.from_numpy(mbody), cfg.min_overlap)
    # moving coarse voxel j <-> fixed coarse voxel j + shift: world(fixed j+s) -> world(moving j)
    fw = fc.affine[:3, :3] @ shift + fc.affine[:3, 3]
    mw = mc.affine[:3, 3]
    t = translation(mw - fw)
    return _affine_refine(fc, ffeat, fbody, mc, mfeat, t, cfg)


def initial_alignment(fixed: Volume, moving: Volume, method: str = "none", *, fixed_modality: str | None = None,
                      moving_modality: str | None = None, cfg: InitConfig | None = None) -> np.ndarray:
    """(4,4) fixed-world -> moving-world transform by ``method`` in {"none", "com", "affine"}."""
    fm = fixed_modality or guess_modality(fixed.array)
    mm = moving_modality or guess_modality(moving.array)
    if method == "none":
        return np.eye(4)
    if method == "com":
        return com_alignment(fixed, moving, fm, mm)
    if method == "affine":
        return affine_alignment(fixed, moving, fm, mm, cfg)
    raise DinoregError(f"Unknown initial alignment '{method}'; use none, com or affine.")
