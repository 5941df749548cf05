"""Registration metrics, with the Learn2Reg definitions.

* Dice per label: 2|A∩B| / (|A|+|B|) of the fixed map A and the warped map B. Learn2Reg's rule: NaN (left out of
  means) only where the label is absent from the fixed map or from the *original* moving map; a label that
  vanishes after warping counts as 0.
* HD95: the robust (95th percentile) Hausdorff distance of DeepMind's ``surface_distance`` package
  (``compute_robust_hausdorff(compute_surface_distances(...), 95)``), which the official Learn2Reg evaluation
  uses: surfaces are the voxel-corner points between inside and outside, each weighted by the area of its
  surface elements, and the larger of the two directed 95th percentiles is reported. In mm (anisotropic spacing
  respected) and in voxels (unit spacing, what Learn2Reg reports). NaN under the Dice rule above; ``inf`` for a
  label that vanished after warping (there is no surface to measure to; the package's own answer).
* SDlogJ: standard deviation of log(J), J the Jacobian determinant of x -> x + u(x), over voxels with J > 0
  (plain); the Learn2Reg variant takes log(clip(J + 3, 1e-9, 1e9)) on the field cropped by 2 voxels at every
  border (it adds 3 to be defined for folded voxels), optionally inside a mask (AbdomenMRCT evaluates it in the
  fixed mask). Derivatives are central differences.
* Folding: percentage of voxels with J <= 0.
* TRE: Euclidean distance in mm between fixed landmarks mapped by the field and the moving landmarks; the
  Learn2Reg form interpolates the field with cubic splines and measures in the moving image's voxel size.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import ndimage

from ..errors import DinoregError
from ..registration.warp import jacobian_determinant

HD_PERCENTILE = 95.0
L2R_JAC_OFFSET = 3.0  # Learn2Reg adds 3 to J before the log
L2R_JAC_CLIP = (1e-9, 1e9)
L2R_BORDER = 2  # voxels cropped at every border before the Learn2Reg SDlogJ


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    return x


def _label_ids(a: np.ndarray, b: np.ndarray) -> list[int]:
    return sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})


def dice_per_label(fixed_labels, warped_labels, labels=None, moving_labels=None) -> dict[int, float]:
    """Dice of every label id with Learn2Reg's rule for missing labels.

    Args:
        fixed_labels, warped_labels: (D,H,W) integer arrays (or tensors with leading singleton dims).
        labels: ids to evaluate; default all non-zero ids of the fixed and the moving (else warped) map.
        moving_labels: the moving map before warping (any grid); a label absent from it is NaN. When not given,
            only a label absent from the fixed map is NaN.

    Returns:
        id -> Dice in [0, 1]; NaN where the label is absent from the fixed or the original moving map; 0 where it
        is present in both but vanished from the warped map.
    """
    a, b = _as_np(fixed_labels), _as_np(warped_labels)
    m = _as_np(moving_labels) if moving_labels is not None else None
    if labels is None:
        labels = _label_ids(a, m if m is not None else b)
    present_m = set(np.unique(m).tolist()) if m is not None else None
    out = {}
    for lab in labels:
        x, y = a == lab, b == lab
        sx, sy = int(x.sum()), int(y.sum())
        if sx == 0 or (present_m is not None and int(lab) not in present_m):
            out[int(lab)] = float("nan")
        else:
            out[int(lab)] = 2.0 * float(np.logical_and(x, y).sum()) / (sx + sy)
    return out


def _surface_distance_module():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import surface_distance
    except ImportError:
        raise DinoregError("HD95 needs the surface-distance package (pip install surface-distance==0.1), "
                           "DeepMind's implementation that the Learn2Reg evaluation uses.") from None
    return surface_distance


def hd95(fixed_mask, warped_mask, spacing=(1.0, 1.0, 1.0), percentile: float = HD_PERCENTILE) -> float:
    """Robust Hausdorff distance (``surface_distance`` definition) of two binary masks, in ``spacing`` units.

    NaN when the fixed mask is empty; ``inf`` when only the warped mask is empty (no surface to reach).
    """
    a, b = _as_np(fixed_mask).astype(bool), _as_np(warped_mask).astype(bool)
    if not a.any():
        return float("nan")
    if not b.any():
        return float("inf")
    sd = _surface_distance_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package imports from scipy.ndimage.filters
        dist = sd.compute_surface_distances(a, b, np.asarray(spacing, dtype=np.float64))
        return float(sd.compute_robust_hausdorff(dist, float(percentile)))


def hd95_per_label(fixed_labels, warped_labels, spacing=(1.0, 1.0, 1.0), labels=None,
                   moving_labels=None) -> dict[int, float]:
    """HD95 per label id in ``spacing`` units, NaN under the same rule as :func:`dice_per_label`."""
    a, b = _as_np(fixed_labels), _as_np(warped_labels)
    m = _as_np(moving_labels) if moving_labels is not None else None
    if labels is None:
        labels = _label_ids(a, m if m is not None else b)
    present_m = set(np.unique(m).tolist()) if m is not None else None
    out = {}
    for lab in labels:
        if present_m is not None and int(lab) not in present_m:
            out[int(lab)] = float("nan")
        else:
            out[int(lab)] = hd95(a == lab, b == lab, spacing)
    return out


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


def _l2r_log_jac(j: np.ndarray, mask=None) -> np.ndarray:
    """The Learn2Reg log(clip(J + 3)) values of a (D,H,W) Jacobian, cropped by 2 voxels, inside ``mask``."""
    b = L2R_BORDER
    logj = np.log(np.clip(j[b:-b, b:-b, b:-b] + L2R_JAC_OFFSET, *L2R_JAC_CLIP))
    if mask is None:
        return logj.ravel()
    return logj[_as_np(mask)[b:-b, b:-b, b:-b] > 0]


def sdlogj_l2r(disp, mask=None) -> float:
    """Learn2Reg SDlogJ: std of log(clip(J + 3, 1e-9, 1e9)) on the field cropped by 2 voxels at each border.

    Args:
        disp: (1,3,D,H,W) or (3,D,H,W) voxel displacement.
        mask: optional (D,H,W) mask on the same grid (the masked evaluation of AbdomenMRCT: voxels where the
            fixed mask is > 0, after the same crop). NaN when the mask holds no voxel.
    """
    v = _l2r_log_jac(_jac(disp), mask)
    return float(v.std()) if v.size else float("nan")


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
    """SDlogJ (plain and Learn2Reg) and folding of a (1,3,D,H,W) voxel field, one Jacobian evaluation.

    With a (D,H,W) ``mask``, ``sdlogj`` and ``folding_pct`` are taken inside it, ``sdlogj_l2r`` stays the
    whole-field value and ``sdlogj_l2r_masked`` is added (Learn2Reg's masked variant).
    """
    j = _jac(disp)
    m = np.ones_like(j, dtype=bool) if mask is None else _as_np(mask).astype(bool)
    pos = (j > 0) & m
    out = {
        "sdlogj": float(np.log(j[pos]).std()) if pos.any() else float("nan"),
        "sdlogj_l2r": float(_l2r_log_jac(j).std()),
        "folding_pct": float(100.0 * (j[m] <= 0).mean()),
    }
    if mask is not None:
        v = _l2r_log_jac(j, mask)
        out["sdlogj_l2r_masked"] = float(v.std()) if v.size else float("nan")
    return out


def tre_l2r(fixed_points, moving_points, disp, moving_spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Learn2Reg TRE per landmark in mm, as its evaluation measures it.

    Args:
        fixed_points, moving_points: (N,3) voxel coordinates (file voxel axes) of corresponding landmarks, as in
            the ``keypoints*`` csv files.
        disp: the submission field, (D,H,W,3) voxels (file voxel axes of the fixed image).
        moving_spacing: voxel size of the moving image in mm.

    Returns:
        (N,) ``|(fixed + u(fixed) - moving) * moving_spacing|``, u interpolated with cubic splines (order 3,
        constant 0 outside the grid: scipy's ``map_coordinates`` defaults, which the evaluation uses).
    """
    u = np.asarray(disp, dtype=np.float64)
    fp = np.atleast_2d(np.asarray(fixed_points, dtype=np.float64))
    mp = np.atleast_2d(np.asarray(moving_points, dtype=np.float64))
    uf = np.stack([ndimage.map_coordinates(u[..., c], fp.T) for c in range(3)], axis=1)
    return np.linalg.norm((fp + uf - mp) * np.asarray(moving_spacing, dtype=np.float64), axis=1)
