"""Joint PCA: subspace recovery, one basis for fixed and moving, determinism, scaling, upsampling, RGB view."""

import numpy as np
import pytest
import torch

from dinoreg_core.errors import DinoregError
from dinoreg_core.features.pca import fit_pca, joint_project, pca_rgb, upsample


def _low_rank(shape, r=4, C=32, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.linalg.qr(torch.randn(C, r, generator=g))[0].T           # (r, C) orthonormal rows
    n = int(np.prod(shape))
    z = torch.randn(n, r, generator=g) * torch.tensor([5.0, 3.0, 2.0, 1.0][:r])
    x = z @ B + 0.7 + noise * torch.randn(n, C, generator=g)
    return x.T.reshape(1, C, *shape), B


def test_low_rank_data_recovers_its_subspace_and_variances():
    f, B = _low_rank((10, 9, 8))
    basis = fit_pca([f[0].reshape(32, -1).T], k=4)
    P_true = B.T.double() @ B.double()
    P_est = basis.components.T @ basis.components
    assert (P_true - P_est).norm() < 1e-3
    # variances in decreasing order, close to 25, 9, 4, 1 (sample estimates)
    v = basis.variances
    assert (v[:-1] >= v[1:]).all()
    np.testing.assert_allclose(v.numpy(), [25, 9, 4, 1], rtol=0.15)
    # orthonormal rows
    torch.testing.assert_close(basis.components @ basis.components.T, torch.eye(4, dtype=torch.float64),
                               atol=1e-10, rtol=0)


def test_joint_basis_is_identical_for_fixed_and_moving():
    f, _ = _low_rank((10, 9, 8), seed=1)
    m = torch.flip(f, dims=[2, 4])                     # the same tokens, rearranged (and a different grid order)
    pf, pm = joint_project(f, m, k=4)
    assert pf.shape == pm.shape == (1, 4, 10, 9, 8)
    # same basis => the projection of rearranged tokens is the rearranged projection
    torch.testing.assert_close(pm, torch.flip(pf, dims=[2, 4]), rtol=0, atol=1e-5)
    # different grid sizes are fine; joint centring: the projections of both together have zero mean
    m2, _ = _low_rank((6, 7, 5), seed=2)
    a, b = joint_project(f, m2, k=4)
    assert b.shape == (1, 4, 6, 7, 5)
    total = torch.cat([a.reshape(4, -1), b.reshape(4, -1)], 1)
    assert total.mean(1).abs().max() < 1e-4
    # the first channel has unit standard deviation over both volumes, the others keep their ratios
    sd = total.std(1)
    assert abs(sd[0].item() - 1) < 1e-3 and 0.4 < sd[1].item() < 0.8
    # swapping the roles gives the same numbers (the basis does not depend on the order)
    b2, a2 = joint_project(m2, f, k=4)
    torch.testing.assert_close(a2, a, rtol=0, atol=1e-5)
    torch.testing.assert_close(b2, b, rtol=0, atol=1e-5)


def test_signs_are_deterministic_and_sampling_is_seeded():
    f, _ = _low_rank((12, 12, 12), seed=3)
    m, _ = _low_rank((11, 12, 13), seed=3)     # same subspace (B is drawn first), other tokens
    a1, _ = joint_project(f, m, k=3)
    a2, _ = joint_project(f.clone(), m.clone(), k=3)
    assert torch.equal(a1, a2)
    # largest-magnitude loading of each component is positive
    basis = fit_pca([f[0].reshape(32, -1).T], 3)
    big = basis.components.gather(1, basis.components.abs().argmax(1, keepdim=True))
    assert (big > 0).all()
    s1, _ = joint_project(f, m, k=3, sample=500, seed=7)
    s2, _ = joint_project(f, m, k=3, sample=500, seed=7)
    s3, _ = joint_project(f, m, k=3, sample=500, seed=8)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    # a sample of 500 of 3444 tokens finds nearly the same components
    cos = torch.nn.functional.cosine_similarity(s1.reshape(3, -1), a1.reshape(3, -1), dim=1)
    assert (cos.abs() > 0.99).all()


def test_k_is_clipped_and_bad_input_is_rejected():
    f = torch.randn(1, 5, 4, 4, 4)
    a, b = joint_project(f, f, k=12)
    assert a.shape[1] == 5
    with pytest.raises(DinoregError, match="different channel counts"):
        joint_project(f, torch.randn(1, 6, 4, 4, 4))
    with pytest.raises(DinoregError, match=r"\(1,C,d,h,w\)"):
        joint_project(f[0], f)


def test_upsample_maps_extent_onto_extent():
    f = torch.arange(4.0).reshape(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2)
    u = upsample(f, (16, 8, 8))
    assert u.shape == (1, 1, 16, 8, 8)
    # voxel centre 4*j + 1.5 is the centre of token j
    torch.testing.assert_close(u[0, 0, 4 * 2 + 1:4 * 2 + 3, 0, 0].mean(), torch.tensor(2.0))
    assert upsample(f, (4, 2, 2)) is f


def test_pca_rgb_is_in_unit_range():
    f, _ = _low_rank((10, 9, 8))
    rgb = pca_rgb(f)
    assert rgb.shape == (10, 9, 8, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.std() > 0.1
    one = pca_rgb(torch.randn(1, 1, 3, 3, 3))
    assert one.shape == (3, 3, 3, 3)
