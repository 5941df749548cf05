"""Learn2Reg submissions: whole folders of per-pair files (:mod:`dinoreg_core.evaluation.l2r_case` holds the per-pair
file and its official-rule metrics), resumable and shardable, with a zip and a metrics table."""

from __future__ import annotations

import os

import numpy as np

from .. import io
from ..errors import DinoregError
from .l2r_case import case_metrics, pair_outputs, warp_labels_l2r  # noqa: F401 - per-pair functions re-exported


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
