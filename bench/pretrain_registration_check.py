"""Small registration check of pretrained weights on the evaluation cohort (issue 14): dino3d (several weights) vs
MIND vs unregistered, the same pairs for every method.

The cohort is the *evaluation* role of :mod:`dinoreg_core.data.cohorts` (seed 14004, 3 mm): inter-patient CT-CT,
MR-MR and MR-CT pairs, and the same MR tasks with the held-back MR appearance ``pd`` that pretraining never renders
(``mrmr_heldout``, ``mrct_heldout``). Every method runs with the default :class:`dinoreg_core.api.RegisterConfig`
(the one code path of the API), so only the features differ.

Pairs are taken one after the other, each with every method, and each (method, pair)'s rows are appended to
``OUT/<method>.csv`` at once (one row per organ; pairs already there are skipped unless ``--force``), so an
interrupted check resumes and partial results stay paired. Then the
summary over every method present: ``OUT/summary.csv`` (mean Dice per task and method; pairs), ``OUT/per_organ.csv``
and ``OUT/wilcoxon.csv`` (per-pair mean Dice, each method against ``--reference``), ``OUT/summary.md``.

    python bench/pretrain_registration_check.py --cohort runs/cohorts/evaluation --pairs 3 \\
        --method shipped=dino3d:dinoreg_core/weights/dino3d_demo.safetensors --method mind=mind
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = ("ctct", "mrmr", "mrct", "mrmr_heldout", "mrct_heldout")
MODALITY = {"0000": "ct", "0001": "mr", "0002": "mr"}


def pair_specs(cohort: Path, tasks, n: int):
    from dinoreg_core.data.cohorts import load_pairs
    from dinoreg_core.evaluation.runner import PairSpec

    specs = []
    for p in load_pairs(cohort, tasks, n):
        mod = [MODALITY[Path(p[k]).name.split("_")[-1].split(".")[0]] for k in ("fixed", "moving")]
        name = f"{p['task']}:{Path(p['fixed']).name.split('.')[0]}<-{Path(p['moving']).name.split('.')[0]}"
        specs.append((p["task"], PairSpec(name, Path(p["fixed"]), Path(p["moving"]), Path(p["fixed_label"]),
                                          Path(p["moving_label"]), fixed_modality=mod[0], moving_modality=mod[1])))
    return specs


def run_method(name: str, spec: str, pairs, out: Path, force: bool = False) -> None:
    """Register every pair with one method; each pair's rows are appended to ``OUT/<name>.csv`` as soon as they
    exist, and pairs already there are skipped (so an interrupted check resumes)."""
    from dinoreg_core.evaluation.runner import evaluate
    from dinoreg_core.labels import L2R_ABDOMEN_CT

    features, _, weights = spec.partition(":")
    settings = {features: {"feat.weights": weights}} if weights else {}
    path = out / f"{name}.csv"
    if force and path.exists():
        path.unlink()
    done = set(pd.read_csv(path)["pair"]) if path.exists() else set()
    for task, p in pairs:
        if p.name in done:
            continue
        df = evaluate([p], [features], dataset=task, label_names=L2R_ABDOMEN_CT, method_settings=settings,
                      progress=False)
        df["method"] = df["method"].where(df["method"] == "initial", name)
        df["weights"] = weights
        df.to_csv(path, mode="a", header=not path.exists(), index=False, float_format="%.5g")
        print(f"{name} {p.name}: dice {df[df.method == name].dice.mean():.3f} "
              f"(initial {df[df.method == 'initial'].dice.mean():.3f})", flush=True)


def summarise(out: Path, reference: str) -> None:
    from scipy.stats import wilcoxon

    frames = [pd.read_csv(p) for p in sorted(out.glob("*.csv"))
              if p.stem not in ("summary", "per_organ", "wilcoxon")]
    df = pd.concat(frames, ignore_index=True)
    init = df[df.method == "initial"].drop_duplicates(["dataset", "pair", "label"])
    df = pd.concat([df[df.method != "initial"], init.assign(method="unregistered")], ignore_index=True)
    per_pair = df.groupby(["dataset", "method", "pair"])["dice"].mean().reset_index()
    summary = per_pair.groupby(["dataset", "method"])["dice"].agg(["mean", "count"]).reset_index()
    summary = summary.rename(columns={"mean": "mean_dice", "count": "pairs"})
    stamp = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": datetime.date.today().isoformat()}
    summary = summary.assign(**stamp)
    rows = []
    for ds, g in per_pair.groupby("dataset"):
        piv = g.pivot(index="pair", columns="method", values="dice")
        if reference not in piv:
            continue
        for m in piv.columns:
            if m == reference:
                continue
            d = (piv[m] - piv[reference]).dropna()
            p = float(wilcoxon(d).pvalue) if len(d) >= 2 and np.any(d != 0) else float("nan")
            rows.append({"dataset": ds, "method": m, "reference": reference, "pairs": len(d),
                         "mean_dice_method": float(piv[m].mean()), "mean_dice_reference": float(piv[reference].mean()),
                         "mean_diff": float(d.mean()), "wins": int((d > 0).sum()), "wilcoxon_p": p})
    tests = pd.DataFrame(rows)
    organ = df.groupby(["dataset", "method", "label_name"])["dice"].mean().unstack("method").reset_index()
    summary.to_csv(out / "summary.csv", index=False, float_format="%.4g")
    tests.to_csv(out / "wilcoxon.csv", index=False, float_format="%.4g")
    organ.to_csv(out / "per_organ.csv", index=False, float_format="%.4g")
    table = summary.pivot(index="dataset", columns="method", values="mean_dice")
    md = ["# Registration check on the evaluation cohort (mean Dice per pair, averaged)", "",
          f"{stamp['machine']}, {stamp['date']}; pairs per task: {int(summary.pairs.max())}", "",
          table.to_markdown(floatfmt=".3f"), "", f"Paired Wilcoxon against {reference} (per-pair mean Dice):", "",
          tests.to_markdown(index=False, floatfmt=".3g") if len(tests) else "(none)", "",
          "Per organ (mean Dice):", "", organ.to_markdown(index=False, floatfmt=".3f")]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print(table.to_string())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", required=True, help="evaluation cohort folder (dinoreg_core.data.cohorts)")
    ap.add_argument("--pairs", type=int, default=3, help="pairs per task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--method", action="append", default=[], metavar="NAME=FEATURES[:WEIGHTS]")
    ap.add_argument("--reference", default="mind")
    ap.add_argument("--force", action="store_true", help="rerun methods already in OUT")
    ap.add_argument("--out", default=str(REPO / "results" / "pretrain" / "registration_check"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = pair_specs(Path(a.cohort), a.tasks.split(","), a.pairs)
    for i, pair in enumerate(pairs):                     # pair by pair, every method: partial results stay paired
        for m in a.method:
            name, _, spec = m.partition("=")
            run_method(name, spec, [pair], out, force=a.force and i == 0)
    summarise(out, a.reference)


if __name__ == "__main__":
    main()
