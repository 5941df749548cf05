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
from .adam_objective import TrilinearSSD, diffusion_, smooth3_
from .adam_update import AdamUpdate
from .warp import identity_grid, sample, voxel_to_normalized


# The Adam stage's two implementations. "fused" (the default) writes the objective and its gradient out
# (registration/adam_objective.py; about 2x faster on CPU, less memory). "autograd" differentiates through grid_sample
# and stays selectable as the reference. Both give the same objective and gradient to float rounding, also where a
# sample point lies exactly on a voxel (every point at Adam's first iteration after a zero discrete field): there the
# one-sided derivative follows grid_sample's float32 coordinate round trip, which the fused kernel reproduces. (It
# used to take the forward difference there, so Adam's sign-like first steps parted the runs: MIND Dice 0.702 fused
# vs 0.768 autograd on the 48x56x48 pin crop; now 0.7678 for both, fields 1.5e-6 voxel apart.)
ADAM_KERNELS = ("fused", "autograd")
_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    early_stop_patience: int = 0  # stop Adam after this many iterations without improvement (0 = off, = official)
    early_stop_tol: float = 1e-4  # an improvement counts when the objective falls by more than this fraction of it
    feature_dtype: str = "float32"  # storage of the Adam stage's features: float32 | float16 | bfloat16 (CUDA only)
    adam_kernel: str = "fused"  # Adam-stage gradient: fused (written out) | autograd (through grid_sample, the reference)
    cost_volume_max_mb: float = 512.0  # a cost volume above this: its temporaries are built in chunks (<= 1/4 of it)

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
        if self.early_stop_patience < 0 or self.early_stop_tol < 0:
            raise DinoregError("ConvexAdam settings early_stop_patience and early_stop_tol must be >= 0.")
        if self.adam_kernel not in ADAM_KERNELS:
            raise DinoregError(f"ConvexAdam setting adam_kernel={self.adam_kernel!r} must be one of "
                               f"{', '.join(ADAM_KERNELS)}.")
        if self.feature_dtype not in _STORAGE_DTYPES:
            raise DinoregError(f"ConvexAdam setting feature_dtype={self.feature_dtype!r} must be one of "
                               f"{', '.join(_STORAGE_DTYPES)}.")
        if self.cost_volume_max_mb <= 0:
            raise DinoregError(f"ConvexAdam setting cost_volume_max_mb={self.cost_volume_max_mb} must be > 0.")
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


