"""Result tables: mean ± sd over pairs, paired Wilcoxon vs dino3d, per-organ Dice, CSV + Markdown."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from dinoreg_core.errors import DinoregError
from dinoreg_core.evaluation import tables


def _tidy(n_pairs=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    base = {"initial": 0.3, "dino3d": 0.7, "mind": 0.65}
    for ds in ("A CT-CT", "A MR-CT"):
        for p in range(n_pairs):
            for m, b in base.items():
                sd = 0.0 if m == "initial" else float(rng.uniform(0.1, 0.6))
                for lab, name in ((1, "spleen"), (2, "liver")):
                    dice = b + rng.normal(0, 0.05) if not (lab == 2 and p == 0 and m == "mind") else np.nan
                    rows.append({"dataset": ds, "pair": f"p{p}", "method": m, "label": lab, "label_name": name,
                                 "dice": dice, "hd95_mm": np.nan if m == "initial" else rng.uniform(2, 9),
                                 "sdlogj": sd, "folding_pct": 0.0, "runtime_s": 0.0 if m == "initial" else 5.0,
                                 "peak_rss_mb": np.nan if m == "initial" else 900.0})
    return pd.DataFrame(rows)


def test_results_table_mean_sd_and_wilcoxon():
    df = _tidy()
    t = tables.results_table(df, reference="dino3d")
    assert list(t["method"][:3]) == ["initial", "dino3d", "mind"]
    pp = df.groupby(["dataset", "method", "pair"])["dice"].mean().reset_index()
    for ds in ("A CT-CT", "A MR-CT"):
        g = pp[pp.dataset == ds].pivot(index="pair", columns="method", values="dice")
        row = t[(t.dataset == ds) & (t.method == "mind")].iloc[0]
        assert row["dice_mean"] == pytest.approx(g["mind"].mean())
        assert row["dice_sd"] == pytest.approx(g["mind"].std(ddof=1))
        assert row["dice_diff_vs_ref"] == pytest.approx((g["mind"] - g["dino3d"]).mean())
        assert row["wilcoxon_p_vs_ref"] == pytest.approx(wilcoxon(g["mind"] - g["dino3d"]).pvalue)
        ref = t[(t.dataset == ds) & (t.method == "dino3d")].iloc[0]
        assert np.isnan(ref["wilcoxon_p_vs_ref"]) and ref["pairs"] == 6
    init = t[t.method == "initial"].iloc[0]
    assert np.isnan(init["hd95_mm_mean"])  # initial has no HD95: n/a, not 0
    f = tables.format_results(t)
    assert " ± " in f.loc[1, "Dice"] and f.loc[0, "HD95 (mm)"] == "n/a"


def test_results_table_without_reference_and_few_pairs():
    df = _tidy(n_pairs=1)
    df = df[df.method != "dino3d"]
    t = tables.results_table(df, reference="dino3d")
    assert t["wilcoxon_p_vs_ref"].isna().all() and t["dice_sd"].isna().all()
    assert (t["reference"] == "").all()


def test_per_organ_table_and_files(tmp_path):
    df = _tidy()
    o = tables.per_organ_table(df)
    assert list(o.columns[:3]) == ["dataset", "label", "label_name"]
    assert {"dino3d_mean", "dino3d_sd", "mind_mean", "initial_mean"} <= set(o.columns)
    sel = df[(df.dataset == "A CT-CT") & (df.method == "mind") & (df.label == 2)]["dice"]
    row = o[(o.dataset == "A CT-CT") & (o.label == 2)].iloc[0]
    assert row["mind_mean"] == pytest.approx(sel.mean())  # the NaN (missing label) is left out
    files = tables.write_table(o, tables.format_per_organ(o), tmp_path / "t" / "per_organ", title="Per organ")
    back = pd.read_csv(files["csv"])
    assert len(back) == len(o) and np.isfinite(back["dino3d_mean"]).all()
    md = files["md"].read_text()
    assert md.startswith("# Per organ") and "| 2 liver |" in md and " ± " in md


def test_table_errors_are_one_sentence():
    with pytest.raises(DinoregError, match="lacks the column"):
        tables.results_table(pd.DataFrame({"dataset": ["a"], "dice": [0.5]}))
    with pytest.raises(DinoregError, match="empty"):
        tables.per_organ_table(_tidy().iloc[:0])
