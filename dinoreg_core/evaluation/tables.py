"""Result tables from the tidy evaluation table (:func:`dinoreg_core.evaluation.runner.evaluate`).

* :func:`per_pair` — one row per (dataset, method, pair): mean Dice and HD95 over the labels, the pair's field
  metrics (SDlogJ, folding), runtime and peak memory.
* :func:`results_table` — the paper's results table: per (dataset, method) mean ± sd over pairs of each metric and
  a paired Wilcoxon signed-rank test of the per-pair mean Dice against a reference method (``dino3d``).
* :func:`per_organ_table` — mean ± sd Dice per organ (rows: dataset, organ; columns: methods).
* :func:`write_table` — one table as CSV (numbers) and Markdown (formatted), both written atomically.

Dice of a label missing in the fixed or moving map is NaN and left out of the means (DESIGN.md section 2).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_path, write_text_atomic
from ..errors import DinoregError

METRICS = ("dice", "hd95_mm", "sdlogj", "folding_pct", "runtime_s", "peak_rss_mb")
LOWER_IS_BETTER = {"hd95_mm", "sdlogj", "folding_pct", "runtime_s", "peak_rss_mb"}
REQUIRED = ("dataset", "pair", "method", "label", "dice")


def _check(df: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DinoregError(f"The evaluation table lacks the column(s) {', '.join(missing)}; expected the tidy table "
                           f"of dinoreg_core.evaluation.runner.evaluate.")
    if df.empty:
        raise DinoregError("The evaluation table is empty; no pair was evaluated.")


def method_order(df: pd.DataFrame, reference: str | None = "dino3d") -> list[str]:
    """Methods in a stable order: ``initial`` first, then the reference, then the rest as they first appear."""
    seen = list(dict.fromkeys(df["method"].tolist()))
    head = [m for m in ("initial", reference) if m in seen]
    return head + [m for m in seen if m not in head]


def per_pair(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, pair): label-mean Dice/HD95, the pair's field metrics, runtime and memory."""
    _check(df)
    agg = {"dice": ("dice", "mean")}
    for c, how in (("hd95_mm", "mean"), ("sdlogj", "first"), ("folding_pct", "first"), ("runtime_s", "first"),
                   ("peak_rss_mb", "first")):
        if c in df.columns:
            agg[c] = (c, how)
    return df.groupby(["dataset", "method", "pair"], sort=False).agg(**agg).reset_index()


