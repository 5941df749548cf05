"""Rendering time per subject and per training region (dinoreg_core.data.render), and phantom tissue-map generation
time (the streamed pretraining's cost per new subject) -> results/bench/render_speed.csv

Variants are interleaved (A, B, C, A, B, C, ...) and the median over ``--reps`` is reported with the machine load
(``uptime``), because the shared machine is noisy. One torch thread unless ``--threads``.

    OMP_NUM_THREADS=1 python bench/render_speed.py [--reps 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_io import append_rows  # noqa: E402
from dinoreg_core.data.phantom import PhantomConfig  # noqa: E402
from dinoreg_core.data.render import FAMILIES, render  # noqa: E402
from dinoreg_core.data.stream import generate_tissue, stream_subject_seed  # noqa: E402

OUT = REPO / "results" / "bench" / "render_speed.csv"
COLUMNS = ["date", "machine", "threads", "load_1min", "what", "family", "shape", "reps", "median_ms", "min_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gen-reps", type=int, default=2, help="tissue maps generated (about 4 s each at 3 mm)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = PhantomConfig()                                       # 3 mm, 128x104x112
    gen = []
    tissue = None
    for k in range(a.gen_reps):
        t = time.perf_counter()
        tissue = generate_tissue(stream_subject_seed(99, k), cfg)
        gen.append(time.perf_counter() - t)
    regions = {"region 48^3": tissue[40:88, 30:78, 30:78], "region 64^3": tissue[32:96, 20:84, 24:88],
               "subject 128x104x112": tissue}
    times: dict = {(w, f): [] for w in regions for f in FAMILIES}
    for r in range(a.reps):
        for w, reg in regions.items():
            for f in FAMILIES:
                t = time.perf_counter()
                render(reg, 1000 * r + 7, f, spacing_mm=cfg.spacing_mm)
                times[(w, f)].append(time.perf_counter() - t)
    load = os.getloadavg()[0]
    stamp = dict(date=datetime.datetime.now().isoformat(timespec="minutes"),
                 machine=f"{platform.machine()} {os.cpu_count()} cores", threads=a.threads, load_1min=round(load, 2))
    rows = [dict(stamp, what="tissue map generation (phantom, 3 mm)", family="-", shape="128x104x112", reps=len(gen),
                 median_ms=round(1000 * float(np.median(gen)), 1), min_ms=round(1000 * min(gen), 1))]
    for (w, f), ts in times.items():
        rows.append(dict(stamp, what="rendering", family=f, shape=w, reps=len(ts),
                         median_ms=round(1000 * float(np.median(ts)), 1), min_ms=round(1000 * min(ts), 1)))
    append_rows(Path(a.out), COLUMNS, rows)
    for r in rows:
        print(f"{r['what']:40s} {r['family']:7s} {r['shape']:22s} median {r['median_ms']:8.1f} ms  min {r['min_ms']:8.1f} ms")
    print(f"load {load:.2f}; appended to {a.out}")


if __name__ == "__main__":
    main()
