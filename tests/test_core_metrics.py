"""Metrics against hand-computed values and the Learn2Reg definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from dinoreg_core.evaluation import metrics as M
from dinoreg_core.registration import warp as W


def _cube(shape, lo, hi, label=1):
    a = np.zeros(shape, np.int32)
    a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = label
    return a


def test_dice_of_shifted_cubes():
    a = _cube((20, 20, 20), (5, 5, 5), (15, 15, 15))  # 1000 voxels
    b = _cube((20, 20, 20), (7, 5, 5), (17, 15, 15))  # shifted by 2: overlap 800
    d = M.dice_per_label(a, b)
    assert d[1] == pytest.approx(2 * 800 / 2000)
    # a label absent from the fixed map is NaN (left out of means); see test_l2r_metrics for the moving rule
    b2 = b + _cube((20, 20, 20), (0, 0, 0), (2, 2, 2), 2)
    assert np.isnan(M.dice_per_label(a, b2)[2])


def test_hd95_of_shifted_cubes_in_mm_and_voxels():
    a = _cube((30, 30, 30), (5, 5, 5), (15, 15, 15))
    b = _cube((30, 30, 30), (8, 5, 5), (18, 15, 15))  # shift 3 voxels along axis 0
    # every surface point is within 3 voxels of the other surface; the end faces are exactly 3 away
    assert M.hd95(a, b) == pytest.approx(3.0)
    assert M.hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert M.hd95(a, a) == 0.0
    assert M.hd95(a, np.zeros_like(a)) == float("inf")  # vanished: the surface_distance answer


def test_jacobian_of_a_linear_field():
    shape = (12, 10, 8)
    g = W.identity_grid(shape)[0]
    a = torch.tensor([[0.2, 0.1, 0.0], [0.0, -0.3, 0.05], [0.1, 0.0, 0.5]])
    u = torch.einsum("ij,j...->i...", a, g)[None]
    j = W.jacobian_determinant(u)
    expected = float(torch.linalg.det(torch.eye(3) + a))
    torch.testing.assert_close(j, torch.full_like(j, expected), atol=1e-5, rtol=1e-5)
    fm = M.field_metrics(u)
    assert fm["sdlogj"] == pytest.approx(0.0, abs=1e-5)
    assert fm["folding_pct"] == 0.0
    assert fm["sdlogj_l2r"] == pytest.approx(0.0, abs=1e-5)


def test_folding_fraction_and_sdlogj_l2r_definition():
    shape = (10, 10, 10)
    u = torch.zeros(1, 3, *shape)
    # u_0 = -2 x_0 on the first half of axis 0 -> J = 1 - 2 = -1 there (folded), 1 elsewhere
    x0 = torch.arange(10.0).view(10, 1, 1).expand(shape)
    u[0, 0] = torch.where(x0 < 5, -2 * x0, -2 * 4.0 * torch.ones_like(x0))
    j = W.jacobian_determinant(u)[0].numpy()
    assert M.folding_percent(u) == pytest.approx(100.0 * (j <= 0).mean())
    jc = j[2:-2, 2:-2, 2:-2]
    assert M.sdlogj_l2r(u) == pytest.approx(float(np.log(np.clip(jc + 3, 1e-9, 1e9)).std()))
    assert 30.0 < M.folding_percent(u) < 60.0


def test_warp_labels_equals_learn2reg_map_coordinates():
    rng = np.random.default_rng(0)
    shape = (24, 20, 16)
    lab = np.zeros(shape, np.int32)
    lab[4:18, 3:15, 2:12] = 1
    lab[8:14, 6:12, 4:10] = 2
    u = W.smooth_random_field(shape, max_disp=3.3, control_spacing=6, seed=3)
    ours = W.warp_labels(torch.from_numpy(lab)[None, None], u)[0, 0].numpy()
    ident = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    coords = ident + u[0].numpy()
    l2r = map_coordinates(lab, coords, order=0, mode="constant", cval=0)
    # identical except where a coordinate sits within float error of a .5 rounding boundary
    frac = np.abs((coords % 1.0) - 0.5)
    ambiguous = (frac < 1e-4).any(axis=0)
    assert (ours[~ambiguous] == l2r[~ambiguous]).all()
    assert rng is not None


def test_tre_with_a_constant_field():
    u = torch.zeros(1, 3, 10, 10, 10)
    u[0, 1] = 2.0
    fixed = np.array([[2.0, 3.0, 4.0], [5.0, 5.0, 5.0]])
    moving = fixed + np.array([0.0, 2.0, 0.0])
    np.testing.assert_allclose(M.tre(fixed, moving, u, spacing=(3, 3, 3)), [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(M.tre(fixed, fixed, u, spacing=(3, 3, 3)), [6.0, 6.0], atol=1e-6)


def test_compose_and_invert_are_consistent():
    shape = (20, 18, 16)
    u = W.smooth_random_field(shape, max_disp=2.0, control_spacing=6, seed=1)
    inv = W.invert(u, iterations=40)
    c = W.compose(u, inv)
    assert c[:, :, 3:-3, 3:-3, 3:-3].abs().max() < 0.05
    img = W.smooth_random_field(shape, max_disp=1.0, control_spacing=4, seed=5)[:, :1]  # a smooth image
    v = W.smooth_random_field(shape, max_disp=1.5, control_spacing=6, seed=2)
    two = W.warp(W.warp(img, u), v)
    one = W.warp(img, W.compose(u, v))
    assert (two - one)[..., 3:-3, 3:-3, 3:-3].abs().mean() < 0.01
