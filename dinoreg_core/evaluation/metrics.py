"""Registration metrics, with the Learn2Reg definitions.

* Dice per label: 2|A∩B| / (|A|+|B|); a label absent from the fixed or the moving (warped) map gives NaN and is
  left out of means.
* HD95: 95th percentile of the symmetric surface distances between the label surfaces, in mm (anisotropic
  spacing respected) and in voxels (what Learn2Reg reports: the surface-distance toolkit on unit spacing).
  The surface of a label is its boundary voxels (label voxels with a 6-neighbour outside the label); the
  distances from each surface to the other are pooled and their 95th percentile taken.
* SDlogJ: standard deviation of log(J), J the Jacobian determinant of x -> x + u(x), over voxels with J > 0
  (plain); the Learn2Reg variant takes log(clip(J + 3, 1e-9, 1e9)) on the field cropped by 2 voxels at every
  border (it adds 3 to be defined for folded voxels).
* Folding: percentage of voxels with J <= 0.
* TRE: mean Euclidean distance in mm between fixed landmarks mapped by the field and the moving landmarks.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..registration.warp import jacobian_determinant


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    return x


def dice_per_label(fixed_labels, warped_labels, labels=None) -> dict[int, float]:
    """Dice of every label id (NaN when the label is absent from either map).

    Args:
        fixed_labels, warped_labels: (D,H,W) integer arrays (or tensors with leading singleton dims).
        labels: ids to evaluate; default all non-zero ids present in either map.
    """
    a, b = _as_np(fixed_labels), _as_np(warped_labels)
    if labels is None:
        labels = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0})
    out = {}
    for lab in labels:
        x, y = a == lab, b == lab
        sx, sy = int(x.sum()), int(y.sum())
        out[int(lab)] = float("nan") if sx == 0 or sy == 0 else 2.0 * float(np.logical_and(x, y).sum()) / (sx + sy)
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def hd95(fixed_mask, moving_mask, spacing=(1.0, 1.0, 1.0), percentile: float = 95.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two binary masks, in the units of ``spacing``.

    NaN when either mask is empty.
    """
    a, b = _as_np(fixed_mask).astype(bool), _as_np(moving_mask).astype(bool)
    if not a.any() or not b.any():
        return float("nan")
    sa, sb = _surface(a), _surface(b)
    dt_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    dt_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    d = np.concatenate([dt_b[sa], dt_a[sb]])
    return float(np.percentile(d, percentile))


def hd95_per_label(fixed_labels, warped_labels, spacing=(1.0, 1.0, 1.0), labels=None) -> dict[int, float]:
    """HD95 per label id, in the units of ``spacing`` (NaN when absent from either map)."""
    a, b = _as_np(fixed_labels), _as_np(warped_labels)
    if labels is None:
        labels = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0})
    return {int(lab): hd95(a == lab, b == lab, spacing) for lab in labels}


def _jac(disp) -> np.ndarray:
    u = disp if isinstance(disp, torch.Tensor) else torch.as_tensor(np.asarray(disp))
    u = u.float()
    if u.dim() == 4:
        u = u[None]
    return jacobian_determinant(u)[0].cpu().numpy()


def sdlogj(disp, mask=None) -> float:
    """Std of log Jacobian determinant over voxels with J > 0 (and inside ``mask`` if given); (1,3,D,H,W) voxels."""
    j = _jac(disp)
    keep = j > 0
    if mask is not None:
        keep &= _as_np(mask).astype(bool)
    return float(np.log(j[keep]).std()) if keep.any() else float("nan")


def sdlogj_l2r(disp) -> float:
    """Learn2Reg SDlogJ: std of log(clip(J + 3, 1e-9, 1e9)) on the field cropped by 2 voxels at each border."""
    j = _jac(disp)[2:-2, 2:-2, 2:-2]
    return float(np.log(np.clip(j + 3.0, 1e-9, 1e9)).std())


def folding_percent(disp, mask=None) -> float:
    """Percentage of voxels (inside ``mask`` if given) whose Jacobian determinant is <= 0."""
    j = _jac(disp)
    if mask is not None:
        j = j[_as_np(mask).astype(bool)]
    return float(100.0 * (j <= 0).mean())


def tre(fixed_points, moving_points, disp, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Target registration error per landmark in mm.

    Args:
        fixed_points, moving_points: (N,3) voxel coordinates (array axes) of corresponding landmarks.
        disp: (1,3,D,H,W) or (3,D,H,W) voxel displacement on the fixed grid (backward).
        spacing: voxel size in mm along the three axes.

    Returns:
        (N,) distances in mm between ``fixed + u(fixed)`` (u trilinearly interpolated) and ``moving``.
    """
    u = _as_np(disp)
    if u.ndim == 5:
        u = u[0]
    fp = np.asarray(fixed_points, dtype=np.float64)
    mp = np.asarray(moving_points, dtype=np.float64)
    uf = np.stack([ndimage.map_coordinates(u[c], fp.T, order=1, mode="nearest") for c in range(3)], axis=1)
    return np.linalg.norm((fp + uf - mp) * np.asarray(spacing), axis=1)


def displacement_error_mm(disp, truth, spacing=(1.0, 1.0, 1.0), mask=None) -> float:
    """Mean Euclidean distance in mm between two (1,3,D,H,W) voxel fields (inside ``mask`` when given)."""
    a, b = _as_np(disp), _as_np(truth)
    if a.ndim == 5:
        a, b = a[0], b[0]
    diff = (a - b) * np.asarray(spacing, dtype=np.float32).reshape(3, 1, 1, 1)
    err = np.linalg.norm(diff, axis=0)
    if mask is not None:
        err = err[_as_np(mask).astype(bool)]
    return float(err.mean())


def field_metrics(disp, mask=None) -> dict[str, float]:
    """SDlogJ (plain and Learn2Reg) and folding of a (1,3,D,H,W) voxel field, one Jacobian evaluation."""
    j = _jac(disp)
    m = np.ones_like(j, dtype=bool) if mask is None else _as_np(mask).astype(bool)
    pos = (j > 0) & m
    jc = j[2:-2, 2:-2, 2:-2]
    return {
        "sdlogj": float(np.log(j[pos]).std()) if pos.any() else float("nan"),
        "sdlogj_l2r": float(np.log(np.clip(jc + 3.0, 1e-9, 1e9)).std()),
        "folding_pct": float(100.0 * (j[m] <= 0).mean()),
    }
