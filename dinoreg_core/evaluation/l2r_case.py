"""Learn2Reg, one pair: the whole-transform file of a registration and its metrics by the official evaluation's rules.

The official evaluation (MDL-UzL/L2R ``evaluation/evaluation.py``) reads one field per pair,
``disp_FFFF_MMMM.nii.gz`` (or the long name, :func:`dinoreg_core.io.l2r_displacement_name`), of shape (D,H,W,3)
in voxels of the fixed file, and computes, per pair:

* the warped moving labels ``map_coordinates(moving_labels_file, identity + field, order=0)`` (0 outside);
* Dice and HD95 per label of the evaluation's list: NaN where the label is absent from the fixed or the
  original moving map, else Dice (0 when it vanished) and the ``surface_distance`` robust HD95 on unit
  spacing; the pair's value is the NaN-mean over labels;
* SDlogJ: std of log(clip(J + 3)) on the field cropped by 2 voxels, inside the fixed mask for masked tasks;
  ``num_foldings`` counts voxels with clip(J + 3) <= 0 (the clip makes it 0 always, as in the evaluation);
* TRE: ``|(fixed_kp + u(fixed_kp) - moving_kp) * moving_spacing|`` with cubic interpolation of the field.

:func:`case_metrics` computes these from arrays as the files hold them, so ``metrics.json`` can carry the
numbers the official script will print for the same files.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .. import io
from ..errors import DinoregError
from .metrics import L2R_BORDER, L2R_JAC_CLIP, L2R_JAC_OFFSET, _jac, dice_per_label, hd95_per_label


def warp_labels_l2r(moving_labels: np.ndarray, field: np.ndarray) -> np.ndarray:
    """The evaluation's warped labels: nearest-neighbour ``map_coordinates`` of the moving file's label array at
    ``identity + field`` ((D,H,W) fixed file grid, constant 0 outside)."""
    shape = field.shape[:3]
    ident = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    coords = ident + np.moveaxis(np.asarray(field, np.float64), -1, 0)
    return ndimage.map_coordinates(np.asarray(moving_labels), coords, order=0)


def _nanmean(values) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def case_metrics(field: np.ndarray, *, fixed_labels: np.ndarray | None = None, moving_labels: np.ndarray | None = None,
                 labels=None, mask: np.ndarray | None = None, fixed_keypoints: np.ndarray | None = None,
                 moving_keypoints: np.ndarray | None = None, moving_spacing=(1.0, 1.0, 1.0)) -> dict:
    """One pair's metrics by the official evaluation's rules, from arrays as stored in the files.

    Args:
        field: (D,H,W,3) Learn2Reg field (fixed file voxel axes).
        fixed_labels, moving_labels: label arrays of the two files as stored (moving on its own grid).
        labels: label ids to evaluate (the evaluation config's list); default the non-zero ids of either map.
        mask: the fixed mask as stored (masked SDlogJ), or None.
        fixed_keypoints, moving_keypoints: (N,3) voxel coordinates from the ``keypoints*`` csv files.
        moving_spacing: voxel size of the moving file in mm (for TRE).

    Returns:
        ``{"sdlogj": .., "num_foldings": .., "dice": .., "dice_detailed": {id: ..}, "hd95": ..,
        "hd95_detailed": {id: ..}, "tre": .., "tre_detailed": [..]}`` (label/keypoint entries only when given).
    """
    field = np.asarray(field, np.float64)
    if field.ndim != 4 or field.shape[-1] != 3:
        raise DinoregError(f"A Learn2Reg field must have shape (D,H,W,3); got {field.shape}.")
    j = _jac(np.moveaxis(field, -1, 0))
    b = L2R_BORDER
    jc = np.clip(j[b:-b, b:-b, b:-b] + L2R_JAC_OFFSET, *L2R_JAC_CLIP)
    logj = np.log(jc)
    if mask is not None:
        logj = logj[np.asarray(mask)[b:-b, b:-b, b:-b] > 0]
    out: dict = {"sdlogj": float(logj.std()) if logj.size else float("nan"), "num_foldings": float((jc <= 0).sum())}
    if fixed_labels is not None and moving_labels is not None:
        fl = np.asarray(fixed_labels)
        ml = np.asarray(moving_labels)
        warped = warp_labels_l2r(ml, field)
        ids = list(labels) if labels is not None else sorted((set(np.unique(fl).tolist()) | set(np.unique(ml).tolist())) - {0})
        dice = dice_per_label(fl, warped, ids, moving_labels=ml)
        hd = hd95_per_label(fl, warped, (1.0, 1.0, 1.0), ids, moving_labels=ml)
        out.update({"dice": _nanmean(dice.values()), "dice_detailed": dice, "hd95": _nanmean(hd.values()),
                    "hd95_detailed": hd})
    if fixed_keypoints is not None and moving_keypoints is not None:
        from .metrics import tre_l2r

        t = tre_l2r(fixed_keypoints, moving_keypoints, field, moving_spacing)
        out.update({"tre": float(t.mean()), "tre_detailed": t.tolist()})
    return out


def file_labels(vol: io.Volume, canonical: np.ndarray | None = None) -> np.ndarray:
    """A label map as its file stores it (voxel order of ``vol``'s file); ``canonical`` replaces ``vol.array``."""
    return io.to_original_orientation(vol.array if canonical is None else canonical, vol)


def pair_outputs(disp: np.ndarray, fixed: io.Volume, moving: io.Volume, world_transform: np.ndarray, out_dir, *,
                 fixed_labels: io.Volume | None = None, moving_labels: io.Volume | None = None,
                 moving_label_lut: dict | None = None, labels=None, fixed_mask: io.Volume | None = None) -> dict:
    """Write the pair's Learn2Reg file (whole transform) when the names and grids allow, and its official metrics.

    Returns ``{"file": path or None, "note": sentence or None, "metrics": case_metrics(...) or None}``.
    """
    from pathlib import Path

    try:
        name = io.l2r_displacement_name(fixed.path or "", moving.path or "")
    except DinoregError:
        return {"file": None, "note": "No Learn2Reg file: the file names do not follow TASK_CCCC_MMMM.nii.gz.",
                "metrics": None}
    problem = io.l2r_grid_problem(fixed, moving)
    if problem:
        return {"file": None, "note": problem, "metrics": None}
    field = io.l2r_whole_field(disp, fixed, moving, world_transform)
    path = io.save_l2r_field(field, fixed, Path(out_dir) / name)
    kw: dict = {}
    if fixed_labels is not None and moving_labels is not None:
        ml = moving_labels.array
        if moving_label_lut:
            lut = np.zeros(int(max(ml.max(), max(moving_label_lut))) + 1, dtype=np.int32)
            for k, v in moving_label_lut.items():
                lut[int(k)] = int(v)
            ml = lut[ml]
        kw.update(fixed_labels=file_labels(fixed_labels), moving_labels=file_labels(moving_labels, ml), labels=labels)
    if fixed_mask is not None:
        kw["mask"] = file_labels(fixed_mask)
    return {"file": str(path), "note": None, "metrics": case_metrics(field, **kw)}
