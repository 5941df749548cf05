"""The two Adam-stage kernels (fused, autograd) on the MIND pin case of tests/test_pipeline_pins.py.

Prints, for the same inputs (the pooled features and initial field the pipeline hands to the Adam stage):
the share of sample points that lie exactly on a voxel at the first iteration, the objective and the gradient
w.r.t. the parameters at that iteration (max error of fused against autograd, sign disagreements), the objective
along both trajectories, the distance of the final fields, the pipeline's Dice with each kernel, and CPU seconds
(``time.process_time``, 1 thread) of each Adam stage. Needs ../shared/data/real; takes ~15 CPU seconds.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/adam_kernel_parity.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import REAL  # noqa: E402  (the tests' data folder and pin case)
import test_pipeline_pins as pins  # noqa: E402

from dinoreg_core.registration import convex_adam as CA  # noqa: E402
from dinoreg_core.registration.adam_objective import TrilinearSSD, diffusion_, smooth3_  # noqa: E402
from dinoreg_core.registration.warp import identity_grid  # noqa: E402

CASE = "mind"
SHOWN_ITERATIONS = (0, 1, 2, 5, 10, 20)  # objective printed at these iterations (and the last)
TIMING_REPEATS = 5  # CPU seconds: the median of this many runs of each kernel


def adam_inputs() -> dict:
    """pf, pm (1,C,n0,n1,n2), init (1,3,D,H,W) voxels and cfg of the pin case's Adam stage."""
    saved = {}
    kernel = CA.adam_refine

    def spy(pf, pm, init, cfg, log=None):
        saved.update(pf=pf.clone(), pm=pm.clone(), init=init.clone(), cfg=cfg)
        return kernel(pf, pm, init, cfg, log)

    CA.adam_refine = spy
    try:
        pins.run_case(REAL, dict(pins.CASES[CASE], adam_kernel="fused"))
    finally:
        CA.adam_refine = kernel
    return saved


def first_gradients(pf, pm, init, cfg):
    """(objective, d objective / d parameters (1,3,n0,n1,n2)) at the first iteration: autograd, then fused."""
    param = F.interpolate(init, size=pf.shape[2:], mode="trilinear", align_corners=False) / cfg.grid_sp_adam
    grid = identity_grid(pf.shape[2:])
    p = param.clone().requires_grad_(True)
    u = CA._smooth3(p)
    reg = sum(cfg.lambda_weight * ((u.narrow(d, 1, u.shape[d] - 1) - u.narrow(d, 0, u.shape[d] - 1)) ** 2).mean()
              for d in (2, 3, 4))
    obj = ((CA._sample_batched(pm, grid + u, 1) - pf) ** 2).mean() * cfg.cost_scale + reg
    obj.backward()
    tmp = torch.empty_like(param)
    uf = smooth3_(param.clone(), tmp)
    scale = cfg.cost_scale / (pf.shape[1] * grid[0, 0].numel())
    grad_u = torch.empty_like(uf)
    ssd, _ = TrilinearSSD(pm, pf)((grid + uf).reshape(3, -1), scale, out=grad_u.view(3, -1))
    obj_f = ssd * scale + diffusion_(uf, grad_u, cfg.lambda_weight, tmp)
    on_voxel = ((grid + uf) == (grid + uf).round()).float().mean().item()
    return on_voxel, (obj.item(), p.grad), (obj_f, smooth3_(grad_u, tmp))


def cpu_seconds(fn, *args) -> float:
    times = []
    for _ in range(TIMING_REPEATS):
        t = time.process_time()
        fn(*args)
        times.append(time.process_time() - t)
    return sorted(times)[len(times) // 2]


def main():
    torch.set_num_threads(1)
    d = adam_inputs()
    pf, pm, init, cfg = d["pf"], d["pm"], d["init"], d["cfg"]
    print(f"case {CASE}: Adam grid {tuple(pf.shape[2:])}, {pf.shape[1]} channels, {cfg.iterations} iterations, "
          f"initial field max |u| {init.abs().max().item():.3g} voxel")
    on_voxel, (obj_a, grad_a), (obj_f, grad_f) = first_gradients(pf, pm, init, cfg)
    err = (grad_f - grad_a).abs().max().item()
    print(f"first iteration: {100 * on_voxel:.1f} % of sample points on a voxel; objective autograd {obj_a:.8f} "
          f"fused {obj_f:.8f}; gradient max error {err:.3g} ({err / grad_a.abs().max().item():.3g} of its largest "
          f"entry), {(grad_f.sign() != grad_a.sign()).sum().item()} of {grad_a.numel()} signs differ")
    log_a, log_f = [], []
    u_a = CA.adam_refine_autograd(pf, pm, init, cfg, log=log_a)
    u_f = CA.adam_refine(pf, pm, init, cfg, log=log_f)
    for i in (*SHOWN_ITERATIONS, len(log_a) - 1):
        print(f"  iteration {i:3d}: objective autograd {log_a[i]:.7f} fused {log_f[i]:.7f}")
    print(f"final fields: max |fused - autograd| {(u_f - u_a).abs().max().item():.3g} voxel")
    for kernel in CA.ADAM_KERNELS:
        s = pins.run_case(REAL, dict(pins.CASES[CASE], adam_kernel=kernel))["summary"]
        print(f"pipeline Dice with {kernel}: {s['dice']:.6f} (unregistered {s['dice_initial']:.6f})")
    print(f"CPU seconds of the Adam stage (median of {TIMING_REPEATS}): "
          f"fused {cpu_seconds(CA.adam_refine, pf, pm, init, cfg):.3f}, "
          f"autograd {cpu_seconds(CA.adam_refine_autograd, pf, pm, init, cfg):.3f}")


if __name__ == "__main__":
    main()
