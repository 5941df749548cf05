"""Wall time and peak memory of our ConvexAdam vs the official `convexadam` package (same CPU, same pair).

Pairs: the real CT of ../shared/data/real (3 mm, 122x101x112) warped by a known smooth field, and the same
resampled to 2 mm (about 183x152x168). Both implementations get the same images and the same MIND settings and
hyperparameters (package defaults: mind_r 1, mind_d 2, grid_sp 6, disp_hw 4, lambda 1.25, 80 iterations,
grid_sp_adam 2, ic on). Each measurement runs in a fresh subprocess (so peak RSS is per run), alternating
ours/official, --repeats times each; medians are reported. Time covers MIND features + registration, not I/O.
Accuracy: mean error (mm, body) against the known field and mean Dice of the 13 organs after warping.

    python bench/convex_adam_vs_official.py [--repeats 3] [--out results/bench/convex_adam_vs_official.csv]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _pair(spacing: float):
    from dinoreg_core.demo import known_deformation_pair
    from dinoreg_core.preprocess import resample_spacing

    p = known_deformation_pair(max_disp_mm=10.0, seed=0)
    if spacing == 3.0:
        return p.fixed.array, p.moving.array, p.fixed_labels.array, p.moving_labels.array, p.true_disp, p.body_mask
    import torch

    from dinoreg_core.preprocess import foreground_mask
    from dinoreg_core.registration.warp import invert, warp, warp_labels

    fixed = resample_spacing(p.fixed, spacing)
    flab = resample_spacing(p.fixed_labels, spacing, labels=True)
    from dinoreg_core.registration.warp import smooth_random_field

    # a smooth field of the same size in mm, drawn on the 2 mm grid
    body = foreground_mask(fixed.array, "ct")
    v = smooth_random_field(fixed.shape, max_disp=10.0 / spacing, control_spacing=15, seed=0,
                            mask=torch.from_numpy(body))
    mov = warp(torch.from_numpy(fixed.array)[None, None], v)[0, 0].numpy()
    mlab = warp_labels(torch.from_numpy(flab.array)[None, None], v)[0, 0].numpy()
    truth = invert(v, iterations=50)[0].numpy()
    return fixed.array, mov, flab.array, mlab, truth, body


def _one(impl: str, spacing: float) -> dict:
    import torch

    from dinoreg_core.evaluation.metrics import dice_per_label, displacement_error_mm
    from dinoreg_core.preprocess import normalize_intensity
    from dinoreg_core.registration.warp import warp_labels

    f, m, fl, ml, truth, body = _pair(spacing)
    fn, mn = normalize_intensity(f, "ct"), normalize_intensity(m, "ct")
    ft, mt = torch.from_numpy(fn)[None, None], torch.from_numpy(mn)[None, None]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if impl == "ours":
        from dinoreg_core.features.mind import mind_ssc
        from dinoreg_core.registration.convex_adam import ConvexAdamConfig, convex_adam

        disp = convex_adam(mind_ssc(ft, 1, 2), mind_ssc(mt, 1, 2), ConvexAdamConfig())
    else:
        import contextlib
        import io

        from convexAdam.convex_adam_MIND import convex_adam_pt

        with contextlib.redirect_stdout(io.StringIO()):
            d = convex_adam_pt(ft[0, 0], mt[0, 0], device=torch.device("cpu"))
        disp = torch.from_numpy(d).permute(3, 0, 1, 2)[None].float()
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wl = warp_labels(torch.from_numpy(ml)[None, None], disp)[0, 0].numpy()
    dice = np.nanmean(list(dice_per_label(fl, wl, sorted(set(np.unique(fl)) - {0})).values()))
    err = displacement_error_mm(disp, truth, (spacing,) * 3, body)
    return {"seconds": seconds, "peak_rss_mb": rss, "rss_before_mb": rss0, "dice": float(dice),
            "field_error_mm": err, "shape": "x".join(map(str, f.shape))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spacings", default="3,2")
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "convex_adam_vs_official.csv"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_one(a.child[0], float(a.child[1]))))
        return
    import pandas as pd

    from dinoreg_core.atomic import atomic_path

    rows = []
    for sp in [float(s) for s in a.spacings.split(",")]:
        for rep in range(a.repeats):
            for impl in ("ours", "official") if rep % 2 == 0 else ("official", "ours"):
                r = subprocess.run([sys.executable, __file__, "--child", impl, str(sp)], capture_output=True,
                                   text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                row = json.loads(r.stdout.strip().splitlines()[-1])
                row.update(impl=impl, spacing_mm=sp, repeat=rep)
                rows.append(row)
                print(f"{sp:.0f} mm {impl:9s} {row['seconds']:6.1f} s  {row['peak_rss_mb']:6.0f} MB  "
                      f"Dice {row['dice']:.3f}  field error {row['field_error_mm']:.2f} mm", flush=True)
    df = pd.DataFrame(rows)
    med = df.groupby(["spacing_mm", "shape", "impl"])[["seconds", "peak_rss_mb", "dice", "field_error_mm"]].median()
    med = med.reset_index()
    wide = med.pivot(index=["spacing_mm", "shape"], columns="impl")
    summary = pd.DataFrame({
        "shape": wide.index.get_level_values("shape"),
        "ours_s": wide["seconds"]["ours"].values, "official_s": wide["seconds"]["official"].values,
        "speedup": (wide["seconds"]["official"] / wide["seconds"]["ours"]).values,
        "ours_peak_mb": wide["peak_rss_mb"]["ours"].values, "official_peak_mb": wide["peak_rss_mb"]["official"].values,
        "ours_dice": wide["dice"]["ours"].values, "official_dice": wide["dice"]["official"].values,
        "ours_err_mm": wide["field_error_mm"]["ours"].values,
        "official_err_mm": wide["field_error_mm"]["official"].values,
    }, index=wide.index.get_level_values("spacing_mm"))
    summary["machine"] = f"{platform.processor() or platform.machine()} {os.cpu_count()} cores"
    summary["torch_threads"] = __import__("torch").get_num_threads()
    summary["date"] = datetime.date.today().isoformat()
    summary["repeats"] = a.repeats
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        summary.to_csv(tmp, float_format="%.4g")
    with atomic_path(out.with_name(out.stem + "_runs.csv")) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4g")
    print(summary.to_string(float_format=lambda x: f"{x:.3g}"))
    print(f"wrote {out} and {out.with_name(out.stem + '_runs.csv')}")


if __name__ == "__main__":
    main()
