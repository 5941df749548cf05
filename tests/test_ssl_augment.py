"""3D views: crops, intensity augmentation, GIN, and flip-back alignment of the student's patch tokens."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoreg_core.data.augment import (AugmentConfig, contrast, flip_tokens, flip_volume, gamma, gaussian_blur, gin,
                                       intensity_augment, intensity_remap, make_views, random_crop_box, random_zoom_box, region_box,
                                       resample_box)
from dinoreg_core.ssl.heads import DINOHead
from dinoreg_core.ssl.masking import random_block_mask
from dinoreg_core.ssl.meta import SSLNet

NO_INTENSITY = dict(bias_field_prob=0.0, gamma_prob=0.0, contrast_prob=0.0, noise_prob=0.0, blur_prob=0.0,
                    gin_prob=0.0)


def _phantom(D=40, seed=0) -> torch.Tensor:
    """A (D,D,D) volume in [0,1] with a few blobs (no symmetry)."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*[torch.arange(D, dtype=torch.float32)] * 3, indexing="ij")
    v = torch.zeros(D, D, D)
    for _ in range(6):
        c = torch.rand(3, generator=g) * D * 0.8 + D * 0.1
        r = torch.rand(3, generator=g) * D * 0.15 + 2
        v[((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1] = float(torch.rand((), generator=g))
    return (v + 0.05 * torch.rand(D, D, D, generator=g)).clamp(0, 1)


class PoolBackbone(nn.Module):
    """A flip-equivariant backbone by construction: token = mean of its patch times a learned vector."""

    def __init__(self, patch_size=4, dim=8):
        super().__init__()
        self.cfg = SimpleNamespace(patch_size=patch_size)
        self.w = nn.Parameter(torch.randn(dim))
        self.mask_token = nn.Parameter(torch.randn(dim) + 5.0)

    def forward(self, x, masks=None):
        t = F.avg_pool3d(x, self.cfg.patch_size).flatten(2).transpose(1, 2) * self.w      # (B, N, dim)
        if masks is not None:
            t = torch.where(masks[..., None], self.mask_token.expand_as(t), t)
        return {"cls": t.mean(1), "patch_tokens": t}


def test_flip_back_aligns_student_tokens_and_masks_with_the_teacher_grid():
    torch.manual_seed(0)
    B, S, p = 6, 32, 4
    grid = (S // p,) * 3
    views = torch.stack([_phantom(S, seed=i)[None] for i in range(B)])              # (B,1,S,S,S)
    flips = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    student_views = torch.stack([flip_volume(v, f) for v, f in zip(views, flips)])
    masks = torch.stack([random_block_mask(grid, torch.Generator().manual_seed(i), probability=1.0)
                         for i in range(B)])
    net = SSLNet(PoolBackbone(p), DINOHead(8, 16, 12, 4, 2))
    with torch.no_grad():
        t = net.forward_teacher(views, masks)
        s = net(student_views, masks, flips)
    keep = ~masks
    # unmasked tokens: the student's flipped-back tokens are the teacher's tokens at the same place
    assert torch.allclose(s["patch_tokens"][keep], t["patch_tokens"][keep], atol=1e-6)
    # masked tokens (teacher frame) are exactly where the student saw the mask token
    mt = net.backbone.mask_token
    assert torch.equal(s["patch_tokens"][masks], mt.expand(int(masks.sum()), -1))
    # negative control: without flipping back, the flipped samples do not line up
    raw = net.backbone(student_views)["patch_tokens"]
    assert not torch.allclose(raw[1:], t["patch_tokens"][1:], atol=1e-3)
    # the masked logits of student and teacher come in the same order (same number, one per masked token)
    assert s["masked_logits"].shape == t["masked_logits"].shape == (int(masks.sum()), 16)


def test_flip_tokens_index_bookkeeping_on_a_marker():
    S, p = 16, 4
    grid = (4, 4, 4)
    vol = torch.zeros(1, S, S, S)
    vol[0, 1, 6, 13] = 1.0                      # lies in token (0, 1, 3)
    expected = (0 * 4 + 1) * 4 + 3
    for f in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]):
        flips = torch.tensor([f], dtype=torch.bool)
        tokens = F.avg_pool3d(flip_volume(vol, flips[0])[None], p).flatten(1)      # (1, N) in the flipped frame
        assert int(tokens.argmax()) != expected                                    # moved by the flip
        back = flip_tokens(tokens, grid, flips)
        assert int(back.argmax()) == expected
    # a flip is its own inverse, also for (B,N,C) tokens
    x = torch.randn(2, 64, 3)
    fl = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    assert torch.equal(flip_tokens(flip_tokens(x, grid, fl), grid, fl), x)


def test_crop_box_and_resampling():
    g = torch.Generator().manual_seed(0)
    shape = (50, 40, 30)
    for _ in range(50):
        start, size = random_crop_box(shape, (0.1, 0.4), 4 / 3, g)
        assert all(s >= 0 and s + e <= n + 1e-6 for s, e, n in zip(start, size, shape))
        frac = size[0] * size[1] * size[2] / (50 * 40 * 30)
        assert frac <= 0.4 + 1e-6
    # zoom mode: edges of about out_size * zoom voxels (aspect jitter 4/3), whatever the volume size
    big = (200, 180, 160)
    for _ in range(50):
        start, size = random_zoom_box(big, 32, (0.8, 1.25), 4 / 3, g)
        vol = size[0] * size[1] * size[2]
        assert 0.8 ** 3 * 32 ** 3 - 1e-3 <= vol <= 1.25 ** 3 * 32 ** 3 + 1e-3
        assert all(0.8 * 32 * 0.75 - 1e-6 <= e <= 1.25 * 32 * 1.34 for e in size)
        assert all(s >= 0 and s + e <= n + 1e-6 for s, e, n in zip(start, size, big))
    start, size = random_zoom_box((20, 20, 20), 32, (1.0, 1.0), 1.0, g)          # clipped to a small volume
    assert size == (20.0, 20.0, 20.0)
    x = torch.rand(1, 16, 12, 10)
    # a box on voxel boundaries resampled at its own size is an exact copy of the sub-volume
    assert torch.allclose(resample_box(x, (4, 2, 0), (8, 8, 8), 8), x[:, 4:12, 2:10, 0:8], atol=1e-5)
    c = torch.rand(1, 8, 8, 8)
    assert torch.allclose(resample_box(c, (0, 0, 0), (8, 8, 8), 8), c, atol=1e-6)
    y = resample_box(x, (0, 0, 0), (16, 12, 10), 20)                 # upsampled whole volume
    assert y.shape == (1, 20, 20, 20)
    assert float(y.mean()) == pytest.approx(float(x.mean()), abs=0.02)


def test_region_keeps_every_crop_of_a_sample_inside_one_box():
    g = torch.Generator().manual_seed(0)
    assert region_box((50, 40, 30), None, g) == ((50, 40, 30), (0.0, 0.0, 0.0))
    for _ in range(20):
        size, start = region_box((50, 40, 30), 24, g)
        assert size == (24, 24, 24) and all(0 <= s <= n - 24 for s, n in zip(start, (50, 40, 30)))
    assert region_box((50, 16, 30), 24, g)[0] == (24, 16, 24)                    # clipped to a thin volume
    # a ramp along axis 0 (1/48 per voxel): with a region, the two global crops of a sample lie in the same
    # 12-voxel box, so they are at most 4 voxels apart (|difference| <= 4/48); without, up to 40 voxels apart
    vol = torch.linspace(0, 1, 48)[:, None, None].expand(48, 48, 48).contiguous()
    cfg = AugmentConfig(global_size=8, local_size=4, n_local=2, global_zoom=(1.0, 1.0), local_zoom=(1.0, 1.0),
                        max_aspect=1.0, region_size=12, **NO_INTENSITY)
    gaps_region, gaps_free = [], []
    for seed in range(30):
        v = make_views(vol, cfg, torch.Generator().manual_seed(seed))
        gaps_region.append(float((v["teacher_global"][0] - v["teacher_global"][1]).abs().mean()))
        v = make_views(vol, AugmentConfig(**{**cfg.__dict__, "region_size": None}), torch.Generator().manual_seed(seed))
        gaps_free.append(float((v["teacher_global"][0] - v["teacher_global"][1]).abs().mean()))
    assert max(gaps_region) <= 4 / 47 + 1e-4 and sum(gaps_free) > 3 * sum(gaps_region)
    assert AugmentConfig(region_size="none").region_size is None and AugmentConfig(region_size="48").region_size == 48


def test_views_are_deterministic_and_student_equals_flipped_teacher_without_intensity_aug():
    vol = _phantom(40)
    cfg = AugmentConfig(global_size=16, local_size=8, n_local=3, **NO_INTENSITY)
    v1 = make_views(vol, cfg, torch.Generator().manual_seed(5))
    v2 = make_views(vol, cfg, torch.Generator().manual_seed(5))
    v3 = make_views(vol, cfg, torch.Generator().manual_seed(6))
    assert v1["teacher_global"].shape == (2, 1, 16, 16, 16) and v1["local"].shape == (3, 1, 8, 8, 8)
    assert all(torch.equal(v1[k], v2[k]) for k in v1)
    assert not torch.equal(v1["teacher_global"], v3["teacher_global"])
    for t, s, f in zip(v1["teacher_global"], v1["student_global"], v1["student_flips"]):
        assert torch.equal(s, flip_volume(t, f))
    # with intensity augmentation the student differs, the teacher does not
    aug = make_views(vol, AugmentConfig(global_size=16, local_size=8, n_local=3, gin_prob=1.0),
                     torch.Generator().manual_seed(5))
    assert not torch.allclose(aug["student_global"][0], flip_volume(aug["teacher_global"][0], aug["student_flips"][0]))
    for k in ("teacher_global", "student_global", "local"):
        assert float(aug[k].min()) >= 0.0 and float(aug[k].max()) <= 1.0


def test_intensity_transforms_do_what_they_say():
    g = torch.Generator().manual_seed(0)
    x = _phantom(24)[None]
    # gamma is a monotone remapping: voxel order preserved
    y = gamma(x, g, 0.35)
    order = torch.argsort(x.flatten())
    assert bool((y.flatten()[order].diff() >= -1e-6).all())
    # contrast keeps the mean
    assert float(contrast(x, g, 0.5, 0.5).mean()) == pytest.approx(float(x.mean()), abs=1e-5)
    # blur keeps the mean (inside) and lowers the voxel-to-voxel variation
    b = gaussian_blur(x, 1.0)
    assert float(b.diff(dim=-1).abs().mean()) < 0.6 * float(x.diff(dim=-1).abs().mean())
    # GIN: same mean/std before blending, a non-linear (not affine) remapping, deterministic by seed
    out = [gin(x, torch.Generator().manual_seed(s)) for s in range(8)]
    assert torch.equal(out[0], gin(x, torch.Generator().manual_seed(0)))
    r2 = []
    for o in out:
        A = torch.stack([x.flatten(), torch.ones(x.numel())], 1)
        sol = torch.linalg.lstsq(A, o.flatten()[:, None]).solution
        res = o.flatten() - (A @ sol)[:, 0]
        r2.append(1 - float(res.var() / o.flatten().var()))
    assert min(r2) < 0.9                       # some draws remap intensities clearly non-linearly
    full = intensity_augment(x, AugmentConfig(bias_field_prob=1, gamma_prob=1, contrast_prob=1, noise_prob=1,
                                              blur_prob=1, gin_prob=1), g)
    assert full.shape == x.shape and float(full.min()) >= 0 and float(full.max()) <= 1


def test_intensity_remap_is_a_function_of_intensity_that_can_reorder_tissues():
    # four "tissues" at known intensities plus a ramp
    x = torch.cat([torch.full((100,), v) for v in (0.1, 0.35, 0.6, 0.9)] + [torch.linspace(0, 1, 101)])[None]
    outs = [intensity_remap(x, torch.Generator().manual_seed(s), n_knots=6, monotone_prob=0.0) for s in range(20)]
    for y in outs:
        assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        for v in (0.1, 0.35, 0.6, 0.9):                  # equal inputs -> equal outputs
            vals = y[x == v]
            assert float(vals.max() - vals.min()) == 0.0
    # piecewise linear through the knots: at the knot inputs 0, 0.2, ..., 1 the ramp takes the knot values,
    # and half-way between two knots their mean
    ramp = outs[0][0, 400:]
    knots = ramp[::20]
    torch.testing.assert_close(ramp[10::20], 0.5 * (knots[:-1] + knots[1:]), atol=1e-5, rtol=0)
    # non-monotone curves re-order the tissues in some draws (as CT -> MR does); monotone ones never do
    def order(y):
        return tuple(torch.argsort(torch.stack([y[x == v][0] for v in (0.1, 0.35, 0.6, 0.9)])).tolist())
    assert len({order(y) for y in outs}) > 3
    mono = [intensity_remap(x, torch.Generator().manual_seed(s), monotone_prob=1.0) for s in range(10)]
    assert {order(y) for y in mono} == {(0, 1, 2, 3)}
    # deterministic by seed; in the views only the student is remapped, through one curve per view
    assert torch.equal(outs[3], intensity_remap(x, torch.Generator().manual_seed(3), 6, 0.0))
    vol = _phantom(40)
    cfg = AugmentConfig(global_size=16, local_size=8, n_local=0, flip_prob=0.0, remap_prob=1.0, **NO_INTENSITY)
    v = make_views(vol, cfg, torch.Generator().manual_seed(1))
    t, st = v["teacher_global"][0].flatten(), v["student_global"][0].flatten()
    assert not torch.allclose(t, st)
    idx = torch.argsort(t)                                 # the student is a continuous function of the teacher:
    jumps = (st[idx].diff().abs() / t[idx].diff().clamp_min(1e-6))   # slope bounded by the steepest segment
    assert float(jumps.max()) <= 5.0 * 1.0 + 1e-3          # 5 segments of width 0.2, values in [0,1]
