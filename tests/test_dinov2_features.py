"""The ``dinov2`` feature method with tiny randomly initialised DINOv2 models (no downloaded weights)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the dinov2 method needs transformers (extra [dinov2])")
from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,  # noqa: E402
                          Dinov2WithRegistersModel)

from dinoreg_core.errors import DinoregError  # noqa: E402
from dinoreg_core.features.registry import get_feature_method  # noqa: E402
from dinoreg_core.models import dinov2_slices as dv  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter (biases, layer scales, norms too) random values so mapping mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(offset + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomise(Dinov2Model(Dinov2Config(**TINY)), 1)
    path = tmp_path_factory.mktemp("tiny_dinov2")
    model.save_pretrained(path)
    return path


def _opts(tiny_dir, **kw):
    return {"weights": str(tiny_dir), "progress": False, "target_tokens": 8, "batch_size": 5, **kw}


def test_registered_with_joint_pca():
    method = get_feature_method("dinov2")
    assert method.joint_pca is True
    assert method.extract is dv.extract_dinov2_features


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_stacking_geometry_marker_peaks_at_its_slice_and_token(tiny_dir, axis):
    shape = (20, 16, 12)
    base = torch.full((1, 1, *shape), 0.3)
    marked = base.clone()
    s = 7  # marker slice along `axis`
    # in-plane marker covers exactly one token: with 8 tokens along the longer in-plane axis
    in_plane = [n for a, n in enumerate(shape) if a != axis]
    grid = dv.token_grid(tuple(in_plane), 8)
    voxel_per_token = [n / t for n, t in zip(in_plane, grid)]
    token = (3, 2)
    lo = [round(t * v) for t, v in zip(token, voxel_per_token)]
    hi = [round((t + 1) * v) for t, v in zip(token, voxel_per_token)]
    index = [slice(None)] * 3
    index[axis] = s
    others = [a for a in range(3) if a != axis]
    index[others[0]] = slice(lo[0], hi[0])
    index[others[1]] = slice(lo[1], hi[1])
    marked[(0, 0, *index)] = 1.0

    f_base = dv.extract_dinov2_features(base, options=_opts(tiny_dir, slice_axis=axis))
    f_mark = dv.extract_dinov2_features(marked, options=_opts(tiny_dir, slice_axis=axis))
    expected = [grid[0], grid[1]]
    expected.insert(axis, shape[axis])
    assert f_mark.shape == (1, 32, *expected)

    diff = (f_mark - f_base).norm(dim=1)[0]  # (d,h,w)
    per_slice = diff.movedim(axis, 0).flatten(1).amax(1)
    assert int(per_slice.argmax()) == s
    others_max = torch.cat([per_slice[:s], per_slice[s + 1:]]).max()
    assert per_slice[s] > 1.0 and others_max < 1e-4 * per_slice[s]  # slices are encoded independently
    plane = diff.movedim(axis, 0)[s]
    peak = divmod(int(plane.argmax()), plane.shape[1])
    assert peak == token


def test_axial_default_and_authors_token_grid():
    assert dv.Dinov2SliceConfig().slice_axis == 2
    assert dv.token_grid((192, 160), 64) == (64, 53)
    assert dv.token_grid((192, 160), 64, keep_aspect=False) == (64, 64)  # 896 px -> 64x64 tokens for /14


def test_every_k_exact_at_encoded_slices_linear_between(tiny_dir):
    g = torch.Generator().manual_seed(3)
    img = torch.rand((1, 1, 10, 14, 11), generator=g)  # 11 slices along axis 2, k=4 -> encoded 0, 4, 8, 10
    full = dv.extract_dinov2_features(img, options=_opts(tiny_dir, every_k=1))
    sparse = dv.extract_dinov2_features(img, options=_opts(tiny_dir, every_k=4))
    assert sparse.shape == full.shape
    encoded = [0, 4, 8, 10]
    for i in encoded:
        torch.testing.assert_close(sparse[..., i], full[..., i], atol=1e-5, rtol=1e-5)
    for a, b in zip(encoded[:-1], encoded[1:]):
        for i in range(a + 1, b):
            w = (i - a) / (b - a)
            expect = (1 - w) * full[..., a] + w * full[..., b]
            torch.testing.assert_close(sparse[..., i], expect, atol=1e-5, rtol=1e-5)
    # the in-between slices really differ from encoding them (the test above is not trivially true)
    assert (sparse[..., 2] - full[..., 2]).abs().max() > 1e-2


def test_fill_between_slices_small_case():
    planes = torch.tensor([[0.0], [-9.0], [-9.0], [3.0], [5.0]])
    dv.fill_between_slices(planes, [0, 3, 4])
    torch.testing.assert_close(planes[:, 0], torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0]))


def test_three_axes_concat_and_mean(tiny_dir):
    img = torch.rand((1, 1, 20, 16, 12), generator=torch.Generator().manual_seed(4))
    cat = dv.extract_dinov2_features(img, options=_opts(tiny_dir, slice_axis="all"))
    mean = dv.extract_dinov2_features(img, options=_opts(tiny_dir, slice_axis="all", combine="mean"))
    # common token grid: D in-plane in views 1,2 -> 8; H in views 0 (16 of 16 -> 8) and 2 (16 of 20 -> 6) -> 8;
    # W in views 0 (12 of 16 -> 6) and 1 (12 of 20 -> 5) -> 6
    assert cat.shape == (1, 96, 8, 8, 6) and mean.shape == (1, 32, 8, 8, 6)
    torch.testing.assert_close(mean, (cat[:, :32] + cat[:, 32:64] + cat[:, 64:]) / 3, atol=1e-5, rtol=1e-5)
    axial = dv.extract_dinov2_features(img, options=_opts(tiny_dir, slice_axis=2))
    torch.testing.assert_close(cat[:, 64:], F.interpolate(axial, size=(8, 8, 6), mode="trilinear",
                                                          align_corners=False), atol=1e-5, rtol=1e-5)


def test_cli_style_string_options(tiny_dir):
    img = torch.rand((1, 1, 9, 9, 4), generator=torch.Generator().manual_seed(5))
    a = dv.extract_dinov2_features(img, options=_opts(tiny_dir, slice_axis="1", every_k="2", target_tokens="4"))
    b = dv.extract_dinov2_features(img, options=_opts(tiny_dir, slice_axis=1, every_k=2, target_tokens=4))
    assert a.shape == (1, 32, 4, 9, 2)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------
# official checkpoint layout


def _modern_names(hf_sd: dict) -> dict:
    """transformers 4.x Dinov2 key names -> the >= 5 names (identity on >= 5 state dicts)."""
    out = {}
    for k, v in hf_sd.items():
        k = (k.replace("attention.attention.query", "attention.q_proj").replace("attention.attention.key",
             "attention.k_proj").replace("attention.attention.value", "attention.v_proj")
             .replace("attention.output.dense", "attention.o_proj").replace("mlp.weights_out", "mlp.down_proj"))
        if ".mlp.weights_in." in k:
            gate, up = v.chunk(2, dim=0)
            out[k.replace("weights_in", "gate_proj")] = gate
            out[k.replace("weights_in", "up_proj")] = up
            continue
        out[k] = v
    return out


def _hf_to_official(hf_sd: dict) -> dict:
    """Test helper: the official facebookresearch/dinov2 key layout built from a tiny HF model."""
    hf_sd = _modern_names(hf_sd)
    sd = {}
    for k, v in hf_sd.items():
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", k)
        if not m:
            name = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
                    "embeddings.mask_token": "mask_token", "embeddings.register_tokens": "register_tokens",
                    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}[k]
            sd[name] = v.clone()
            continue
        i, rest = m.groups()
        b = f"blocks.{i}."
        if rest.startswith("attention.q_proj"):
            kind = rest.rsplit(".", 1)[1]
            sd[b + f"attn.qkv.{kind}"] = torch.cat([hf_sd[f"encoder.layer.{i}.attention.{p}_proj.{kind}"]
                                                    for p in "qkv"], 0)
        elif rest.startswith(("attention.k_proj", "attention.v_proj", "mlp.up_proj")):
            continue
        elif rest.startswith("mlp.gate_proj"):
            kind = rest.rsplit(".", 1)[1]
            sd[b + f"mlp.w12.{kind}"] = torch.cat([hf_sd[f"encoder.layer.{i}.mlp.gate_proj.{kind}"],
                                                   hf_sd[f"encoder.layer.{i}.mlp.up_proj.{kind}"]], 0)
        else:
            rest = (rest.replace("attention.o_proj", "attn.proj").replace("layer_scale1.lambda1", "ls1.gamma")
                    .replace("layer_scale2.lambda1", "ls2.gamma").replace("mlp.down_proj", "mlp.w3"))
            sd[b + rest] = v.clone()
    return sd


def _official_forward(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Independent re-statement of the official DINOv2 forward at the native size: normed patch tokens."""
    w = sd["patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    B, C = t.shape[0], t.shape[2]
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], 1) + sd["pos_embed"]
    n_reg = 0
    if "register_tokens" in sd:
        n_reg = sd["register_tokens"].shape[1]
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], 1)
    N = t.shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (C // heads) ** 0.5, -1) @ v
        att = att.transpose(1, 2).reshape(B, N, C)
        t = t + sd[p + "ls1.gamma"] * F.linear(att, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        if p + "mlp.w12.weight" in sd:
            x1, x2 = F.linear(h, sd[p + "mlp.w12.weight"], sd[p + "mlp.w12.bias"]).chunk(2, -1)
            m = F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        else:
            m = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + sd[p + "ls2.gamma"] * m
    t = F.layer_norm(t, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 1 + n_reg:]


@pytest.mark.parametrize("registers,swiglu", [(False, False), (True, True), (False, True), (True, False)])
def test_official_pth_mapping_gives_identical_outputs(tmp_path, registers, swiglu):
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, num_register_tokens=4,
                                                                   use_swiglu_ffn=swiglu))
    else:
        model = Dinov2Model(Dinov2Config(**TINY, use_swiglu_ffn=swiglu))
    model = _randomise(model, 7)
    official = _hf_to_official(model.state_dict())
    assert "blocks.1.attn.qkv.weight" in official and "pos_embed" in official
    assert ("blocks.0.mlp.w12.weight" in official) == swiglu
    pth = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save({"module." + k: v for k, v in official.items()} if registers else official, pth)

    loaded = dv.load_dinov2_model(dv.Dinov2SliceConfig(weights=str(pth), num_heads=2))
    assert type(loaded) is type(model)
    assert loaded.config.num_hidden_layers == 2 and loaded.config.image_size == 56

    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(8))
    prefix = 1 + (4 if registers else 0)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        out = loaded(pixel_values=x).last_hidden_state
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        # and against an independent statement of the official forward computation
        torch.testing.assert_close(out[:, prefix:], _official_forward(official, x, heads=2), atol=1e-5, rtol=1e-4)
        # non-native size (position embeddings interpolated): still identical to the HF original
        y = torch.randn(1, 3, 70, 42, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(loaded(pixel_values=y).last_hidden_state,
                                   model(pixel_values=y).last_hidden_state, atol=0, rtol=0)

    # the whole feature method through the .pth path equals the HF-folder path
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    img = torch.rand((1, 1, 12, 10, 3), generator=torch.Generator().manual_seed(10))
    a = dv.extract_dinov2_features(img, options={"weights": str(pth), "num_heads": 2, "target_tokens": 4,
                                                 "progress": False})
    b = dv.extract_dinov2_features(img, options={"weights": str(folder), "target_tokens": 4, "progress": False})
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_block_chunked_checkpoint_and_legacy_names():
    sd = {"blocks.1.5.attn.qkv.weight": torch.zeros(1), "backbone.cls_token": torch.zeros(1)}
    assert set(dv._strip_wrappers(sd)) == {"blocks.5.attn.qkv.weight", "cls_token"}
    hf = {"encoder.layer.0.attention.q_proj.weight": torch.zeros(2), "encoder.layer.0.mlp.gate_proj.bias":
          torch.ones(3), "encoder.layer.0.mlp.up_proj.bias": torch.full((3,), 2.0),
          "encoder.layer.0.mlp.down_proj.weight": torch.zeros(1), "encoder.layer.0.attention.o_proj.bias":
          torch.zeros(1)}
    legacy = dv._to_legacy_names(hf)
    assert set(legacy) == {"encoder.layer.0.attention.attention.query.weight",
                           "encoder.layer.0.mlp.weights_in.bias", "encoder.layer.0.mlp.weights_out.weight",
                           "encoder.layer.0.attention.output.dense.bias"}
    torch.testing.assert_close(legacy["encoder.layer.0.mlp.weights_in.bias"],
                               torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0]))


