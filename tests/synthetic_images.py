"""Small synthetic test images shared by several test modules."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from dinoreg_core.registration import warp as W


def blobs(shape, seed: int = 0, n: int = 12) -> torch.Tensor:
    """A smooth random image (1,1,D,H,W) in [0,1]: a sum of ``n`` Gaussian blobs (sigma 2-6 voxels)."""
    g = torch.Generator().manual_seed(seed)
    grid = W.identity_grid(shape)[0]
    img = torch.zeros(shape)
    for _ in range(n):
        c = torch.rand(3, generator=g) * torch.tensor(shape, dtype=torch.float32)
        s = 2.0 + 4.0 * torch.rand(1, generator=g)
        img += torch.exp(-((grid - c.view(3, 1, 1, 1)) ** 2).sum(0) / (2 * s * s))
    return (img / img.max())[None, None]


def sphere_pair(folder, seed: int, shape=(40, 36, 32), n_labels: int = 3, radius: float = 6.0,
                centre_range=(10, 24), max_disp: float = 3.0):
    """A labelled pair written as NIfTI files in ``folder``: ``n_labels`` spheres (intensity 0.3 * label) plus
    noise, and the same warped by a smooth random field (largest vector ``max_disp`` voxels). Returns a
    :class:`dinoreg_core.evaluation.runner.PairSpec` named ``p<seed>`` (modality "mr", so no CT window)."""
    from dinoreg_core.evaluation.runner import PairSpec

    g = W.identity_grid(shape)[0]
    rng = np.random.default_rng(seed)
    lab = torch.zeros(shape, dtype=torch.int32)
    img = torch.zeros(shape)
    for k in range(1, n_labels + 1):
        c = torch.tensor(rng.uniform(*centre_range, 3), dtype=torch.float32)
        blob = ((g - c.view(3, 1, 1, 1)) ** 2).sum(0) < radius ** 2
        lab[blob] = k
        img[blob] = 0.3 * k
    img = img + 0.02 * torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    v = W.smooth_random_field(shape, max_disp=max_disp, control_spacing=8, seed=seed)
    mov = W.warp(img[None, None], v)[0, 0]
    mlab = W.warp_labels(lab[None, None], v)[0, 0]
    paths = {}
    for name, arr in [("f", img), ("m", mov), ("fl", lab.short()), ("ml", mlab.short())]:
        paths[name] = folder / f"{name}{seed}.nii.gz"
        nib.save(nib.Nifti1Image(arr.numpy(), np.eye(4)), str(paths[name]))
    return PairSpec(f"p{seed}", paths["f"], paths["m"], paths["fl"], paths["ml"], fixed_modality="mr",
                    moving_modality="mr")
