"""Inference cost of dense feature extraction per volume: dinov2 (2D, slice by slice) vs dino3d vs MIND.

Each (case, volume size) runs in a fresh Python subprocess, so peak memories do not mix. Per case we record
the wall time of feature extraction for one volume (models built beforehand and excluded; after one warm-up call
on a small input; calls under 30 s are repeated, 3 in all, and the fastest is kept), the peak resident memory
of the process (CPU RSS, ``ru_maxrss``), the RSS right after the imports, and on CUDA the peak allocated GPU
memory. ``mem_mb`` = peak RSS - RSS after imports = model weights + activations + output features (the
Python/torch runtime, identical for all cases, is left out); on CUDA the ratios use the GPU peak.
CPU cases use ``--threads`` torch threads (default 1: on a shared machine, more threads than free cores make
timings slow and erratic; pass 0 for torch's default on a dedicated machine).

Cases (weights are random: the cost does not depend on their values):

* ``dino3d_tiny`` / ``dino3d_paper``: :class:`dinoreg_core.models.vit3d.ViT3D` with the ``tiny`` / ``paper``
  configs (patch 4) through :func:`dinoreg_core.features.extract.extract_features` with the pipeline's default
  :class:`~dinoreg_core.features.extract.ExtractConfig` (one full pass when it fits the 4 GB budget, else
  sliding windows; ``note`` says which), features on the (D/4, H/4, W/4) token grid.
* ``dinov2_s14_matched`` / ``dinov2_l14_matched``: Hugging Face Dinov2Model with the real ViT-S/14 and
  ViT-L/14 sizes through :func:`dinoreg_core.models.dinov2_slices.extract_dinov2_features`, axial slices,
  at the output resolution matched to dino3d: tokens every 4 voxels in-plane (target_tokens = longer in-plane
  side / 4) and every 4th slice encoded (every_k=4), the planes between interpolated.
* ``dinov2_s14_authors`` / ``dinov2_l14_authors``: the authors' baseline setting, 896 x 896 px slices
  (64 x 64 tokens, keep_aspect=False) and every 6th slice encoded.
* ``mind``: MIND-SSC (12 channels) at full resolution, as the pipeline uses it.

Extrapolation: a dinov2 case that would encode more slices than its ``max_encoded`` (CPU only) is measured
on a sub-volume, the first (m-1)*k+1 slices (m = max(max_encoded, batch size) encoded slices, so at least one
full batch), and extrapolated to the whole volume: time proportionally to the number of encoded slices (the
slices are encoded independently, batch by batch), memory by adding one float32 output plane (C x ta x tb) per
missing slice (the output volume is the only allocation that grows with the slice count). Such rows have
``extrapolated = yes`` and the measured numbers in ``note``.

Usage::

    .venv/bin/python bench/features_cost.py                     # full table (about an hour on 2 CPU cores)
    .venv/bin/python bench/features_cost.py --quick             # small volumes, a few seconds per case
    .venv/bin/python bench/features_cost.py --cases mind dinov2_s14_matched --sizes 128x128x128

Writes results/bench/features_cost.csv and .md (atomically) with machine and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# case name -> method and settings; max_encoded: slices encoded before extrapolating on CPU (None: never)
CASES = {
    "dino3d_tiny": dict(method="dino3d", config="tiny"),
    "dino3d_paper": dict(method="dino3d", config="paper"),
    "dino3d_demo": dict(method="dino3d", config="demo"),  # the shipped weights (dinoreg_core/weights/dino3d_demo.*)
    "mind": dict(method="mind", config="mind_r=1,mind_d=2"),
    "dinov2_s14_matched": dict(method="dinov2", config="vits14", setting="matched", max_encoded=None),
    "dinov2_l14_matched": dict(method="dinov2", config="vitl14", setting="matched", max_encoded=4),
    "dinov2_s14_authors": dict(method="dinov2", config="vits14", setting="authors", max_encoded=8),
    "dinov2_l14_authors": dict(method="dinov2", config="vitl14", setting="authors", max_encoded=4),
}
# real DINOv2 sizes (width, depth, heads), native 518 px (37 x 37 position embeddings)
DINOV2_SIZES = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}
DINO3D_PATCH = 4
REPEATS, REPEAT_BELOW_S = 3, 30.0  # short calls are repeated and the fastest kept (shared machines are noisy)
DEFAULT_SIZES = ["128x128x128", "192x160x192"]


def dinov2_options(setting: str, shape: tuple[int, int, int]) -> dict:
    """Options of the dinov2 method for a setting ("matched" to dino3d's 4-voxel grid, or "authors")."""
    if setting == "matched":
        return {"slice_axis": 2, "target_tokens": -(-max(shape[0], shape[1]) // DINO3D_PATCH), "keep_aspect": True,
                "every_k": DINO3D_PATCH, "batch_size": 4, "progress": False}
    return {"slice_axis": 2, "target_tokens": 64, "keep_aspect": False, "every_k": 6, "batch_size": 4,
            "progress": False}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(case: str, shape: tuple[int, int, int], device: str, slices: int | None = None,
             threads: int = 0) -> dict:
    """Measure one case in this process; ``slices``: use only the first that many slices along axis 2.

    ``threads`` > 0 sets torch's CPU threads. A call shorter than ``REPEAT_BELOW_S`` is repeated
    (``REPEATS`` calls in all) and the fastest kept.
    """
    import torch

    from dinoreg_core.features.registry import get_feature_method

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = CASES[case]
    rss_imports = _rss_mb()
    dev = torch.device(device)
    n = slices or shape[2]
    image = torch.rand((1, 1, shape[0], shape[1], n), generator=torch.Generator().manual_seed(0)).to(dev)
    note = ""
    if spec["method"] == "dino3d":
        from dinoreg_core.features.extract import ExtractConfig, extract_features, plan_extraction, prepare_image
        from dinoreg_core.models.vit3d import CONFIGS, ViT3D

        if spec["config"] == "demo":
            from dinoreg_core.features.dino3d import DEFAULT_WEIGHTS
            from dinoreg_core.models.checkpoint import load_backbone

            model = load_backbone(DEFAULT_WEIGHTS, dev)[0].eval()
        else:
            model = ViT3D(CONFIGS[spec["config"]]).eval().to(dev)
        ecfg = ExtractConfig(progress=False)  # the pipeline default (4 GB budget: full pass or sliding windows)
        plan = plan_extraction(model.cfg, prepare_image(image, model.cfg.patch_size).shape[2:], ecfg,
                               bytes_per_el=2 if dev.type == "cuda" else 4)
        note = f"{plan.mode} pass" + (f", {len(plan.starts)} windows of {plan.window} tokens, {plan.batch} per "
                                      f"forward" if plan.mode == "sliding" else "")

        def extract(img=image):
            with torch.inference_mode():
                return extract_features(model, img, ecfg, device=dev)
    elif spec["method"] == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        from dinoreg_core.models.dinov2_slices import extract_dinov2_features

        width, depth, heads = DINOV2_SIZES[spec["config"]]
        model = Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                         patch_size=14, image_size=518)).eval().to(dev)
        options = dinov2_options(spec["setting"], shape)

        def extract(img=image):
            return extract_dinov2_features(img, device=dev, options=options, model=model)
    else:
        method = get_feature_method("mind")

        def extract(img=image):
            with torch.inference_mode():
                return method.extract(img, modality="ct", device=dev, options={})
    rss_model = _rss_mb()
    # warm-up on a small input (kernel selection, allocator); for dinov2 one slice at a small token grid
    if spec["method"] == "dinov2":
        extract_dinov2_features(image[..., :1], device=dev, model=model, options={**options, "target_tokens": 4})
    else:
        extract(image[..., :16, :16, :16])
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    cpu_start = time.process_time()
    while not times or (len(times) < REPEATS and max(times) < REPEAT_BELOW_S):
        t0 = time.perf_counter()
        feat = extract()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if len(times) < REPEATS and times[-1] < REPEAT_BELOW_S:
            del feat
    seconds = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    cpu_s = (time.process_time() - cpu_start) / len(times)  # CPU seconds per call (all threads), the steadier
    split = time_split(model, extract) if spec["method"] == "dino3d" else {}  # measure on a loaded machine
    if split:
        note += "; time split " + ", ".join(f"{k} {v:.0%}" for k, v in split.items())
    return dict(case=case, shape=list(shape), slices=n, time_s=seconds, peak_rss_mb=peak, rss_imports_mb=rss_imports,
                rss_model_mb=rss_model, mem_mb=peak - rss_imports,
                cuda_peak_mb=(torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None),
                feature_shape=list(feat.shape), threads=torch.get_num_threads(), calls=len(times), note=note,
                cpu_s=cpu_s, **{f"split_{k}": round(v, 3) for k, v in split.items()})


