"""End to end: dinov2 slice features (tiny random DINOv2) -> joint PCA -> ConvexAdam -> metrics, API and CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the dinov2 method needs transformers (extra [dinov2])")
from transformers import Dinov2Config, Dinov2Model  # noqa: E402

from dinoreg_core import io  # noqa: E402
from dinoreg_core.api import register  # noqa: E402
from dinoreg_core.cli import main as cli_main  # noqa: E402
from dinoreg_core.models import dinov2_slices as dv  # noqa: E402

SHAPE = (32, 30, 20)
SHIFT = 3  # voxels along axis 0


def _phantom(shift: int):
    """CT-like body (HU) with four labelled ellipsoid organs, translated by ``shift`` voxels along axis 0."""
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in SHAPE], indexing="ij")
    z = z - shift
    img = np.full(SHAPE, -1000.0, np.float32)
    lab = np.zeros(SHAPE, np.int32)
    img[((z - 16) / 13) ** 2 + ((y - 15) / 13) ** 2 < 1] = 0.0
    organs = [(10, 10, 10, 5, 4, 6, 60, 1), (22, 19, 10, 4, 5, 6, -80, 2), (14, 21, 6, 3, 3, 4, 200, 3),
              (21, 8, 13, 3, 3, 3, 120, 4)]
    for cz, cy, cx, rz, ry, rx, hu, label in organs:
        inside = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
        img[inside] = hu
        lab[inside] = label
    return img, lab


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                                     image_size=56)).eval()
    path = tmp_path_factory.mktemp("tiny_dinov2_e2e")
    model.save_pretrained(path)
    return path


@pytest.mark.slow
def test_register_with_dinov2_recovers_a_translation(tiny_dir):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed, flab = _phantom(0)
    moving, mlab = _phantom(SHIFT)  # moving(x) = fixed(x - SHIFT e0), so u = +SHIFT along axis 0
    res = register(io.Volume(fixed, aff), io.Volume(moving, aff), fixed_labels=io.Volume(flab, aff),
                   moving_labels=io.Volume(mlab, aff), features="dinov2",
                   feature_options={"weights": str(tiny_dir), "target_tokens": 12, "progress": False},
                   grid_sp=4, disp_hw=2, iterations=40)
    assert res.displacement.shape == (3, *SHAPE) and np.isfinite(res.displacement).all()
    summary = res.metrics["summary"]
    assert summary["dice"] > summary["dice_initial"] + 0.2, summary
    organs = flab > 0
    assert 1.5 < res.displacement[0][organs].mean() < 4.0
    assert abs(res.displacement[1][organs].mean()) < 1.0 and abs(res.displacement[2][organs].mean()) < 1.0
    assert res.metrics["field"]["folding_pct"] < 1.0
    assert res.config["features"] == "dinov2"


def test_cli_without_weights_stops_with_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(dv.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dv._BACKBONE_CACHE.clear()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    img, _ = _phantom(0)
    fixed = io.save_nifti(img, aff, tmp_path / "f.nii.gz")
    rc = cli_main(["register", str(fixed), str(fixed), "--features", "dinov2", "--out", str(tmp_path / "out"),
                   "--set", f"feat.cache_dir={tmp_path / 'empty_cache'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("dinoreg: error: No DINOv2 weights found") and "--weights" in err
    assert len(err.splitlines()) == 1
