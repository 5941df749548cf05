"""ConvexAdam: coupled convex discrete optimisation followed by Adam instance optimisation.

Reference: Siebert, Hansen & Heinrich, "Fast 3D registration with accurate optimisation and little learning
for Learn2Reg 2021" (MICCAI 2021 challenge). This implementation is feature-agnostic (any (1,C,D,H,W)
features; MIND-SSC, PCA-reduced DINO features, intensities) and vectorised (no per-slice Python loops).

Stages, each a pure function of tensors:

1. :func:`cost_volume` — features average-pooled onto a coarse grid (``grid_sp`` voxels per cell), SSD over
   all integer coarse displacements in [-disp_hw, disp_hw]^3 (moving features outside the volume are 0), box
   filtered twice (3^3).
2. :func:`coupled_convex` — alternately take the per-cell argmin of ``cost + w * |d - smooth|^2`` and smooth the
   result (3^3 box), for an increasing coupling weight ``w`` (``coupling_weights``).
3. :func:`inverse_consistency` (optional, ``ic``) — the same for the reversed pair, then both fields are made
   inverse consistent by ``ic_iterations`` fixed-point steps.
4. :func:`adam_refine` — the field, on a grid of ``grid_sp_adam`` voxels per cell, is optimised with Adam
   (``lr``, ``iterations``) on SSD of the pooled features + ``lambda_weight`` x diffusion regulariser, the
   parameters being smoothed by three 3^3 box filters before use (a B-spline-like parametrisation).
   An optional final smoothing (``final_smooth`` odd kernel, 3 box passes) follows.

Units: displacements are (1,3,D,H,W) in voxels of the input grid, channel c = array axis c, backward
(``warped(x) = moving(x + u(x))``). Volumes whose size is not a multiple of the grid spacings are padded
(replicate) internally and cropped back, so no voxel is dropped.

Defaults equal the official package (``convexAdam.convex_adam_MIND.convex_adam_pt``): grid_sp 6, disp_hw 4,
lambda 1.25, 80 iterations, grid_sp_adam 2, ic on, no final smoothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..filters import box_filter
from .warp import identity_grid, sample, voxel_to_normalized


@dataclass
class ConvexAdamConfig:
    """Hyperparameters of :func:`convex_adam` (defaults = the official ConvexAdam MIND defaults)."""

    grid_sp: int = 6  # voxels per cell of the coarse (discrete) grid
    disp_hw: int = 4  # half width of the discrete search window, in coarse cells (4 -> 9^3 candidates)
    coupling_weights: tuple = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # schedule of the coupled convex step
    ic: bool = True  # inverse consistency of the discrete fields
    ic_iterations: int = 15  # fixed-point iterations of the inverse-consistency step
    grid_sp_adam: int = 2  # voxels per cell of the Adam grid
    lambda_weight: float = 1.25  # diffusion regularisation weight (0 disables the Adam stage)
    iterations: int = 80  # Adam iterations
    lr: float = 1.0  # Adam learning rate (cells of the Adam grid per step, roughly)
    final_smooth: int = 0  # odd box kernel for a final smoothing of the dense field (0 = none)
    cost_scale: float = 12.0  # SSD of the Adam stage = mean over channels x cost_scale (12 = sum for 12 channels)

    def validate(self) -> "ConvexAdamConfig":
        """Raise DinoregError (one sentence) unless every field is finite and within its range.

        Ranges (the caps keep a run from becoming absurd): grid_sp 1..32 and grid_sp_adam 1..16 voxels per cell;
        disp_hw 0..8 (cap: the cost volume holds (2*disp_hw+1)^3 candidates per cell, 4913 at 8 = 6.7x the
        default's 729; disp_hw 40 took 254 s); iterations 0..10000 (cap: 10x the largest count in the paper);
        lr (0, 10] cells per step (cap: larger steps overshoot the whole grid; 1e20 gave 1e18-voxel fields);
        lambda_weight 0..1000; cost_scale (0, 1e4]; final_smooth 0 or odd 1..15; ic_iterations 0..100;
        coupling_weights 1..20 finite values > 0.
        """
        from ..errors import DinoregError

        def check(name, lo, hi, *, integer=False, low_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
                raise DinoregError(f"ConvexAdam setting {name}={v!r} must be {'an integer' if integer else 'a number'}.")
            if not math.isfinite(v):
                raise DinoregError(f"ConvexAdam setting {name}={v!r} is not a finite number.")
            if v < lo or v > hi or (low_open and v == lo):
                rng = f"({lo}, {hi}]" if low_open else f"{lo}..{hi}"
                kind = " (a positive integer)" if integer and lo == 1 else ""
                raise DinoregError(f"ConvexAdam setting {name}={v!r} is out of range; allowed {rng}{kind}.")

        check("grid_sp", 1, 32, integer=True)
        check("grid_sp_adam", 1, 16, integer=True)
        check("disp_hw", 0, 8, integer=True)
        check("iterations", 0, 10000, integer=True)
        check("ic_iterations", 0, 100, integer=True)
        check("final_smooth", 0, 15, integer=True)
        check("lr", 0.0, 10.0, low_open=True)
        check("lambda_weight", 0.0, 1000.0)
        check("cost_scale", 0.0, 1e4, low_open=True)
        if self.final_smooth and self.final_smooth % 2 == 0:
            raise DinoregError(f"ConvexAdam setting final_smooth={self.final_smooth} must be odd (or 0).")
        w = tuple(self.coupling_weights)
        if not 1 <= len(w) <= 20 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                             and math.isfinite(x) and x > 0 for x in w):
            raise DinoregError(f"ConvexAdam setting coupling_weights={list(w)!r} must be 1..20 finite numbers > 0.")
        return self


@dataclass
class ConvexAdamTimings:
    """Wall time in seconds of each stage (filled by :func:`convex_adam`)."""

    seconds: dict = field(default_factory=dict)


def _box3(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Zero-padded k^3 mean filter on (B,C,D,H,W) (borders shrink towards 0, as in the reference)."""
    return box_filter(x, k, padding="zeros")


def _pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    pads = []
    for s in reversed(x.shape[2:]):
        pads += [0, (-s) % m]
    return F.pad(x, pads, mode="replicate") if any(pads) else x


def displacement_candidates(disp_hw: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """All integer displacements in [-disp_hw, disp_hw]^3: (3,K), K=(2*disp_hw+1)^3, raster order (axis 0 slowest)."""
    r = torch.arange(-disp_hw, disp_hw + 1, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), 0).reshape(3, -1)


def cost_volume(fix: torch.Tensor, mov: torch.Tensor, disp_hw: int) -> torch.Tensor:
    """SSD cost of every integer displacement on a coarse grid.

    Args:
        fix, mov: (1,C,n0,n1,n2) coarse features.
        disp_hw: search half width (cells).

    Returns:
        (K,n0,n1,n2) cost, K in the order of :func:`displacement_candidates`, box filtered twice (3^3).
    """
    _, c, n0, n1, n2 = fix.shape
    w = 2 * disp_hw + 1
    movp = F.pad(mov, (disp_hw,) * 6)
    ff = (fix * fix).sum(1)  # (1,n0,n1,n2)
    mm = (movp * movp).sum(1)  # (1,P0,P1,P2)
    costs = []
    for a in range(w):
        for b in range(w):
            slab = movp[:, :, a:a + n0, b:b + n1, :]  # (1,C,n0,n1,n2+2h)
            mslab = mm[:, a:a + n0, b:b + n1, :]
            # cross term for all shifts along axis 2 at once via unfold
            sl = slab.unfold(4, n2, 1)  # (1,C,n0,n1,w,n2)
            cross = torch.einsum("bcijn,bcijkn->bkijn", fix, sl)  # (1,w,n0,n1,n2)
            msq = mslab.unfold(3, n2, 1).permute(0, 3, 1, 2, 4)  # (1,w,n0,n1,n2)
            costs.append(ff[:, None] - 2 * cross + msq)
    cost = torch.cat(costs, dim=1)  # (1,K,n0,n1,n2)
    cost = _box3(_box3(cost))
    return cost[0]


def _soft_argmin_field(cost: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Displacement (1,3,n0,n1,n2) of the per-cell argmin of cost (K,n0,n1,n2)."""
    idx = cost.argmin(0)
    return cand[:, idx][None]


def coupled_convex(cost: torch.Tensor, disp_hw: int, weights=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0)) -> torch.Tensor:
    """Coupled convex optimisation of a discrete cost volume.

    Args:
        cost: (K,n0,n1,n2) from :func:`cost_volume`.
        weights: increasing coupling weights.

    Returns:
        (1,3,n0,n1,n2) smooth displacement in coarse cells.
    """
    cand = displacement_candidates(disp_hw, cost.device, cost.dtype)  # (3,K)
    smooth = _box3(_soft_argmin_field(cost, cand))
    cand_sq = (cand * cand).sum(0).view(-1, 1, 1, 1)  # (K,1,1,1)
    for w in weights:
        s = smooth[0]
        # |d - s|^2 = |d|^2 - 2 d.s + |s|^2 ; the last term does not change the argmin
        coupled = cost + w * (cand_sq - 2 * torch.einsum("ck,cijl->kijl", cand, s))
        smooth = _box3(_soft_argmin_field(coupled, cand))
    return smooth


def inverse_consistency(fwd: torch.Tensor, bwd: torch.Tensor, iterations: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Make two (1,3,n0,n1,n2) displacements (in cells) approximately inverse to each other.

    Each iteration replaces u by (u - v(x + u)) / 2 and v by (v - u(x + v)) / 2 (fields sampled with border
    padding), the symmetric scheme of the reference implementation.
    """
    grid = identity_grid(fwd.shape[2:], fwd.device, fwd.dtype)
    u, v = fwd, bwd
    for _ in range(iterations):
        u_new = 0.5 * (u - sample(v, grid + u, padding_mode="border"))
        v_new = 0.5 * (v - sample(u, grid + v, padding_mode="border"))
        u, v = u_new, v_new
    return u, v


def _upsample_cells(disp_cells: torch.Tensor, cell: int, size) -> torch.Tensor:
    """Coarse cell field (1,3,n...) in cells -> dense field (1,3,*size) in voxels (cell centres at cell*(i+.5)-.5)."""
    return F.interpolate(disp_cells * cell, size=tuple(size), mode="trilinear", align_corners=False)


def _smooth3(x: torch.Tensor) -> torch.Tensor:
    return _box3(_box3(_box3(x)))


def adam_refine(fix: torch.Tensor, mov: torch.Tensor, init: torch.Tensor, cfg: ConvexAdamConfig) -> torch.Tensor:
    """Adam instance optimisation of a displacement on the ``grid_sp_adam`` grid.

    Args:
        fix, mov: (1,C,D,H,W) features with D,H,W multiples of ``cfg.grid_sp_adam``.
        init: (1,3,D,H,W) initial displacement in voxels.

    Returns:
        (1,3,D,H,W) refined displacement in voxels.
    """
    g = cfg.grid_sp_adam
    size = fix.shape[2:]
    with torch.no_grad():
        pf = F.avg_pool3d(fix, g, stride=g)
        pm = F.avg_pool3d(mov, g, stride=g)
        coarse = pf.shape[2:]
        param0 = F.interpolate(init, size=coarse, mode="trilinear", align_corners=False) / g
    param = param0.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=cfg.lr)
    grid = identity_grid(coarse, fix.device, fix.dtype)
    # grid_sample parallelises over the batch only: split the sampling points into `nb` slabs along axis 0
    # and sample a batch of identical copies of the moving features (a constant, copied once).
    nb = _sampling_batches(fix.device, coarse[0])
    pm_b = pm.expand(nb, -1, -1, -1, -1).contiguous()
    lam = cfg.lambda_weight
    for _ in range(cfg.iterations):
        opt.zero_grad(set_to_none=True)
        u = _smooth3(param)
        reg = (lam * ((u[:, :, 1:] - u[:, :, :-1]) ** 2).mean() + lam * ((u[:, :, :, 1:] - u[:, :, :, :-1]) ** 2).mean()
               + lam * ((u[..., 1:] - u[..., :-1]) ** 2).mean())
        warped = _sample_batched(pm_b, grid + u, nb)
        cost = ((warped - pf) ** 2).mean() * cfg.cost_scale
        (cost + reg).backward()
        opt.step()
    with torch.no_grad():
        u = _smooth3(param)
        return _upsample_cells(u, g, size)


def _sampling_batches(device, n0: int) -> int:
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads() * 2, n0 // 4))


def _sample_batched(vol_b: torch.Tensor, coords: torch.Tensor, nb: int) -> torch.Tensor:
    """Trilinear, zero-padded sampling of (1,C,n0,n1,n2) features (given as nb identical copies) at voxel
    coordinates (1,3,n0,n1,n2), with the points split into nb slabs along axis 0 to use all CPU threads."""
    n0 = coords.shape[2]
    grid = voxel_to_normalized(coords, vol_b.shape[2:])  # (1,n0,n1,n2,3)
    if nb == 1:
        return F.grid_sample(vol_b, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    per = -(-n0 // nb)
    extra = per * nb - n0
    if extra:
        grid = torch.cat([grid, grid[:, -1:].expand(-1, extra, -1, -1, -1)], dim=1)
    grid = grid.reshape(nb, per, *grid.shape[2:])
    out = F.grid_sample(vol_b, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.permute(1, 0, 2, 3, 4).reshape(1, vol_b.shape[1], nb * per, *out.shape[3:])
    return out[:, :, :n0]


def convex_adam(fix: torch.Tensor, mov: torch.Tensor, cfg: ConvexAdamConfig | None = None,
                timings: ConvexAdamTimings | None = None) -> torch.Tensor:
    """Register moving features to fixed features.

    Args:
        fix, mov: (1,C,D,H,W) float32 features on the same grid (e.g. MIND-SSC, PCA-reduced DINO, intensity).
        cfg: hyperparameters (defaults = official ConvexAdam).
        timings: optional object receiving per-stage wall times.

    Returns:
        (1,3,D,H,W) float32 displacement in voxels, backward: ``warped(x) = moving(x + u(x))``.
    """
    import time

    cfg = (cfg or ConvexAdamConfig()).validate()
    if fix.shape != mov.shape:
        raise ValueError(f"fixed and moving features differ in shape: {tuple(fix.shape)} vs {tuple(mov.shape)}")
    t = time.perf_counter()
    size = fix.shape[2:]
    m = cfg.grid_sp * cfg.grid_sp_adam // math.gcd(cfg.grid_sp, cfg.grid_sp_adam)
    fixp, movp = _pad_to_multiple(fix.float(), m), _pad_to_multiple(mov.float(), m)
    psize = fixp.shape[2:]
    with torch.no_grad():
        cf = F.avg_pool3d(fixp, cfg.grid_sp, stride=cfg.grid_sp)
        cm = F.avg_pool3d(movp, cfg.grid_sp, stride=cfg.grid_sp)
        cost = cost_volume(cf, cm, cfg.disp_hw)
        disp = coupled_convex(cost, cfg.disp_hw, cfg.coupling_weights)
        if cfg.ic:
            cost_b = cost_volume(cm, cf, cfg.disp_hw)
            disp_b = coupled_convex(cost_b, cfg.disp_hw, cfg.coupling_weights)
            disp, _ = inverse_consistency(disp, disp_b, cfg.ic_iterations)
        dense = _upsample_cells(disp, cfg.grid_sp, psize)
    t_discrete = time.perf_counter() - t
    if cfg.lambda_weight > 0 and cfg.iterations > 0:
        dense = adam_refine(fixp, movp, dense, cfg)
    t_adam = time.perf_counter() - t - t_discrete
    with torch.no_grad():
        if cfg.final_smooth:
            k = cfg.final_smooth
            for _ in range(3):
                dense = F.avg_pool3d(dense, k, stride=1, padding=k // 2)
        dense = dense[:, :, :size[0], :size[1], :size[2]].contiguous()
    if timings is not None:
        timings.seconds.update(discrete=t_discrete, adam=t_adam, total=time.perf_counter() - t)
    return dense
