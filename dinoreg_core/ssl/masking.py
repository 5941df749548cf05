"""3D block masking for the iBOT masked-patch loss.

A mask is a bool tensor over the patch-token grid (d,h,w), flattened in raster order to (N,) = (d*h*w,)
exactly like the tokens of :class:`dinoreg_core.models.vit3d.ViT3D`; True = the student sees the mask
token there and must predict the teacher's patch distribution.

Blocks (BEiT-style, lifted to 3D): boxes of random volume and random aspect ratio are added until the wanted
number of tokens is masked; a box is only accepted if it adds at least one and at most the still-missing
number of tokens, so the masked count never exceeds the target (it may end a few tokens short when no box
fits the remainder). All randomness comes from the ``torch.Generator`` passed in, so a mask is a pure
function of the generator's seed.
"""

from __future__ import annotations

import math

import torch


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def block_mask_3d(grid: tuple[int, int, int], num_masked: int, generator: torch.Generator, *,
                  min_block: int = 4, max_aspect: float = 3.0, max_attempts: int = 10) -> torch.Tensor:
    """Mask about ``num_masked`` tokens of a (d,h,w) grid with random 3D boxes.

    Args:
        grid: token grid (d,h,w).
        num_masked: wanted number of masked tokens (clamped to [0, d*h*w]).
        generator: source of randomness.
        min_block: smallest box volume drawn (tokens).
        max_aspect: box edge ratios are drawn log-uniformly within [1/max_aspect, max_aspect].
        max_attempts: tries per box before giving up on the remainder.

    Returns:
        (d*h*w,) bool, raster order; ``mask.sum() <= num_masked``.
    """
    d, h, w = (int(s) for s in grid)
    n_total = d * h * w
    target = max(0, min(int(num_masked), n_total))
    mask = torch.zeros(d, h, w, dtype=torch.bool)
    count = 0
    log_a = math.log(max_aspect)
    while count < target:
        added = 0
        for _ in range(max_attempts):
            remaining = target - count
            volume = _uniform(generator, min(min_block, remaining), max(min_block, remaining))
            logs = [_uniform(generator, -log_a, log_a) for _ in range(3)]
            mean_log = sum(logs) / 3.0
            edge = volume ** (1.0 / 3.0)
            sd, sh, sw = (max(1, min(n, int(round(edge * math.exp(l - mean_log)))))
                          for n, l in zip((d, h, w), logs))
            z0, y0, x0 = _randint(generator, 0, d - sd), _randint(generator, 0, h - sh), _randint(generator, 0, w - sw)
            box = mask[z0:z0 + sd, y0:y0 + sh, x0:x0 + sw]
            new = box.numel() - int(box.sum())
            if 0 < new <= remaining:
                box.fill_(True)
                count += new
                added = new
                break
        if added == 0:
            break
    return mask.reshape(-1)


def random_block_mask(grid: tuple[int, int, int], generator: torch.Generator, *, ratio_min: float = 0.4,
                      ratio_max: float = 0.7, probability: float = 1.0, min_block: int = 4) -> torch.Tensor:
    """The iBOT mask of one view: with ``probability``, mask a ratio drawn uniformly in [ratio_min, ratio_max].

    Returns (d*h*w,) bool (all False for a view drawn as unmasked).
    """
    n = int(grid[0]) * int(grid[1]) * int(grid[2])
    if not 0.0 <= ratio_min <= ratio_max <= 1.0:
        raise ValueError(f"mask ratios must satisfy 0 <= min <= max <= 1, got {ratio_min}, {ratio_max}")
    masked = float(torch.rand((), generator=generator)) < probability
    ratio = _uniform(generator, ratio_min, ratio_max)
    if not masked:
        return torch.zeros(n, dtype=torch.bool)
    return block_mask_3d(grid, int(round(ratio * n)), generator, min_block=min_block)
