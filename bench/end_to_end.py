"""End-to-end registration benchmark: every available method on the same pairs, side by side.

Methods (registry :mod:`dinoreg_core.peers`): the project's path ``dino3d`` (when weights exist at the default
path or ``--dino3d-weights``), ``mind``, ``intensity``, ``dinov2`` (when weights exist), and the peers ``ants``
(antspyx, in its own environment), ``convexadam_official`` (PyPI convexadam) and ``unigradicon`` (when its package
and weights are local). A method that cannot run is listed with the reason and left out; ``initial`` (zero
displacement) is the reference row.

Pairs:

* ``ctct`` — inter-patient CT-CT pairs (``registration_val``) and ``mrct`` — MR -> CT pairs of one subject
  (``registration_mrct``) of a Learn2Reg-layout cohort: by default the synthetic demo cohort, generated into
  ``results/cache/synthetic_demo`` when absent (about 2-3 min), or any folder/``*_dataset.json`` given by
  ``--cohort``. Scans of a pair share a grid; no initial alignment (Learn2Reg convention).
* ``real`` — the real MR -> real CT pair of ``../shared/data/real`` (different people and scanners, MR a 60 mm
  slab). Its world coordinates are unrelated, so the MR is first aligned with the project's
  ``initial_alignment(..., "affine")`` (MIND translation search + affine), computed once, and resampled onto the CT
  grid; every method starts from that same resampled MR and registers only the box of the CT grid the MR covers
  (the field is extended outside by its border values, as ``dinoreg register`` does). MR labels are mapped to CT
  ids with ``mr_label_ids_to_ct_label_ids.json``; the labels are TotalSegmentator predictions (silver standard).

Per (pair, method), in a fresh subprocess (so peak memory is per run): Dice (mean over the labels present in both
the fixed map and the moving map on the fixed grid), HD95 (mm, mean over labels), SDlogJ (std of log Jacobian
determinant, plain and Learn2Reg variant) and folding (% voxels with J <= 0) of the field on the registered box,
wall time of the registration call (features + optimisation, or the peer's whole run including finding its
interpreter and starting its subprocess; loading and metrics excluded) and peak memory up to the end of that call:
the process's own peak RSS (VmHWM; it includes the Python/torch runtime and the loaded pair: the ``initial`` row
shows that floor) plus the peak RSS of the peer's worker subprocess (ANTs, uniGradICON), if any.

Outputs (atomic): ``results/bench/end_to_end.csv`` (one row per set, pair and method, with a ``settings`` column),
``end_to_end_labels.csv`` (one row per label), ``end_to_end_settings.json`` (every method's resolved settings,
skipped methods and why, machine, date) and ``end_to_end.md`` (mean over pairs per set and method).

Usage::

    nice -n 5 .venv/bin/python bench/end_to_end.py                        # default: 2 pairs per set, cheap ANTs
    .venv/bin/python bench/end_to_end.py --pairs 5 --ants-preset strong   # ANTs 100x70x50 (slow)
    .venv/bin/python bench/end_to_end.py --methods mind,ants --sets real
    .venv/bin/python bench/end_to_end.py --cohort /data/AbdomenCTCT --sets ctct
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ALL_METHODS = ["dino3d", "mind", "intensity", "dinov2", "ants", "convexadam_official", "unigradicon"]
SETS = {"ctct": ("registration_val", "CT-CT inter-patient (synthetic)"),
        "mrct": ("registration_mrct", "MR -> CT, same subject (synthetic)"),
        "real": (None, "real MR -> real CT (affine initial alignment)")}
# For the real pair many shared structures (bowel, colon, muscles, vertebrae) reach far beyond the 60 mm MR slab, so
# their HD95 measures the slab's extent, not the registration: the table also gives the organs both label maps cover
# best (TotalSegmentator ids: 1 spleen, 2 right kidney, 3 left kidney, 5 liver).
ORGANS = {"real": {1: "spleen", 2: "right kidney", 3: "left kidney", 5: "liver"}}
COLUMNS = ["set", "pair", "method", "status", "dice_initial", "dice", "hd95_mm", "hd95_vox", "sdlogj", "sdlogj_l2r",
           "folding_pct", "time_s", "peak_rss_mb", "n_labels", "shape", "box", "date", "machine", "settings", "note"]


# ------------------------------------------------------------------------------------------- pairs

def prepare_pair(out: Path, *, set_name: str, name: str, fixed, moving, fixed_labels, moving_labels,
                 fixed_modality: str | None = None, moving_modality: str | None = None, init: str = "none",
                 label_map: dict | None = None) -> Path:
    """Align a pair once with the pipeline's first stage (:func:`dinoreg_core.pipeline.align`, the same as
    ``dinoreg register``) and save the :class:`AlignedPair` to an npz that every method's worker starts from."""
    from dinoreg_core.pipeline import align, save_pair

    pair = align(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels, init=init,
                 fixed_modality=fixed_modality, moving_modality=moving_modality, label_map=label_map)
    pair.timings.update(set=set_name, pair=name, init=init)
    return save_pair(pair, out / f"{set_name}_{name}.npz")


