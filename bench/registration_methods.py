"""Feature methods compared on the same pairs: dino3d vs MIND vs intensity (issue "3D DINO", Must show).

Pairs: held-out synthetic subjects (the seed-0 demo cohort; the demo weights were pretrained on a cohort of other
seeds), inter-patient CT-CT (`registration_val`) and intra-patient MR-CT (`registration_mrct`), plus the real MR ->
real CT pair of ../shared/data/real (silver-standard labels, affine initial alignment for every method). Writes the
tidy per-organ table, a per-method summary and paired Wilcoxon signed-rank tests (per-pair mean Dice, dino3d vs
each other method) to results/bench/registration_methods*.csv/.md.

    python bench/registration_methods.py [--pairs 6] [--methods dino3d,mind,intensity] [--weights W.safetensors]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def cohort_dir(root: Path) -> Path:
    from dinoreg_core.data.phantom import PhantomConfig, generate_cohort

    return Path(generate_cohort(root / "synth_seed0", PhantomConfig(), progress=True)).parent


def wilcoxon_table(df: pd.DataFrame, ref: str) -> pd.DataFrame:
    from scipy.stats import wilcoxon

    per_pair = df.groupby(["dataset", "method", "pair"])["dice"].mean().reset_index()
    rows = []
    for ds, g in per_pair.groupby("dataset"):
        piv = g.pivot(index="pair", columns="method", values="dice")
        if ref not in piv:
            continue
        for m in piv.columns:
            if m == ref:
                continue
            d = (piv[ref] - piv[m]).dropna()
            p = float(wilcoxon(d).pvalue) if len(d) >= 2 and np.any(d != 0) else float("nan")
            rows.append({"dataset": ds, "method": m, "reference": ref, "pairs": len(d),
                         "mean_dice_ref": float(piv[ref].mean()), "mean_dice_method": float(piv[m].mean()),
                         "mean_diff": float(d.mean()), "wilcoxon_p": p})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=6, help="pairs per synthetic task")
    ap.add_argument("--methods", default="dino3d,mind,intensity")
    ap.add_argument("--weights", default=None, help="dino3d weights (default: the shipped demo weights)")
    ap.add_argument("--cache", default=str(REPO / "results" / "cache"))
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "registration_methods"))
    a = ap.parse_args()

    from dinoreg_core.atomic import atomic_path
    from dinoreg_core.evaluation.runner import PairSpec, evaluate, pairs_from_l2r, summarise
    from dinoreg_core.io import read_l2r_dataset
    from dinoreg_core.labels import L2R_ABDOMEN_CT, TOTALSEG_MAIN_ABDOMEN, load_label_id_map

    methods = a.methods.split(",")
    settings = {m: {} for m in methods}
    if a.weights and "dino3d" in settings:
        settings["dino3d"]["feat.weights"] = a.weights
    ds = read_l2r_dataset(cohort_dir(Path(a.cache)))
    mods = {"0000": "ct", "0001": "mr"}
    frames = []
    ct = pairs_from_l2r(ds, "registration_val", limit=a.pairs, modalities=mods)
    frames.append(evaluate(ct, methods, dataset="synthetic CT-CT", label_names=L2R_ABDOMEN_CT, method_settings=settings))
    mr = pairs_from_l2r(ds, "registration_mrct", limit=a.pairs, modalities=mods)
    frames.append(evaluate(mr, [m for m in methods if m != "intensity"], dataset="synthetic MR-CT",
                           label_names=L2R_ABDOMEN_CT, method_settings=settings))
    real = REPO.parent / "shared" / "data" / "real"
    if (real / "mr_upper_abdomen.nii.gz").exists():
        pair = PairSpec("real_mr_ct", real / "ct_abdomen_pelvis.nii.gz", real / "mr_upper_abdomen.nii.gz",
                        real / "ct_abdomen_pelvis_labels.nii.gz", real / "mr_upper_abdomen_labels.nii.gz",
                        label_map=load_label_id_map(real / "mr_label_ids_to_ct_label_ids.json"), init="affine",
                        fixed_modality="ct", moving_modality="mr")
        df_real = evaluate([pair], [m for m in methods if m != "intensity"], dataset="real MR-CT (silver labels)",
                           label_names=TOTALSEG_MAIN_ABDOMEN, method_settings=settings)
        frames.append(df_real[df_real["label"].isin(list(TOTALSEG_MAIN_ABDOMEN))])
    df = pd.concat(frames, ignore_index=True)
    stamp = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": datetime.date.today().isoformat()}
    summary = summarise(df).assign(**stamp)
    tests = wilcoxon_table(df, "dino3d") if "dino3d" in methods else pd.DataFrame()
    organ = df.groupby(["dataset", "method", "label_name"])["dice"].mean().unstack("method").reset_index()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, frame in [("_per_label.csv", df), (".csv", summary), ("_wilcoxon.csv", tests), ("_per_organ.csv", organ)]:
        with atomic_path(Path(str(out) + suffix)) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.4g")
    md = ["# Feature methods on the same pairs", "", f"{stamp['machine']}, {stamp['date']}", "",
          summary.to_markdown(index=False, floatfmt=".3f"), "", "Paired Wilcoxon (per-pair mean Dice):", "",
          tests.to_markdown(index=False, floatfmt=".3g") if len(tests) else "(no dino3d)", "",
          "Per organ (mean Dice):", "", organ.to_markdown(index=False, floatfmt=".3f")]
    with atomic_path(Path(str(out) + ".md")) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    print(summary.to_string())
    print(tests.to_string())
    print(f"wrote {out}.csv, {out}_per_label.csv, {out}_wilcoxon.csv, {out}_per_organ.csv, {out}.md")


if __name__ == "__main__":
    main()