SPLIT_PARTS = ("embedding", "attention", "mlp", "other_model", "blending")


def time_split(model, extract) -> dict:
    """Fractions of one more ``extract()`` call spent in the patch embedding, attention, MLP, the rest of the
    model (norms, residuals, position embedding) and outside the model (window gathering and blending).

    Timed with forward pre-/post-hooks on the modules (CPU: ops run synchronously; on CUDA the hooks
    synchronise, which adds a little time)."""
    import torch

    spent = dict.fromkeys(SPLIT_PARTS, 0.0)
    start = {}
    cuda = next(model.parameters()).device.type == "cuda"

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def pre(name):
        return lambda mod, args: start.__setitem__(id(mod), now())

    def post(name):
        def hook(mod, args, out):
            spent[name] += now() - start.pop(id(mod))
        return hook

    handles = []
    parts = [("embedding", model.patch_embed)] + [(n, getattr(b, a)) for b in model.blocks
                                                   for n, a in (("attention", "attn"), ("mlp", "mlp"))]
    parts.append(("model", model))
    for name, mod in parts:
        handles += [mod.register_forward_pre_hook(pre(name)), mod.register_forward_hook(post(name))]
    spent["model"] = 0.0
    t0 = now()
    extract()
    total = now() - t0
    for h in handles:
        h.remove()
    model_time = spent.pop("model")
    spent["other_model"] = model_time - spent["embedding"] - spent["attention"] - spent["mlp"]
    spent["blending"] = total - model_time
    return {k: v / total for k, v in spent.items()}


