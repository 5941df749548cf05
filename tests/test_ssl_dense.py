"""The cross-view correspondence loss: token geometry, interpolation, and a loss that knows where points are."""

import math

import torch
import torch.nn.functional as F

from dinoreg_core.data.augment import AugmentConfig, make_views, resample_box
from dinoreg_core.ssl.dense import (DenseProjector, dense_correspondence_loss, sample_tokens, to_token_coords,
                                    token_centres)


def _fourier(points: torch.Tensor, n: int = 32, seed: int = 0) -> torch.Tensor:
    """An embedding that is a smooth, distinctive function of the volume position: (..., 3) -> (..., 2n) unit."""
    w = torch.randn(3, n, generator=torch.Generator().manual_seed(seed)) * 0.35
    z = points @ w
    return F.normalize(torch.cat([z.sin(), z.cos()], -1), dim=-1)


def test_token_centres_and_their_inverse():
    boxes = torch.tensor([[[10.0, 0.0, 5.0], [32.0, 16.0, 8.0]]])            # start, size along (D,H,W)
    c = token_centres(boxes, (4, 2, 2))                                       # (1, 16, 3)
    assert c.shape == (1, 16, 3)
    torch.testing.assert_close(c[0, 0], torch.tensor([14.0, 4.0, 7.0]))       # start + 0.5 / n * size
    torch.testing.assert_close(c[0, -1], torch.tensor([38.0, 12.0, 11.0]))    # start + 3.5 / 4 * 32, ...
    idx = to_token_coords(c, boxes, (4, 2, 2))[0]
    expect = torch.stack(torch.meshgrid(torch.arange(4.), torch.arange(2.), torch.arange(2.), indexing="ij"), -1)
    torch.testing.assert_close(idx, expect.reshape(-1, 3))


def test_sample_tokens_is_exact_at_centres_and_linear_between():
    g = torch.Generator().manual_seed(0)
    grid = (3, 4, 5)
    tok = torch.randn(2, 60, 7, generator=g)
    ijk = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij"), -1)
    coords = ijk.reshape(1, -1, 3).expand(2, -1, -1)
    torch.testing.assert_close(sample_tokens(tok, coords, grid), tok, atol=1e-5, rtol=0)
    mid = torch.tensor([[[1.0, 2.5, 3.0]]]).expand(2, 1, 3)                  # half-way along h
    v = tok.reshape(2, *grid, 7)
    torch.testing.assert_close(sample_tokens(tok, mid, grid)[:, 0], 0.5 * (v[:, 1, 2, 3] + v[:, 1, 3, 3]))


def test_make_views_reports_the_box_of_every_global_crop():
    vol = torch.rand(1, 50, 44, 40, generator=torch.Generator().manual_seed(1))
    cfg = AugmentConfig(global_size=16, local_size=8, n_local=1, global_zoom=(0.8, 1.5), region_size=36)
    v = make_views(vol, cfg, torch.Generator().manual_seed(3))
    assert v["global_boxes"].shape == (2, 2, 3)
    for crop, box in zip(v["teacher_global"], v["global_boxes"]):
        start, size = box[0].tolist(), box[1].tolist()
        assert all(s >= 0 and s + e <= n + 1e-4 for s, e, n in zip(start, size, vol.shape[1:]))
        torch.testing.assert_close(crop, resample_box(vol, start, size, 16))


def test_loss_is_low_for_a_position_embedding_and_chance_for_noise():
    """Two overlapping crops: an embedding that is a function of the volume position matches every point to its
    partner (top-1 = 1, loss near 0 at a low temperature); the same embedding with the second crop's box wrong by
    10 voxels, or random embeddings, do not."""
    grid, G, B = (8, 8, 8), 2, 3
    g = torch.Generator().manual_seed(0)
    boxes = []
    for _ in range(G):
        for _ in range(B):
            size = 24 + 12 * torch.rand(3, generator=g)
            boxes.append(torch.stack([10 * torch.rand(3, generator=g), size]))
    boxes = torch.stack(boxes)                                               # (G*B, 2, 3)
    emb = _fourier(token_centres(boxes, grid))
    loss, st = dense_correspondence_loss(emb, emb, boxes, grid, G, temp=0.05, exclude=4.0)
    assert st["queries"] > 0.3 * G * B * 512 and st["top1"] > 0.97 and float(loss) < 0.3
    shifted = boxes.clone()
    shifted[B:, 0] += 10.0                                                   # second view's box mislabelled
    loss_s, st_s = dense_correspondence_loss(emb, _fourier(token_centres(shifted, grid)), boxes, grid, G, temp=0.05,
                                             exclude=4.0)
    # (a wrong box pairs each point with the one 10 voxels away; where that one is in the crop it wins instead)
    assert st_s["top1"] < 0.6 and float(loss_s) > float(loss) + 3.0
    noise = F.normalize(torch.randn(G * B, 512, 64, generator=g), dim=-1)
    loss_n, st_n = dense_correspondence_loss(noise, noise.flip(0), boxes, grid, G, temp=1.0, exclude=4.0)
    assert st_n["top1"] < 0.05
    assert abs(float(loss_n) - math.log(512)) < 0.5                          # about log(1 + negatives)
    # masked-out queries are not counted; the projector gives unit vectors
    valid = torch.zeros(G * B, 512, dtype=torch.bool)
    valid[:, :100] = True
    _, st_v = dense_correspondence_loss(emb, emb, boxes, grid, G, valid=valid, temp=0.05)
    assert 0 < st_v["queries"] <= G * B * 100
    out = DenseProjector(48, 32, 16)(torch.randn(5, 48))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
