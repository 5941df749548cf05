"""Wall time and peak memory of our ConvexAdam vs the official `convexadam` package (same CPU, same pair).

Pairs: the real CT of ../shared/data/real (3 mm, 122x101x112) warped by a known smooth field, and the same
resampled to 2 mm (about 183x152x168). Both implementations get the same images and the same MIND settings and
hyperparameters (package defaults: mind_r 1, mind_d 2, grid_sp 6, disp_hw 4, lambda 1.25, 80 iterations,
grid_sp_adam 2, ic on). Each measurement runs in a fresh subprocess (so peak RSS is per run), alternating
ours/official, --repeats times each; medians are reported. Time covers MIND features + registration, not I/O.
Accuracy: mean error (mm, body) against the known field and mean Dice of the 13 organs after warping.
CPU seconds (user + system of the run) are recorded beside wall seconds: on a loaded machine they are the
steadier measure of the work each implementation does.

With ``--mode cli`` the same pair is written as NIfTI files first, and each run is a whole command in a fresh
process, timed from outside (wall clock of the process, peak RSS of the child): ours is
``python -m dinoreg_core.cli register FIXED MOVING --out DIR --fixed-modality ct --moving-modality ct`` (load,
MIND, ConvexAdam, warp, writing its outputs), the official one a script that loads the same files with nibabel,
normalises them the same way, calls ``convexAdam.convex_adam_MIND.convex_adam_pt`` and writes the field and the
warped image (:func:`_official_cli`); accuracy from the written fields.

``--threads N`` sets OMP_NUM_THREADS / torch threads of every child. The machine load (``os.getloadavg``) is
recorded before each run; the summary has its median.

    python bench/convex_adam_vs_official.py [--repeats 3] [--threads 1] [--mode inprocess|cli]
        [--out results/bench/convex_adam_vs_official.csv]
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


KERNEL_ENV = "DINOREG_BENCH_ADAM_KERNEL"  # --adam-kernel, handed to the child processes


def _kernel() -> str:
    """The Adam-stage implementation our side runs (ConvexAdamConfig.adam_kernel; the bench measures "fused")."""
    return os.environ.get(KERNEL_ENV, "fused")


def _one(impl: str, spacing: float) -> dict:
    import torch

    from dinoreg_core.evaluation.metrics import dice_per_label, displacement_error_mm
    from dinoreg_core.preprocess import normalize_intensity
    from dinoreg_core.registration.warp import warp_labels

    f, m, fl, ml, truth, body = _pair(spacing)
    fn, mn = normalize_intensity(f, "ct"), normalize_intensity(m, "ct")
    ft, mt = torch.from_numpy(fn)[None, None], torch.from_numpy(mn)[None, None]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0 = time.process_time()
    t = time.perf_counter()
    if impl == "ours":
        from dinoreg_core.features.mind import mind_ssc
        from dinoreg_core.registration.convex_adam import ConvexAdamConfig, convex_adam

        disp = convex_adam(mind_ssc(ft, 1, 2), mind_ssc(mt, 1, 2), ConvexAdamConfig(adam_kernel=_kernel()))
    else:
        import contextlib
        import io

        from convexAdam.convex_adam_MIND import convex_adam_pt

        with contextlib.redirect_stdout(io.StringIO()):
            d = convex_adam_pt(ft[0, 0], mt[0, 0], device=torch.device("cpu"))
        disp = torch.from_numpy(d).permute(3, 0, 1, 2)[None].float()
    seconds = time.perf_counter() - t
    cpu = time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wl = warp_labels(torch.from_numpy(ml)[None, None], disp)[0, 0].numpy()
    dice = np.nanmean(list(dice_per_label(fl, wl, sorted(set(np.unique(fl)) - {0})).values()))
    err = displacement_error_mm(disp, truth, (spacing,) * 3, body)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": rss, "rss_before_mb": rss0, "dice": float(dice),
            "field_error_mm": err, "shape": "x".join(map(str, f.shape))}


def _write_pair(spacing: float, folder: Path) -> None:
    """The benchmark pair as NIfTI files (fixed.nii.gz, moving.nii.gz at the pair's spacing) + truth.npz."""
    import nibabel as nib

    f, m, fl, ml, truth, body = _pair(spacing)
    folder.mkdir(parents=True, exist_ok=True)
    aff = np.diag([spacing, spacing, spacing, 1.0])
    for name, arr in (("fixed", f), ("moving", m)):
        nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), aff), str(folder / f"{name}.nii.gz"))
    np.savez_compressed(folder / "truth.npz", fl=fl, ml=ml, truth=np.asarray(truth), body=body)