def pair_meta(path: Path) -> dict:
    """What the tables say about a prepared pair (its files, modalities, initial alignment and its time)."""
    from dinoreg_core.pipeline import load_pair

    p = load_pair(path)
    t = p.timings
    return {"set": t.get("set"), "pair": t.get("pair"), "fixed": p.fixed.path, "moving": p.moving.path,
            "fixed_modality": p.fixed_modality, "moving_modality": p.moving_modality, "init": t.get("init"),
            "init_s": t.get("init_s"), "init_transform": np.asarray(p.world_transform).tolist()}


def cohort_pairs(dataset, set_name: str, n: int) -> list[dict]:
    key = SETS[set_name][0]
    pairs = dataset.pairs.get(key, [])[:n]
    return [dict(set_name=set_name, name=p.name, fixed=p.fixed, moving=p.moving, fixed_labels=p.fixed_labels,
                 moving_labels=p.moving_labels) for p in pairs if p.fixed_labels and p.moving_labels]


def real_pair(shared: Path) -> dict | None:
    from dinoreg_core.labels import load_label_id_map

    r = shared / "real"
    if not (r / "mr_upper_abdomen.nii.gz").exists():
        return None
    return dict(set_name="real", name="mr_to_ct", fixed=r / "ct_abdomen_pelvis.nii.gz",
                moving=r / "mr_upper_abdomen.nii.gz", fixed_labels=r / "ct_abdomen_pelvis_labels.nii.gz",
                moving_labels=r / "mr_upper_abdomen_labels.nii.gz", fixed_modality="ct", moving_modality="mr",
                init="affine", label_map=load_label_id_map(r / "mr_label_ids_to_ct_label_ids.json"))


# ------------------------------------------------------------------------------------------- one run



def run_one(pair_npz: Path, method: str, options: dict, device: str = "cpu") -> dict:
    """Register one prepared pair with one method (``initial``: zero field) and evaluate it, through the pipeline's
    stages (:meth:`RegistrationMethod.register`, :func:`evaluate`); returns a row dict."""
    from dinoreg_core.peers._worker import own_peak_rss_mb
    from dinoreg_core.pipeline import evaluate, get_registration_method, load_pair, zero_displacement

    pair = load_pair(pair_npz)
    t = time.perf_counter()
    if method == "initial":
        disp = zero_displacement(pair)
    else:
        disp = get_registration_method(method).register(pair, options, device=device)
    seconds = time.perf_counter() - t
    # peak memory up to the end of the registration call (evaluation below excluded): this process's own
    # high-water mark plus that of the peer's worker subprocess, if any (an upper bound on their sum at any time)
    peak = own_peak_rss_mb() + float((disp.timings or {}).get("worker_peak_rss_mb") or 0.0)
    m = evaluate(pair, disp)
    rows, s = m.labels or [], m.summary or {}
    lo, hi = pair.box
    return {"set": pair.timings["set"], "pair": pair.timings["pair"], "method": method, "status": "ok",
            "dice_initial": s.get("dice_initial", float("nan")), "dice": s.get("dice", float("nan")),
            "hd95_mm": s.get("hd95_mm", float("nan")), "hd95_vox": s.get("hd95_vox", float("nan")),
            "sdlogj": m.field["sdlogj"], "sdlogj_l2r": m.field["sdlogj_l2r"], "folding_pct": m.field["folding_pct"],
            "time_s": seconds, "peak_rss_mb": peak, "n_labels": len(rows),
            "shape": "x".join(map(str, pair.fixed.shape)), "box": f"{list(lo)}-{list(hi)}", "settings": disp.settings,
            "timings": disp.timings, "labels": rows}