def _subprocess(case: str, shape, device: str, slices: int | None, timeout: float | None, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--sizes", "x".join(map(str, shape)),
           "--device", device, "--threads", str(threads)]
    if slices:
        cmd += ["--worker-slices", str(slices)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} {shape} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(case: str, shape, device: str, max_encoded: int | None, timeout: float | None, threads: int) -> dict:
    """Measure a case on the whole volume, or extrapolate from a sub-volume (see the module docstring)."""
    from dinoreg_core.models.dinov2_slices import _encoded_slices

    spec = CASES[case]
    total = ""
    if spec["method"] == "dinov2":
        opts = dinov2_options(spec["setting"], shape)
        total = len(_encoded_slices(shape[2], opts["every_k"]))
    if spec["method"] != "dinov2" or device != "cpu" or not max_encoded or total <= max_encoded:
        row = _subprocess(case, shape, device, None, timeout, threads)
        row.update(extrapolated="no", encoded_slices=total)
        return row
    k = opts["every_k"]
    m = max(max_encoded, opts["batch_size"])  # at least one full batch: activation memory at its peak
    n_sub = (m - 1) * k + 1  # slices 0, k, ..., (m-1)k are encoded
    sub = _subprocess(case, shape, device, n_sub, timeout, threads)
    channels, ta, tb = sub["feature_shape"][1:4]
    slice_mb = channels * ta * tb * 4 / 2**20  # one float32 output plane
    row = dict(sub)
    row["slices"] = shape[2]
    row["feature_shape"] = sub["feature_shape"][:-1] + [shape[2]]
    row["time_s"] = sub["time_s"] * total / m
    for key in ("peak_rss_mb", "mem_mb"):
        row[key] = sub[key] + (shape[2] - n_sub) * slice_mb
    row.update(extrapolated="yes", encoded_slices=total,
               note=(f"measured on the first {n_sub} slices ({m} encoded): {sub['time_s']:.1f} s, "
                     f"{sub['mem_mb']:.0f} MB; time x {total}/{m} encoded slices, memory + {shape[2] - n_sub} "
                     f"output planes x {slice_mb:.1f} MB"))
    return row


COLUMNS = ["date", "machine", "device", "volume", "case", "method", "config", "setting", "feature_shape",
           "encoded_slices", "time_s", "mem_mb", "peak_rss_mb", "cuda_peak_mb", "time_ratio_vs_dino3d_paper",
           "mem_ratio_vs_dino3d_paper", "time_ratio_vs_dino3d_tiny", "mem_ratio_vs_dino3d_tiny", "extrapolated",
           "threads", "calls", "load_1min", "cpu_s", "split_embedding", "split_attention", "split_mlp",
           "split_other_model", "split_blending", "note"]


