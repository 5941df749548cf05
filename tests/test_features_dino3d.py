"""The dino3d feature method: registry, weights resolution and errors, model cache, real-scan smoke check."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoreg_core.errors import DinoregError
from dinoreg_core.features import dino3d
from dinoreg_core.features.pca import joint_project, upsample
from dinoreg_core.features.registry import available_feature_methods, get_feature_method
from dinoreg_core.models.checkpoint import save_backbone
from dinoreg_core.models.vit3d import ViT3D, ViT3DConfig

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CFG = ViT3DConfig(embed_dim=48, depth=2, num_heads=4, pos_grid=(8, 8, 8))


@pytest.fixture()
def weights(tmp_path):
    torch.manual_seed(0)
    return save_backbone(ViT3D(CFG), CFG, tmp_path / "bb", {"note": "random test weights"})


def test_registered_with_joint_pca():
    assert "dino3d" in available_feature_methods()
    method = get_feature_method("dino3d")
    assert method.joint_pca and method.extract is dino3d.dino3d_features


def test_missing_default_weights_say_which_file_and_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setattr(dino3d, "DEFAULT_WEIGHTS", tmp_path / "weights" / "dino3d_demo.safetensors")
    with pytest.raises(DinoregError) as e:
        dino3d.dino3d_features(torch.rand(1, 1, 8, 8, 8))
    msg = str(e.value)
    assert "dino3d_demo.safetensors" in msg and "dinoreg pretrain" in msg
    with pytest.raises(DinoregError, match=r"nope\.safetensors does not exist"):
        dino3d.dino3d_features(torch.rand(1, 1, 8, 8, 8), options={"weights": str(tmp_path / "nope")})


def test_extracts_with_options_and_caches_the_model(weights):
    img = torch.rand(1, 1, 30, 24, 17)
    f = get_feature_method("dino3d").extract(img, modality="mr", device="cpu",
                                             options={"weights": str(weights), "blocks": "0,-1"})
    assert f.shape == (1, 96, 8, 6, 5) and f.dtype == torch.float32 and torch.isfinite(f).all()
    m1 = dino3d.load_cached(weights, "cpu")
    m2 = dino3d.load_cached(Path(str(weights)), torch.device("cpu"))
    assert m1 is m2
    # memory budget option forces windows; the result keeps its shape
    g = dino3d.dino3d_features(img, options={"weights": str(weights), "memory_budget_gb": 0.0005,
                                             "window": 16, "progress": False})
    assert g.shape == (1, 48, 8, 6, 5)
    assert dino3d.parse_blocks(-2) == (-2,) and dino3d.parse_blocks([0, 1]) == (0, 1)
    with pytest.raises(DinoregError, match="comma-separated"):
        dino3d.parse_blocks("last")


@pytest.mark.skipif(not (DATA / "real" / "ct_abdomen_pelvis.nii.gz").is_file(),
                    reason="real test volumes not found in ../shared/data/real")
def test_real_ct_features_follow_the_anatomy(weights):
    """On a real CT the 12 joint PCA channels, upsampled to the image grid, linearly explain the (blurred) image."""
    from dinoreg_core.io import load_volume
    from dinoreg_core.preprocess import normalize_intensity

    vol = load_volume(DATA / "real" / "ct_abdomen_pelvis.nii.gz")
    img = torch.from_numpy(normalize_intensity(vol.array, "ct"))[None, None]
    img = F.interpolate(img, scale_factor=0.5, mode="trilinear", align_corners=False)      # 61x50x56
    flipped = torch.flip(img, dims=[2])
    fa = dino3d.dino3d_features(img, options={"weights": str(weights)})
    fb = dino3d.dino3d_features(flipped, options={"weights": str(weights)})
    pa, pb = joint_project(fa, fb, k=12)
    assert pa.shape[1] == 12
    up = upsample(pa, img.shape[2:])[0].flatten(1).t().numpy()                         # (voxels, 12)
    blur = F.avg_pool3d(img, 5, stride=1, padding=2, count_include_pad=False)[0, 0].flatten().numpy()
    design = np.concatenate([up, np.ones((len(up), 1), np.float32)], axis=1)
    fit = design @ np.linalg.lstsq(design, blur, rcond=None)[0]
    corr = np.corrcoef(fit, blur)[0, 1]                                                # multiple correlation
    assert corr > 0.8, corr