def _child(argv) -> None:
    import torch

    pair, method, options, device, threads = argv
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    try:
        row = run_one(Path(pair), method, json.loads(options), device)
    except Exception as e:  # noqa: BLE001 - reported in the table, the benchmark goes on
        from dinoreg_core.errors import DinoregError

        msg = " ".join(str(e).split()) if isinstance(e, DinoregError) else f"{type(e).__name__}: {e}"
        row = {"status": "failed", "note": msg}
    print("@@ROW " + json.dumps(row, default=float))


def run_child(pair: Path, method: str, options: dict, device: str, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(pair), method, json.dumps(options), device,
           str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("@@ROW "):
            return json.loads(line[6:])
    tail = " ".join((r.stderr or "").strip().splitlines()[-1:]) or f"exit status {r.returncode}"
    return {"status": "failed", "note": tail}


# ------------------------------------------------------------------------------------------- output

def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=str(REPO)).stdout.strip()
    except OSError:
        return ""


def _fmt(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _brief_settings(method: str, s: dict) -> str:
    """A few words naming the settings that matter, for the markdown table."""
    if method == "initial":
        return "zero displacement"
    if method == "ants":
        return (f"{s.get('type_of_transform')} {s.get('metric')}"
                f"{'[r=' + str(s.get('cc_radius')) + ']' if str(s.get('metric')).lower() == 'cc' else ''} "
                f"{'x'.join(map(str, s.get('reg_iterations', [])))} ({s.get('preset')})")
    if method == "convexadam_official":
        return (f"MIND r{s.get('mind_r')} d{s.get('mind_d')}, grid {s.get('grid_sp')}, hw {s.get('disp_hw')}, "
                f"lambda {s.get('lambda_weight')}, {s.get('selected_niter')} it")
    if method == "unigradicon":
        return f"io_iterations {s.get('io_iterations')}"
    c = s.get("convex", {})
    pca = f", PCA {s.get('pca_dim')}" if s.get("features") in ("dino3d", "dinov2") else ""
    return (f"{s.get('features')}{pca}, grid {c.get('grid_sp')}, hw {c.get('disp_hw')}, "
            f"lambda {c.get('lambda_weight')}, {c.get('iterations')} it")


def write_outputs(rows: list[dict], out_csv: Path, header: dict) -> None:
    from dinoreg_core.atomic import write_json_atomic, write_text_atomic

    out_csv.parent.mkdir(parents=True, exist_ok=True)
    date, machine = header["date"], header["machine_line"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**{k: r.get(k, "") for k in COLUMNS}, "date": date, "machine": machine,
                    "settings": json.dumps(r.get("settings", {}), sort_keys=True, default=str)})
    write_text_atomic(out_csv, buf.getvalue())
    buf = io.StringIO()
    lw = csv.writer(buf)
    lw.writerow(["set", "pair", "method", "label", "dice_initial", "dice", "hd95_mm", "hd95_vox"])
    for r in rows:
        for lab in r.get("labels", []) or []:
            lw.writerow([r["set"], r["pair"], r["method"], lab["label"], lab["dice_initial"], lab["dice"],
                         lab["hd95_mm"], lab["hd95_vox"]])
    write_text_atomic(out_csv.with_name(out_csv.stem + "_labels.csv"), buf.getvalue())
    settings = {}
    for r in rows:
        if r.get("status") == "ok" and r["method"] != "initial":
            settings.setdefault(r["method"], {})[f"{r['set']}/{r['pair']}"] = r.get("settings", {})
    write_json_atomic(out_csv.with_name(out_csv.stem + "_settings.json"),
                      {**{k: v for k, v in header.items() if k != "machine_line"}, "settings": settings})
    write_text_atomic(out_csv.with_suffix(".md"), markdown(rows, header))


