"""3D block masking and the step schedules (hand-computed values)."""

import math

import pytest
import torch
from scipy import ndimage

from dinoreg_core.ssl.masking import block_mask_3d, random_block_mask
from dinoreg_core.ssl.schedules import cosine, warmup_constant, warmup_cosine


def test_block_mask_hits_the_ratio_and_is_made_of_blocks():
    grid = (8, 8, 8)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        ratio = 0.4 + 0.03 * seed                       # 0.40 .. 0.67
        target = round(ratio * 512)
        m = block_mask_3d(grid, target, g)
        assert m.shape == (512,) and m.dtype == torch.bool
        n = int(m.sum())
        assert target - 12 <= n <= target              # never more than asked, at most a few short
        # blocks, not salt-and-pepper: few connected pieces, and most masked tokens have a masked neighbour
        _, pieces = ndimage.label(m.reshape(grid).numpy())
        assert pieces <= 12
        vol = m.reshape(grid).numpy()
        nb = ndimage.convolve(vol.astype(int), ndimage.generate_binary_structure(3, 1).astype(int), mode="constant")
        assert (nb[vol] >= 3).mean() > 0.8             # itself + at least 2 masked face neighbours


def test_random_block_mask_ratio_range_probability_and_determinism():
    grid = (6, 6, 6)
    fracs = []
    for seed in range(40):
        m = random_block_mask(grid, torch.Generator().manual_seed(seed), ratio_min=0.4, ratio_max=0.7)
        fracs.append(float(m.float().mean()))
    assert min(fracs) >= 0.4 - 0.05 and max(fracs) <= 0.7
    assert max(fracs) - min(fracs) > 0.15                       # ratios actually vary over the range
    a = random_block_mask(grid, torch.Generator().manual_seed(3))
    b = random_block_mask(grid, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    none = [int(random_block_mask(grid, torch.Generator().manual_seed(s), probability=0.0).sum()) for s in range(5)]
    assert none == [0] * 5
    half = [bool(random_block_mask(grid, torch.Generator().manual_seed(s), probability=0.5).any()) for s in range(60)]
    assert 15 <= sum(half) <= 45
    with pytest.raises(ValueError):
        random_block_mask(grid, torch.Generator(), ratio_min=0.8, ratio_max=0.4)


def test_schedules_by_hand():
    # lr: linear warm-up 0 -> 1e-3 over 10 steps, then cosine to 1e-5 over the remaining 90
    assert warmup_cosine(0, 100, 1e-3, 1e-5, 10) == 0.0
    assert warmup_cosine(5, 100, 1e-3, 1e-5, 10) == pytest.approx(5e-4)
    assert warmup_cosine(10, 100, 1e-3, 1e-5, 10) == pytest.approx(1e-3)
    assert warmup_cosine(55, 100, 1e-3, 1e-5, 10) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert warmup_cosine(100, 100, 1e-3, 1e-5, 10) == pytest.approx(1e-5)
    # teacher momentum 0.992 -> 0.998 cosine: mid-way 0.995; a quarter: 0.998 - 0.003 * (1 + cos(pi/4))
    assert cosine(0, 1000, 0.992, 0.998) == pytest.approx(0.992)
    assert cosine(500, 1000, 0.992, 0.998) == pytest.approx(0.995)
    assert cosine(250, 1000, 0.992, 0.998) == pytest.approx(0.998 - 0.003 * (1 + math.cos(math.pi / 4)))
    assert cosine(2000, 1000, 0.992, 0.998) == pytest.approx(0.998)
    # weight decay 0.04 -> 0.2
    assert cosine(1000, 1000, 0.04, 0.2) == pytest.approx(0.2)
    # teacher temperature: linear 0.04 -> 0.07 over 30 steps, then constant
    assert warmup_constant(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert warmup_constant(10, 30, 0.04, 0.07) == pytest.approx(0.05)
    assert warmup_constant(30, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert warmup_constant(999, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert warmup_constant(0, 0, 0.04, 0.07) == pytest.approx(0.07)