def _wilcoxon(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired Wilcoxon signed-rank p-value of a vs b (NaN when fewer than 2 pairs or all equal)."""
    from scipy.stats import wilcoxon

    d = a - b
    d = d[np.isfinite(d)]
    if len(d) < 2 or not np.any(d != 0):
        return float("nan")
    return float(wilcoxon(d).pvalue)


def results_table(df: pd.DataFrame, reference: str = "dino3d", metrics=METRICS) -> pd.DataFrame:
    """Per (dataset, method): ``pairs``, ``<metric>_mean`` and ``<metric>_sd`` over pairs for each metric, and the
    paired Wilcoxon test of per-pair mean Dice against ``reference`` (``dice_diff_vs_ref`` = method - reference,
    ``wilcoxon_p_vs_ref``; NaN for the reference itself, for ``initial``'s missing HD95, or without a reference)."""
    pp = per_pair(df)
    metrics = [m for m in metrics if m in pp.columns]
    order = method_order(df, reference)
    rows = []
    for ds, g in pp.groupby("dataset", sort=False):
        piv = g.pivot(index="pair", columns="method", values="dice")
        for m in [m for m in order if m in set(g["method"])]:
            gm = g[g["method"] == m]
            row = {"dataset": ds, "method": m, "pairs": int(gm["pair"].nunique())}
            for c in metrics:
                v = gm[c].to_numpy(dtype=float)
                v = v[np.isfinite(v)]
                row[f"{c}_mean"] = float(v.mean()) if v.size else float("nan")
                row[f"{c}_sd"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
            if reference in piv.columns and m != reference:
                both = piv[[reference, m]].dropna()
                row["dice_diff_vs_ref"] = float((both[m] - both[reference]).mean()) if len(both) else float("nan")
                row["wilcoxon_p_vs_ref"] = _wilcoxon(both[m].to_numpy(), both[reference].to_numpy())
            else:
                row["dice_diff_vs_ref"] = float("nan")
                row["wilcoxon_p_vs_ref"] = float("nan")
            row["reference"] = reference if reference in piv.columns else ""
            rows.append(row)
    return pd.DataFrame(rows)


def per_organ_table(df: pd.DataFrame, reference: str = "dino3d") -> pd.DataFrame:
    """Rows (dataset, label, label_name); per method the columns ``<method>_mean`` and ``<method>_sd`` of Dice over
    pairs."""
    _check(df)
    name = "label_name" if "label_name" in df.columns else "label"
    g = df.groupby(["dataset", "label", name, "method"], sort=False)["dice"].agg(["mean", "std"]).reset_index()
    out = None
    for m in method_order(df, reference):
        part = g[g["method"] == m].drop(columns="method").rename(columns={"mean": f"{m}_mean", "std": f"{m}_sd"})
        out = part if out is None else out.merge(part, on=["dataset", "label", name], how="outer")
    out = out.sort_values(["dataset", "label"], kind="stable").reset_index(drop=True)
    return out.rename(columns={name: "label_name"}) if name != "label_name" else out


def _pm(mean: float, sd: float, nd: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if sd is None or not math.isfinite(sd):
        return f"{mean:.{nd}f}"
    return f"{mean:.{nd}f} ± {sd:.{nd}f}"


def format_p(p: float) -> str:
    """A p-value as text: two significant digits, scientific below 1e-3, empty when undefined."""
    if p is None or not math.isfinite(p):
        return ""
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


DIGITS = {"dice": 3, "hd95_mm": 2, "sdlogj": 3, "folding_pct": 3, "runtime_s": 1, "peak_rss_mb": 0}
HEADERS = {"dice": "Dice", "hd95_mm": "HD95 (mm)", "sdlogj": "SDlogJ", "folding_pct": "folding (%)",
           "runtime_s": "time (s)", "peak_rss_mb": "peak RSS (MB)"}


def format_results(table: pd.DataFrame) -> pd.DataFrame:
    """The results table as strings: ``mean ± sd`` per metric and the Wilcoxon p-value vs the reference."""
    refs = set(table["reference"]) if "reference" in table.columns else set()
    rows = []
    for _, r in table.iterrows():
        row = {"dataset": r["dataset"], "method": r["method"], "pairs": int(r["pairs"])}
        if len(refs) > 1:  # one reference per row (e.g. tagged rows against their untagged rows): its own column
            row["reference"] = r["reference"]
        for c, nd in DIGITS.items():
            if f"{c}_mean" in table.columns:
                row[HEADERS[c]] = _pm(r[f"{c}_mean"], r[f"{c}_sd"], nd)
        ref = (r.get("reference") if len(refs) == 1 else "") or "reference"
        row[f"ΔDice vs {ref}"] = "" if not math.isfinite(r["dice_diff_vs_ref"]) else f"{r['dice_diff_vs_ref']:+.3f}"
        row[f"Wilcoxon p vs {ref}"] = format_p(r["wilcoxon_p_vs_ref"])
        rows.append(row)
    return pd.DataFrame(rows)


def format_per_organ(table: pd.DataFrame) -> pd.DataFrame:
    """The per-organ table as strings (``mean ± sd`` Dice per method)."""
    methods = [c[:-5] for c in table.columns if c.endswith("_mean")]
    rows = []
    for _, r in table.iterrows():
        row = {"dataset": r["dataset"], "organ": f"{int(r['label'])} {r['label_name']}"}
        for m in methods:
            row[m] = _pm(r[f"{m}_mean"], r[f"{m}_sd"], 3)
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """A plain pipe table (no extra dependency)."""
    cols = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r.tolist()) + " |")
    return "\n".join(lines) + "\n"


def write_table(numbers: pd.DataFrame, formatted: pd.DataFrame, stem, *, title: str | None = None) -> dict:
    """Write ``stem.csv`` (the numbers) and ``stem.md`` (the formatted table, with ``title``), atomically.
    Returns {"csv": path, "md": path}."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".md")
    with atomic_path(csv) as tmp:
        numbers.to_csv(tmp, index=False, float_format="%.6g")
    text = (f"# {title}\n\n" if title else "") + to_markdown(formatted)
    write_text_atomic(md, text)
    return {"csv": csv, "md": md}
