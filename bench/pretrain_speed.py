"""Benchmark DINO/iBOT pretraining speed (steps/s) on this machine -> results/bench/pretrain_speed.csv.

Runs :func:`dinoreg_core.ssl.train.train` for a few steps per case on synthetic 96^3 volumes (timing does not
depend on the content) and reports the mean seconds per step after the first ``--skip`` steps (warm-up), from
the run's own log. The machine is described by its CPU count, torch version and the 1-minute load average
at the start and end of each case (the CPU may be shared with other work).

    .venv/bin/python bench/pretrain_speed.py                       # the default cases, 2 threads
    .venv/bin/python bench/pretrain_speed.py --threads 1 --steps 6 --cases tiny:32:16:4:4
    .venv/bin/python bench/pretrain_speed.py --device cuda --cases paper:128:48:8:8

A case is ``MODEL:GLOBAL:LOCAL:N_LOCAL:BATCH`` (crop edges in voxels, global batch).

A packaged or file config instead (``--config stream``: streamed phantom subjects, two appearances per sample; the
data then come from the stream and the timing includes rendering the views, with the subjects generated in the
background as in a real run; ``--set`` overrides its fields, e.g. a small pool so the start-up is short):

    OMP_NUM_THREADS=1 .venv/bin/python bench/pretrain_speed.py --threads 1 --config stream --steps 30 --skip 10 \
        --set stream.pool_size=4 stream.new_every=16

The row's ``model`` column then reads ``CONFIG(MODEL)`` and ``status`` lists the overrides.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench_io import append_rows  # bench/ is on sys.path when a bench script runs

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "bench" / "pretrain_speed.csv"
COLUMNS = ["date", "machine", "device", "torch", "threads", "model", "params_m", "global_size", "local_size",
           "n_local", "batch_size", "head_out_dim", "steps_timed", "sec_per_step", "steps_per_s", "samples_per_s",
           "load_start", "load_end", "amp", "num_workers", "cuda_peak_mb", "status"]
DEFAULT_CASES = ["tiny:32:16:4:4", "tiny:48:24:4:4", "tiny:64:32:4:2"]


def make_data(folder: Path, n: int = 4, size: int = 96) -> None:
    """``n`` synthetic CT-like volumes (HU) with a body and organ-like blobs."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    c0 = size / 2
    for i in range(n):
        img = np.full((size,) * 3, -1000.0, np.float32)
        img[((z - c0) / (0.45 * size)) ** 2 + ((y - c0) / (0.38 * size)) ** 2 + ((x - c0) / (0.47 * size)) ** 2 < 1] = -100
        for _ in range(10):
            c, r = rng.uniform(0.25, 0.75, 3) * size, rng.uniform(0.05, 0.15, 3) * size
            img[((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1] = rng.uniform(-50, 300)
        img += rng.normal(0, 20, img.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.diag([2.0, 2.0, 2.0, 1.0])), str(folder / f"case{i}.nii.gz"))


def run_case(case: str, data: Path, work: Path, args) -> dict:
    import torch

    from dinoreg_core.ssl.train import load_config, train

    model, g, l, nl, b = case.split(":")
    over = [f"model={model}", f"augment.global_size={g}", f"augment.local_size={l}", f"augment.n_local={nl}",
            f"batch_size={b}", f"steps={args.steps}", "log_every=1", f"ckpt_every={10 ** 9}", "progress=false",
            f"threads={args.threads}", f"device={args.device}", f"head_out_dim={args.head_out_dim}",
            "spacing_mm=2.0", "warmup_steps=1", f"num_workers={args.workers}", f"amp={args.amp}"]
    cfg = load_config(None, over)
    run = work / case.replace(":", "_")
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    load0 = os.getloadavg()[0]
    train(cfg, data, run)
    load1 = os.getloadavg()[0]
    peak = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if cuda else ""
    with (run / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    sec = float(np.mean([float(r["sec_per_step"]) for r in rows[args.skip:]]))
    params = sum(v.numel() for k, v in torch.load(run / "checkpoint.pt", weights_only=True)["student"].items()
                 if k.startswith("backbone."))
    return {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus",
            "device": torch.cuda.get_device_name() if cuda else args.device, "torch": torch.__version__, "threads": torch.get_num_threads(), "model": model,
            "params_m": round(params / 1e6, 3), "global_size": int(g), "local_size": int(l), "n_local": int(nl),
            "batch_size": int(b), "head_out_dim": args.head_out_dim, "steps_timed": len(rows) - args.skip,
            "sec_per_step": round(sec, 3), "steps_per_s": round(1.0 / sec, 3),
            "samples_per_s": round(int(b) / sec, 3), "load_start": round(load0, 2), "load_end": round(load1, 2),
            "amp": args.amp if cuda or args.amp != "auto" else "none", "num_workers": args.workers, "cuda_peak_mb": peak,
            "status": "ok"}


def run_config(name: str, work: Path, args) -> dict:
    """Time a whole config (``--config``) for ``--steps`` steps (data: the stream when the config enables it)."""
    import torch

    from dinoreg_core.commands.pretrain import resolve_config_path
    from dinoreg_core.ssl.train import load_config, train

    over = [f"steps={args.steps}", "log_every=1", f"ckpt_every={10 ** 9}", "progress=false", "snapshot_every=0",
            f"threads={args.threads}", f"device={args.device}", f"num_workers={args.workers}", f"amp={args.amp}",
            "val.every=0", *args.set]
    cfg = load_config(resolve_config_path(name, work, False), over)
    run = work / f"config_{Path(name).stem}"
    data = "stream" if cfg.stream.enabled else args.data
    if data is None:
        raise SystemExit(f"--config {name} does not stream its data; pass --data DIR")
    load0 = os.getloadavg()[0]
    train(cfg, data, run)
    load1 = os.getloadavg()[0]
    with (run / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    sec = float(np.median([float(r["sec_per_step"]) for r in rows[args.skip:]]))
    a = cfg.augment
    return {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus", "device": args.device,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "model": f"{Path(name).stem}({cfg.model})",
            "global_size": a.global_size, "local_size": a.local_size, "n_local": a.n_local, "batch_size": cfg.batch_size,
            "head_out_dim": cfg.head_out_dim, "steps_timed": len(rows) - args.skip, "sec_per_step": round(sec, 3),
            "steps_per_s": round(1.0 / sec, 3), "samples_per_s": round(cfg.batch_size / sec, 3),
            "load_start": round(load0, 2), "load_end": round(load1, 2), "amp": args.amp, "num_workers": args.workers,
            "status": "ok (median s/step); " + " ".join(args.set)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="MODEL:GLOBAL:LOCAL:N_LOCAL:BATCH")
    ap.add_argument("--steps", type=int, default=8, help="steps per case")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--head-out-dim", type=int, default=1024, help="prototypes K")
    ap.add_argument("--workers", type=int, default=1, help="data-loader processes (GPU runs need several)")
    ap.add_argument("--amp", default="auto", help="auto (bf16 on CUDA), bf16, fp16 or none")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--config", default=None, help="time this packaged/file config instead of the cases")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --config")
    ap.add_argument("--data", default=None, help="data of a --config that does not stream")
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.config:
        with tempfile.TemporaryDirectory() as tmp:
            row = run_config(args.config, Path(tmp), args)
        append_rows(args.out, COLUMNS, [row])
        print(", ".join(f"{k}={row.get(k)}" for k in ("model", "batch_size", "sec_per_step", "steps_per_s", "load_start",
                                                      "load_end", "status")), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        make_data(data)
        for case in args.cases:
            try:
                row = run_case(case, data, Path(tmp), args)
            except Exception as e:  # noqa: BLE001 -- an out-of-memory case is a result, not a crash
                row = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "device": args.device, "model": case,
                       "status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                if args.device.startswith("cuda"):
                    import torch
                    torch.cuda.empty_cache()
            append_rows(args.out, COLUMNS, [row])
            print(", ".join(f"{k}={row.get(k)}" for k in ("model", "global_size", "local_size", "n_local", "batch_size",
                                                          "sec_per_step", "steps_per_s", "cuda_peak_mb", "status")),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
