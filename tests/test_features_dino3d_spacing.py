"""Spacing-aware dino3d: the image meets the backbone at the spacing the weights were trained at."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from dinoreg_core.errors import DinoregError
from dinoreg_core.features import dino3d
from dinoreg_core.features.extract import ExtractConfig, extract_features
from dinoreg_core.models.checkpoint import save_backbone
from dinoreg_core.models.vit3d import ViT3D, ViT3DConfig

CFG = ViT3DConfig(embed_dim=48, depth=2, num_heads=4, pos_grid=(8, 8, 8))


@pytest.fixture()
def weights(tmp_path):
    torch.manual_seed(0)
    w = save_backbone(ViT3D(CFG), CFG, tmp_path / "bb", {"pretrain_config": {"spacing_mm": 3.0}})
    return w


def _explicit_resample(img: np.ndarray, size) -> np.ndarray:
    """Trilinear resampling, extent onto extent: new voxel i samples old coordinate (i + 0.5) n / n' - 0.5."""
    axes = [(np.arange(m) + 0.5) * n / m - 0.5 for n, m in zip(img.shape, size)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    return ndimage.map_coordinates(img.astype(np.float64), coords, order=1, mode="nearest").astype(np.float32)


def test_spacing_aware_equals_explicit_resampling_then_extraction(weights):
    torch.manual_seed(1)
    img = torch.rand(1, 1, 30, 24, 18)
    opts = {"weights": str(weights), "spacing_mm": 2.0, "progress": False, "spacing_aware": True}  # 2 mm, 3 mm model
    aware = dino3d.dino3d_features(img, options=opts)
    # 60 x 48 x 36 mm at 3 mm, rounded to whole 4-voxel patches: 20 x 16 x 12 voxels -> 5 x 4 x 3 tokens
    assert aware.shape == (1, 48, 5, 4, 3)
    model = dino3d.load_cached(weights, "cpu")
    x = torch.from_numpy(_explicit_resample(img[0, 0].numpy(), (20, 16, 12)))[None, None]
    ref = extract_features(model, x, ExtractConfig(progress=False))
    torch.testing.assert_close(aware, ref, atol=2e-4, rtol=1e-4)
    # the off switch, and an image already at the training spacing, leave the input as it is
    plain = extract_features(model, img, ExtractConfig(progress=False))
    assert plain.shape == (1, 48, 8, 6, 5)
    off = dino3d.dino3d_features(img, options={**opts, "spacing_aware": False})
    same = dino3d.dino3d_features(img, options={**opts, "spacing_mm": "3,3,3"})
    no_spacing = dino3d.dino3d_features(img, options={"weights": str(weights), "progress": False})
    default = dino3d.dino3d_features(img, options={k: v for k, v in opts.items() if k != "spacing_aware"})
    as_text = dino3d.dino3d_features(img, options={**opts, "spacing_aware": "off"})
    for f in (off, same, no_spacing, default, as_text):
        torch.testing.assert_close(f, plain)


def test_train_spacing_records(weights, tmp_path):
    assert dino3d.train_spacing(weights, {}) == (3.0, 3.0, 3.0)          # from provenance.pretrain_config
    meta = weights.with_suffix(".json")
    d = json.loads(meta.read_text())
    d["train_spacing_mm"] = [2.0, 2.0, 4.0]
    meta.write_text(json.dumps(d))
    assert dino3d.train_spacing(weights, {}) == (2.0, 2.0, 4.0)          # the explicit record wins
    assert dino3d.train_spacing(weights, {"train_spacing_mm": 1.5}) == (1.5, 1.5, 1.5)
    demo = json.loads(dino3d.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert demo["train_spacing_mm"] == [3.0, 3.0, 3.0] == [demo["provenance"]["pretrain_config"]["spacing_mm"]] * 3


def test_bad_spacing_options_are_one_sentence_errors(weights):
    img = torch.rand(1, 1, 8, 8, 8)
    for bad in ("two", -2.0, "2,2", 0):
        with pytest.raises(DinoregError, match="spacing"):
            dino3d.dino3d_features(img, options={"weights": str(weights), "spacing_mm": bad})
