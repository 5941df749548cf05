"""Learn2Reg metric definitions on hand-made cases, including where the old definitions gave other numbers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dinoreg_core import io
from dinoreg_core.evaluation import metrics as M
from dinoreg_core.evaluation.l2r_case import case_metrics, warp_labels_l2r

sd = pytest.importorskip("surface_distance", reason="surface-distance (HD95 reference) is not installed")
pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")  # the package's scipy imports


def _cube(shape, lo, hi, label=1):
    a = np.zeros(shape, np.int32)
    a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = label
    return a


def _old_dice_mean(fixed, warped):
    """The previous rule: a label absent from either map is NaN and left out of the mean."""
    vals = []
    for lab in sorted((set(np.unique(fixed).tolist()) | set(np.unique(warped).tolist())) - {0}):
        x, y = fixed == lab, warped == lab
        vals.append(np.nan if not x.any() or not y.any() else 2 * (x & y).sum() / (x.sum() + y.sum()))
    return float(np.nanmean(vals))


def _old_hd95(a, b, spacing=(1.0, 1.0, 1.0)):
    """The previous distance-transform variant: boundary voxels (6-neighbourhood), pooled 95th percentile."""
    st = ndimage.generate_binary_structure(3, 1)
    sa = a & ~ndimage.binary_erosion(a, st, border_value=0)
    sb = b & ~ndimage.binary_erosion(b, st, border_value=0)
    d = np.concatenate([ndimage.distance_transform_edt(~sb, sampling=spacing)[sa],
                        ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]])
    return float(np.percentile(d, 95))


def test_vanished_label_counts_as_zero_and_only_absent_labels_are_nan():
    shape = (16, 16, 16)
    fixed = _cube(shape, (2, 2, 2), (8, 8, 8), 1) + _cube(shape, (10, 10, 10), (13, 13, 13), 2)
    moving = fixed.copy()
    warped = _cube(shape, (2, 2, 2), (8, 8, 8), 1)  # label 2 vanished in warping
    d = M.dice_per_label(fixed, warped, moving_labels=moving)
    assert d == {1: 1.0, 2: 0.0}
    assert np.nanmean(list(d.values())) == 0.5 and _old_dice_mean(fixed, warped) == 1.0  # the toy case
    # a label missing from the original moving map is NaN (left out), even when the fixed map has it
    moving_without_2 = _cube(shape, (2, 2, 2), (8, 8, 8), 1)
    d2 = M.dice_per_label(fixed, warped, moving_labels=moving_without_2)
    assert d2[1] == 1.0 and np.isnan(d2[2])
    # ... and so is a label missing from the fixed map
    moving3 = moving + _cube(shape, (0, 0, 0), (2, 2, 2), 3)
    assert np.isnan(M.dice_per_label(fixed, warped + _cube(shape, (0, 0, 0), (2, 2, 2), 3), [3], moving3)[3])
    hd = M.hd95_per_label(fixed, warped, labels=[1, 2], moving_labels=moving)
    assert hd[1] == 0.0 and hd[2] == float("inf")
    assert np.isnan(M.hd95_per_label(fixed, warped, labels=[2], moving_labels=moving_without_2)[2])


def test_hd95_follows_surface_distance_where_the_old_variant_differs():
    zz, yy, xx = np.meshgrid(*[np.arange(30)] * 3, indexing="ij")
    a = (zz - 15) ** 2 + (yy - 15) ** 2 + (xx - 15) ** 2 <= 6 ** 2  # a ball
    b = (zz - 16.3) ** 2 + (yy - 14) ** 2 / 1.5 + (xx - 15) ** 2 <= 5.5 ** 2  # a smaller, shifted ellipsoid
    ref = sd.compute_robust_hausdorff(sd.compute_surface_distances(a, b, np.ones(3)), 95.0)
    assert M.hd95(a, b) == pytest.approx(ref, rel=1e-12) and ref == pytest.approx(np.sqrt(2))
    assert _old_hd95(a, b) == pytest.approx(2.0)  # the old variant said 2 voxels
    ref_mm = sd.compute_robust_hausdorff(sd.compute_surface_distances(a, b, np.array([2.0, 1.0, 0.8])), 95.0)
    assert M.hd95(a, b, (2.0, 1.0, 0.8)) == pytest.approx(ref_mm, rel=1e-12)
    # hand-made: a one-voxel cube against itself moved by 2 voxels along axis 0. Its surface points are the voxel
    # corners (x = 0, 1 vs 2, 3): corners at x=1 are 1 away, at x=0 2 away; both carry half the area -> 95% = 2.
    one = _cube((8, 8, 8), (2, 3, 3), (3, 4, 4))
    moved = _cube((8, 8, 8), (4, 3, 3), (5, 4, 4))
    assert M.hd95(one, moved) == pytest.approx(2.0)
    assert M.hd95(one, moved, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert M.hd95(one, one) == 0.0
    assert np.isnan(M.hd95(np.zeros_like(one), one)) and M.hd95(one, np.zeros_like(one)) == float("inf")


def _jac_correlate(field):
    """Learn2Reg's Jacobian: correlate with [-0.5, 0, 0.5] (zero outside), cropped by 2."""
    k = np.array([-0.5, 0.0, 0.5])
    g = np.empty((3, 3) + field.shape[:3])
    for ax in range(3):
        shp = [1, 1, 1]
        shp[ax] = 3
        for c in range(3):
            g[ax, c] = ndimage.correlate(field[..., c], k.reshape(shp), mode="constant")
    j = (g + np.eye(3).reshape(3, 3, 1, 1, 1))[:, :, 2:-2, 2:-2, 2:-2]
    return np.linalg.det(np.moveaxis(j, (0, 1), (-2, -1)))


