"""The written-out Adam objective of ConvexAdam equals autograd through grid_sample and the box filters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinoreg_core.registration import convex_adam as CA
from dinoreg_core.registration.adam_objective import TrilinearSSD, diffusion_, grid_sample_coordinates_, smooth3_
from dinoreg_core.registration.warp import identity_grid, smooth_random_field, voxel_to_normalized, warp

from synthetic_images import blobs

SHAPE = (9, 7, 8)
ON_VOXEL_SHAPE = (16, 20, 9)  # grid_sample's round trip lands below c = 1, 2, 3 (n=16) and above c = 1, 2, 15 (n=20)
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)


def _autograd_objective(param, pf, pm, lam, cost_scale):
    """The objective as the previous implementation wrote it (autograd through box_filter and grid_sample)."""
    u = CA._smooth3(param)
    reg = sum(lam * ((u.narrow(d, 1, u.shape[d] - 1) - u.narrow(d, 0, u.shape[d] - 1)) ** 2).mean()
              for d in (2, 3, 4))
    coords = identity_grid(pf.shape[2:]) + u
    warped = F.grid_sample(pm, voxel_to_normalized(coords, pm.shape[2:]), mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    return ((warped - pf) ** 2).mean() * cost_scale + reg


def test_trilinear_ssd_value_and_gradient_equal_grid_sample_autograd():
    g = torch.Generator().manual_seed(0)
    mov, fix = torch.rand(1, 5, *SHAPE, generator=g), torch.rand(1, 5, *SHAPE, generator=g)
    u = (3.0 * torch.randn(1, 3, *SHAPE, generator=g)).requires_grad_(True)  # many points leave the volume
    coords = identity_grid(SHAPE) + u
    warped = F.grid_sample(mov, voxel_to_normalized(coords, SHAPE), padding_mode="zeros", align_corners=True)
    loss = ((warped - fix) ** 2).sum()
    loss.backward()
    outside = ((coords < -1) | (coords > torch.tensor(SHAPE).view(1, 3, 1, 1, 1))).any(1)
    assert outside.float().mean() > 0.1  # the zero border and beyond are exercised
    ssd = TrilinearSSD(mov, fix, chunk=37)  # several chunks, the last one partial
    value, grad = ssd(coords.detach().reshape(3, -1), 1.0)
    assert abs(value - loss.item()) < 1e-4 * loss.item()
    torch.testing.assert_close(grad.view_as(u), u.grad, atol=1e-5, rtol=1e-5)


def _ssd_grad_both_ways(mov, fix, coords):
    """(autograd value, autograd gradient, fused value, fused gradient) of the SSD at (1,3,...) coordinates."""
    c = coords.clone().requires_grad_(True)
    warped = F.grid_sample(mov, voxel_to_normalized(c, mov.shape[2:]), padding_mode="zeros", align_corners=True)
    loss = ((warped - fix) ** 2).sum()
    loss.backward()
    value, grad = TrilinearSSD(mov, fix, chunk=101)(coords.reshape(3, -1), 1.0)
    return loss.item(), c.grad, value, grad.view_as(coords)


def test_grid_sample_round_trip_moves_some_integers_below_themselves():
    """The reason on-voxel points need care: for n = 16 the integers 1, 2, 3 come back one ulp low, so grid_sample
    takes the backward difference there; for n = 9 every integer comes back exact."""
    for n, low in ((16, [1, 2, 3]), (9, [])):
        c = torch.arange(n, dtype=torch.float32).view(1, n).expand(3, n).contiguous()
        back = grid_sample_coordinates_(c.clone(), torch.full((3, 1), n - 1.0), torch.full((3, 1), n - 1.0))
        assert (back[0] < c[0]).nonzero().flatten().tolist() == low
        assert (back - c).abs().max() <= 2 * torch.finfo(torch.float32).eps * n


def test_trilinear_ssd_gradient_equals_autograd_at_on_voxel_points():
    """Integer coordinates (the kink of trilinear interpolation), inside and outside the volume: same one-sided
    difference as grid_sample. The forward difference everywhere (the kernel before the round trip) differs."""
    g = torch.Generator().manual_seed(3)
    mov, fix = torch.rand(1, 6, *ON_VOXEL_SHAPE, generator=g), torch.rand(1, 6, *ON_VOXEL_SHAPE, generator=g)
    for shift in (0, 2):  # the identity grid (a zero field) and integer fields up to +-2 voxels
        u = torch.randint(-shift, shift + 1, (1, 3, *ON_VOXEL_SHAPE), generator=g).float()
        coords = identity_grid(ON_VOXEL_SHAPE) + u
        ref_value, ref_grad, value, grad = _ssd_grad_both_ways(mov, fix, coords)
        assert abs(value - ref_value) < 1e-5 * ref_value
        torch.testing.assert_close(grad, ref_grad, **GRAD_TOL)
    # without the round trip (forward differences at every integer) the gradient is far from autograd's
    forward = TrilinearSSD(mov, fix)
    forward.span, forward.scale = torch.full((3, 1), 2.0), torch.full((3, 1), 2.0)  # round trip = identity
    _, grad_fwd = forward(coords.reshape(3, -1), 1.0)
    assert (grad_fwd.view_as(coords) - ref_grad).abs().max() > 0.1 * ref_grad.abs().max()


def test_trilinear_ssd_gradient_equals_autograd_at_random_and_outside_points():
    g = torch.Generator().manual_seed(4)
    mov, fix = torch.rand(1, 6, *ON_VOXEL_SHAPE, generator=g), torch.rand(1, 6, *ON_VOXEL_SHAPE, generator=g)
    u = 4.0 * torch.randn(1, 3, *ON_VOXEL_SHAPE, generator=g)
    coords = identity_grid(ON_VOXEL_SHAPE) + u
    upper = torch.tensor(ON_VOXEL_SHAPE, dtype=torch.float32).view(1, 3, 1, 1, 1) - 1
    beyond = ((coords < -1) | (coords > upper + 1)).any(1)  # no corner inside: value 0, gradient 0
    assert beyond.float().mean() > 0.1
    ref_value, ref_grad, value, grad = _ssd_grad_both_ways(mov, fix, coords)
    assert abs(value - ref_value) < 1e-5 * ref_value
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL)
    assert grad.permute(1, 0, 2, 3, 4)[:, beyond].abs().max() == 0


def test_trilinear_ssd_on_a_one_voxel_axis_matches_grid_sample():
    """grid_sample maps every coordinate of a one-voxel axis to index 0 (zero gradient along it)."""
    g = torch.Generator().manual_seed(5)
    shape = (1, 7, 8)
    mov, fix = torch.rand(1, 3, *shape, generator=g), torch.rand(1, 3, *shape, generator=g)
    coords = identity_grid(shape) + 0.6 * torch.randn(1, 3, *shape, generator=g)
    ref_value, ref_grad, value, grad = _ssd_grad_both_ways(mov, fix, coords)
    assert abs(value - ref_value) < 1e-5 * ref_value
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL)
    assert grad[:, 0].abs().max() == 0


def test_in_place_smoothing_and_diffusion_equal_autograd():
    p = torch.randn(1, 3, *SHAPE, requires_grad=True)
    u_ref = CA._smooth3(p)
    lam = 1.25
    reg = sum(lam * ((u_ref.narrow(d, 1, u_ref.shape[d] - 1) - u_ref.narrow(d, 0, u_ref.shape[d] - 1)) ** 2).mean()
              for d in (2, 3, 4))
    reg.backward()
    tmp = torch.empty_like(p)
    u = smooth3_(p.detach().clone(), tmp)
    torch.testing.assert_close(u, u_ref.detach(), atol=1e-6, rtol=1e-6)
    grad = torch.zeros_like(u)
    value = diffusion_(u, grad, lam, tmp)
    assert abs(value - reg.item()) < 1e-6 * max(1.0, reg.item())
    # the smoothing is self-adjoint, so the parameter gradient is the smoothed u-gradient
    torch.testing.assert_close(smooth3_(grad, tmp), p.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shape,param_std", [(SHAPE, 0.7), (ON_VOXEL_SHAPE, 0.0)])
def test_whole_objective_gradient_equals_autograd(shape, param_std):
    """Random parameters, and zero parameters (every point on a voxel: Adam's first iteration after a zero
    discrete field)."""
    g = torch.Generator().manual_seed(1)
    pf, pm = torch.rand(1, 12, *shape, generator=g), torch.rand(1, 12, *shape, generator=g)
    param = (param_std * torch.randn(1, 3, *shape, generator=g)).requires_grad_(True)
    lam, cost_scale = 1.25, 12.0
    obj = _autograd_objective(param, pf, pm, lam, cost_scale)
    obj.backward()
    tmp = torch.empty_like(param)
    u = smooth3_(param.detach().clone(), tmp)
    n = pf[0, 0].numel()
    scale = cost_scale / (12 * n)
    ssd, grad = TrilinearSSD(pm, pf)((identity_grid(shape) + u).reshape(3, -1), scale)
    grad = grad.view_as(u)
    value = ssd * scale + diffusion_(u, grad, lam, tmp)
    assert abs(value - obj.item()) < 1e-5 * obj.item()
    torch.testing.assert_close(smooth3_(grad, tmp), param.grad, atol=1e-6 * param.grad.abs().max().item(), rtol=1e-4)


def test_fused_and_autograd_adam_stages_give_the_same_field_on_a_known_deformation():
    """moving warped by a known smooth field (3 voxels at most), a zero initial field (all points on voxels at
    the first iteration): both kernels reach the same field, which recovers much of the known one."""
    shape = (32, 28, 24)
    moving = torch.cat([blobs(shape, seed=s) for s in range(4)], 1)  # (1,4,...) smooth features
    known = smooth_random_field(shape, max_disp=3.0, control_spacing=12, seed=6)
    fixed = warp(moving, known)  # fixed(x) = moving(x + known(x))
    cfg = CA.ConvexAdamConfig(grid_sp_adam=2, iterations=30, lambda_weight=0.5)
    size = CA._padded_size(shape, cfg.grid_sp_adam)
    pf, pm = CA.pool_padded(fixed, cfg.grid_sp_adam, size), CA.pool_padded(moving, cfg.grid_sp_adam, size)
    init = torch.zeros(1, 3, *size)
    log_a, log_f = [], []
    u_auto = CA.adam_refine_autograd(pf, pm, init, cfg, log=log_a)
    u_fused = CA.adam_refine(pf, pm, init, cfg, log=log_f)
    torch.testing.assert_close(torch.tensor(log_f), torch.tensor(log_a), atol=0, rtol=1e-4)
    assert (u_fused - u_auto).abs().max() < 1e-4  # voxels (the forward-difference kernel: 0.26)
    err_before = known.norm(dim=1).mean()
    err_after = (u_fused - known).norm(dim=1).mean()
    assert err_after < 0.6 * err_before, (err_before, err_after)


def test_early_stopping_is_off_by_default_and_stops_a_flat_objective():
    g = torch.Generator().manual_seed(2)
    pf, pm = torch.rand(1, 4, 8, 8, 8, generator=g), torch.rand(1, 4, 8, 8, 8, generator=g)
    init = torch.zeros(1, 3, 16, 16, 16)
    log_full, log_early = [], []
    CA.adam_refine(pf, pm, init, CA.ConvexAdamConfig(iterations=8), log=log_full)
    CA.adam_refine(pf, pm, init, CA.ConvexAdamConfig(iterations=8, early_stop_patience=2, early_stop_tol=0.5),
                   log=log_early)
    assert len(log_full) == 8
    # a 50 % improvement per step is never reached after the first: stop after 1 + patience iterations
    assert len(log_early) == 3 and log_early == log_full[:3]


def test_pooling_equals_padding_then_average_pooling():
    x = torch.rand(1, 3, 13, 7, 11)
    for g, m in [(6, 6), (2, 6), (3, 6), (1, 4)]:
        padded = CA._padded_size(x.shape[2:], m)
        pads = []
        for s, p in zip(reversed(x.shape[2:]), reversed(padded)):
            pads += [0, p - s]
        ref = F.avg_pool3d(F.pad(x, pads, mode="replicate"), g, g)
        torch.testing.assert_close(CA.pool_padded(x, g, padded), ref, atol=1e-6, rtol=1e-6)
