"""The hybrid feature methods: MIND-SSC beside jointly-PCA'd learned channels, weighted, through the registry."""

import pytest
import torch
import torch.nn.functional as F

from dinoreg_core.errors import DinoregError
from dinoreg_core.features import dino3d
from dinoreg_core.features.hybrid import PairFeatureMethod, compute_pair_features, hybrid_weights
from dinoreg_core.features.mind import mind_ssc
from dinoreg_core.features.pca import joint_project
from dinoreg_core.features.registry import available_feature_methods, get_feature_method
from dinoreg_core.models.checkpoint import save_backbone
from dinoreg_core.models.vit3d import ViT3D, ViT3DConfig

CFG = ViT3DConfig(embed_dim=48, depth=2, num_heads=4, pos_grid=(8, 8, 8))


@pytest.fixture()
def weights(tmp_path):
    torch.manual_seed(0)
    return save_backbone(ViT3D(CFG), CFG, tmp_path / "bb", {"note": "random test weights"})


def _pair():
    torch.manual_seed(3)
    f = F.avg_pool3d(torch.rand(1, 1, 20, 16, 12), 3, 1, 1)
    m = torch.roll(f, 2, dims=2) * 0.9 + 0.05
    return f, m


def test_registered_as_pair_methods():
    assert {"dino3d+mind", "dinov2+mind"} <= set(available_feature_methods())
    meth = get_feature_method("dino3d+mind")
    assert isinstance(meth, PairFeatureMethod) and not meth.joint_pca
    with pytest.raises(DinoregError, match="needs both images"):
        meth.extract(torch.rand(1, 1, 8, 8, 8), modality="ct", device="cpu", options={})


def test_hybrid_is_mind_beside_weighted_joint_pca_of_dino3d_only(weights):
    f, m = _pair()
    opts = {"weights": str(weights), "progress": False, "mind_weight": 2.0, "dino_weight": 0.5}
    hf, hm = compute_pair_features("dino3d+mind", f, m, fixed_modality="ct", moving_modality="mr", device="cpu",
                                   options=opts, pca_dim=6, seed=0)
    assert hf.shape == hm.shape == (1, 12 + 6, 20, 16, 12)
    mf, mm = mind_ssc(f, 1, 2), mind_ssc(m, 1, 2)
    torch.testing.assert_close(hf[:, :12], 2.0 * mf)
    torch.testing.assert_close(hm[:, :12], 2.0 * mm)
    sigma = float(torch.cat([mf, mm], 0).std())
    dopts = {"weights": str(weights), "progress": False}
    pf, pm = joint_project(dino3d.dino3d_features(f, options=dopts), dino3d.dino3d_features(m, options=dopts), k=6)
    up = lambda x: F.interpolate(x, size=(20, 16, 12), mode="trilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(hf[:, 12:], 0.5 * sigma * up(pf), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hm[:, 12:], 0.5 * sigma * up(pm), atol=1e-5, rtol=1e-4)


def test_zero_dino_weight_is_plain_mind_and_bad_weights_are_one_sentence(weights):
    f, m = _pair()
    hf, hm = compute_pair_features("dino3d+mind", f, m, options={"dino_weight": 0, "weights": str(weights)})
    torch.testing.assert_close(hf, mind_ssc(f, 1, 2))
    torch.testing.assert_close(hm, mind_ssc(m, 1, 2))
    for bad in ({"dino_weight": -0.1}, {"mind_weight": -1}, {"mind_weight": float("nan")}, {"dino_weight": "x"},
                {"mind_weight": 0, "dino_weight": 0}):
        with pytest.raises(DinoregError, match="hybrid option"):
            hybrid_weights(bad)
    with pytest.raises(DinoregError, match="one grid"):
        compute_pair_features("dino3d+mind", f, m[:, :, :10], options={"weights": str(weights)})


def test_the_pipeline_hands_the_image_spacing_to_the_hybrid_learned_part(tmp_path):
    """``feat.spacing_aware`` reaches the dino3d part of ``dino3d+mind`` (it once did not: the hybrid declared no
    options, so the pipeline never filled in the image spacing and the switch was silently ignored)."""
    import numpy as np

    from dinoreg_core import io
    from dinoreg_core.pipeline.methods import get_registration_method

    torch.manual_seed(0)
    w = save_backbone(ViT3D(CFG), CFG, tmp_path / "bb3", {"pretrain_config": {"spacing_mm": 3.0}})
    torch.manual_seed(4)
    f = F.avg_pool3d(torch.rand(1, 1, 24, 24, 24), 3, 1, 1)[0, 0].numpy()
    m = np.roll(f, 2, axis=0) * 0.9 + 0.05
    run = get_registration_method("dino3d+mind").run

    def disp(spacing_mm: float, aware: bool) -> np.ndarray:
        aff = np.diag([spacing_mm] * 3 + [1.0])
        opts = {"feat": {"weights": str(w), "progress": False, "spacing_aware": aware, "dino_weight": 4.0},
                "iterations": 5}
        out = run(io.Volume(f, aff), io.Volume(m, aff), fixed_modality="ct", moving_modality="ct", options=opts)
        return np.asarray(out.displacement)

    # a 2 mm image meets the 3 mm model resampled when the switch is on: another field
    assert np.abs(disp(2.0, True) - disp(2.0, False)).max() > 1e-4
    # at the training spacing the switch changes nothing
    np.testing.assert_allclose(disp(3.0, True), disp(3.0, False), atol=1e-6)
