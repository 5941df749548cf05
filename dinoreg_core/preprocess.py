"""Preprocessing: intensity normalisation, foreground masks, resampling between grids.

All functions take and return numpy arrays in canonical (D,H,W) voxel order (see :mod:`dinoreg_core.io`).

Intensity normalisation (used identically by registration, feature extraction and pretraining):

* CT: Hounsfield units clipped to a window (default -1000..1000 HU, which keeps air, fat, soft tissue and
  bone apart) and mapped linearly to [0,1].
* MR: arbitrary units mapped so the 0.5th..99.5th percentiles of the voxels above the volume's 5th
  percentile span [0,1], then clipped to [0,1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import DinoregError
from .io import Volume

CT_WINDOW_HU = (-1000.0, 1000.0)
MR_PERCENTILES = (0.5, 99.5)


def guess_modality(array: np.ndarray) -> str:
    """Guess "ct" or "mr" from intensities: CT holds air near -1000 HU and soft tissue near 0..100 HU."""
    lo = float(np.percentile(array, 1))
    return "ct" if lo < -500.0 else "mr"


def normalize_intensity(array: np.ndarray, modality: str, *, ct_window=CT_WINDOW_HU,
                        mr_percentiles=MR_PERCENTILES) -> np.ndarray:
    """Map a (D,H,W) image to float32 intensities in [0,1].

    Args:
        array: image in HU (CT) or arbitrary units (MR).
        modality: "ct" (fixed HU window ``ct_window``) or "mr" (percentiles ``mr_percentiles`` of the voxels
            above the volume's 5th percentile, so a large empty background does not compress the range).
    """
    a = np.asarray(array, dtype=np.float32)
    if modality == "ct":
        lo, hi = ct_window
    elif modality == "mr":
        floor = np.percentile(a, 5)
        fg = a[a > floor]
        if fg.size < 100:
            fg = a.ravel()
        lo, hi = np.percentile(fg, mr_percentiles)
        lo = min(lo, float(np.percentile(a, 0.5)))
    else:
        raise DinoregError(f"Unknown modality '{modality}'; use 'ct' or 'mr'.")
    if hi - lo < 1e-6:
        raise DinoregError("The image has (almost) constant intensity and cannot be normalised.")
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def foreground_mask(array: np.ndarray, modality: str | None = None, *, threshold: float | None = None) -> np.ndarray:
    """Body mask (bool, (D,H,W)): threshold, keep the largest connected component, fill holes slice-wise.

    CT threshold: -500 HU; MR: 10 % of the 99th percentile (unless ``threshold`` is given).
    """
    a = np.asarray(array, dtype=np.float32)
    modality = modality or guess_modality(a)
    if threshold is None:
        threshold = -500.0 if modality == "ct" else 0.1 * float(np.percentile(a, 99))
    m = a > threshold
    m = ndimage.binary_opening(m, iterations=1)
    lab, n = ndimage.label(m)
    if n == 0:
        return np.zeros_like(m)
    sizes = ndimage.sum(m, lab, index=np.arange(1, n + 1))
    m = lab == (1 + int(np.argmax(sizes)))
    # fill holes in each axial slice (lungs and bowel gas are inside the body)
    for k in range(m.shape[2]):
        m[:, :, k] = ndimage.binary_fill_holes(m[:, :, k])
    return m


def world_grid(shape, affine: np.ndarray) -> np.ndarray:
    """World (mm, RAS) coordinates of every voxel centre: (D,H,W,3) float64."""
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=-1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def sample_voxel_coords(array: np.ndarray, coords: np.ndarray, *, order: int, cval: float = 0.0) -> np.ndarray:
    """Sample ``array`` (D,H,W) at voxel coordinates ``coords`` (...,3): trilinear (order 1) or nearest (order 0).

    Uses ``torch.grid_sample`` (align_corners=True, so coordinate 0 is the first voxel centre); points
    outside the volume get ``cval``.
    """
    src = torch.as_tensor(np.asarray(array, dtype=np.float32))[None, None]
    shape = np.array(array.shape, dtype=np.float64)
    c = np.asarray(coords, dtype=np.float64)
    norm = 2.0 * c / np.maximum(shape - 1, 1) - 1.0
    grid = torch.as_tensor(norm[..., ::-1].copy(), dtype=torch.float32).reshape(1, -1, 1, 1, 3)
    mode = "nearest" if order == 0 else "bilinear"
    out = F.grid_sample(src - cval, grid, mode=mode, padding_mode="zeros", align_corners=True) + cval
    return out.reshape(c.shape[:-1]).numpy()


def resample_to(moving: Volume, fixed: Volume, *, labels: bool = False, world_transform: np.ndarray | None = None,
                cval: float | None = None) -> np.ndarray:
    """Resample ``moving`` onto the voxel grid of ``fixed`` through world coordinates.

    Args:
        moving, fixed: volumes with their voxel -> world affines.
        labels: nearest-neighbour interpolation (label maps) instead of trilinear.
        world_transform: optional (4,4) matrix mapping fixed world points to moving world points (an initial
            alignment, see :mod:`dinoreg_core.registration.initial`); identity when None.
        cval: value outside the moving field of view (default 0 for labels, the moving minimum for images).

    Returns:
        (D,H,W) array on ``fixed``'s grid (float32 for images, int32 for labels).
    """
    t = np.eye(4) if world_transform is None else np.asarray(world_transform, dtype=np.float64)
    vox = np.linalg.inv(moving.affine) @ t @ fixed.affine
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in fixed.shape], indexing="ij"), axis=-1)
    coords = idx @ vox[:3, :3].T + vox[:3, 3]
    if labels:
        out = sample_voxel_coords(moving.array.astype(np.float32), coords, order=0, cval=0.0 if cval is None else cval)
        return np.rint(out).astype(np.int32)
    if cval is None:
        cval = float(moving.array.min())
    return sample_voxel_coords(moving.array, coords, order=1, cval=cval).astype(np.float32)


def world_overlap_fraction(a: Volume, b: Volume, *, world_transform: np.ndarray | None = None, step: int = 4) -> float:
    """Fraction of ``a``'s voxel centres (on a subsampled grid) that fall inside ``b``'s field of view."""
    t = np.eye(4) if world_transform is None else world_transform
    vox = np.linalg.inv(b.affine) @ t @ a.affine
    idx = np.stack(np.meshgrid(*[np.arange(0, s, step, dtype=np.float64) for s in a.shape], indexing="ij"), -1)
    c = idx @ vox[:3, :3].T + vox[:3, 3]
    inside = np.all((c >= -0.5) & (c <= np.array(b.shape) - 0.5), axis=-1)
    return float(inside.mean())


def resample_spacing(vol: Volume, spacing_mm: float | tuple, *, labels: bool = False) -> Volume:
    """Resample a canonical volume to a new voxel spacing (mm), keeping its field of view and world position.

    Returns a new :class:`Volume` whose ``original_affine`` is its own affine (it is a new grid).
    """
    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    old_sp = np.asarray(vol.spacing)
    extent = old_sp * (np.asarray(vol.shape) - 1)
    new_shape = tuple(int(np.floor(e / s + 1e-6)) + 1 for e, s in zip(extent, sp))
    new_aff = vol.affine.copy()
    new_aff[:3, :3] = vol.affine[:3, :3] / old_sp * sp
    target = Volume(np.zeros(new_shape, np.float32), new_aff)
    arr = resample_to(vol, target, labels=labels)
    return Volume(arr, new_aff, new_aff.copy(), new_shape, vol.path)