def markdown(rows: list[dict], header: dict) -> str:
    lines = [f"# End-to-end registration benchmark ({header['date']})", "",
             f"Machine: {header['machine_line']}. Command: `{header['command']}` (commit {header['commit']}).", "",
             "Each (pair, method) ran in its own process on the same prepared pair; mean over pairs. Dice = mean over "
             "the labels present in both maps; HD95 in mm; SDlogJ and folding of the field on the registered box; "
             "time = the registration call (features + optimisation, or the peer's whole run incl. its subprocess); "
             "peak = peak RSS up to the end of that call, of the process plus the peer's worker subprocess if any "
             "(includes the Python/torch runtime and the loaded pair: the initial row shows that floor). The machine "
             "is shared: times carry the noise of other jobs (load average above).", ""]
    for set_name, (_, title) in SETS.items():
        sel = [r for r in rows if r.get("set") == set_name]
        if not sel:
            continue
        pairs = sorted({r["pair"] for r in sel})
        organs = ORGANS.get(set_name)
        extra_h = f" Dice {'/'.join(organs.values())} | HD95 (mm) of those |" if organs else ""
        lines += [f"## {title}: {len(pairs)} pair(s) ({', '.join(pairs)})", "",
                  f"| method | Dice | HD95 (mm) |{extra_h} SDlogJ | SDlogJ (L2R) | folding % | time (s) | peak (MB) | "
                  "settings |", "|---|---|---|" + ("---|---|" if organs else "") + "---|---|---|---|---|---|"]
        if organs:
            lines[-2:-2] = [f"Dice and HD95 over all {len({lab['label'] for r in sel for lab in r.get('labels') or []})} "
                            "structures present in both maps, and over the organs both maps cover best: many shared "
                            "structures (bowel, colon, muscles, vertebrae) reach far beyond the 60 mm MR slab, so their "
                            "HD95 measures the slab's extent rather than the registration.", ""]
        methods = ["initial"] + [m for m in dict.fromkeys(r["method"] for r in sel) if m != "initial"]
        for m in methods:
            ok = [r for r in sel if r["method"] == m and r.get("status") == "ok"]
            bad = [r for r in sel if r["method"] == m and r.get("status") != "ok"]
            if not ok:
                if bad:
                    lines.append(f"| {m} | failed: {bad[0].get('note', '')[:120]} | | | | | | | |")
                continue
            mean = lambda k: float(np.nanmean([float(r[k]) for r in ok]))  # noqa: E731
            note = f" ({len(bad)} failed)" if bad else ""
            extra = ""
            if organs:
                labs = [lab for r in ok for lab in (r.get("labels") or []) if int(lab["label"]) in organs]
                od = float(np.nanmean([float(x["dice"]) for x in labs])) if labs else float("nan")
                oh = float(np.nanmean([float(x["hd95_mm"]) for x in labs])) if labs else float("nan")
                extra = f" {_fmt(od)} | {_fmt(oh, 1)} |"
            lines.append(f"| {m}{note} | {_fmt(mean('dice'))} | {_fmt(mean('hd95_mm'), 1)} |{extra} {_fmt(mean('sdlogj'))} | "
                         f"{_fmt(mean('sdlogj_l2r'))} | {_fmt(mean('folding_pct'), 2)} | {_fmt(mean('time_s'), 1)} | "
                         f"{_fmt(mean('peak_rss_mb'), 0)} | {_brief_settings(m, ok[0].get('settings', {}))} |")
        lines.append("")
    if header.get("skipped"):
        lines += ["## Methods not run", ""]
        lines += [f"- `{m}`: {why}" for m, why in header["skipped"].items()]
        lines.append("")
    if header.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in header["notes"]] + [""]
    return "\n".join(lines).replace(str(REPO) + "/", "")