def _official_cli(fixed: str, moving: str, out: str) -> None:
    """What a user of the official package runs on two files: load, normalise, register, write field + warped."""
    import nibabel as nib
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    from dinoreg_core.preprocess import normalize_intensity
    from dinoreg_core.registration.warp import warp

    fi, mi = nib.load(fixed), nib.load(moving)
    f = normalize_intensity(np.asarray(fi.get_fdata(), np.float32), "ct")
    m = normalize_intensity(np.asarray(mi.get_fdata(), np.float32), "ct")
    d = convex_adam_pt(torch.from_numpy(f), torch.from_numpy(m), device=torch.device("cpu"))
    Path(out).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(d.astype(np.float32), fi.affine), str(Path(out) / "disp.nii.gz"))
    disp = torch.from_numpy(d).permute(3, 0, 1, 2)[None].float()
    w = warp(torch.from_numpy(np.asarray(mi.get_fdata(), np.float32))[None, None], disp)[0, 0].numpy()
    nib.save(nib.Nifti1Image(w, fi.affine), str(Path(out) / "warped.nii.gz"))


def _cli_run(impl: str, folder: Path, threads: int) -> dict:
    """One whole command in a fresh process; wall time and the child's peak RSS measured from outside."""
    import nibabel as nib
    import torch

    from dinoreg_core.evaluation.metrics import dice_per_label, displacement_error_mm
    from dinoreg_core.registration.warp import warp_labels

    out = folder / f"out_{impl}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    if impl == "ours":
        cmd = [sys.executable, "-m", "dinoreg_core.cli", "register", str(folder / "fixed.nii.gz"),
               str(folder / "moving.nii.gz"), "--out", str(out), "--fixed-modality", "ct", "--moving-modality", "ct",
               "--set", f"adam_kernel={_kernel()}"]
    else:
        cmd = [sys.executable, __file__, "--official-cli", str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"),
               str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = r0.ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    peak = r1.ru_maxrss
    # RUSAGE_CHILDREN is the max over all waited-for children: it is this child's only when it sets a new max
    rss = peak / 1024 if peak > before else float("nan")
    d = np.asarray(nib.load(str(out / "disp.nii.gz")).dataobj, np.float32)
    disp = torch.from_numpy(d).permute(3, 0, 1, 2)[None].float()
    z = np.load(folder / "truth.npz")
    fl, ml = z["fl"], z["ml"]
    wl = warp_labels(torch.from_numpy(ml)[None, None], disp)[0, 0].numpy()
    dice = np.nanmean(list(dice_per_label(fl, wl, sorted(set(np.unique(fl)) - {0})).values()))
    sp = float(np.diag(nib.load(str(folder / "fixed.nii.gz")).affine)[0])
    err = displacement_error_mm(disp, torch.from_numpy(z["truth"]), (sp,) * 3, z["body"])
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": rss, "rss_before_mb": float("nan"),
            "dice": float(dice),
            "field_error_mm": err, "shape": "x".join(map(str, fl.shape))}


