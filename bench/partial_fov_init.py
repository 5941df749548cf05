"""Benchmark the initial alignment on partial fields of view (full-size real scans of ../shared/data/real).

1. Split CT: the real CT (3 mm) cut into an upper and a lower part that share 30-50 % of their extent, the lower
   part's header rotated by 10-20 degrees and shifted by 100-300 mm (several cases). Dice over the labels present
   in both parts (all, and the abdominal organs 1-9) with the true alignment, after ``com`` and after ``affine``.
2. Real MR slab -> real CT (different people, no true alignment; MR ids mapped to CT ids): Dice of the shared
   organs (spleen, kidneys, liver, stomach) after none / com / affine, and after MIND registration through the
   public ``dinoreg_core.api.register(..., init="affine", features="mind")``.

Rows are appended to results/bench/partial_fov_init.csv (machine, date, threads, load).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/partial_fov_init.py [--skip-register]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_io import append_rows  # noqa: E402  (bench/ is on sys.path when a bench script runs)

from dinoreg_core import io  # noqa: E402
from dinoreg_core.evaluation.metrics import dice_per_label  # noqa: E402
from dinoreg_core.labels import load_mr_to_ct_map  # noqa: E402
from dinoreg_core.preprocess import resample_to  # noqa: E402
from dinoreg_core.registration.initial import initial_alignment_report  # noqa: E402
from dinoreg_core.evaluation.partial_fov_cases import shared_dice, split_scan  # noqa: E402

REAL = Path(os.environ.get("DINOREG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "real"
OUT = ROOT / "results" / "bench" / "partial_fov_init.csv"
ORGANS = list(range(1, 10))                      # TotalSegmentator ids 1-9: spleen .. adrenal glands
MRCT_ORGANS = [1, 2, 3, 5, 6]                    # spleen, kidneys, liver, stomach (in both real label maps)
# (upper_start, lower_stop, rotation_deg about x,y,z, shift_mm)
CASES = [
    (0.40, 0.70, (5.0, -8.0, 15.0), (120.0, -80.0, 150.0)),
    (0.45, 0.72, (0.0, 12.0, 0.0), (-60.0, 90.0, 250.0)),
    (0.40, 0.68, (-10.0, 0.0, -10.0), (200.0, 50.0, -100.0)),
]
COLUMNS = ["date", "machine", "threads", "load_1min", "case", "shared_upper", "shared_lower", "rotation_deg",
           "shift_mm", "method", "chosen", "score", "shared_fraction", "dice_all", "dice_organs", "error_mm", "seconds",
           "dice_organs_initial", "dice_all_initial"]


def _meta() -> dict:
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cpus",
            "threads": os.environ.get("OMP_NUM_THREADS", ""), "load_1min": f"{os.getloadavg()[0]:.2f}"}


def _mean(d: dict, ids) -> float:
    v = [d[i] for i in ids if i in d and np.isfinite(d[i])]
    return float(np.mean(v)) if v else float("nan")


def transform_error_mm(case, t: np.ndarray, step: int = 20) -> float:
    """Mean distance (mm) between ``t`` and the true transform over every ``step``-th labelled fixed voxel."""
    idx = np.argwhere(case.fixed_labels.array > 0)[::step].astype(np.float64)
    x = np.c_[idx @ case.fixed.affine[:3, :3].T + case.fixed.affine[:3, 3], np.ones(len(idx))]
    return float(np.linalg.norm((x @ (t - case.true_transform).T)[:, :3], axis=1).mean())


def split_ct_rows() -> list[dict]:
    ct = io.load_volume(REAL / "ct_abdomen_pelvis.nii.gz")
    lab = io.load_labels(REAL / "ct_abdomen_pelvis_labels.nii.gz")
    rows = []
    for i, (a, b, rot, shift) in enumerate(CASES):
        case = split_scan(ct, lab, a, b, rotation_deg=rot, shift_mm=shift)
        base = {"case": f"split_ct_{i}", "shared_upper": f"{case.shared_extent[0]:.2f}",
                "shared_lower": f"{case.shared_extent[1]:.2f}", "rotation_deg": str(rot), "shift_mm": str(shift)}
        runs = [("true", case.true_transform, None, 0.0)]
        for m in ("com", "affine"):
            t0 = time.perf_counter()
            t, rep = initial_alignment_report(case.fixed, case.moving, m, fixed_modality="ct", moving_modality="ct")
            runs.append((m, t, rep, time.perf_counter() - t0))
        for m, t, rep, sec in runs:
            all_d, d = shared_dice(case, t)
            row = {**_meta(), **base, "method": m, "chosen": rep.chosen if rep else "", "seconds": f"{sec:.1f}",
                   "score": "" if rep is None or rep.score is None else f"{rep.score:.3f}",
                   "shared_fraction": "" if rep is None or rep.shared_fraction is None else f"{rep.shared_fraction:.3f}",
                   "dice_all": f"{all_d:.3f}", "dice_organs": f"{_mean(d, ORGANS):.3f}",
                   "error_mm": f"{transform_error_mm(case, t):.2f}"}
            rows.append(row)
            print(row, flush=True)
    return rows


def mr_ct_rows(register: bool) -> list[dict]:
    ct = io.load_volume(REAL / "ct_abdomen_pelvis.nii.gz")
    lab = io.load_labels(REAL / "ct_abdomen_pelvis_labels.nii.gz")
    mr = io.load_volume(REAL / "mr_upper_abdomen.nii.gz")
    mlab = io.load_labels(REAL / "mr_upper_abdomen_labels.nii.gz")
    lmap = load_mr_to_ct_map(REAL / "mr_label_ids_to_ct_label_ids.json")
    lut = np.zeros(max(max(lmap), int(mlab.array.max())) + 1, np.int32)
    for k, v in lmap.items():
        lut[k] = v
    rows = []
    for m in ("none", "com", "affine"):
        t0 = time.perf_counter()
        t, rep = initial_alignment_report(ct, mr, m, fixed_modality="ct", moving_modality="mr")
        sec = time.perf_counter() - t0
        d = dice_per_label(lab.array, lut[resample_to(mlab, ct, labels=True, world_transform=t)], MRCT_ORGANS)
        rows.append({**_meta(), "case": "mr_to_ct", "method": m, "chosen": rep.chosen, "seconds": f"{sec:.1f}",
                     "score": "" if rep.score is None else f"{rep.score:.3f}",
                     "shared_fraction": "" if rep.shared_fraction is None else f"{rep.shared_fraction:.3f}",
                     "dice_organs": f"{_mean(d, MRCT_ORGANS):.3f}"})
        print(rows[-1], flush=True)
    if register:
        from dinoreg_core.api import register as api_register
        t0 = time.perf_counter()
        res = api_register(REAL / "ct_abdomen_pelvis.nii.gz", REAL / "mr_upper_abdomen.nii.gz",
                           fixed_labels=REAL / "ct_abdomen_pelvis_labels.nii.gz",
                           moving_labels=REAL / "mr_upper_abdomen_labels.nii.gz", label_map=lmap, init="affine",
                           features="mind", fixed_modality="ct", moving_modality="mr")
        d = {r["label"]: r["dice"] for r in res.metrics["labels"]}
        d0 = {r["label"]: r["dice_initial"] for r in res.metrics["labels"]}
        print("per organ before/after registration:",
              {i: (round(d0.get(i, np.nan), 3), round(d.get(i, np.nan), 3)) for i in MRCT_ORGANS}, flush=True)
        rows.append({**_meta(), "case": "mr_to_ct", "method": "affine+mind_register", "seconds":
                     f"{time.perf_counter() - t0:.1f}", "dice_organs": f"{_mean(d, MRCT_ORGANS):.3f}",
                     "dice_all": f"{res.metrics['summary']['dice']:.3f}",
                     "dice_organs_initial": f"{_mean(d0, MRCT_ORGANS):.3f}",
                     "dice_all_initial": f"{res.metrics['summary']['dice_initial']:.3f}"})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-register", action="store_true", help="skip the MIND registration of the MR -> CT pair")
    ap.add_argument("--only", choices=["split", "mrct"], help="run one part only")
    args = ap.parse_args()
    rows = []
    if args.only in (None, "split"):
        rows += split_ct_rows()
    if args.only in (None, "mrct"):
        rows += mr_ct_rows(not args.skip_register)
    append_rows(OUT, COLUMNS, rows)
    print(f"appended {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
