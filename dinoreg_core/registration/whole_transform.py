"""Sample the moving scan once through the whole transform (initial alignment composed with the deformable part).

Resampling the moving scan onto the fixed grid through the initial alignment and then warping that by the
deformable field interpolates twice (labels: two nearest-neighbour roundings). The files other tools and the
Learn2Reg evaluation produce from our transforms sample the moving *file* once, so ``warped.nii.gz`` does too.
"""

from __future__ import annotations

import numpy as np

from .. import io
from ..preprocess import sample_voxel_coords


def warp_whole(moving: io.Volume, fixed: io.Volume, disp: np.ndarray, world_transform: np.ndarray | None, *,
               labels: bool = False, cval: float | None = None) -> np.ndarray:
    """``moving`` sampled at ``inv(A_m) @ T @ A_f @ (p + u(p))`` for every canonical fixed voxel p.

    Args:
        moving, fixed: canonical volumes (any two grids).
        disp: (3,D,H,W) canonical fixed-voxel displacement (deformable part).
        world_transform: (4,4) fixed world -> moving world (identity when None).
        labels: nearest neighbour (int32 result) instead of trilinear (float32). A label sample whose coordinate lies
            outside [0, n-1] on any axis is ``cval`` (0), as ``scipy.ndimage.map_coordinates(order=0)`` in the
            Learn2Reg evaluation gives it (ITK would still take the border voxel within half a voxel).
        cval: value outside the moving field of view (default 0 for labels, the moving minimum for images,
            as :func:`dinoreg_core.preprocess.resample_to`).

    Returns:
        (D,H,W) array on the fixed grid.
    """
    coords = np.moveaxis(io.whole_transform_coords(disp, fixed, moving, world_transform), 0, -1)
    if labels:
        c = 0.0 if cval is None else cval
        out = sample_voxel_coords(moving.array.astype(np.float32), coords, order=0, cval=c)
        outside = np.any((coords < 0) | (coords > np.asarray(moving.shape, dtype=np.float64) - 1), axis=-1)
        out[outside] = c
        return np.rint(out).astype(np.int32)
    c = float(moving.array.min()) if cval is None else cval
    return sample_voxel_coords(moving.array, coords, order=1, cval=c).astype(np.float32)
