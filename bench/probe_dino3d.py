"""Linear probe of frozen dense features: do they tell the organs apart? -> results/bench/probe_dino3d.csv

The pretraining never sees labels; this checks what its features learned. On held-out synthetic subjects (a
cohort generated with a seed the pretraining did not use, CT and MR of every subject), each 4^3 patch whose
voxels carry one label for at least ``--purity`` of the patch becomes a token with that label (background
included as a class). For every feature method the token features are standardised and a multinomial logistic
regression (scikit-learn) is fitted on the training subjects and scored on the test subjects by balanced
accuracy (mean recall over classes; chance = 1 / classes). Settings: CT -> CT, MR -> MR, CT -> MR and MR -> CT
(fitted on one modality's tokens only, scored on the other's: a modality-invariant feature keeps its accuracy), and,
when the cohort holds the held-back MR appearance (``_0002`` images of the evaluation cohort of
:mod:`dinoreg_core.data.cohorts`, labels of ``_0001``), CT -> PD and MR -> PD: scored on an MR look that
pretraining never rendered.

``--cohort`` may name an existing cohort folder (its ``*_dataset.json`` gives the task name; the first
``--subjects`` cases are used, the last ``--test-subjects`` of them as the test set).

Methods: ``dino3d:NAME=PATH`` for exported backbones (several allowed), ``random`` (the first backbone's
architecture with random weights: what the architecture alone gives), ``mind`` (MIND-SSC averaged over each
patch) and ``intensity`` (the normalised intensity averaged over each patch, plus its patch standard deviation).

    .venv/bin/python bench/probe_dino3d.py --weights demo=dinoreg_core/weights/dino3d_demo.safetensors
    python3 bench/probe_dino3d.py --device cuda --weights a=run_a/teacher_backbone.safetensors b=...
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_io import append_rows  # noqa: E402  (bench/ is on sys.path when a bench script runs)
from dinoreg_core.data.phantom import PhantomConfig, generate_cohort  # noqa: E402
from dinoreg_core.features.extract import ExtractConfig, extract_features  # noqa: E402
from dinoreg_core.features.mind import mind_ssc  # noqa: E402
from dinoreg_core.io import load_volume  # noqa: E402
from dinoreg_core.models.checkpoint import load_backbone  # noqa: E402
from dinoreg_core.models.vit3d import ViT3D  # noqa: E402
from dinoreg_core.preprocess import normalize_intensity  # noqa: E402

OUT = ROOT / "results" / "bench" / "probe_dino3d.csv"
COLUMNS = ["date", "machine", "device", "method", "weights", "setting", "train_tokens", "test_tokens", "classes",
           "chance", "balanced_accuracy", "accuracy", "feature_dim", "seconds"]
PATCH = 4


def token_labels(labels: np.ndarray, purity: float) -> np.ndarray:
    """Majority label per 4^3 patch (-1 where the majority covers less than ``purity``): (D,H,W) -> (d,h,w)."""
    lab = torch.from_numpy(labels.astype(np.int64))
    n = int(lab.max()) + 1
    onehot = F.one_hot(lab, n).permute(3, 0, 1, 2).float()[None]           # (1,n,D,H,W)
    pad = [(-s) % PATCH for s in lab.shape]
    onehot = F.pad(onehot, (0, pad[2], 0, pad[1], 0, pad[0]))
    frac = F.avg_pool3d(onehot, PATCH)[0]                                  # (n,d,h,w), padding counts as none
    best, arg = frac.max(0)
    return torch.where(best >= purity, arg, torch.full_like(arg, -1)).numpy()


def pooled(x: torch.Tensor, grid) -> torch.Tensor:
    """(1,C,D,H,W) -> (1,C,d,h,w): mean over each 4^3 patch (zero padding at the far edges)."""
    pad = [(-s) % PATCH for s in x.shape[2:]]
    x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
    out = F.avg_pool3d(x, PATCH)
    return out if tuple(out.shape[2:]) == tuple(grid) else F.interpolate(out, size=grid, mode="trilinear")


def features(method: str, model, image: np.ndarray, grid, device) -> np.ndarray:
    """(d*h*w, C) float32 token features of one normalised image (D,H,W) for ``method``."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    with torch.no_grad():
        if method == "mind":
            f = pooled(mind_ssc(x), grid)
        elif method == "intensity":
            m = pooled(x, grid)
            f = torch.cat([m, (pooled(x * x, grid) - m * m).clamp(min=0).sqrt()], 1)
        else:
            f = extract_features(model, x, ExtractConfig(progress=False), device=device)
            if tuple(f.shape[2:]) != tuple(grid):
                f = F.interpolate(f, size=grid, mode="trilinear", align_corners=False)
    return f[0].flatten(1).t().float().cpu().numpy()


