"""Time the pretraining corpus builder on the real test scans (../shared/data/real).

Writes one row per (scan, spacing) to results/bench/data_corpus.csv: source grid, cached grid, seconds to
preprocess (load + resample + body crop + normalise + save) and the size on disk, with machine and date.

    .venv/bin/python bench/bench_data_corpus.py [--spacings 2 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench_io import append_rows  # bench/ is on sys.path when a bench script runs
from dinoreg_core.data.corpus import CorpusConfig, build_corpus, load_corpus_index

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / ".." / "shared" / "data" / "real"
OUT = ROOT / "results" / "bench" / "data_corpus.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spacings", type=float, nargs="+", default=[2.0, 3.0])
    ap.add_argument("--repeats", type=int, default=3, help="builds per spacing; the fastest is reported")
    args = ap.parse_args()
    if not REAL.is_dir():
        raise SystemExit(f"the real test scans are not at {REAL}")
    machine = f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cpus " \
              f"torch {torch.__version__} threads {torch.get_num_threads()}"
    date = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for sp in args.spacings:
        for name in ("ct_abdomen_pelvis.nii.gz", "mr_upper_abdomen.nii.gz"):
            best = None
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as d:
                    src = Path(d) / "src"
                    src.mkdir()
                    (src / name).symlink_to((REAL / name).resolve())
                    t0 = time.perf_counter()
                    build_corpus(src, Path(d) / "corpus", CorpusConfig(spacing_mm=sp, progress=False))
                    dt = time.perf_counter() - t0
                    e = load_corpus_index(Path(d) / "corpus")[0]
                    size = Path(e.path).stat().st_size
                if best is None or dt < best[0]:
                    best = (dt, e, size)
            dt, e, size = best
            rows.append({"date": date, "machine": machine, "scan": name, "modality": e.modality,
                         "source_shape": "x".join(map(str, e.original_shape)),
                         "source_spacing_mm": "x".join(f"{s:g}" for s in e.original_spacing_mm),
                         "spacing_mm": sp, "cached_shape": "x".join(map(str, e.shape)), "dtype": e.dtype,
                         "seconds": round(dt, 3), "bytes_on_disk": size})
            print(rows[-1])
    append_rows(OUT, list(rows[0]), rows)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
