"""The written-out Adam objective of ConvexAdam equals autograd through grid_sample and the box filters."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinoreg_core.registration import convex_adam as CA
from dinoreg_core.registration.adam_objective import TrilinearSSD, diffusion_, smooth3_
from dinoreg_core.registration.warp import identity_grid, voxel_to_normalized

SHAPE = (9, 7, 8)


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


def test_whole_objective_gradient_equals_autograd():
    g = torch.Generator().manual_seed(1)
    pf, pm = torch.rand(1, 12, *SHAPE, generator=g), torch.rand(1, 12, *SHAPE, generator=g)
    param = (0.7 * torch.randn(1, 3, *SHAPE, generator=g)).requires_grad_(True)
    lam, cost_scale = 1.25, 12.0
    obj = _autograd_objective(param, pf, pm, lam, cost_scale)
    obj.backward()
    tmp = torch.empty_like(param)
    u = smooth3_(param.detach().clone(), tmp)
    n = pf[0, 0].numel()
    scale = cost_scale / (12 * n)
    ssd, grad = TrilinearSSD(pm, pf)((identity_grid(SHAPE) + u).reshape(3, -1), scale)
    grad = grad.view_as(u)
    value = ssd * scale + diffusion_(u, grad, lam, tmp)
    assert abs(value - obj.item()) < 1e-5 * obj.item()
    torch.testing.assert_close(smooth3_(grad, tmp), param.grad, atol=1e-6, rtol=1e-4)


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
