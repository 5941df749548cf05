"""Authors' Primus checkpoints: key mapping against the recorded key list, and output equivalence with an
independent re-implementation of the authors' forward pass (timm EvaBlock / RotaryEmbeddingCat semantics)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinoreg_core.errors import DinoregError
from dinoreg_core.models.checkpoint import load_backbone
from dinoreg_core.models.primus_keys import (convert_authors_checkpoint, load_authors_checkpoint,
                                             map_authors_state_dict, read_state_dict)
from dinoreg_core.models.vit3d import ViT3D

KEYS = Path(__file__).resolve().parent / "data" / "authors_primus_paper_keys.json"


def _recorded_state(seed=0):
    torch.manual_seed(seed)
    rec = json.loads(KEYS.read_text())
    return rec, {k: torch.randn(s) for k, s in rec["keys"]}


def test_recorded_paper_checkpoint_maps_completely():
    rec, sd = _recorded_state()
    cfg, out, notes = map_authors_state_dict(sd, which="teacher")
    assert notes == []
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (180, 8, 6, 4)
    assert cfg.pos_grid == (32, 32, 32) and cfg.mlp_hidden == 480
    assert cfg.layerscale_init is None and cfg.mlp_norm and not cfg.attn_norm
    model = ViT3D(cfg)
    model.load_state_dict(out, strict=True)          # every ViT3D tensor is provided, nothing extra
    pre = "model.teacher_backbone."
    C = 180
    # fused qkv rows are [q; k; v] with a zero k bias
    qkv = out["blocks.3.attn.qkv.weight"]
    assert torch.equal(qkv[:C], sd[pre + "vit.blocks.3.attn.q_proj.weight"])
    assert torch.equal(qkv[C:2 * C], sd[pre + "vit.blocks.3.attn.k_proj.weight"])
    assert torch.equal(qkv[2 * C:], sd[pre + "vit.blocks.3.attn.v_proj.weight"])
    b = out["blocks.3.attn.qkv.bias"]
    assert torch.equal(b[C:2 * C], torch.zeros(C)) and torch.equal(b[2 * C:], sd[pre + "vit.blocks.3.attn.v_proj.bias"])
    # position embedding: row 0 is the cls token's, rows 1.. are the tokens in raster order (d, h, w)
    pe = sd[pre + "vit.pos_embed"]
    assert torch.equal(out["cls_pos_embed"][0, 0], pe[0, 0])
    d, h, w = 5, 17, 30
    assert torch.equal(out["pos_embed"][0, :, d, h, w], pe[0, 1 + (d * 32 + h) * 32 + w])
    assert torch.equal(out["patch_embed.proj.weight"], sd[pre + "down_projection.proj.weight"])
    # the student is a different set of tensors
    _, out_s, _ = map_authors_state_dict(sd, which="student")
    assert not torch.equal(out_s["cls_token"], out["cls_token"])


# ---------------------------------------------------------------------------------------------------------
# an independent reference of the authors' forward pass, written from the timm / med_ssl_3d sources
# ---------------------------------------------------------------------------------------------------------

def _ln(x, sd, name, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _timm_rope(grid, rope_dim, temperature=10000.0):
    nb = rope_dim // 4
    bands = 1.0 / (temperature ** (torch.arange(0, nb, 1).float() / nb))
    t = [torch.arange(s).float() for s in grid]
    g = torch.stack(torch.meshgrid(t, indexing="ij"), dim=-1).unsqueeze(-1) * bands     # (d,h,w,3,nb)
    n = grid[0] * grid[1] * grid[2]
    return g.sin().reshape(n, -1).repeat_interleave(2, -1), g.cos().reshape(n, -1).repeat_interleave(2, -1)


def _rot(x):
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def _reference_forward(sd, x, heads, grid, n_prefix):
    """Authors' Primus(classification=True) forward: returns all tokens after the final norm."""
    tok = F.conv3d(x, sd["down_projection.proj.weight"], sd["down_projection.proj.bias"], stride=4)
    B, C = tok.shape[:2]
    tok = tok.flatten(2).transpose(1, 2)
    parts = [sd["cls_token"].expand(B, -1, -1)]
    if "register_tokens" in sd:
        parts.insert(1, sd["register_tokens"].expand(B, -1, -1))
    z = torch.cat([parts[0]] + parts[1:] + [tok], 1) + sd["vit.pos_embed"]
    sin, cos = _timm_rope(grid, int(C // heads / 1.5))
    i = 0
    while f"vit.blocks.{i}.norm1.weight" in sd:
        p = f"vit.blocks.{i}."
        y = _ln(z, sd, p + "norm1")
        N = y.shape[1]
        if p + "attn.qkv.weight" in sd:
            bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.q_bias"]), sd[p + "attn.v_bias"]])
            q, k, v = F.linear(y, sd[p + "attn.qkv.weight"], bias).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        else:
            def split(t):
                return t.reshape(B, N, heads, -1).transpose(1, 2)
            q = split(F.linear(y, sd[p + "attn.q_proj.weight"], sd[p + "attn.q_proj.bias"]))
            k = split(F.linear(y, sd[p + "attn.k_proj.weight"]))
            v = split(F.linear(y, sd[p + "attn.v_proj.weight"], sd[p + "attn.v_proj.bias"]))
        q = torch.cat([q[:, :, :n_prefix], q[:, :, n_prefix:] * cos + _rot(q[:, :, n_prefix:]) * sin], 2)
        k = torch.cat([k[:, :, :n_prefix], k[:, :, n_prefix:] * cos + _rot(k[:, :, n_prefix:]) * sin], 2)
        att = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
        a = (att @ v).transpose(1, 2).reshape(B, N, C)
        if p + "attn.norm.weight" in sd:
            a = _ln(a, sd, p + "attn.norm")
        a = F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        z = z + (sd[p + "gamma_1"] * a if p + "gamma_1" in sd else a)
        y = _ln(z, sd, p + "norm2")
        hdn = F.silu(F.linear(y, sd[p + "mlp.fc1_g.weight"], sd[p + "mlp.fc1_g.bias"])) * \
            F.linear(y, sd[p + "mlp.fc1_x.weight"], sd[p + "mlp.fc1_x.bias"])
        hdn = _ln(hdn, sd, p + "mlp.norm")
        m = F.linear(hdn, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        z = z + (sd[p + "gamma_2"] * m if p + "gamma_2" in sd else m)
        i += 1
    return _ln(z, sd, "vit.norm")


def _synthetic_authors_sd(C=36, heads=3, depth=2, grid=(3, 4, 2), fused=False, gamma=False, inner=False, regs=0,
                          seed=0):
    """A small random state dict in the authors' naming (head dim 12 -> rope dim 8, as Primus requires)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    H = int(C * 8 / 3)
    N = grid[0] * grid[1] * grid[2]
    sd = {"down_projection.proj.weight": r(C, 1, 4, 4, 4), "down_projection.proj.bias": r(C),
          "cls_token": r(1, 1, C), "mask_token": torch.zeros(1, 1, C), "vit.pos_embed": r(1, 1 + regs + N, C),
          "vit.norm.weight": 1 + r(C), "vit.norm.bias": r(C),
          "up_projection.decode.1.weight": r(16, 1, 2, 2, 2)}
    if regs:
        sd["register_tokens"] = r(1, regs, C)
    for i in range(depth):
        p = f"vit.blocks.{i}."
        for n, w in (("norm1", C), ("norm2", C), ("mlp.norm", H)) + ((("attn.norm", C),) if inner else ()):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + r(w), r(w)
        if fused:
            sd[p + "attn.qkv.weight"], sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = r(3 * C, C), r(C), r(C)
        else:
            sd[p + "attn.q_proj.weight"], sd[p + "attn.q_proj.bias"] = r(C, C), r(C)
            sd[p + "attn.k_proj.weight"] = r(C, C)
            sd[p + "attn.v_proj.weight"], sd[p + "attn.v_proj.bias"] = r(C, C), r(C)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(C, C), r(C)
        for n, (o, i_) in (("fc1_g", (H, C)), ("fc1_x", (H, C)), ("fc2", (C, H))):
            sd[p + f"mlp.{n}.weight"], sd[p + f"mlp.{n}.bias"] = r(o, i_), r(o)
        if gamma:
            sd[p + "gamma_1"], sd[p + "gamma_2"] = 0.1 + r(C), 0.1 + r(C)
    return sd, grid


@pytest.mark.parametrize("variant", [dict(), dict(fused=True, gamma=True, inner=True, regs=2)])
def test_mapped_model_reproduces_authors_forward(variant):
    sd, grid = _synthetic_authors_sd(**variant)
    lightning = {"model.student_backbone." + k: v for k, v in sd.items()}
    lightning["model.student_dino_head._dino_head.layers.0.weight"] = torch.randn(8, 36)
    cfg, mapped, _ = map_authors_state_dict(lightning, num_heads=3, pos_grid=grid)
    model = ViT3D(cfg).eval()
    model.load_state_dict(mapped, strict=True)
    x = torch.rand(2, 1, grid[0] * 4, grid[1] * 4, grid[2] * 4)
    with torch.no_grad():
        ours = model(x)
        ref = _reference_forward(sd, x, heads=3, grid=grid, n_prefix=1 + variant.get("regs", 0))
    n_pre = 1 + variant.get("regs", 0)
    torch.testing.assert_close(ours["patch_tokens"], ref[:, n_pre:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["cls"], ref[:, 0], rtol=1e-4, atol=1e-4)
    # and the tokens are not trivially equal to a model with other weights
    other = ViT3D(cfg).eval()
    with torch.no_grad():
        assert (other(x)["patch_tokens"] - ref[:, n_pre:]).abs().max() > 1e-2


def test_unmappable_checkpoints_raise_clear_errors():
    sd, grid = _synthetic_authors_sd()
    bad = dict(sd, **{"vit.blocks.0.attn.q_norm.weight": torch.ones(12)})
    with pytest.raises(DinoregError, match=r"'vit\.blocks\.0\.attn\.q_norm\.weight' has no counterpart"):
        map_authors_state_dict(bad, num_heads=3, pos_grid=grid)
    no_cls = {k: v for k, v in sd.items() if k != "cls_token"}
    with pytest.raises(DinoregError, match="no 'cls_token'"):
        map_authors_state_dict(no_cls, num_heads=3, pos_grid=grid)
    with pytest.raises(DinoregError, match="not a Primus backbone"):
        map_authors_state_dict({"model.student_backbone.foo": torch.ones(1)})
    with pytest.raises(DinoregError, match="pass pos_grid"):
        map_authors_state_dict(sd, num_heads=3)          # 24 tokens is not a cube
    with pytest.raises(DinoregError, match="head dim"):
        map_authors_state_dict(sd, num_heads=4, pos_grid=grid)


def test_file_loading_and_conversion(tmp_path):
    sd, grid = _synthetic_authors_sd()
    ckpt = tmp_path / "epoch=1.ckpt"
    torch.save({"state_dict": {"model.student_backbone." + k: v for k, v in sd.items()}, "epoch": 1}, ckpt)
    model, cfg, meta = load_authors_checkpoint(ckpt, num_heads=3, pos_grid=grid)
    assert meta["which"] == "student" and cfg.embed_dim == 36
    out = convert_authors_checkpoint(ckpt, tmp_path / "converted", num_heads=3, pos_grid=grid)
    m2, cfg2, meta2 = load_backbone(out)
    assert cfg2 == cfg and meta2["provenance"]["backbone"] == "student"
    x = torch.rand(1, 1, 12, 16, 8)
    with torch.no_grad():
        assert torch.equal(model(x)["patch_tokens"], m2(x)["patch_tokens"])
    # a pickle holding arbitrary objects is refused with a clear sentence, never unpickled
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hparams": Path("x")}, unsafe)
    with pytest.raises(DinoregError, match="cannot be read safely"):
        read_state_dict(unsafe)
    with pytest.raises(DinoregError, match="does not exist"):
        read_state_dict(tmp_path / "missing.ckpt")
