"""Generate the demo synthetic cohort, time it, and measure how realistic it is.

1. Times ``generate_cohort`` for the default config (16 subjects at 3 mm, 8 with MR) into a temporary folder, with
   the wall time, the CPU time of all processes and the load average (other people share the machine), and one
   Learn2Reg-sized subject (192x160x256 at 2 mm, CT + MR) -> results/bench/phantom_generation.csv (appended).
2. Measures the realism numbers on the same subjects -> results/phantom_realism.csv (one row per measurement,
   with its reference range and whether it lies inside): inter-subject Dice, organ volumes, CT HU per tissue and
   contrast phase, measured CT noise, MR vs CT rank correlation per subject, intra-patient MR-CT Dice.

    .venv/bin/python bench/phantom_realism.py [--skip-l2r]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dinoreg_core.atomic import write_text_atomic
from dinoreg_core.data import phantom_realism as R
from dinoreg_core.data.phantom import LABELS, PhantomConfig, generate_cohort, generate_subject, subject_seed
from dinoreg_core.io import load_labels

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "phantom_realism.csv"
BENCH = ROOT / "results" / "bench" / "phantom_generation.csv"


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _timed(fn):
    load0, cpu0, t0 = os.getloadavg()[0], _cpu_seconds(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, _cpu_seconds() - cpu0, 0.5 * (load0 + os.getloadavg()[0])


def _write_csv(path: Path, header: list[str], rows: list[list], append: bool) -> None:
    old = path.read_text() if append and path.exists() else ""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if not old:
        w.writerow(header)
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, old + buf.getvalue())


def bench_generation(cfg: PhantomConfig, skip_l2r: bool) -> None:
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus torch {torch.__version__}"
    date = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _, wall, cpu, load = _timed(lambda: generate_cohort(Path(tmp) / "demo", cfg, progress=True))
        n_mr = len(cfg.mr_cases())
        grid = "x".join(map(str, cfg.shape))
        rows.append([date, machine, "demo cohort", cfg.n_subjects, n_mr, grid, cfg.spacing_mm, cfg.workers,
                     f"{wall:.1f}", f"{cpu:.1f}", f"{load:.1f}"])
        print(f"demo cohort ({cfg.n_subjects} subjects, {n_mr} MR, {grid} at {cfg.spacing_mm} mm): {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU, load {load:.1f}")
        # the files hold what generate_subject returns (checked on one case)
        lab = load_labels(Path(tmp) / "demo" / "labelsTr" / f"{cfg.task}_0002_0000.nii.gz").array
        assert np.array_equal(lab, generate_subject(subject_seed(cfg.seed, 2), cfg, with_mr=False)["labels"])
    if not skip_l2r:
        big = PhantomConfig(spacing_mm=2.0, shape=(192, 160, 256))
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        _, wall, cpu, load = _timed(lambda: generate_subject(subject_seed(0, 1), big, with_mr=True))
        torch.set_num_threads(old)
        rows.append([date, machine, "one Learn2Reg-size subject (CT+MR)", 1, 1, "192x160x256", 2.0, 1,
                     f"{wall:.1f}", f"{cpu:.1f}", f"{load:.1f}"])
        print(f"one Learn2Reg-size subject (CT + MR, 192x160x256 at 2 mm): {wall:.1f} s wall, {cpu:.1f} s CPU")
    _write_csv(BENCH, ["date", "machine", "what", "subjects", "mr_subjects", "grid", "spacing_mm", "workers",
                       "wall_s", "cpu_s", "load_avg"], rows, append=True)


def measure_realism(cfg: PhantomConfig) -> list[list]:
    subjects = []
    mr = cfg.mr_cases()
    contrasts = {c: cfg.mr_contrasts[i % len(cfg.mr_contrasts)] for i, c in enumerate(mr)}
    for case in range(1, cfg.n_subjects + 1):
        subjects.append(generate_subject(subject_seed(cfg.seed, case), cfg, with_mr=case in mr,
                                         mr_contrast=contrasts.get(case)))
    rows = []

    def row(metric, value, lo="", hi="", n=1, note=""):
        inside = "" if lo == "" else bool(lo <= value <= hi)
        rows.append([metric, f"{value:.4g}", lo, hi, inside, n, note])

    sp = cfg.spacing_mm
    mean, per_organ, per_pair = R.intersubject_dice([s["labels"] for s in subjects])
    npairs = len(per_pair)
    row("dice_between_subjects_mean", mean, *R.DICE_RANGE, npairs, "13 organs, no registration; real AbdomenCTCT ~0.25-0.30")
    row("dice_between_subjects_pair_min", min(per_pair), n=npairs)
    row("dice_between_subjects_pair_max", max(per_pair), n=npairs)
    for k, v in per_organ.items():
        row(f"dice_between_subjects_{LABELS[k].replace(' ', '_')}", v, n=npairs)
    vols = [R.organ_volumes_l(s["labels"], sp) for s in subjects]
    for k in LABELS:
        v = np.array([x[k] for x in vols])
        lo, hi = R.VOLUME_RANGES_L.get(k, ("", ""))
        name = LABELS[k].replace(" ", "_")
        row(f"volume_L_{name}_min", float(v.min()), lo, hi, len(v))
        row(f"volume_L_{name}_median", float(np.median(v)), lo, hi, len(v))
        row(f"volume_L_{name}_max", float(v.max()), lo, hi, len(v))
    # CT per tissue (eroded masks), by contrast phase where it matters
    for name in ("fat", "muscle", "gas"):
        v = [R.tissue_mean(s["ct"], s["tissue"], name) for s in subjects]
        row(f"ct_hu_{name}_min", min(v), *R.CT_RANGES_HU[name], len(v))
        row(f"ct_hu_{name}_max", max(v), *R.CT_RANGES_HU[name], len(v))
    v = [R.tissue_mean(s["ct"], s["tissue"], ["bone_cancellous", "bone_cortical"], erode=0) for s in subjects]
    row("ct_hu_bone_min", min(v), *R.CT_RANGES_HU["bone"], len(v))
    row("ct_hu_bone_max", max(v), *R.CT_RANGES_HU["bone"], len(v))
    for phase in ("native", "arterial", "portal"):
        sub = [s for s in subjects if s["meta"]["ct_phase"] == phase]
        if not sub:
            continue
        lo, hi = R.LIVER_HU_BY_PHASE[phase]
        for tissue in ("liver", "spleen", "kidney_cortex", "kidney_medulla", "artery", "portal_vein", "pancreas"):
            v = [R.tissue_mean(s["ct"], s["tissue"], tissue) for s in sub]
            rng = (lo - 5, hi + 5) if tissue == "liver" else ("", "")
            row(f"ct_hu_{tissue}_{phase}_mean", float(np.mean(v)), *rng, len(v))
    drawn = np.array([s["meta"]["ct_noise_hu"] for s in subjects])
    meas = np.array([R.tissue_std(s["ct"], s["tissue"], "liver") for s in subjects])
    row("ct_noise_hu_measured_min", float(meas.min()), 9.0, 28.0, len(meas), "std inside the eroded liver (noise + texture)")
    row("ct_noise_hu_measured_max", float(meas.max()), 9.0, 28.0, len(meas))
    row("ct_noise_hu_drawn_min", float(drawn.min()), 10.0, 25.0, len(drawn))
    row("ct_noise_hu_drawn_max", float(drawn.max()), 10.0, 25.0, len(drawn))
    # MR vs CT of the same subject
    with_mr = [s for s in subjects if "mr" in s]
    for con in cfg.mr_contrasts:
        rhos = [R.mr_ct_rank_correlation(s["ct"], s["tissue"], s["mr"], s["mr_tissue"])
                for s in with_mr if s["meta"]["mr_contrast"] == con]
        if rhos:
            row(f"mr_ct_rank_correlation_{con}_min", min(rhos), -0.5, 0.5, len(rhos), "Spearman over tissues")
            row(f"mr_ct_rank_correlation_{con}_max", max(rhos), -0.5, 0.5, len(rhos))
    intra = [float(np.nanmean(list(R.organ_dice(s["labels"], s["mr_labels"]).values()))) for s in with_mr]
    if intra:
        row("dice_mr_ct_same_subject_mean", float(np.mean(intra)), n=len(intra),
            note="13 organs, no registration (other breathing state and pose)")
        row("dice_mr_ct_same_subject_min", float(np.min(intra)), n=len(intra))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-l2r", action="store_true", help="do not time a Learn2Reg-size subject")
    args = ap.parse_args()
    cfg = PhantomConfig()
    bench_generation(cfg, args.skip_l2r)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = measure_realism(cfg)
    torch.set_num_threads(old)
    _write_csv(OUT, ["metric", "value", "range_lo", "range_hi", "within_range", "n", "note"], rows, append=False)
    bad = [r[0] for r in rows if r[4] is False]
    print(f"wrote {OUT} ({len(rows)} rows); outside the reference ranges: {bad or 'none'}")


if __name__ == "__main__":
    main()
