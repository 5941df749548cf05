"""Dense 3D features from a ViT3D backbone: one full-volume pass when it fits a memory budget, else sliding windows.

Input: an image (1,1,D,H,W) float32 normalised to [0,1] (:func:`dinoreg_core.preprocess.normalize_intensity`).
Output: features (1, C * len(blocks), d, h, w) float32 with d = ceil(D / patch_size) (same for h, w).

Grid alignment. Unless ``fit="pad"``, the image is first resampled (trilinear) to (d*p, h*p, w*p) voxels, the
nearest multiple of the patch size p at or above its size (a stretch of at most p-1 voxels). Token j then covers
exactly the fraction [j/d, (j+1)/d) of the image extent, so :func:`dinoreg_core.features.pca.upsample` (trilinear,
``align_corners=False``) maps the token grid back onto the image grid without a shift. With ``fit="pad"`` the model
zero-pads at the far end instead and the last token overhangs the image.

Full volume or windows. :func:`estimate_memory_bytes` predicts the peak activation memory of one forward pass
from the token count, embedding width, MLP width and the number of returned blocks (it assumes a fused
scaled-dot-product-attention kernel, which PyTorch uses on CPU (float32) and CUDA, so attention costs O(tokens)
memory; measured on CPU it is conservative, 1.3-1.9x the RSS increase of a full pass, see
results/bench/features_dino3d.csv).
When it exceeds ``memory_budget_gb`` the volume is processed in overlapping windows (default: the
pretraining crop, ``pos_grid * patch_size`` voxels per axis, stride ``(1 - overlap)`` of it) whose token
features are blended with Gaussian (sigma = window/4) or linear-ramp weights. One window plus the float32
blending accumulators over the whole token grid never exceed the budget: the window is shrunk (down to 4
tokens per axis) until they fit.

Predict, then pick (``mode="auto"``, the default). Attention costs O(tokens^2) arithmetic, so one pass over a
whole 192x160x256 volume (122,880 tokens) costs far more than windows of the pretraining crop (512-32,768 tokens)
that cover it with overlap. :func:`estimate_cost` predicts the arithmetic of either (linear layers, attention,
per-token element-wise work, in multiply-add equivalents weighted by constants measured on CPU, see
``ATTENTION_COST``), and the full pass is kept unless the windows are predicted at least
``SLIDING_MIN_GAIN`` times cheaper (a full pass sees the whole volume, so it wins ties). ``mode="memory"`` is the
previous rule (full pass whenever it fits the budget); "full" and "sliding" force one.

Batched windows. Windows are run ``batch`` at a time through one forward pass (as many as the memory budget
allows, at most ``MAX_WINDOW_BATCH``); their blended features are accumulated with one ``index_add_`` per batch,
so no Python work is done per window. The result equals a window-by-window loop to float rounding.

Features are the patch tokens of the chosen blocks after the model's final LayerNorm (block -1 = the last
block, as the authors use), concatenated along channels in the order given.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DinoregError
from ..models.vit3d import ViT3D, ViT3DConfig


# Cost model constants (multiply-add equivalents), measured on a 2-core x86 CPU with torch 2.13 (float32):
# scaled_dot_product_attention ran at 5.5-6.8 G multiply-adds/s beside nn.Linear's 3.5-5.3 (1 thread, loaded
# machine), so an attention multiply-add costs about one linear one; the time split of the demo model in
# 8^3-token windows (results/bench/features_cost_p17.csv: attention 53 %, MLP 31 %, rest of the model 11 %)
# matches the predicted attention/MLP ratio (1.8 vs 1.7 measured) and puts the rest (LayerNorms, residual
# adds, LayerScale, position embedding) at about 75 multiply-adds per channel (C + H) per token and block.
ATTENTION_COST = 1.0
ELEMENTWISE_COST = 75.0
SLIDING_MIN_GAIN = 2.0   # windows replace the full pass only when predicted at least this many times cheaper
MAX_WINDOW_BATCH = 64    # windows per forward pass at most (bigger batches gained nothing measurable on CPU)
MODES = ("auto", "memory", "full", "sliding")
# Windows tile the volume without overlap by default. On the evaluation protocol (30 inter-patient pairs at 3 mm,
# CT-CT / MR-MR / MR-CT, demo weights, official preset) overlap 0 and 0.5 gave the same Dice (mean difference
# -0.0013, paired Wilcoxon p 0.44; results/protocol/README.md), and 0.5 costs about 5x the windows at 192x160x256
# (1485 against 240 windows of 8^3 tokens).
DEFAULT_OVERLAP = 0.0


@dataclass
class ExtractConfig:
    """How to compute dense features (see the module docstring)."""

    blocks: tuple = (-1,)              # block indices (negative from the end); features are concatenated
    memory_budget_gb: float = 4.0      # above this predicted peak, use sliding windows
    mode: str = "auto"                 # auto (cheapest predicted) | memory (full if it fits) | full | sliding
    window_batch: int = 0              # windows per forward pass (0: as many as the budget allows, <= 64)
    window: tuple | int | None = None  # window size in voxels (None: the pretraining crop pos_grid * patch_size)
    overlap: float = DEFAULT_OVERLAP   # fraction of the window shared by neighbouring windows (0 <= overlap < 1)
    blend: str = "gaussian"            # "gaussian" (sigma = window / 4) or "linear" (tent-shaped ramp)
    fit: str = "resample"              # "resample" the image to a multiple of patch_size, or zero-"pad" it
    amp: bool = True                   # bf16 autocast on CUDA (CPU always runs float32)
    progress: bool = True              # tqdm bar over windows


@dataclass
class Plan:
    """What :func:`extract_features` will do: "full" or "sliding", token grid, window and starts (tokens)."""

    mode: str
    grid: tuple
    window: tuple          # window size in tokens
    starts: list           # window start (tokens) per window, each a (d,h,w) tuple
    est_bytes: int         # predicted peak bytes: one forward pass (+ the blending accumulators when sliding)
    batch: int = 1         # windows per forward pass
    cost: dict = None      # predicted cost (multiply-adds) of "full" and "sliding"


def estimate_memory_bytes(cfg: ViT3DConfig, grid, n_blocks: int = 1, bytes_per_el: int = 4) -> int:
    """Predicted peak activation bytes of one no-grad forward pass of ``cfg`` over a token ``grid``.

    T = tokens (+ prefix); per block at most ~8 T*C (residual, norm, qkv, rotated q/k, attention output) plus
    ~4 T*H (SwiGLU gate, value, product, norm) live at once; the returned block features add n_blocks * T * C;
    times 1.5 for allocator slack. Assumes a fused attention kernel (no T x T score matrix).
    """
    T = math.prod(int(g) for g in grid) + 1 + cfg.num_register_tokens
    live = T * (8 * cfg.embed_dim + 4 * cfg.mlp_hidden)
    kept = (n_blocks + 1) * T * cfg.embed_dim
    return int(1.5 * bytes_per_el * (live + kept))


def estimate_cost(cfg: ViT3DConfig, window, n_windows: int = 1) -> float:
    """Predicted arithmetic (multiply-add equivalents) of ``n_windows`` forward passes over a token ``window``.

    Per block and token: qkv + output projection 4 C^2, SwiGLU 3 C H, element-wise ELEMENTWISE_COST (C + H);
    per block and window: attention 2 T^2 C (scores and weighted sum) x ATTENTION_COST; plus the patch embedding.
    """
    T = math.prod(int(g) for g in window) + 1 + cfg.num_register_tokens
    C, H = cfg.embed_dim, cfg.mlp_hidden
    per_token = 4 * C * C + 3 * C * H + ELEMENTWISE_COST * (C + H)
    per_block = T * per_token + ATTENTION_COST * 2 * T * T * C
    embed = T * C * cfg.patch_size ** 3 * cfg.in_chans
    return float(n_windows) * (cfg.depth * per_block + embed)


def _window_starts(n: int, win: int, stride: int) -> list[int]:
    if win >= n:
        return [0]
    starts = list(range(0, n - win + 1, stride))
    if starts[-1] != n - win:
        starts.append(n - win)
    return starts


def plan_extraction(cfg: ViT3DConfig, image_shape, ecfg: ExtractConfig, bytes_per_el: int = 4) -> Plan:
    """Decide between one full pass and sliding windows for an image of spatial size ``image_shape`` (D,H,W)."""
    p = cfg.patch_size
    grid = tuple(max(1, -(-int(s) // p)) for s in image_shape)
    nb = len(ecfg.blocks)
    budget = ecfg.memory_budget_gb * 1024 ** 3
    if ecfg.mode not in MODES:
        raise DinoregError(f"Unknown extraction mode '{ecfg.mode}'; use one of {', '.join(MODES)}.")
    full = estimate_memory_bytes(cfg, grid, nb, bytes_per_el)
    full_plan = Plan("full", grid, grid, [(0, 0, 0)], full, 1, {"full": estimate_cost(cfg, grid)})
    if ecfg.mode == "full" or (ecfg.mode == "memory" and full <= budget):
        return full_plan
    try:
        sliding = _sliding_plan(cfg, grid, ecfg, bytes_per_el)
    except DinoregError:
        if ecfg.mode == "auto" and full <= budget:
            return full_plan
        raise
    sliding.cost["full"] = full_plan.cost["full"]
    full_plan.cost["sliding"] = sliding.cost["sliding"]
    if ecfg.mode == "auto" and full <= budget and sliding.cost["sliding"] * SLIDING_MIN_GAIN > full_plan.cost["full"]:
        return full_plan
    return sliding


def _sliding_plan(cfg: ViT3DConfig, grid, ecfg: ExtractConfig, bytes_per_el: int) -> Plan:
    p = cfg.patch_size
    nb = len(ecfg.blocks)
    budget = ecfg.memory_budget_gb * 1024 ** 3
    if not 0 <= ecfg.overlap < 1:
        raise DinoregError(f"Sliding-window overlap must be in [0, 1), got {ecfg.overlap}.")
    if ecfg.window is None:
        win = tuple(int(g) for g in cfg.pos_grid)
    else:
        w = (ecfg.window,) * 3 if isinstance(ecfg.window, int) else tuple(ecfg.window)
        win = tuple(max(1, -(-int(s) // p)) for s in w)
    win = tuple(min(a, g) for a, g in zip(win, grid))
    # float32 accumulators over the whole token grid: weighted sum, weight sum and the blended result
    acc = 4 * math.prod(grid) * (2 * nb * cfg.embed_dim + 1)
    while estimate_memory_bytes(cfg, win, nb, bytes_per_el) + acc > budget and max(win) > 4:
        win = tuple(max(4, min(a, (a * 3) // 4)) if a == max(win) else a for a in win)
        win = tuple(min(a, g) for a, g in zip(win, grid))
    est = estimate_memory_bytes(cfg, win, nb, bytes_per_el) + acc
    if est > budget:
        raise DinoregError(f"Even a {win} token window needs about {est / 1024 ** 3:.2f} GB, more than the "
                           f"memory budget of {ecfg.memory_budget_gb} GB; raise memory_budget_gb.")
    strides = [max(1, int(round(a * (1 - ecfg.overlap)))) for a in win]
    axes = [_window_starts(g, a, s) for g, a, s in zip(grid, win, strides)]
    starts = list(itertools.product(*axes))
    one = estimate_memory_bytes(cfg, win, nb, bytes_per_el)
    batch = int(ecfg.window_batch) if ecfg.window_batch else int(max(1, (budget - acc) // one))
    batch = max(1, min(batch, MAX_WINDOW_BATCH, len(starts)))
    return Plan("sliding", grid, win, starts, one * batch + acc, batch,
                {"sliding": estimate_cost(cfg, win, len(starts))})


def blend_weights(window, kind: str = "gaussian", device=None) -> torch.Tensor:
    """Blending weights (d,h,w) over a window of tokens, maximal in the centre, strictly positive at the rim."""
    ws = []
    for n in window:
        c = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n - 0.5   # -0.5..0.5
        if kind == "gaussian":
            w = torch.exp(-0.5 * (c / 0.25) ** 2)        # sigma = window / 4
        elif kind == "linear":
            w = 1.0 - 2.0 * c.abs()                       # tent: 1 at the centre, 1/n at the rim
        else:
            raise DinoregError(f"Unknown blend '{kind}'; use 'gaussian' or 'linear'.")
        ws.append(w.clamp_min(1e-3))
    return ws[0][:, None, None] * ws[1][None, :, None] * ws[2][None, None, :]


def _forward_blocks(model: ViT3D, x: torch.Tensor, blocks, amp: bool) -> torch.Tensor:
    """Patch-token features (1, C*len(blocks), d, h, w) float32 of one forward pass."""
    use_amp = amp and x.device.type == "cuda"
    with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = model(x, return_blocks=list(blocks))
    return torch.cat([out["blocks"][b].float() for b in blocks], dim=1)


def prepare_image(image: torch.Tensor, patch_size: int, fit: str = "resample") -> torch.Tensor:
    """(1,1,D,H,W) -> the network input: resampled to multiples of ``patch_size`` ("resample") or unchanged ("pad")."""
    if fit == "pad":
        return image
    if fit != "resample":
        raise DinoregError(f"Unknown fit '{fit}'; use 'resample' or 'pad'.")
    size = tuple(max(1, -(-int(s) // patch_size)) * patch_size for s in image.shape[2:])
    if size == tuple(image.shape[2:]):
        return image
    return F.interpolate(image, size=size, mode="trilinear", align_corners=False)


def extract_features(model: ViT3D, image: torch.Tensor, ecfg: ExtractConfig | None = None,
                     device=None) -> torch.Tensor:
    """Dense features (1, C*len(blocks), d, h, w) float32 of ``image`` (1,1,D,H,W) on ``device``.

    Uses one full-volume pass or Gaussian/linear-blended sliding windows, as :func:`plan_extraction` decides.
    """
    ecfg = ecfg or ExtractConfig()
    if image.ndim != 5 or image.shape[0] != 1 or image.shape[1] != model.cfg.in_chans:
        raise DinoregError(f"Expected an image of shape (1,{model.cfg.in_chans},D,H,W), got {tuple(image.shape)}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    for b in ecfg.blocks:
        if not -model.cfg.depth <= int(b) < model.cfg.depth:
            raise DinoregError(f"Block index {b} is out of range for a backbone of depth {model.cfg.depth}.")
    x = prepare_image(image.to(device, torch.float32), model.cfg.patch_size, ecfg.fit)
    bpe = 2 if (ecfg.amp and device.type == "cuda") else 4
    plan = plan_extraction(model.cfg, x.shape[2:], ecfg, bytes_per_el=bpe)
    if plan.mode == "full":
        return _forward_blocks(model, x, ecfg.blocks, ecfg.amp)

    return _sliding(model, x, plan, ecfg)


def _sliding(model: ViT3D, x: torch.Tensor, plan: Plan, ecfg: ExtractConfig) -> torch.Tensor:
    """Blended window features (1, C, *grid): ``plan.batch`` windows per forward pass, one index_add_ per batch."""
    p = model.cfg.patch_size
    device = x.device
    grid, win = plan.grid, plan.window
    # zero-pad to the token grid (a "pad" fit leaves a partial patch at the far end): the model would pad each
    # far-end window with the same zeros, so every window now has the full size and windows can be batched
    pads = []
    for s, g in zip(reversed(x.shape[2:]), reversed(grid)):
        pads += [0, g * p - s]
    vol = (F.pad(x, pads) if any(pads) else x)[0, 0]
    C = model.cfg.embed_dim * len(ecfg.blocks)
    n_tok = math.prod(grid)
    acc = torch.zeros(n_tok, C, device=device)            # channels last: one row per token of the grid
    wsum = torch.zeros(n_tok, device=device)
    wts = blend_weights(win, ecfg.blend, device)          # (t0, t1, t2)
    g1, g2 = grid[1], grid[2]
    ar = [torch.arange(n, device=device) for n in win]
    offs = (ar[0][:, None, None] * (g1 * g2) + ar[1][None, :, None] * g2 + ar[2][None, None, :]).reshape(-1)
    vox = [torch.arange(n * p, device=device) for n in win]
    starts = torch.tensor(plan.starts, device=device, dtype=torch.long).reshape(-1, 3)
    batches = range(0, len(starts), plan.batch)
    bar = tqdm(batches, desc="dino3d windows", disable=not ecfg.progress or len(batches) < 2, leave=False)
    for b0 in bar:
        s = starts[b0:b0 + plan.batch]                     # (B, 3) token starts
        i0, i1, i2 = (s[:, a:a + 1] * p + vox[a][None] for a in range(3))
        crops = vol[i0[:, :, None, None], i1[:, None, :, None], i2[:, None, None, :]]  # (B, w0p, w1p, w2p)
        f = _forward_blocks(model, crops[:, None], ecfg.blocks, ecfg.amp)  # (B, C, t0, t1, t2)
        f = (f * wts).permute(0, 2, 3, 4, 1).reshape(-1, C)
        rows = ((s[:, 0] * (g1 * g2) + s[:, 1] * g2 + s[:, 2])[:, None] + offs[None]).reshape(-1)
        acc.index_add_(0, rows, f)
        wsum.index_add_(0, rows, wts.reshape(-1).repeat(len(s)))
    acc /= wsum[:, None]
    return acc.t().reshape(1, C, *grid)
