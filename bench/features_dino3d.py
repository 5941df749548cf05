"""Benchmark dense dino3d feature extraction: time and peak memory per backbone config and volume size.

Each case runs in a fresh subprocess (so the peak RSS is that case's own) with a random-weight backbone:
the timing does not depend on the weights. Two modes per (config, size): "full" (one pass over the whole
volume) and "sliding" (windows of the pretraining crop, pos_grid * patch_size voxels, 50 % overlap, forced by a
memory budget just above one window's estimate; only where the volume is larger than one window).
Results are appended to results/bench/features_dino3d.csv with the machine and date; a case is skipped (and
recorded as skipped, with the reason) when its predicted time exceeds --max-seconds: full passes are
extrapolated quadratically in the token count from the previous size of the same config, sliding windows as
(number of windows) x (time of one window-sized full pass, extrapolated the same way).

    .venv/bin/python bench/features_dino3d.py                          # CPU, tiny + paper, 96^3 128^3 192x160x192
    .venv/bin/python bench/features_dino3d.py --device cuda --max-seconds 600
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["date", "machine", "device", "torch", "threads", "config", "size", "tokens", "mode", "windows",
           "memory_budget_gb", "seconds", "peak_rss_mb", "rss_increase_mb", "estimate_mb", "cuda_peak_mb",
           "status", "note"]


def _child(args) -> dict:
    """Run one case in this process and return its measurements (called via --child)."""
    import resource
    import time

    import torch

    from dinoreg_core.features.extract import ExtractConfig, extract_features, plan_extraction, prepare_image
    from dinoreg_core.models.vit3d import CONFIGS, ViT3D

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    model = ViT3D(cfg).eval().to(device)
    size = tuple(int(s) for s in args.size.split("x"))
    img = torch.rand((1, 1) + size, device=device)
    budget = args.budget
    if args.mode == "sliding":
        grid = [-(-s // cfg.patch_size) for s in size]
        budget = sliding_budget_gb(cfg, grid, 2 if device.type == "cuda" else 4)
    ecfg = ExtractConfig(memory_budget_gb=budget, progress=False)
    bpe = 2 if device.type == "cuda" else 4
    plan = plan_extraction(cfg, prepare_image(img, cfg.patch_size).shape[2:], ecfg, bytes_per_el=bpe)
    with torch.no_grad():                                      # warm-up on a small crop (kernels, allocator)
        model(img[..., :32, :32, :32])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    feats = extract_features(model, img, ecfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": math.prod(plan.grid), "mode": plan.mode, "windows": len(plan.starts),
            "memory_budget_gb": round(budget, 4),
            "seconds": round(secs, 2), "peak_rss_mb": round(rss, 1), "rss_increase_mb": round(rss - rss0, 1),
            "estimate_mb": round(plan.est_bytes / 2 ** 20, 1),
            "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if device.type == "cuda" else "",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "shape": list(feats.shape)}


def sliding_budget_gb(cfg, grid, bytes_per_el: int) -> float:
    """A memory budget just above one pretraining-crop window plus the blending accumulators (forces windows)."""
    from dinoreg_core.features.extract import estimate_memory_bytes

    acc = 4 * math.prod(grid) * (2 * cfg.embed_dim + 1)
    return 1.05 * (estimate_memory_bytes(cfg, cfg.pos_grid, 1, bytes_per_el) + acc) / 2 ** 30


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{socket.gethostname()} | {cpu} | {os.cpu_count()} cpus"


def _write_rows(path: Path, rows: list[dict]) -> None:
    sys.path.insert(0, str(ROOT))
    from dinoreg_core.atomic import write_text_atomic

    old = []
    if path.is_file():
        with path.open(newline="") as f:
            old = [r for r in csv.DictReader(f)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in old + rows:
        w.writerow({k: r.get(k, "") for k in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buf.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "paper"])
    ap.add_argument("--sizes", nargs="+", default=["96x96x96", "128x128x128", "192x160x192"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", nargs="+", default=["full", "sliding"], choices=["full", "sliding"])
    ap.add_argument("--budget", type=float, default=64.0, help="memory_budget_gb of the full-volume mode")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="skip cases predicted to take longer")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "features_dino3d.csv"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0

    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    machine = _machine()
    rows = []
    sys.path.insert(0, str(ROOT))
    from dinoreg_core.features.extract import ExtractConfig, plan_extraction
    from dinoreg_core.models.vit3d import CONFIGS

    for config in args.configs:
        cfg = CONFIGS[config]
        measured = []                                          # (tokens, seconds) of measured full passes

        def predict_full(tokens):
            if not measured:
                return None
            t0, s0 = min(measured, key=lambda m: abs(math.log(m[0] / tokens)))
            return s0 * (tokens / t0) ** 2

        for mode in args.modes:
            for size in args.sizes:
                dims = [int(s) for s in (size.split("x") if "x" in size else [size] * 3)]
                size = "x".join(map(str, dims))
                grid = [-(-d // cfg.patch_size) for d in dims]
                tokens = math.prod(grid)
                row = {"date": date, "machine": machine, "config": config, "size": size, "tokens": tokens,
                       "memory_budget_gb": args.budget, "device": args.device, "mode": mode}
                if mode == "sliding":
                    bpe = 2 if args.device.startswith("cuda") else 4
                    budget = sliding_budget_gb(cfg, grid, bpe)
                    plan = plan_extraction(cfg, [g * cfg.patch_size for g in grid],
                                           ExtractConfig(memory_budget_gb=budget), bytes_per_el=bpe)
                    if plan.mode != "sliding":
                        continue                               # the volume fits in one window: same as full
                    per_window = predict_full(math.prod(plan.window))
                    predicted = None if per_window is None else per_window * len(plan.starts)
                    basis = f"{len(plan.starts)} windows x predicted window time"
                else:
                    predicted = predict_full(tokens)
                    basis = "quadratic in tokens from the nearest measured size"
                if predicted is not None and predicted > args.max_seconds:
                    row.update(status="skipped", note=f"predicted {predicted:.0f} s ({basis}) > --max-seconds "
                                                      f"{args.max_seconds:.0f}")
                    rows.append(row)
                    print(f"{config:6s} {size:12s} {mode:7s} skipped: {row['note']}", flush=True)
                    continue
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--config", config, "--size", size,
                       "--device", args.device, "--budget", str(args.budget), "--threads", str(args.threads),
                       "--mode", mode]
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                         timeout=max(120.0, 3 * args.max_seconds))
                except subprocess.TimeoutExpired:
                    row.update(status="timeout", note=f"killed after {max(120.0, 3 * args.max_seconds):.0f} s")
                    rows.append(row)
                    continue
                if res.returncode != 0:
                    row.update(status="error", note=(res.stderr.strip().splitlines() or ["?"])[-1][:200])
                    rows.append(row)
                    print(f"{config:6s} {size:12s} {mode:7s} error: {row['note']}", flush=True)
                    continue
                out = json.loads(res.stdout.strip().splitlines()[-1])
                row.update({k: v for k, v in out.items() if k in COLUMNS}, status="ok")
                rows.append(row)
                if out["mode"] == "full":
                    measured.append((tokens, float(out["seconds"])))
                print(f"{config:6s} {size:12s} {out['mode']:7s} windows={out['windows']:3d} {out['seconds']:8.2f} s "
                      f"peak RSS {out['peak_rss_mb']:8.1f} MB (+{out['rss_increase_mb']:.1f}, estimate "
                      f"{out['estimate_mb']}) cuda {out['cuda_peak_mb']} MB", flush=True)
    _write_rows(Path(args.out), rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