def test_sdlogj_plain_learn2reg_and_masked():
    rng = np.random.default_rng(1)
    shape = (20, 18, 16)
    field = ndimage.gaussian_filter(rng.normal(0, 3.0, shape + (3,)), (2, 2, 2, 0))  # (D,H,W,3)
    disp = np.moveaxis(field, -1, 0)
    jl = _jac_correlate(field)
    ref = np.log(np.clip(jl + 3, 1e-9, 1e9))
    assert M.sdlogj_l2r(disp) == pytest.approx(float(ref.std()), rel=1e-5)
    mask = np.zeros(shape, np.uint8)
    mask[4:14, 3:12, 5:11] = 1
    ref_masked = np.ma.MaskedArray(ref, 1 - mask[2:-2, 2:-2, 2:-2]).std()
    assert M.sdlogj_l2r(disp, mask) == pytest.approx(float(ref_masked), rel=1e-5)
    assert abs(M.sdlogj_l2r(disp, mask) - M.sdlogj_l2r(disp)) > 1e-3
    fm = M.field_metrics(disp, mask)
    assert fm["sdlogj_l2r_masked"] == pytest.approx(float(ref_masked), rel=1e-5)
    assert fm["sdlogj_l2r"] == pytest.approx(float(ref.std()), rel=1e-5)
    # plain SDlogJ: std of log J over voxels with J > 0 (here inside the mask)
    j_full = M._jac(disp)
    keep = (j_full > 0) & (mask > 0)
    assert fm["sdlogj"] == pytest.approx(float(np.log(j_full[keep]).std()), rel=1e-5)
    cm = case_metrics(field, mask=mask)
    assert cm["sdlogj"] == pytest.approx(float(ref_masked), rel=1e-5) and cm["num_foldings"] == 0.0


def test_tre_l2r_uses_the_moving_spacing_and_cubic_field():
    field = np.zeros((10, 10, 10, 3))
    field[..., 1] = 2.0
    fixed = np.array([[2.0, 3.0, 4.0], [5.5, 5.0, 5.25]])
    moving = fixed + np.array([0.0, 2.0, 0.0])
    np.testing.assert_allclose(M.tre_l2r(fixed, moving, field, (3, 2, 1)), [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(M.tre_l2r(fixed, fixed, field, (3, 2, 1)), [4.0, 4.0], atol=1e-9)
    # cubic spline of a linear ramp is exact in the interior
    field[..., 0] = np.arange(10.0).reshape(10, 1, 1) * 0.5
    # (cubic spline, zero outside: near-exact in the interior, as scipy's map_coordinates defaults give)
    exp = np.linalg.norm((fixed + np.stack([fixed[:, 0] * 0.5, [2, 2], [0, 0]], 1) - moving) * [3, 2, 1], axis=1)
    np.testing.assert_allclose(M.tre_l2r(fixed, moving, field, (3, 2, 1)), exp, atol=0.02)
    u0 = ndimage.map_coordinates(field[..., 0], fixed.T)
    np.testing.assert_allclose(M.tre_l2r(fixed, moving, field, (3, 2, 1)), np.abs(fixed[:, 0] * 0 + u0) * 3, atol=1e-9)


def test_case_metrics_from_files_apply_the_field_like_the_evaluation():
    rng = np.random.default_rng(4)
    shape = (18, 16, 14)
    fixed = _cube(shape, (3, 3, 3), (12, 11, 10), 1) + _cube(shape, (13, 12, 11), (15, 14, 13), 2)
    moving = np.roll(fixed, 1, axis=0)
    field = np.zeros(shape + (3,))
    field[..., 0] = -1.0 + rng.normal(0, 0.05, shape)  # undoes the roll
    out = case_metrics(field, fixed_labels=fixed, moving_labels=moving, labels=[1, 2, 3])
    warped = ndimage.map_coordinates(moving, np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"))
                                     + np.moveaxis(field, -1, 0), order=0)
    assert (warp_labels_l2r(moving, field) == warped).all()
    assert out["dice_detailed"][1] == pytest.approx(2 * ((fixed == 1) & (warped == 1)).sum() /
                                                    ((fixed == 1).sum() + (warped == 1).sum()))
    assert np.isnan(out["dice_detailed"][3]) and out["dice"] == pytest.approx(np.nanmean(list(out["dice_detailed"].values())))


def test_official_file_names():
    n = io.l2r_displacement_name
    assert n("imagesTr/AbdomenCTCT_0001_0000.nii.gz", "imagesTr/AbdomenCTCT_0002_0000.nii.gz") == "disp_0001_0002.nii.gz"
    assert n("AbdomenMRCT_0001_0000.nii.gz", "AbdomenMRCT_0001_0001.nii.gz") == "disp_0001_0001.nii.gz"
    assert n("AbdomenMRCT_0003_0001.nii.gz", "AbdomenMRCT_0001_0000.nii.gz") == "disp_0003_0001_0001_0000.nii.gz"
    assert n("X_0004_0001.nii.gz", "X_0005_0002.nii.gz") == "disp_0004_0001_0005_0002.nii.gz"