def probe(train_x, train_y, test_x, test_y, seed: int, max_train: int) -> tuple[float, float]:
    """Balanced accuracy and accuracy of a logistic-regression probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    from sklearn.exceptions import ConvergenceWarning

    warnings.filterwarnings("ignore", category=ConvergenceWarning)   # 300 lbfgs steps: a probe, not a model
    rng = np.random.default_rng(seed)
    if len(train_y) > max_train:
        keep = rng.choice(len(train_y), max_train, replace=False)
        train_x, train_y = train_x[keep], train_y[keep]
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=300, class_weight="balanced")
    clf.fit(scaler.transform(train_x), train_y)
    pred = clf.predict(scaler.transform(test_x))
    return float(balanced_accuracy_score(test_y, pred)), float(np.mean(pred == test_y))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", nargs="*", default=[], help="NAME=PATH of exported dino3d backbones")
    ap.add_argument("--methods", nargs="+", default=["random", "mind", "intensity"],
                    help="baselines besides the dino3d weights: random, mind, intensity")
    ap.add_argument("--cohort", type=Path, default=None, help="held-out cohort folder (generated when missing)")
    ap.add_argument("--subjects", type=int, default=5, help="subjects of the generated cohort")
    ap.add_argument("--test-subjects", type=int, default=2, help="the last N subjects are the test set")
    ap.add_argument("--seed", type=int, default=2026, help="cohort seed (the demo pretraining used 1000)")
    ap.add_argument("--purity", type=float, default=0.5)
    ap.add_argument("--max-train", type=int, default=30000, help="training tokens kept (random subset)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    tmp = tempfile.TemporaryDirectory()
    cohort = args.cohort or Path(tmp.name) / "cohort"
    existing = sorted(cohort.glob("*_dataset.json")) if cohort.is_dir() else []
    if existing:
        import json

        task = json.loads(existing[0].read_text())["name"]
    else:
        cfg = PhantomConfig(n_subjects=args.subjects, seed=args.seed, mr_fraction=1.0, n_val_subjects=0)
        generate_cohort(cohort, cfg, progress=False)
        task = cfg.task
    cases = list(range(1, args.subjects + 1))
    test_cases = set(cases[-args.test_subjects:])

    models = {}
    for spec in args.weights:
        name, _, path = spec.partition("=")
        models[f"dino3d:{name}"] = (load_backbone(Path(path), device)[0].eval(), path)
    if "random" in args.methods:
        if not models:
            sys.exit("probe: the 'random' baseline needs at least one --weights entry (its architecture)")
        first = next(iter(models.values()))[0]
        torch.manual_seed(0)
        models["random"] = (ViT3D(first.cfg).to(device).eval(), "random init")
    for m in ("mind", "intensity"):
        if m in args.methods:
            models[m] = (None, "")

    # normalised images and token labels of every (case, modality)
    data = {}
    for c in cases:
        for mod, suffix, lab_suffix in (("ct", "0000", "0000"), ("mr", "0001", "0001"), ("pd", "0002", "0001")):
            path = cohort / "imagesTr" / f"{task}_{c:04d}_{suffix}.nii.gz"
            if mod == "pd" and not path.exists():
                continue
            img = load_volume(path)
            lab = load_volume(cohort / "labelsTr" / f"{task}_{c:04d}_{lab_suffix}.nii.gz", what="labels")
            norm = "ct" if mod == "ct" else "mr"
            data[(c, mod)] = (normalize_intensity(img.array, norm), token_labels(lab.array, args.purity))
    held_back = all((c, "pd") in data for c in cases)

    rows = []
    machine = f"{platform.node() or 'host'} {platform.machine()} {os.cpu_count()} cpus"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for method, (model, weights) in models.items():
        t0 = time.time()
        feats = {}
        for key, (img, tl) in data.items():
            f = features(method if model is None else "vit", model, img, tl.shape, device)
            y = tl.reshape(-1)
            keep = y >= 0
            feats[key] = (f[keep], y[keep])
        settings = [("CT->CT", ("ct",), "ct"), ("MR->MR", ("mr",), "mr"), ("CT->MR", ("ct",), "mr"),
                    ("MR->CT", ("mr",), "ct")]
        if held_back:
            settings += [("CT->PD", ("ct",), "pd"), ("MR->PD", ("mr",), "pd")]
        for setting, train_mods, test_mod in settings:
            tr = [feats[(c, m)] for c in cases if c not in test_cases for m in train_mods]
            te = [feats[(c, test_mod)] for c in cases if c in test_cases]
            tx, ty = np.concatenate([a for a, _ in tr]), np.concatenate([b for _, b in tr])
            ex, ey = np.concatenate([a for a, _ in te]), np.concatenate([b for _, b in te])
            common = np.intersect1d(np.unique(ty), np.unique(ey))
            sel_tr, sel_te = np.isin(ty, common), np.isin(ey, common)
            bacc, acc = probe(tx[sel_tr], ty[sel_tr], ex[sel_te], ey[sel_te], 0, args.max_train)
            rows.append({"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine,
                         "device": dev_name, "method": method, "weights": weights, "setting": setting,
                         "train_tokens": int(sel_tr.sum()), "test_tokens": int(sel_te.sum()),
                         "classes": len(common), "chance": round(1 / len(common), 4),
                         "balanced_accuracy": round(bacc, 4), "accuracy": round(acc, 4),
                         "feature_dim": tx.shape[1], "seconds": round(time.time() - t0, 1)})
            print(f"{method:28s} {setting:7s} balanced acc {bacc:.3f} (chance {1 / len(common):.3f}, "
                  f"{len(common)} classes)", flush=True)
    append_rows(args.out, COLUMNS, rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