def read_outputs(out_csv: Path) -> tuple[list[dict], dict]:
    """Rows (with their per-label rows) and header back from the CSVs and JSON that :func:`write_outputs` wrote."""
    rows = []
    for r in csv.DictReader(out_csv.open()):
        for k in COLUMNS[4:14]:
            r[k] = float(r[k]) if r.get(k) not in (None, "") else float("nan")
        r["settings"] = json.loads(r["settings"] or "{}")
        r["labels"] = []
        rows.append(r)
    index = {(r["set"], r["pair"], r["method"]): r for r in rows}
    lab_csv = out_csv.with_name(out_csv.stem + "_labels.csv")
    if lab_csv.exists():
        for lab in csv.DictReader(lab_csv.open()):
            r = index.get((lab["set"], lab["pair"], lab["method"]))
            if r is not None:
                r["labels"].append(lab)
    header = json.loads(out_csv.with_name(out_csv.stem + "_settings.json").read_text())
    header["machine_line"] = rows[0]["machine"] if rows else ""
    return rows, header


# ------------------------------------------------------------------------------------------- main

def method_options(args) -> dict:
    opts = {m: {} for m in ALL_METHODS}
    opts["ants"] = {"preset": args.ants_preset, "threads": args.threads or 2}
    if args.dino3d_weights:
        opts["dino3d"] = {"feat.weights": args.dino3d_weights}
    if args.dinov2_weights:
        opts["dinov2"] = {"feat.weights": args.dinov2_weights}
    if args.unigradicon_weights:
        opts["unigradicon"]["weights"] = args.unigradicon_weights
    from dinoreg_core.settings import parse_assignments, parse_literal

    for key, value in parse_assignments(args.set):
        meth, _, name = key.partition(".")
        if meth not in opts or not name:
            raise SystemExit(f"--set {key}={value}: expected METHOD.NAME=VALUE with METHOD in {', '.join(ALL_METHODS)}")
        opts[meth][name] = parse_literal(value, key)
    return opts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", help="Learn2Reg folder or *_dataset.json (default: the synthetic demo cohort, "
                                     "generated into --cache/synthetic_demo when absent)")
    ap.add_argument("--sets", default="ctct,mrct,real", help="comma list of ctct, mrct, real (default all)")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per cohort set (default 2)")
    ap.add_argument("--methods", default="all", help=f"comma list from {', '.join(ALL_METHODS)} (default all available)")
    ap.add_argument("--ants-preset", default="fast", choices=["fast", "strong", "antspy_default"],
                    help="ANTs SyN schedule: fast = 100x70x0 (default), strong = 100x70x50 (slow), antspy_default")
    ap.add_argument("--dino3d-weights", help="dino3d backbone (.safetensors); default: the demo weights if present")
    ap.add_argument("--dinov2-weights", help="DINOv2 weights (HF folder, cached hub id or official .pth)")
    ap.add_argument("--unigradicon-weights", help="uniGradICON Step_2_final.trch")
    ap.add_argument("--set", action="append", metavar="METHOD.NAME=VALUE",
                    help="extra option of a method, repeatable (e.g. mind.lambda_weight=2, ants.reg_iterations=[50,30,0])")
    ap.add_argument("--threads", type=int, default=2, help="torch/ITK threads per run (default 2; 0 = library default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=str(REPO / "results" / "cache"), help="cache folder (git-ignored)")
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "end_to_end.csv"))
    ap.add_argument("--render", action="store_true",
                    help="only rebuild the markdown table from an earlier run's --out CSV, labels CSV and settings JSON")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    if args.render:
        from dinoreg_core.atomic import write_text_atomic

        rows, header = read_outputs(Path(args.out))
        write_text_atomic(Path(args.out).with_suffix(".md"), markdown(rows, header))
        print(f"wrote {Path(args.out).with_suffix('.md')}")
        return 0

    from tqdm.auto import tqdm

    from dinoreg_core.demo import shared_data_dir
    from dinoreg_core.io import read_l2r_dataset
    from dinoreg_core.peers import get_registration_method

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    bad = [s for s in sets if s not in SETS]
    if bad:
        raise SystemExit(f"--sets: unknown set(s) {bad}; use {', '.join(SETS)}")
    wanted = ALL_METHODS if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in wanted if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown method(s) {bad}; use {', '.join(ALL_METHODS)}")
    opts = method_options(args)
    cache = Path(args.cache)
    notes = []

    # which methods can run
    methods, skipped = [], {}
    for m in wanted:
        why = get_registration_method(m).check(opts[m])
        if why:
            skipped[m] = why
            print(f"skip {m}: {why}", flush=True)
        else:
            methods.append(m)

    # pairs
    specs = []
    if {"ctct", "mrct"} & set(sets):
        if args.cohort:
            ds_path = Path(args.cohort)
        else:
            from dinoreg_core.data.phantom import PhantomConfig, generate_cohort

            ds_path = generate_cohort(cache / "synthetic_demo", PhantomConfig())
            notes.append(f"Synthetic demo cohort (PhantomConfig defaults: 16 subjects, 128x104x112 at 3 mm) in "
                         f"{ds_path.parent}.")
        ds = read_l2r_dataset(ds_path)
        for s in ("ctct", "mrct"):
            if s in sets:
                got = cohort_pairs(ds, s, args.pairs)
                if not got:
                    notes.append(f"The cohort has no labelled '{SETS[s][0]}' pairs: set {s} left out.")
                specs += got
    if "real" in sets:
        rp = real_pair(shared_data_dir())
        if rp is None:
            notes.append(f"No real pair: {shared_data_dir() / 'real'} is absent.")
        else:
            specs.append(rp)
            notes.append("Real pair: the MR is aligned to the CT once with initial_alignment(..., 'affine') and "
                         "resampled onto the CT grid; every method (and the initial row) starts from that same MR; "
                         "registration runs on the CT-grid box the MR slab covers. Labels: TotalSegmentator "
                         "predictions (silver standard), MR ids mapped to CT ids.")
    if "ants" in methods:
        notes.append(f"ANTs: antspyx in its own environment (it pins numpy < 2.4, scipy < 1.16), type SyN = affine "
                     f"stage (Mattes MI) + SyN; CC radius 2 for same-modality pairs, Mattes MI 32 bins for MR-CT; "
                     f"preset '{args.ants_preset}'. antspyx's own defaults (MI, 40x20x0) barely move abdominal organs.")

    prep_dir = cache / "end_to_end_pairs"
    prep_dir.mkdir(parents=True, exist_ok=True)
    prepared = []
    for sp in tqdm(specs, desc="prepare pairs", unit="pair"):
        prepared.append(prepare_pair(prep_dir, **sp))

    rows = []
    runs = [(p, m) for p in prepared for m in ["initial"] + methods]
    bar = tqdm(runs, desc="registrations", unit="run")
    for p, m in bar:
        bar.set_postfix_str(f"{p.stem} {m}")
        r = run_child(p, m, opts.get(m, {}), args.device, args.threads)
        if r.get("status") != "ok":
            set_name, pair = p.stem.split("_", 1)
            r.update(set=set_name, pair=pair, method=m)
            print(f"{p.stem} {m}: {r.get('note')}", flush=True)
        else:
            print(f"{p.stem:24s} {m:20s} Dice {r['dice']:.3f} (initial {r['dice_initial']:.3f})  HD95 "
                  f"{r['hd95_mm']:.1f} mm  SDlogJ {r['sdlogj']:.3f}  fold {r['folding_pct']:.2f}%  "
                  f"{r['time_s']:.1f} s  {r['peak_rss_mb']:.0f} MB", flush=True)
        rows.append(r)

    from dinoreg_core.machine import machine_info

    mi = machine_info()
    header = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": mi,
              "machine_line": f"{mi['host']}: {mi['cpu']}, {mi['cores']} cores, {mi['ram_gb']} GB RAM, GPU {mi['gpu']}; "
                              f"torch {mi['torch']}, {args.threads} threads per run; load average at the end "
                              f"{mi['load_avg']}",
              "command": "python bench/end_to_end.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": _git_commit(), "methods": methods, "skipped": skipped, "notes": notes,
              "pairs": [pair_meta(p) for p in prepared]}
    write_outputs(rows, Path(args.out), header)
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