def _padded_size(size, m: int) -> tuple:
    return tuple(-(-s // m) * m for s in size)


def _pool_axis(x: torch.Tensor, dim: int, g: int, padded: int) -> torch.Tensor:
    """Mean over cells of g voxels along ``dim`` of x replicate-padded to length ``padded`` (a multiple of g)."""
    n = x.shape[dim]
    q, r = divmod(n, g)
    parts = []
    if q:
        parts.append(x.narrow(dim, 0, q * g).unflatten(dim, (q, g)).mean(dim + 1))
    last = x.narrow(dim, n - 1, 1)
    if r:
        parts.append((x.narrow(dim, q * g, r).sum(dim, keepdim=True) + (g - r) * last) / g)
    extra = padded // g - q - (1 if r else 0)
    if extra:
        parts.append(last.expand(*[extra if d == dim else -1 for d in range(x.dim())]))
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0].contiguous()


def pool_padded(x: torch.Tensor, g: int, padded_size) -> torch.Tensor:
    """``avg_pool3d(replicate_pad(x, padded_size), g, stride=g)`` of (B,C,D,H,W) without the padded copy.

    The padded volume never exists: each axis is pooled in turn (mean over whole cells, the partial last
    cell completed by copies of the last voxel), so memory stays at one pooled copy.
    """
    for dim, p in zip((2, 3, 4), padded_size):
        x = _pool_axis(x, dim, g, p)
    return x


def displacement_candidates(disp_hw: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """All integer displacements in [-disp_hw, disp_hw]^3: (3,K), K=(2*disp_hw+1)^3, raster order (axis 0 slowest)."""
    r = torch.arange(-disp_hw, disp_hw + 1, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), 0).reshape(3, -1)


def _chunk(total: int, per_item_bytes: int, max_bytes: float | None) -> int:
    """Items per chunk so that one chunk's temporaries stay within ``max_bytes`` (all at once when None)."""
    if max_bytes is None:
        return total
    return int(max(1, min(total, max_bytes // max(1, per_item_bytes))))


def cost_volume(fix: torch.Tensor, mov: torch.Tensor, disp_hw: int, max_bytes: float | None = None) -> torch.Tensor:
    """SSD cost of every integer displacement on a coarse grid.

    Args:
        fix, mov: (1,C,n0,n1,n2) coarse features.
        disp_hw: search half width (cells).
        max_bytes: bound on the temporaries beside the result (None: one candidate slab of (2h+1)^2 shifts and
            the whole volume filtered at once). The result is written in place, candidates slab by slab, and
            box filtered in chunks of candidates, so the shifted features of all displacements never exist.

    Returns:
        (K,n0,n1,n2) cost, K in the order of :func:`displacement_candidates`, box filtered twice (3^3).
    """
    _, c, n0, n1, n2 = fix.shape
    w = 2 * disp_hw + 1
    movp = F.pad(mov, (disp_hw,) * 6)
    ff = (fix * fix).sum(1)  # (1,n0,n1,n2)
    mm = (movp * movp).sum(1)  # (1,P0,P1,P2)
    cost = torch.empty((1, w ** 3, n0, n1, n2), device=fix.device, dtype=fix.dtype)
    for a in range(w):
        for b in range(w):
            slab = movp[:, :, a:a + n0, b:b + n1, :]  # (1,C,n0,n1,n2+2h)
            mslab = mm[:, a:a + n0, b:b + n1, :]
            # cross term for all shifts along axis 2 at once via unfold
            sl = slab.unfold(4, n2, 1)  # (1,C,n0,n1,w,n2)
            out = cost[:, (a * w + b) * w:(a * w + b + 1) * w]  # (1,w,n0,n1,n2)
            out.copy_(torch.einsum("bcijn,bcijkn->bkijn", fix, sl))
            out.mul_(-2).add_(ff[:, None]).add_(mslab.unfold(3, n2, 1).permute(0, 3, 1, 2, 4))
    cells = n0 * n1 * n2
    k = _chunk(w ** 3, 4 * cells * fix.element_size(), max_bytes)  # box_filter: ~4 temporaries per candidate
    for k0 in range(0, w ** 3, k):
        cost[:, k0:k0 + k] = _box3(_box3(cost[:, k0:k0 + k]))
    return cost[0]


def _soft_argmin_field(cost: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Displacement (1,3,n0,n1,n2) of the per-cell argmin of cost (K,n0,n1,n2)."""
    idx = cost.argmin(0)
    return cand[:, idx][None]


def coupled_convex(cost: torch.Tensor, disp_hw: int, weights=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                   max_bytes: float | None = None) -> torch.Tensor:
    """Coupled convex optimisation of a discrete cost volume.

    Args:
        cost: (K,n0,n1,n2) from :func:`cost_volume`.
        weights: increasing coupling weights.
        max_bytes: bound on the temporaries (None: all cells at once); the coupled cost is then formed and
            minimised slab by slab along axis 0.

    Returns:
        (1,3,n0,n1,n2) smooth displacement in coarse cells.
    """
    cand = displacement_candidates(disp_hw, cost.device, cost.dtype)  # (3,K)
    smooth = _box3(_soft_argmin_field(cost, cand))
    cand_sq = (cand * cand).sum(0).view(-1, 1, 1, 1)  # (K,1,1,1)
    k, n0 = cost.shape[0], cost.shape[1]
    rows = _chunk(n0, 3 * k * cost[0, 0].numel() * cost.element_size(), max_bytes)
    idx = torch.empty(cost.shape[1:], device=cost.device, dtype=torch.long)
    for w in weights:
        s = smooth[0]
        for i0 in range(0, n0, rows):
            sl = slice(i0, i0 + rows)
            # |d - s|^2 = |d|^2 - 2 d.s + |s|^2 ; the last term does not change the argmin
            coupled = cost[:, sl] + w * (cand_sq - 2 * torch.einsum("ck,cijl->kijl", cand, s[:, sl]))
            idx[sl] = coupled.argmin(0)
        smooth = _box3(cand[:, idx][None])
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


def _sampling_batches(device, n0: int) -> int:
    """Slabs along axis 0 for CPU grid_sample (it parallelises over the batch only); 1 on other devices."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads() * 2, n0 // 4))


def _sample_batched(vol_b: torch.Tensor, coords: torch.Tensor, nb: int) -> torch.Tensor:
    """Trilinear, zero-padded sampling of (1,C,n0,n1,n2) features (given as nb identical copies) at voxel
    coordinates (1,3,n0,n1,n2), the points split into nb slabs along axis 0 to use all CPU threads."""
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


def adam_refine_autograd(pf: torch.Tensor, pm: torch.Tensor, init: torch.Tensor, cfg: ConvexAdamConfig,
                         log: list | None = None) -> torch.Tensor:
    """The Adam stage by autograd through grid_sample (``adam_kernel="autograd"``, the reference; same arguments
    as :func:`adam_refine` and the same result to float rounding)."""
    g = cfg.grid_sp_adam
    size = init.shape[2:]
    coarse = pf.shape[2:]
    with torch.no_grad():
        param0 = F.interpolate(init, size=coarse, mode="trilinear", align_corners=False) / g
    param = param0.clone().requires_grad_(True)
    opt = AdamUpdate([param], lr=cfg.lr)
    grid = identity_grid(coarse, pf.device, pf.dtype)
    nb = _sampling_batches(pf.device, coarse[0])
    pm_b = pm.expand(nb, -1, -1, -1, -1).contiguous()
    lam = cfg.lambda_weight
    best, stale = math.inf, 0
    for _ in range(cfg.iterations):
        param.grad = None
        u = _smooth3(param)
        reg = (lam * ((u[:, :, 1:] - u[:, :, :-1]) ** 2).mean() + lam * ((u[:, :, :, 1:] - u[:, :, :, :-1]) ** 2).mean()
               + lam * ((u[..., 1:] - u[..., :-1]) ** 2).mean())
        warped = _sample_batched(pm_b, grid + u, nb)
        objective = ((warped - pf) ** 2).mean() * cfg.cost_scale + reg
        objective.backward()
        opt.step([param.grad])
        value = float(objective.detach())
        if log is not None:
            log.append(value)
        if cfg.early_stop_patience:
            if value < best * (1.0 - cfg.early_stop_tol):
                best, stale = value, 0
            else:
                stale += 1
                if stale >= cfg.early_stop_patience:
                    break
    with torch.no_grad():
        return _upsample_cells(_smooth3(param), g, size)


def adam_refine(pf: torch.Tensor, pm: torch.Tensor, init: torch.Tensor, cfg: ConvexAdamConfig,
                log: list | None = None) -> torch.Tensor:
    """Adam instance optimisation of a displacement on the ``grid_sp_adam`` grid.

    The objective (SSD of the features + ``lambda_weight`` x diffusion of the thrice box-smoothed parameters)
    and its gradient are written out (:mod:`.adam_objective`), and so is the Adam update (:mod:`.adam_update`);
    buffers are allocated once, before the loop.
    ``adam_kernel="fused"``, the default; equals :func:`adam_refine_autograd` to float rounding.

    Args:
        pf, pm: (1,C,n0,n1,n2) fixed and moving features pooled onto the Adam grid (``grid_sp_adam`` voxels a cell).
        init: (1,3,D,H,W) initial displacement in voxels, D = n0 * grid_sp_adam (etc.).
        log: optional list receiving the objective of every iteration (before its step).

    Returns:
        (1,3,D,H,W) refined displacement in voxels.
    """
    g = cfg.grid_sp_adam
    size = init.shape[2:]
    coarse = pf.shape[2:]
    storage = _STORAGE_DTYPES[cfg.feature_dtype] if pf.device.type == "cuda" else torch.float32
    with torch.no_grad():
        param = (F.interpolate(init, size=coarse, mode="trilinear", align_corners=False) / g).contiguous()
    opt = AdamUpdate([param], lr=cfg.lr)
    ssd = TrilinearSSD(pm, pf, storage_dtype=storage)
    grid = identity_grid(coarse, pf.device, torch.float32).reshape(3, -1)
    u, tmp, grad_u = torch.empty_like(param), torch.empty_like(param), torch.empty_like(param)
    coords = torch.empty_like(grid)
    scale = cfg.cost_scale / (pf.shape[1] * grid.shape[1])  # d(mean over channels and points x cost_scale)
    lam = cfg.lambda_weight
    best, stale = math.inf, 0
    with torch.no_grad():
        for _ in range(cfg.iterations):
            smooth3_(u.copy_(param), tmp)
            torch.add(grid, u.view(3, -1), out=coords)
            ssd_sum, _ = ssd(coords, scale, out=grad_u.view(3, -1))
            objective = ssd_sum * scale + diffusion_(u, grad_u, lam, tmp)
            opt.step([smooth3_(grad_u, tmp)])  # S is self-adjoint: d/dparam = S(d/du)
            if log is not None:
                log.append(objective)
            if cfg.early_stop_patience:
                if objective < best * (1.0 - cfg.early_stop_tol):
                    best, stale = objective, 0
                else:
                    stale += 1
                    if stale >= cfg.early_stop_patience:
                        break
        u = smooth3_(u.copy_(param), tmp)
        return _upsample_cells(u, g, size)


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
    psize = _padded_size(size, m)  # replicate padding to a multiple of both grids (never materialised)
    with torch.no_grad():
        cf = pool_padded(fix.float(), cfg.grid_sp, psize)
        cm = pool_padded(mov.float(), cfg.grid_sp, psize)
        k = (2 * cfg.disp_hw + 1) ** 3
        tight = k * cf[0, 0].numel() * 4 > cfg.cost_volume_max_mb * 2 ** 20  # one cost volume above the limit
        lim = cfg.cost_volume_max_mb * 2 ** 20 / 4 if tight else None  # temporaries: a quarter of the limit
        cost = cost_volume(cf, cm, cfg.disp_hw, lim)
        disp = coupled_convex(cost, cfg.disp_hw, cfg.coupling_weights, lim)
        if cfg.ic:
            del cost
            cost_b = cost_volume(cm, cf, cfg.disp_hw, lim)
            disp_b = coupled_convex(cost_b, cfg.disp_hw, cfg.coupling_weights, lim)
            del cost_b
            disp, _ = inverse_consistency(disp, disp_b, cfg.ic_iterations)
        dense = _upsample_cells(disp, cfg.grid_sp, psize)
    t_discrete = time.perf_counter() - t
    if cfg.lambda_weight > 0 and cfg.iterations > 0:
        with torch.no_grad():
            pf = pool_padded(fix.float(), cfg.grid_sp_adam, psize)
            pm = pool_padded(mov.float(), cfg.grid_sp_adam, psize)
        refine = adam_refine if cfg.adam_kernel == "fused" else adam_refine_autograd
        dense = refine(pf, pm, dense, cfg)
        del pf, pm
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
