"""ViT3D behaviour: padding, masks, position-embedding interpolation, relative RoPE, blocks, checkpointing."""

import math

import pytest
import torch
import torch.nn.functional as F

from dinoreg_core.models.layers import apply_rope, grid_positions, rope_frequencies, rope_tables
from dinoreg_core.models.vit3d import CONFIGS, ViT3D, ViT3DConfig

SMALL = ViT3DConfig(embed_dim=48, depth=2, num_heads=4, pos_grid=(4, 4, 4))


def _model(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    return ViT3D(cfg).eval()


def test_configs_have_rope_compatible_heads():
    for name, cfg in CONFIGS.items():
        assert cfg.head_dim % 6 == 0 and cfg.embed_dim % cfg.num_heads == 0, name
    for name in ("tiny", "paper"):
        ViT3D(CONFIGS[name])  # builds (base/large take seconds to initialise; same code path)
    assert CONFIGS["paper"].embed_dim == 180 and CONFIGS["paper"].depth == 8 and CONFIGS["paper"].num_heads == 6
    assert CONFIGS["paper"].patch_size == 4 and CONFIGS["paper"].mlp_hidden == 480
    with pytest.raises(ValueError):
        ViT3D(ViT3DConfig(embed_dim=64, num_heads=4))  # head dim 16 is not a multiple of 6


def test_output_shapes_and_odd_sizes_are_zero_padded():
    m = _model()
    x = torch.rand(2, 1, 9, 7, 5)
    out = m(x, return_blocks=[0, -1])
    assert out["grid"] == (3, 2, 2)
    assert out["cls"].shape == (2, 48)
    assert out["patch_tokens"].shape == (2, 12, 48)
    assert out["registers"].shape == (2, 0, 48)
    assert set(out["blocks"]) == {0, -1} and out["blocks"][0].shape == (2, 48, 3, 2, 2)
    # the last block's normed output is the final patch tokens, reshaped
    torch.testing.assert_close(out["blocks"][-1], ViT3D.patch_grid(out["patch_tokens"], out["grid"]))
    # odd size == explicit zero padding at the far end
    xp = F.pad(x, (0, 3, 0, 1, 0, 3))
    assert xp.shape[2:] == (12, 8, 8)
    torch.testing.assert_close(m(xp)["patch_tokens"], out["patch_tokens"], rtol=0, atol=1e-6)


def test_volume_smaller_than_one_patch_is_padded_to_one_token():
    m = _model()
    out = m(torch.rand(1, 1, 2, 3, 1))
    assert out["grid"] == (1, 1, 1) and out["patch_tokens"].shape == (1, 1, 48)
    assert torch.isfinite(out["patch_tokens"]).all()


def test_masks_replace_patch_embeddings_with_the_mask_token():
    m = _model()
    with torch.no_grad():
        m.mask_token.normal_()
    x1 = torch.rand(1, 1, 16, 16, 16)
    masks = torch.zeros(1, 64, dtype=torch.bool)
    masks[0, [0, 5, 21, 63]] = True
    # change the image only inside the masked patches: token (0,0,0) and (3,3,3) and (0,1,1), (1,1,1)
    x2 = x1.clone()
    for idx in [0, 5, 21, 63]:
        d, h, w = idx // 16, (idx // 4) % 4, idx % 4
        x2[..., d * 4:(d + 1) * 4, h * 4:(h + 1) * 4, w * 4:(w + 1) * 4] = torch.rand(4, 4, 4)
    with torch.no_grad():
        a, b = m(x1, masks), m(x2, masks)
        c = m(x2)
        d0 = m(x1, torch.zeros_like(masks))
        e = m(x1)
    torch.testing.assert_close(a["patch_tokens"], b["patch_tokens"])     # masked content is invisible
    assert (a["patch_tokens"] - c["patch_tokens"]).abs().max() > 1e-3    # ... but matters without the mask
    torch.testing.assert_close(d0["patch_tokens"], e["patch_tokens"])     # an all-False mask changes nothing
    with pytest.raises(ValueError):
        m(x1, torch.zeros(1, 63, dtype=torch.bool))


def test_position_embedding_interpolation_keeps_values_at_matching_positions():
    m = _model(ViT3DConfig(embed_dim=48, depth=1, num_heads=4, pos_grid=(4, 5, 6)))
    pe = m.pos_embed.detach()[0]                                  # (C, 4, 5, 6)
    same = m.interpolate_pos_embed((4, 5, 6)).detach()[0]         # (N, C)
    torch.testing.assert_close(same.T.reshape(pe.shape), pe, rtol=0, atol=0)
    k = 3
    fine_grid = tuple((s - 1) * k + 1 for s in (4, 5, 6))          # every k-th fine token sits on a coarse one
    fine = m.interpolate_pos_embed(fine_grid).detach()[0].T.reshape((48,) + fine_grid)
    torch.testing.assert_close(fine[:, ::k, ::k, ::k], pe, rtol=0, atol=1e-6)
    # in between it interpolates linearly
    torch.testing.assert_close(fine[:, 1, 0, 0], pe[:, 0, 0, 0] + (pe[:, 1, 0, 0] - pe[:, 0, 0, 0]) / k,
                               rtol=0, atol=1e-6)


def test_rope_is_relative_shift_invariant_logits():
    torch.manual_seed(0)
    hd = 30
    freqs = rope_frequencies(hd)
    assert freqs.shape == (5,)
    pos = grid_positions((3, 4, 5))
    q, k = torch.randn(2, pos.shape[0], hd), torch.randn(2, pos.shape[0], hd)

    def logits(p):
        s, c = rope_tables(p, freqs)
        return apply_rope(q, s, c) @ apply_rope(k, s, c).transpose(-1, -2)

    base = logits(pos)
    shifted = logits(pos + torch.tensor([7.0, -3.0, 11.5]))
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    # rotation preserves norms, and it really depends on position
    s, c = rope_tables(pos, freqs)
    torch.testing.assert_close(apply_rope(q, s, c).norm(dim=-1), q.norm(dim=-1))
    assert (logits(pos * 2) - base).abs().max() > 1e-2


def test_rope_matches_timm_table_layout():
    """Axis-major chunks, interleaved pairs, frequencies 10000 ** (-i / n) (timm RotaryEmbeddingCat, in_pixels=False).
    """
    hd, n = 12, 2
    pos = torch.tensor([[1.0, 2.0, 3.0]])
    s, c = rope_tables(pos, rope_frequencies(hd, 10000.0))
    bands = 10000.0 ** (-torch.arange(n, dtype=torch.float64) / n)
    want = (pos.double()[:, :, None] * bands).reshape(1, -1).repeat_interleave(2, -1)
    torch.testing.assert_close(s.double(), want.sin(), rtol=0, atol=1e-6)
    torch.testing.assert_close(c.double(), want.cos(), rtol=0, atol=1e-6)


def test_registers_and_grad_checkpointing_give_same_gradients():
    cfg = ViT3DConfig(embed_dim=48, depth=2, num_heads=4, pos_grid=(4, 4, 4), num_register_tokens=2)
    m = _model(cfg).train()
    x = torch.rand(1, 1, 16, 16, 16)
    out = m(x)
    assert out["registers"].shape == (1, 2, 48)
    out["patch_tokens"].square().mean().backward()
    g1 = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x)["patch_tokens"].square().mean().backward()
    g2 = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_drop_path_is_identity_in_eval_and_random_in_train():
    cfg = ViT3DConfig(embed_dim=48, depth=2, num_heads=4, pos_grid=(4, 4, 4), drop_path_rate=0.5)
    m = _model(cfg)
    x = torch.rand(4, 1, 8, 8, 8)
    torch.testing.assert_close(m(x)["cls"], m(x)["cls"])
    m.train()
    torch.manual_seed(1)
    a = m(x)["cls"]
    torch.manual_seed(2)
    b = m(x)["cls"]
    assert (a - b).abs().max() > 1e-4


def test_bf16_autocast_runs_and_stays_close():
    m = _model()
    x = torch.rand(1, 1, 16, 16, 16)
    ref = m(x)["patch_tokens"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x)["patch_tokens"].float()
    assert torch.isfinite(low).all()
    assert (low - ref).norm() / ref.norm() < 0.05


def test_layerscale_none_and_norm_options():
    cfg = ViT3DConfig(embed_dim=48, depth=1, num_heads=4, pos_grid=(2, 2, 2), layerscale_init=None,
                      mlp_norm=False, attn_norm=True)
    m = ViT3D(cfg)
    names = set(m.state_dict())
    assert "blocks.0.ls1.gamma" not in names and "blocks.0.mlp.norm.weight" not in names
    assert "blocks.0.attn.norm.weight" in names
    assert math.isfinite(float(m(torch.rand(1, 1, 8, 8, 8))["cls"].detach().sum()))
