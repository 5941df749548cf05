"""Backbone checkpoints: exact round trip, and one-sentence errors for missing, truncated and mismatched files."""

import json

import pytest
import torch

from dinoreg_core.errors import DinoregError
from dinoreg_core.models.checkpoint import checkpoint_paths, load_backbone, save_backbone
from dinoreg_core.models.vit3d import ViT3D, ViT3DConfig

CFG = ViT3DConfig(embed_dim=48, depth=2, num_heads=4, pos_grid=(4, 4, 4), num_register_tokens=1)


def _saved(tmp_path):
    torch.manual_seed(0)
    m = ViT3D(CFG).eval()
    with torch.no_grad():
        m.mask_token.normal_()
    path = save_backbone(m, CFG, tmp_path / "sub" / "backbone", {"steps": 12, "seed": 3})
    return m, path


def test_round_trip_is_exact(tmp_path):
    m, path = _saved(tmp_path)
    assert path == tmp_path / "sub" / "backbone.safetensors"
    assert (tmp_path / "sub" / "backbone.json").is_file()
    m2, cfg2, meta = load_backbone(path)
    assert cfg2 == CFG
    assert not m2.training
    assert meta["provenance"]["steps"] == 12 and meta["provenance"]["seed"] == 3
    assert meta["provenance"]["num_parameters"] == sum(p.numel() for p in m.parameters())
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    x = torch.rand(1, 1, 13, 16, 9)
    with torch.no_grad():
        assert torch.equal(m(x)["patch_tokens"], m2(x)["patch_tokens"])
    # the same files are found from the stem, the .safetensors or the .json path
    for p in (tmp_path / "sub" / "backbone", tmp_path / "sub" / "backbone.json"):
        assert checkpoint_paths(p)[0] == path
    meta_json = json.loads((tmp_path / "sub" / "backbone.json").read_text())
    assert meta_json["model"]["pos_grid"] == [4, 4, 4] and meta_json["format"] == "dinoreg-vit3d/1"
    # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["backbone.json", "backbone.safetensors"]


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(DinoregError, match=r"nothere\.safetensors does not exist"):
        load_backbone(tmp_path / "nothere")
    _, path = _saved(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(DinoregError, match=r"backbone\.json \(expected beside backbone\.safetensors\) does not exist"):
        load_backbone(path)


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DinoregError, match=r"backbone\.safetensors is unreadable \(truncated or corrupt"):
        load_backbone(path)
    path.write_bytes(b"")
    with pytest.raises(DinoregError, match="unreadable"):
        load_backbone(path)


def test_mismatched_config_names_first_key_and_shapes(tmp_path):
    _, path = _saved(tmp_path)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["model"]["embed_dim"] = 96
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DinoregError) as e:
        load_backbone(path)
    msg = str(e.value)
    assert "does not match its config" in msg and "'cls_token'" in msg
    assert "(1, 1, 48) in the file but (1, 1, 96) in the model" in msg

    meta["model"]["embed_dim"] = 48
    meta["model"]["depth"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DinoregError, match=r"lacks tensor 'blocks\.2\.norm1\.weight'"):
        load_backbone(path)

    meta["model"]["depth"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DinoregError,
                       match=r"holds tensor 'blocks\.1\.[a-z_.0-9]+' that a ViT3D with this config does not have"):
        load_backbone(path)

    meta["model"]["depth"] = 2
    meta["model"]["colour"] = "blue"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DinoregError, match="unknown model field 'colour'"):
        load_backbone(path)

    meta_path.write_text("{not json")
    with pytest.raises(DinoregError, match="is not valid JSON"):
        load_backbone(path)
