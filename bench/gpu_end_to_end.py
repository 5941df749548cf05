"""One whole registration pair per feature method, end to end, on a GPU (or the CPU): time and peak memory.

Each case is one call of the public :func:`dinoreg_core.api.register` on two NIfTI files of 192x160x256 voxels
(the real CT of ../shared/data/real resampled onto that grid, and the same warped by a known smooth field, with
its organ labels): load, features of both images, joint PCA (learned features), ConvexAdam, warp of image and
labels, metrics (Dice, HD95, field statistics). Cases (random weights for the learned backbones: the cost does
not depend on their values):

* ``mind``: MIND-SSC (12 channels) + ConvexAdam, the official preset;
* ``mind_bf16``: the same with the Adam stage's features stored as bfloat16 (CUDA only);
* ``dino3d_tiny`` / ``dino3d_paper``: :class:`dinoreg_core.models.vit3d.ViT3D` ``tiny`` / ``paper`` configs saved
  as a weights file and used through the ``dino3d`` method (bf16 autocast on CUDA, the extraction plan of
  :mod:`dinoreg_core.features.extract`);
* ``dinov2_l14_matched`` / ``dinov2_l14_authors``: a Hugging Face DINOv2 ViT-L/14 with 4 registers built from its
  config (no download) and saved to a folder, axial slices: tokens every 4 voxels in-plane, every 4th slice
  ("matched" to dino3d), or the authors' 896 px slices (64 x 64 tokens), every 6th slice.

Every case runs in a fresh process: a warm-up registration on a small crop (CUDA context, kernels), then the
timed one; peak GPU memory is ``torch.cuda.max_memory_allocated`` of the timed call, peak RSS the process's.
Per-stage times come from the result's ``timings``.

    python bench/gpu_end_to_end.py --device cuda --out results/bench/gpu_end_to_end.csv
    python bench/gpu_end_to_end.py --device cpu --quick          # small grid, small models: a test of the script
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZE = (192, 160, 256)  # Learn2Reg AbdomenCTCT grid
QUICK_SIZE = (48, 40, 64)
MAX_DISP_VOX = 4.0  # amplitude of the known warp (voxels of the grid)
CASES = ["mind", "mind_bf16", "dino3d_tiny", "dino3d_paper", "dinov2_l14_matched", "dinov2_l14_authors"]
QUICK_CASES = ["mind", "dino3d_tiny", "dinov2_s14_matched"]
DINOV2 = {"l14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
          "s14": dict(hidden_size=384, num_hidden_layers=2, num_attention_heads=6)}  # s14: a 2-block stand-in
COLUMNS = ["date", "machine", "device", "torch", "threads", "case", "size", "total_s", "load_s", "features_s",
           "convex_adam_s", "discrete_s", "adam_s", "warp_metrics_s", "cuda_peak_mb", "peak_rss_mb", "dice_initial",
           "dice", "hd95_mm", "sdlogj", "warmup_s", "note"]


def write_pair(folder: Path, size) -> None:
    """fixed/moving images and labels (NIfTI) on a ``size`` grid from the real CT, moving = fixed warped."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dinoreg_core import io
    from dinoreg_core.registration.warp import smooth_random_field, warp, warp_labels

    real = REPO.parent / "shared" / "data" / "real"
    if not real.is_dir():
        real = Path(os.environ.get("DINOREG_REAL", "/work/shared/data/real"))
    ct = io.load_volume(real / "ct_abdomen_pelvis.nii.gz")
    lab = io.load_volume(real / "ct_abdomen_pelvis_labels.nii.gz")
    x = torch.from_numpy(np.ascontiguousarray(ct.array, dtype=np.float32))[None, None]
    fixed = F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
    flab = F.interpolate(torch.from_numpy(lab.array.astype(np.float32))[None, None], size=tuple(size),
                         mode="nearest")
    v = smooth_random_field(tuple(size), max_disp=MAX_DISP_VOX, control_spacing=max(8, size[0] // 8), seed=0)
    moving = warp(fixed, v)
    mlab = warp_labels(flab.long(), v)
    spacing = [s_old * n_old / n for s_old, n_old, n in zip(ct.spacing, ct.shape, size)]
    aff = np.diag(list(spacing) + [1.0])
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr, dtype in (("fixed", fixed, np.float32), ("moving", moving, np.float32),
                             ("fixed_labels", flab, np.int16), ("moving_labels", mlab, np.int16)):
        nib.save(nib.Nifti1Image(arr[0, 0].numpy().astype(dtype), aff), str(folder / f"{name}.nii.gz"))


def _weights(case: str, folder: Path, quick: bool) -> dict:
    """Feature method and options of a case; learned backbones are written (random weights) into ``folder``."""
    import torch

    if case.startswith("mind"):
        return {"features": "mind", "options": {}}
    if case.startswith("dino3d"):
        from dinoreg_core.models.checkpoint import save_backbone
        from dinoreg_core.models.vit3d import CONFIGS, ViT3D

        cfg = CONFIGS[case.split("_")[1]]
        torch.manual_seed(0)
        path = save_backbone(ViT3D(cfg).eval(), cfg, folder / f"{case}.safetensors", {"note": "random weights"})
        return {"features": "dino3d", "options": {"weights": str(path), "progress": False}}
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    arch = case.split("_")[1]
    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, image_size=518, num_register_tokens=4,
                                                               **DINOV2[arch]))
    model.save_pretrained(str(folder / case))
    setting = case.split("_")[2]
    if setting == "matched":
        opts = {"target_tokens": -(-max(SIZE[:2] if not quick else QUICK_SIZE[:2]) // 4), "keep_aspect": True,
                "every_k": 4}
    else:
        opts = {"target_tokens": 64, "keep_aspect": False, "every_k": 6}
    return {"features": "dinov2", "options": {"weights": str(folder / case), "slice_axis": 2, "batch_size": 8,
                                              "progress": False, **opts}}


def run_case(case: str, pair: Path, device: str, quick: bool, threads: int) -> dict:
    """Run one case in this process (warm-up on a crop, then the timed pair) and return its row."""
    import numpy as np
    import torch

    from dinoreg_core import io
    from dinoreg_core.api import RegisterConfig, register

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec = _weights(case, Path(tmp), quick)
        cfg = RegisterConfig(features=spec["features"], device=device, fixed_modality="ct", moving_modality="ct",
                             feature_options=spec["options"])
        if case.endswith("bf16"):
            cfg.set("feature_dtype", "bfloat16")
        fixed = io.load_volume(pair / "fixed.nii.gz")
        moving = io.load_volume(pair / "moving.nii.gz")
        crop = tuple(slice(0, max(24, s // 4)) for s in fixed.shape)
        t = time.perf_counter()
        register(io.Volume(fixed.array[crop].copy(), fixed.affine), io.Volume(moving.array[crop].copy(), moving.affine),
                 config=cfg)
        warmup = time.perf_counter() - t
        del fixed, moving
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = register(pair / "fixed.nii.gz", pair / "moving.nii.gz", fixed_labels=pair / "fixed_labels.nii.gz",
                       moving_labels=pair / "moving_labels.nii.gz", config=cfg)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - t
    tm = res.timings
    summ = res.metrics.get("summary", {})
    fieldm = res.metrics.get("field", {})
    staged = tm["load_s"] + tm["init_s"] + tm["features_s"] + tm["convex_adam_s"]
    return {"case": case, "size": "x".join(map(str, res.fixed.shape)), "total_s": total,
            "load_s": tm["load_s"], "features_s": tm["features_s"], "convex_adam_s": tm["convex_adam_s"],
            "discrete_s": tm["discrete_s"], "adam_s": tm["adam_s"], "warp_metrics_s": max(0.0, total - staged),
            "cuda_peak_mb": (torch.cuda.max_memory_allocated() / 2 ** 20) if device.startswith("cuda") else "",
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "dice_initial": summ.get("dice_initial"), "dice": summ.get("dice"), "hd95_mm": summ.get("hd95_mm"),
            "sdlogj": fieldm.get("sdlogj", fieldm.get("std_log_jacobian")), "warmup_s": warmup,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "note": json.dumps({k: v for k, v in spec["options"].items() if k not in ("weights", "progress")})
            if not case.startswith("mind") else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help=f"{'x'.join(map(str, QUICK_SIZE))} grid, small models")
    ap.add_argument("--cases", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "gpu_end_to_end.csv"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(run_case(a.child[0], Path(a.child[1]), a.device, a.quick, a.threads)))
        return 0
    from bench_io import append_rows

    cases = a.cases or (QUICK_CASES if a.quick else CASES)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes")
    machine = f"{platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cpus"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pair = Path(tmp) / "pair"
        write_pair(pair, QUICK_SIZE if a.quick else SIZE)
        for case in cases:
            if case.endswith("bf16") and not a.device.startswith("cuda"):
                continue
            cmd = [sys.executable, __file__, "--child", case, str(pair), "--device", a.device,
                   "--threads", str(a.threads)] + (["--quick"] if a.quick else [])
            row = {"date": date, "machine": machine, "case": case}
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=REPO,
                                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if r.returncode:
                    row["note"] = "error: " + (r.stderr.strip().splitlines() or ["?"])[-1][:300]
                else:
                    row.update(json.loads(r.stdout.strip().splitlines()[-1]))
            except subprocess.TimeoutExpired:
                row["note"] = f"timeout after {a.timeout:.0f} s"
            rows.append(row)
            print(" ".join(f"{k}={row[k]:.3g}" if isinstance(row.get(k), float) else f"{k}={row.get(k, '')}"
                           for k in ("case", "size", "total_s", "features_s", "convex_adam_s", "cuda_peak_mb",
                                     "peak_rss_mb", "dice", "note")), flush=True)
    append_rows(Path(a.out), COLUMNS, [{k: r.get(k, "") for k in COLUMNS} for r in rows])
    print(f"appended {len(rows)} rows to {a.out}")
    return 0 if all("error" not in str(r.get("note", "")) for r in rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