def add_ratios(rows: list[dict]) -> None:
    """Ratios of time and memory to dino3d (paper and tiny) of the same volume (GPU peak on CUDA)."""
    for ref in ("paper", "tiny"):
        base = {r["volume"]: r for r in rows if r["case"] == f"dino3d_{ref}"}
        for r in rows:
            b = base.get(r["volume"])
            mem_key = "cuda_peak_mb" if r.get("cuda_peak_mb") not in (None, "") else "mem_mb"
            r[f"time_ratio_vs_dino3d_{ref}"] = round(r["time_s"] / b["time_s"], 2) if b else ""
            r[f"mem_ratio_vs_dino3d_{ref}"] = round(r[mem_key] / b[mem_key], 2) if b else ""


def _fmt(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}" if seconds < 1000 else f"{seconds:.0f}"


def write_tables(rows: list[dict], info: dict, out_csv: Path) -> None:
    from dinoreg_core.atomic import write_text_atomic

    out_csv.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
    write_text_atomic(out_csv, buf.getvalue())
    lines = [f"# Feature-extraction cost per volume ({rows[0]['date'] if rows else ''})", "",
             f"Machine: {rows[0]['machine'] if rows else ''}; torch {info['torch']}; load average at start "
             f"{info['load_avg']}. Random weights (cost does not depend on them); each case in a fresh process; "
             f"time = fastest of up to {REPEATS} calls (repeated only while a call takes under {REPEAT_BELOW_S:.0f} s). mem = peak RSS minus RSS after imports (model + activations + features); on "
             "CUDA the ratios use the GPU peak. Rows marked extrapolated were measured on a sub-volume (the first "
             "slices, at least one full batch) and extrapolated: time proportionally to the encoded slices, memory "
             "plus one output plane per missing slice (see notes). The machine is shared: timings carry the noise of other jobs (load average above).", "",
             "| volume | case | feature grid (C,d,h,w) | encoded slices | time (s) | mem (MB) | GPU peak (MB) | "
             "time / dino3d paper | mem / dino3d paper | time / dino3d tiny | mem / dino3d tiny | extrapolated |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gpu = f"{r['cuda_peak_mb']:.0f}" if isinstance(r.get("cuda_peak_mb"), float) else "-"
        lines.append(f"| {r['volume']} | {r['case']} | {r['feature_shape']} | {r['encoded_slices'] or '-'} | "
                     f"{_fmt(r['time_s'])} | {r['mem_mb']:.0f} | {gpu} | {r['time_ratio_vs_dino3d_paper']} | "
                     f"{r['mem_ratio_vs_dino3d_paper']} | {r['time_ratio_vs_dino3d_tiny']} | "
                     f"{r['mem_ratio_vs_dino3d_tiny']} | {r['extrapolated']} |")
    notes = [f"- {r['volume']} {r['case']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + notes
    write_text_atomic(out_csv.with_suffix(".md"), "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="volume sizes DxHxW")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--max-encoded", type=int, default=None,
                   help="override every dinov2 case's max_encoded (0: never extrapolate)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per case (default 1: stable timings on a shared machine; 0: torch default)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "features_cost.csv")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small volumes (32x32x24, 48x40x48), without the 896-px authors cases")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-slices", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = ["32x32x24", "48x40x48"]
        if args.cases == list(CASES):
            args.cases = [c for c in CASES if not c.endswith("_authors")]
    shapes = [tuple(int(s) for s in size.lower().split("x")) for size in args.sizes]

    if args.worker:
        print(json.dumps(run_case(args.worker, shapes[0], args.device, args.worker_slices, args.threads)))
        return 0

    from dinoreg_core.machine import machine_info

    info = machine_info()
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = (f"{info['host']}: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, GPU {info['gpu']}; "
               f"torch threads per case: {args.threads or 'default'}")
    rows = []
    for shape in shapes:
        for case in args.cases:
            spec = CASES[case]
            max_enc = spec.get("max_encoded") if args.max_encoded is None else (args.max_encoded or None)
            print(f"{'x'.join(map(str, shape))} {case} ...", file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
            row = measure(case, shape, args.device, max_enc, args.timeout, args.threads)
            row["load_1min"] = round(load, 1)
            row.update(date=date, machine=machine, device=args.device, volume="x".join(map(str, shape)),
                       method=spec["method"], config=spec["config"], setting=spec.get("setting", ""))
            print(f"  {row['time_s']:.1f} s, {row['mem_mb']:.0f} MB, features {row['feature_shape']}"
                  f"{' (extrapolated)' if row['extrapolated'] == 'yes' else ''}", file=sys.stderr, flush=True)
            rows.append(row)
            add_ratios(rows)
            write_tables(rows, info, args.out)  # partial results survive an interruption
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