# ---------------------------------------------------------------------------------------------------------
# errors a user sees without weights


def test_without_weights_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv(dv.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dv._BACKBONE_CACHE.clear()
    img = torch.rand(1, 1, 8, 8, 4)
    with pytest.raises(DinoregError) as err:
        dv.extract_dinov2_features(img, options={"cache_dir": str(tmp_path / "empty_cache")})
    msg = str(err.value)
    assert "facebook/dinov2-with-registers-large" in msg and "weights" in msg and ".pth" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")  # one sentence

    with pytest.raises(DinoregError, match="vitb14"):
        dv.extract_dinov2_features(img, options={"arch": "vitb14", "cache_dir": str(tmp_path / "empty_cache")})
    missing = tmp_path / "dinov2_vitl14_pretrain.pth"
    with pytest.raises(DinoregError, match=re.escape(str(missing))):
        dv.extract_dinov2_features(img, options={"weights": str(missing)})
    monkeypatch.setenv(dv.WEIGHTS_ENV, str(missing))
    with pytest.raises(DinoregError, match=re.escape(str(missing))):
        dv.extract_dinov2_features(img, options={})


def test_bad_checkpoint_and_options(tmp_path, tiny_dir):
    bad = tmp_path / "not_dinov2.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(DinoregError, match="not an official DINOv2"):
        dv.load_dinov2_model(dv.Dinov2SliceConfig(weights=str(bad)))
    model = _randomise(Dinov2Model(Dinov2Config(**TINY)), 2)
    pth = tmp_path / "tiny.pth"
    torch.save(_hf_to_official(model.state_dict()), pth)
    with pytest.raises(DinoregError, match="does not match arch='vitl14'"):
        dv.load_dinov2_model(dv.Dinov2SliceConfig(weights=str(pth), arch="vitl14", num_heads=2))
    with pytest.raises(DinoregError, match="num_heads"):
        dv.load_dinov2_model(dv.Dinov2SliceConfig(weights=str(pth), num_heads=3))
    with pytest.raises(DinoregError, match="slice_axis"):
        dv.extract_dinov2_features(torch.rand(1, 1, 4, 4, 4), options=_opts(tiny_dir, slice_axis=3))
    with pytest.raises(DinoregError, match="no config.json"):
        dv.load_dinov2_model(dv.Dinov2SliceConfig(weights=str(tmp_path)))
