"""Run methods x pairs and collect one tidy table.

One row per (dataset, pair, method, label) with Dice before/after, HD95 (mm, voxels), the field metrics of the
pair (SDlogJ, Learn2Reg SDlogJ, % folding), runtime and peak memory alongside (DESIGN.md section 2).
Each method is a method of the one registry (:mod:`dinoreg_core.pipeline.methods`: feature methods and peers), run
through the pipeline's stages by :func:`dinoreg_core.api.register_methods` (each pair aligned once, then every method
registered and evaluated on it) with its own settings (``method_settings[name]``: ``--set`` names -> values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from ..io import L2RDataset


@dataclass
class PairSpec:
    """One registration pair; paths to NIfTI files (labels optional)."""

    name: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    label_map: dict | None = None  # moving id -> fixed id
    init: str = "none"
    fixed_modality: str | None = None
    moving_modality: str | None = None


def pairs_from_l2r(ds: L2RDataset, key: str = "registration_val", *, init: str = "none", limit: int | None = None,
                   modalities: dict | None = None) -> list[PairSpec]:
    """Pairs of a Learn2Reg dataset list ``key``. ``modalities``: file-suffix ("0000", "0001") -> "ct"/"mr"."""
    out = []
    for p in ds.pairs.get(key, [])[:limit]:
        def mod(path):
            if not modalities:
                return None
            return modalities.get(Path(path).name.split("_")[-1].split(".")[0])

        out.append(PairSpec(p.name, p.fixed, p.moving, p.fixed_labels, p.moving_labels, init=init,
                            fixed_modality=mod(p.fixed), moving_modality=mod(p.moving)))
    return out


def evaluate(pairs: list[PairSpec], methods: list[str], *, dataset: str = "dataset", label_names: dict | None = None,
             method_settings: dict | None = None, device: str = "cpu", progress: bool = True) -> pd.DataFrame:
    """Register every pair with every method; returns the tidy table (also an ``initial`` row set per pair).

    ``methods``: names of the one registry (feature methods and peers). ``method_settings``: {method: {setting:
    value}} in ``--set`` names (e.g. ``{"dino3d": {"feat.weights": "w.safetensors", "lambda_weight": 2}}``; a peer's
    own option names). ``runtime_s`` of a method row: loading + alignment of the pair + the method's registration
    and evaluation.
    """
    from ..api import register_methods

    rows: list[dict] = []
    for pair in tqdm(pairs, desc=f"{dataset}: pairs", disable=not progress):
        results = register_methods(pair.fixed, pair.moving, methods, settings=method_settings,
                                   fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels, init=pair.init,
                                   fixed_modality=pair.fixed_modality, moving_modality=pair.moving_modality,
                                   label_map=pair.label_map, label_names=label_names, device=device)
        base = {"dataset": dataset, "pair": pair.name}
        first = True
        for method, res in results.items():
            fm = res.metrics["field"]
            settings = dict((method_settings or {}).get(method, {}))
            for r in res.metrics.get("labels", []):
                if first:
                    rows.append({**base, "method": "initial", "label": r["label"], "label_name": r["name"],
                                 "dice": r["dice_initial"], "hd95_mm": float("nan"), "hd95_vox": float("nan"),
                                 "sdlogj": 0.0, "sdlogj_l2r": 0.0, "folding_pct": 0.0, "runtime_s": 0.0,
                                 "peak_rss_mb": float("nan"), "settings": ""})
                rows.append({**base, "method": method, "label": r["label"], "label_name": r["name"], "dice": r["dice"],
                             "hd95_mm": r["hd95_mm"], "hd95_vox": r["hd95_vox"], "sdlogj": fm["sdlogj"],
                             "sdlogj_l2r": fm["sdlogj_l2r"], "folding_pct": fm["folding_pct"],
                             "runtime_s": res.timings["total_s"], "peak_rss_mb": res.timings["peak_rss_mb"],
                             "settings": ";".join(f"{k}={v}" for k, v in settings.items())})
            first = False
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method): mean over pairs of the per-pair mean Dice, HD95, SDlogJ, folding, runtime."""
    per_pair = df.groupby(["dataset", "method", "pair"]).agg(
        dice=("dice", "mean"), hd95_mm=("hd95_mm", "mean"), sdlogj=("sdlogj", "first"),
        folding_pct=("folding_pct", "first"), runtime_s=("runtime_s", "first")).reset_index()
    return per_pair.groupby(["dataset", "method"]).agg(
        dice_mean=("dice", "mean"), dice_sd=("dice", "std"), hd95_mm=("hd95_mm", "mean"), sdlogj=("sdlogj", "mean"),
        folding_pct=("folding_pct", "mean"), runtime_s=("runtime_s", "mean"), pairs=("pair", "nunique")).reset_index()
