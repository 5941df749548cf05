"""The typed stages: align -> method.register -> evaluate -> write compose to exactly what api.register returns,
and the one registry checks every method's options strictly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dinoreg_core import io
from dinoreg_core.api import register
from dinoreg_core.errors import DinoregError
from dinoreg_core.pipeline import (align, available_registration_methods, evaluate, get_registration_method,
                                   method_status, write, zero_displacement)
from dinoreg_core.registration import warp as W

SMALL = {"grid_sp": 4, "disp_hw": 2, "iterations": 20}


@pytest.fixture(scope="module")
def volumes():
    shape = (32, 28, 24)
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.avg_pool3d(torch.rand((1, 1, *shape), generator=g), 5, 1, 2) * 3000 - 1000
    lab = (img > img.median()).int() + (img > img.quantile(0.8)).int()
    v = W.smooth_random_field(shape, max_disp=2.0, control_spacing=8, seed=1)
    mov, mlab = W.warp(img, v), W.warp_labels(lab, v)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    mk = lambda t: io.Volume(t[0, 0].numpy().astype(np.float32 if t.is_floating_point() else np.int32), aff)  # noqa
    return mk(img), mk(mov), mk(lab), mk(mlab)


def test_stages_compose_to_api_register(volumes, tmp_path):
    f, m, fl, ml = volumes
    pair = align(f, m, fixed_labels=fl, moving_labels=ml, fixed_modality="ct", moving_modality="ct")
    assert pair.same_grid and pair.full_box and pair.fixed_modality == "ct"
    disp = get_registration_method("mind").register(pair, dict(SMALL))
    assert disp.field.shape == (1, 3, *f.shape) and disp.method == "mind"
    metrics = evaluate(pair, disp)
    files = write(tmp_path / "stages", pair, disp, metrics, config={"k": 1})
    res = register(f, m, fixed_labels=fl, moving_labels=ml, fixed_modality="ct", moving_modality="ct",
                   out_dir=tmp_path / "api", **SMALL)
    assert np.array_equal(res.displacement, disp.numpy())
    assert res.metrics == metrics.to_dict()
    assert json.loads((tmp_path / "stages" / "metrics.json").read_text())["metrics"]["summary"] == \
        json.loads((tmp_path / "api" / "metrics.json").read_text())["metrics"]["summary"]
    assert sorted(files) == sorted(res.outputs) == ["config", "displacement", "metrics", "warped", "warped_labels"]
    assert (tmp_path / "stages" / "outputs.json").is_file() and (tmp_path / "api" / "outputs.json").is_file()
    zero = evaluate(pair, zero_displacement(pair))
    assert zero.summary["dice"] == pytest.approx(zero.summary["dice_initial"])


def test_shifted_partial_moving_scan_is_registered_on_its_covered_box(volumes):
    f, m, _, _ = volumes
    aff = m.affine.copy()
    aff[:3, 3] += 4.0  # 2 voxels in world space
    part = io.Volume(m.array[:24].copy(), aff)
    pair = align(f, part, fixed_modality="ct", moving_modality="ct")
    assert not pair.same_grid
    assert pair.box == ((2, 2, 2), (26, 28, 24))
    fixed_box, moving_box = pair.cropped()
    assert io.same_grid(fixed_box, moving_box) and fixed_box.shape == (24, 26, 22)
    disp = get_registration_method("intensity").register(pair, dict(SMALL))
    inside = disp.on_box()
    assert inside.shape == (1, 3, 24, 26, 22)
    assert torch.equal(disp.field[:, :, 0], disp.field[:, :, 2])  # border replicated outside the box


def test_one_registry_with_declared_options_and_strict_checks():
    names = available_registration_methods()
    for n in ("intensity", "mind", "dino3d", "dinov2", "ants", "convexadam_official", "unigradicon"):
        assert n in names
        assert get_registration_method(n).options is not None
    assert get_registration_method("mind").kind == "features" and get_registration_method("ants").kind == "peer"
    mind = get_registration_method("mind")
    assert mind.check({"feat.mind_r": 2, "grid_sp": 4}) is None
    assert "Unknown mind feature option 'mind_q'" in mind.check({"feat.mind_q": 2})
    assert "must be an integer" in mind.check({"feat.mind_r": "two"})
    assert "Unknown setting 'grid'" in mind.check({"grid": 4})
    assert "Unknown ants option" in get_registration_method("ants").check({"presett": "fast"})
    st = method_status(["mind", "intensity"], {"intensity": {"feat.weights": "w"}})
    assert st["mind"] is None and "Unknown intensity feature option 'weights'" in st["intensity"]
    with pytest.raises(DinoregError, match="Unknown registration method 'nope'"):
        get_registration_method("nope")