def _rss_child(impl: str, folder: Path, threads: int) -> dict:
    """Run _cli_run in its own process so RUSAGE_CHILDREN holds exactly one command's peak."""
    r = subprocess.run([sys.executable, __file__, "--cli-child", impl, str(folder), str(threads)],
                       capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spacings", default="3,2")
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "convex_adam_vs_official.csv"))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--mode", choices=("inprocess", "cli"), default="inprocess")
    ap.add_argument("--adam-kernel", choices=("fused", "autograd"), default="fused",
                    help="our Adam stage: fused (written-out gradient, the default of dinoreg register) or autograd "
                         "(the reference through grid_sample)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--cli-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--official-cli", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault(KERNEL_ENV, a.adam_kernel)
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(_one(a.child[0], float(a.child[1]))))
        return
    if a.cli_child:
        print(json.dumps(_cli_run(a.cli_child[0], Path(a.cli_child[1]), int(a.cli_child[2]))))
        return
    if a.official_cli:
        _official_cli(*a.official_cli)
        return
    import tempfile
    import pandas as pd

    from dinoreg_core.atomic import atomic_path

    rows = []
    tmpdir = Path(tempfile.mkdtemp(prefix="ca_bench_"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(a.threads),
           "MKL_NUM_THREADS": str(a.threads)}
    for sp in [float(s) for s in a.spacings.split(",")]:
        if a.mode == "cli":
            _write_pair(sp, tmpdir / f"{sp:g}mm")
        for rep in range(a.repeats):
            for impl in ("ours", "official") if rep % 2 == 0 else ("official", "ours"):
                load = os.getloadavg()[0]
                if a.mode == "cli":
                    row = _rss_child(impl, tmpdir / f"{sp:g}mm", a.threads)
                else:
                    r = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--child", impl, str(sp)],
                                       capture_output=True, text=True, check=True, env=env)
                    row = json.loads(r.stdout.strip().splitlines()[-1])
                row.update(impl=impl, spacing_mm=sp, repeat=rep, load_1min=load, adam_kernel=_kernel())
                rows.append(row)
                print(f"{sp:.0f} mm {impl:9s} {row['seconds']:6.1f} s (cpu {row['cpu_seconds']:6.1f} s) "
                      f"load {load:4.1f}  {row['peak_rss_mb']:6.0f} MB  "
                      f"Dice {row['dice']:.3f}  field error {row['field_error_mm']:.2f} mm", flush=True)
    __import__("shutil").rmtree(tmpdir, ignore_errors=True)
    df = pd.DataFrame(rows)
    df["machine"] = f"{platform.processor() or platform.machine()} {os.cpu_count()} cores"
    df["threads"], df["mode"] = a.threads, a.mode
    df["date"] = datetime.datetime.now().isoformat(timespec="minutes")
    med = df.groupby(["spacing_mm", "shape", "impl"])[["seconds", "cpu_seconds", "peak_rss_mb", "dice",
                                                       "field_error_mm", "load_1min"]].median()
    med = med.reset_index()
    wide = med.pivot(index=["spacing_mm", "shape"], columns="impl")
    summary = pd.DataFrame({
        "shape": wide.index.get_level_values("shape"),
        "ours_s": wide["seconds"]["ours"].values, "official_s": wide["seconds"]["official"].values,
        "speedup": (wide["seconds"]["official"] / wide["seconds"]["ours"]).values,
        "ours_cpu_s": wide["cpu_seconds"]["ours"].values, "official_cpu_s": wide["cpu_seconds"]["official"].values,
        "cpu_speedup": (wide["cpu_seconds"]["official"] / wide["cpu_seconds"]["ours"]).values,
        "ours_peak_mb": wide["peak_rss_mb"]["ours"].values, "official_peak_mb": wide["peak_rss_mb"]["official"].values,
        "ours_dice": wide["dice"]["ours"].values, "official_dice": wide["dice"]["official"].values,
        "ours_err_mm": wide["field_error_mm"]["ours"].values,
        "official_err_mm": wide["field_error_mm"]["official"].values,
    }, index=wide.index.get_level_values("spacing_mm"))
    summary["load_1min_median"] = wide["load_1min"].median(axis=1).values
    summary["mode"] = a.mode
    summary["machine"] = f"{platform.processor() or platform.machine()} {os.cpu_count()} cores"
    summary["torch_threads"] = a.threads
    summary["date"] = datetime.datetime.now().isoformat(timespec="minutes")
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
