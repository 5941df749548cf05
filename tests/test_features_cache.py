"""The on-disk feature cache: a second extraction loads, any change of image, options or weights misses."""

import os

import pytest
import torch

from dinoreg_core.errors import DinoregError
from dinoreg_core.features import dino3d
from dinoreg_core.features.cache import FeatureCache
from dinoreg_core.models.checkpoint import save_backbone
from dinoreg_core.models.vit3d import ViT3D, ViT3DConfig

CFG = ViT3DConfig(embed_dim=48, depth=2, num_heads=4, pos_grid=(8, 8, 8))


@pytest.fixture()
def weights(tmp_path):
    torch.manual_seed(0)
    return save_backbone(ViT3D(CFG), CFG, tmp_path / "bb", {"pretrain_config": {"spacing_mm": 3.0}})


def test_generic_cache_hits_and_misses(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 2, 2) * len(calls)

    img = torch.rand(1, 1, 6, 5, 4)
    a = cache.get_or_compute(img, compute, method="m", modality="ct", options={"x": 1, "progress": True})
    b = cache.get_or_compute(img.clone(), compute, method="m", modality="ct", options={"progress": False, "x": 1})
    assert len(calls) == 1 and torch.equal(a, b) and (cache.hits, cache.misses) == (1, 1)
    img2 = img.clone()
    img2[0, 0, 0, 0, 0] += 1e-3
    for kw in ({"options": {"x": 2}}, {"options": {"x": 1, "y": None}}, {"modality": "mr"}, {"method": "n"},
               {"image": img2}):
        args = {"method": "m", "modality": "ct", "options": {"x": 1}, **kw}
        cache.get_or_compute(args.pop("image", img), compute, **args)
    assert len(calls) == 6
    files = list((tmp_path / "c").rglob("*"))
    assert not [f for f in files if f.name.startswith(".")]              # no temporary files left behind
    assert len([f for f in files if f.suffix == ".safetensors"]) == 6


def test_dino3d_cache_reuses_and_misses_on_option_or_weights_change(weights, tmp_path, monkeypatch):
    calls = []
    real = dino3d.extract_features

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(dino3d, "extract_features", counting)
    img = torch.rand(1, 1, 16, 12, 12)
    opts = {"weights": str(weights), "cache_dir": str(tmp_path / "cache"), "progress": False}
    f1 = dino3d.dino3d_features(img, options=opts)
    f2 = dino3d.dino3d_features(img, options={**opts, "progress": True})
    assert len(calls) == 1 and torch.equal(f1, f2)
    plain = dino3d.dino3d_features(img, options={"weights": str(weights), "progress": False})
    torch.testing.assert_close(f1, plain)                                 # a hit returns the same features
    dino3d.dino3d_features(img, options={**opts, "blocks": "0"})
    dino3d.dino3d_features(img, options={**opts, "spacing_mm": 2.0})
    assert len(calls) == 4                                                # (+1 for `plain`, uncached)
    dino3d.dino3d_features(img, options={**opts, "spacing_mm": 2.0, "spacing_aware": True})
    assert len(calls) == 5                                                # resampled input: another entry
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))        # "retrained" weights: new mtime
    dino3d.dino3d_features(img, options=opts)
    assert len(calls) == 6


def test_unwritable_cache_folder_is_one_sentence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = FeatureCache(blocker / "sub")
    with pytest.raises(DinoregError, match="not writable"):
        cache.get_or_compute(torch.rand(1, 1, 2, 2, 2), lambda: torch.zeros(1, 1, 1, 1, 1), method="m",
                             modality="ct")
