"""Quick measurements of the feature variants of issue 13 on synthetic inter-subject pairs.

``hybrid``: MIND vs dino3d (shipped demo weights) vs dino3d+mind (several ``dino_weight`` values) through the same
ConvexAdam with the official MIND defaults, on CT-CT and MR-CT inter-subject phantom pairs at 3 mm
(:func:`dinoreg_core.data.phantom.generate_subject`, cohort seed 7300: never used for pretraining, which used
1000). dino3d features are extracted once per volume through the feature cache and shared by every variant.

``spacing``: dino3d with the 3 mm-trained demo weights on 2 mm CT-CT pairs, spacing-aware (the image resampled
to 3 mm before the backbone) vs not (the 2 mm image as it is), same ConvexAdam defaults.

Methods are interleaved per pair (A, B, A, B, ...). Rows (mean Dice over the 13 phantom organs, with the
unregistered Dice and the seconds) are appended to results/bench/feature_variants.csv.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/feature_variants.py hybrid --pairs 3
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/feature_variants.py spacing --pairs 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_io import append_rows  # noqa: E402

from dinoreg_core.data.phantom import PhantomConfig, generate_subject, subject_seed  # noqa: E402
from dinoreg_core.evaluation.metrics import dice_per_label  # noqa: E402
from dinoreg_core.features.hybrid import compute_pair_features  # noqa: E402
from dinoreg_core.preprocess import normalize_intensity  # noqa: E402
from dinoreg_core.registration.convex_adam import ConvexAdamConfig, convex_adam  # noqa: E402
from dinoreg_core.registration.warp import warp_labels  # noqa: E402

OUT = ROOT / "results" / "bench" / "feature_variants.csv"
COHORT_SEED = 7300
LABELS = list(range(1, 14))
COLUMNS = ["date", "machine", "threads", "load_1min", "experiment", "task", "pair", "spacing_mm", "method",
           "options", "dice_initial", "dice", "seconds"]


def _meta() -> dict:
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
            "threads": os.environ.get("OMP_NUM_THREADS", ""), "load_1min": f"{os.getloadavg()[0]:.2f}"}


def _subject(case: int, spacing: float, shape) -> dict:
    cfg = PhantomConfig(spacing_mm=spacing, shape=tuple(shape), seed=COHORT_SEED)
    return generate_subject(subject_seed(COHORT_SEED, case), cfg, with_mr=True)


def _dice(fixed_lab: np.ndarray, moving_lab: np.ndarray, disp: torch.Tensor | None) -> float:
    m = torch.from_numpy(moving_lab.astype(np.int64))[None, None]
    w = m if disp is None else warp_labels(m, disp)
    d = dice_per_label(fixed_lab, w[0, 0].numpy(), LABELS)
    return float(np.nanmean([v for v in d.values()]))


def _register(method: str, fi: np.ndarray, mi: np.ndarray, fmod: str, mmod: str, options: dict,
              sum_cost: bool = False):
    ft = torch.from_numpy(fi)[None, None]
    mt = torch.from_numpy(mi)[None, None]
    ff, mf = compute_pair_features(method, ft, mt, fixed_modality=fmod, moving_modality=mmod, device="cpu",
                                   options=options, pca_dim=12, seed=0)
    size = fi.shape
    ff = F.interpolate(ff, size=size, mode="trilinear", align_corners=False) if ff.shape[2:] != size else ff
    mf = F.interpolate(mf, size=size, mode="trilinear", align_corners=False) if mf.shape[2:] != size else mf
    # sum_cost: the Adam SSD summed over channels (cost_scale = C) like the discrete stage, instead of the mean
    # over channels x 12, so extra channels do not dilute the 12 MIND channels (same as MIND alone when C = 12)
    return convex_adam(ff, mf, ConvexAdamConfig(cost_scale=float(ff.shape[1])) if sum_cost else ConvexAdamConfig())


def run(experiment: str, n_pairs: int, cache_dir: str, dino_weights: list[float], sum_cost: bool = False,
        only_hybrid: bool = False) -> list[dict]:
    spacing, shape = (3.0, (128, 104, 112)) if experiment == "hybrid" else (2.0, (128, 104, 112))
    subjects = {}
    rows = []
    for p in range(n_pairs):
        a, b = 2 * p + 1, 2 * p + 2
        for c in (a, b):
            if c not in subjects:
                subjects[c] = _subject(c, spacing, shape)
        A, B = subjects[a], subjects[b]
        tasks = [("ct-ct", A["ct"], A["labels"], "ct", B["ct"], B["labels"], "ct")]
        if experiment == "hybrid":
            tasks.append(("mr-ct", A["ct"], A["labels"], "ct", B["mr"], B["mr_labels"], "mr"))
        for task, fimg, flab, fmod, mimg, mlab, mmod in tasks:
            fi, mi = normalize_intensity(fimg, fmod), normalize_intensity(mimg, mmod)
            d0 = _dice(flab, mlab, None)
            base = {"cache_dir": cache_dir, "progress": False}
            if experiment == "hybrid":
                variants = [] if only_hybrid else [("mind", {}), ("dino3d", base)]
                variants += [("dino3d+mind", {**base, "dino_weight": w}) for w in dino_weights]
            else:
                variants = [("dino3d", {**base, "spacing_mm": spacing, "spacing_aware": True}),
                            ("dino3d", {**base, "spacing_mm": spacing, "spacing_aware": False})]
            for method, opts in variants:
                t0 = time.perf_counter()
                disp = _register(method, fi, mi, fmod, mmod, opts, sum_cost and method.endswith("+mind"))
                shown = {k: v for k, v in opts.items() if k not in ("cache_dir", "progress")}
                if sum_cost and method.endswith("+mind"):
                    shown["cost_scale"] = "channels"
                row = {**_meta(), "experiment": experiment, "task": task, "pair": f"{a:04d}_{b:04d}",
                       "spacing_mm": spacing, "method": method, "options": str(shown),
                       "dice_initial": f"{d0:.3f}", "dice": f"{_dice(flab, mlab, disp):.3f}",
                       "seconds": f"{time.perf_counter() - t0:.1f}"}
                rows.append(row)
                print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", choices=["hybrid", "spacing"])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--dino-weights", default="0.25,0.5,1.0", help="dino_weight values of the hybrid")
    ap.add_argument("--cache-dir", default=None, help="feature cache folder (default: a temporary folder)")
    ap.add_argument("--sum-cost", action="store_true", help="hybrid: ConvexAdam cost_scale = channel count")
    ap.add_argument("--only-hybrid", action="store_true", help="hybrid experiment: skip the mind and dino3d rows")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.experiment, args.pairs, args.cache_dir or tmp,
                   [float(w) for w in args.dino_weights.split(",")], args.sum_cost, args.only_hybrid)
    append_rows(OUT, COLUMNS, rows)
    print(f"appended {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
