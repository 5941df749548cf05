"""Learn2Reg submissions: the per-pair files, their metrics by the official evaluation's rules, whole folders.

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

import os

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


# ------------------------------------------------------------------------------------------ whole submissions

SUBMISSION_TABLE = "metrics_l2r.csv"
PAIR_FOLDER = "pairs"  # SUBMISSION/pairs/<FFFF_ffff-MMMM_mmmm>/: each pair's register outputs (not submitted)


def _pair_key(pair: io.L2RPair) -> str:
    (fc, fm), (mc, mm) = io.l2r_case_modality(pair.fixed), io.l2r_case_modality(pair.moving)
    return f"{fc}_{fm}<--{mc}_{mm}"


def _load_kp(path):
    return None if path is None else np.atleast_2d(np.loadtxt(str(path), delimiter=","))


def evaluate_files(field_path, pair: io.L2RPair, labels=None, masked: bool = False) -> dict:
    """:func:`case_metrics` of a written submission file and the pair's label / mask / keypoint files."""
    import nibabel as nib

    field = np.asarray(nib.load(str(field_path)).dataobj, dtype=np.float64)
    kw: dict = {}
    if pair.fixed_labels is not None and pair.moving_labels is not None:
        kw["fixed_labels"] = np.asarray(nib.load(str(pair.fixed_labels)).dataobj)
        kw["moving_labels"] = np.asarray(nib.load(str(pair.moving_labels)).dataobj)
        kw["labels"] = labels
    if masked and pair.fixed_mask is not None:
        kw["mask"] = np.asarray(nib.load(str(pair.fixed_mask)).dataobj)
    if pair.fixed_keypoints is not None and pair.moving_keypoints is not None:
        kw.update(fixed_keypoints=_load_kp(pair.fixed_keypoints), moving_keypoints=_load_kp(pair.moving_keypoints),
                  moving_spacing=nib.load(str(pair.moving)).header.get_zooms()[:3])
    return case_metrics(field, **kw)


def run_submission(dataset_json, split: str, out_dir, *, config=None, masked: bool = False, rank: int = 0,
                   world: int = 1, make_zip: bool = True, log=print) -> dict:
    """Register every pair of ``split`` into a Learn2Reg submission folder (resumable, shardable).

    Args:
        dataset_json: the task's ``*_dataset.json`` (or its folder).
        split: pair list, e.g. ``registration_val`` or ``registration_test``.
        out_dir: submission folder: the ``disp_*.nii.gz`` files at its top, each pair's other outputs under
            ``pairs/``, and (once every pair is done, by rank 0) ``submission.zip`` and ``metrics_l2r.csv``
            (official-rule metrics, when the dataset has labels or keypoints).
        config: :class:`dinoreg_core.api.RegisterConfig`.
        masked: SDlogJ inside the fixed masks (AbdomenMRCT).
        rank, world: this process takes pairs ``rank, rank + world, ...`` (``torchrun`` sets RANK / WORLD_SIZE).

    Returns:
        ``{"done": n finished pairs (all ranks), "total": n, "skipped": n already there, "table": path or None,
        "zip": path or None}``.
    """
    import zipfile
    from pathlib import Path

    import pandas as pd

    from ..api import register
    from ..atomic import atomic_path

    ds = io.read_l2r_dataset(dataset_json)
    if split not in ds.pairs:
        raise DinoregError(f"The dataset {ds.root} has no pair list '{split}'; it has: {', '.join(sorted(ds.pairs))}.")
    pairs = ds.pairs[split]
    out = Path(out_dir)
    (out / PAIR_FOLDER).mkdir(parents=True, exist_ok=True)
    skipped = 0
    for i in range(rank, len(pairs), world):
        pair = pairs[i]
        target = out / pair.submission_name
        if target.exists():
            skipped += 1
            continue
        log(f"[{i + 1}/{len(pairs)}] {pair.fixed.name} <- {pair.moving.name}")
        pdir = out / PAIR_FOLDER / _pair_key(pair).replace("<--", "-")
        res = register(pair.fixed, pair.moving, fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels,
                       config=config, out_dir=pdir, label_names=ds.labels or None)
        written = res.outputs.get("l2r_displacement")
        if not written:
            raise DinoregError(f"The pair {pair.fixed.name} <- {pair.moving.name} cannot be submitted: "
                               f"{res.metrics.get('learn2reg', {}).get('note')}")
        os.replace(written, target)  # the submission file moves to the folder's top: its presence marks the pair done
    done = [p for p in pairs if (out / p.submission_name).exists()]
    result = {"done": len(done), "total": len(pairs), "skipped": skipped, "table": None, "zip": None}
    if rank != 0 or len(done) < len(pairs):
        return result
    labels = sorted(ds.labels) or None
    rows = []
    for p in pairs:
        m = evaluate_files(out / p.submission_name, p, labels, masked)
        row = {"pair": _pair_key(p), "file": p.submission_name, "sdlogj": m["sdlogj"],
               "num_foldings": m["num_foldings"]}
        for k in ("dice", "hd95", "tre"):
            if k in m:
                row[k] = m[k]
        for lab, v in (m.get("dice_detailed") or {}).items():
            row[f"dice_{lab}"] = v
        for lab, v in (m.get("hd95_detailed") or {}).items():
            row[f"hd95_{lab}"] = v
        rows.append(row)
    table = out / SUBMISSION_TABLE
    with atomic_path(table) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    result["table"] = str(table)
    if make_zip:
        zpath = out / "submission.zip"
        with atomic_path(zpath) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for p in pairs:
                    z.write(out / p.submission_name, arcname=p.submission_name)
        result["zip"] = str(zpath)
    return result
