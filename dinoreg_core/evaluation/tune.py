"""Tune a registration method's preset on the *tuning* cohort: :func:`tune` (``dinoreg tune``).

The search (one documented procedure for every method, MIND included, so the comparison is fair):

1. **Start.** Each preset of :attr:`TuneConfig.starts` that the method has (``official``, ``authors``) is scored;
   the best admissible one is the starting point.
2. **Coordinate descent.** For each parameter of :attr:`TuneConfig.params` in turn, every candidate value of
   :data:`SEARCH_SPACE` (factors of the current value for ``lambda_weight`` and ``feature_scale``, absolute values
   otherwise) is scored with the other parameters held; the best admissible candidate replaces the current value
   when it beats it by at least ``min_gain`` Dice. :attr:`TuneConfig.rounds` passes over all parameters.
3. **Score** of a candidate: the mean over the tuning pairs of each pair's mean Dice over labels. A candidate is
   *admissible* only when its mean SDlogJ is at most ``max_sdlogj`` and its mean folding at most
   ``max_folding_pct`` (a field that folds to gain Dice is not a better registration).

Pairs come from a cohort whose role is ``tuning`` (:mod:`dinoreg_core.data.cohorts`); an evaluation or validation
cohort is refused, so a preset never sees an evaluation pair. Every pair is aligned once; backbone features are
extracted once per volume (:mod:`dinoreg_core.evaluation.feature_memo`, stored in ``<out>.cache/``).

Resumable: each scored candidate is one JSON line of the search log (``<out>.log.jsonl``: settings, per-pair Dice,
SDlogJ, folding, admissible); a rerun with the same arguments replays the log and scores only what is missing.
The result is a preset file (:func:`dinoreg_core.pipeline.presets.write_preset_file`) naming the log, the pairs and the score.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DinoregError

# parameter -> ("factor" | "value", candidates); factors multiply the current value
SEARCH_SPACE: dict[str, tuple[str, tuple]] = {
    "lambda_weight": ("factor", (0.25, 0.5, 2.0, 4.0)),
    "feature_scale": ("factor", (0.25, 0.5, 2.0, 4.0)),
    "disp_hw": ("value", (1, 2, 4, 6)),
    "grid_sp_adam": ("value", (2, 4)),
    "iterations": ("value", (80, 300, 1000)),
    "pca_dim": ("value", (6, 12, 24)),
    "feat.blocks": ("value", ("-1", "-2", "-2,-1")),
    "feat.dino_weight": ("factor", (0.5, 2.0)),
}
JOINT_PCA_ONLY = ("pca_dim",)  # parameters that only mean something for methods with joint PCA
METHOD_ONLY = {"feat.blocks": ("dino3d", "dino3d+mind"),
               "feat.dino_weight": ("dino3d+mind", "dinov2+mind")}  # parameters of some methods' features
UNSET_FEATURE_DEFAULTS = {"feat.blocks": "-1", "feat.dino_weight": 0.5}  # the extractors' defaults when unset
TUNING_ROLE = "tuning"


@dataclass
class TuneConfig:
    """Settings of :func:`tune` (see the module docstring)."""

    method: str = "mind"
    params: tuple = ("lambda_weight", "feature_scale", "disp_hw", "grid_sp_adam", "iterations")
    starts: tuple = ("official", "authors")  # presets scored as starting points (those the method has)
    rounds: int = 1  # passes of coordinate descent over params
    min_gain: float = 0.002  # Dice a candidate must add to replace the current value
    max_sdlogj: float = 0.5  # guard: mean SDlogJ of an admissible candidate (official MIND: ~0.27 on the cohort)
    max_folding_pct: float = 0.5  # guard: mean % folding voxels of an admissible candidate
    factors: tuple | None = None  # replaces the factors of the "factor" parameters (e.g. (0.5, 2.0): a small search)
    pairs_per_task: int = 1  # tuning pairs of each task
    tasks: tuple = ("ctct", "mrmr", "mrct")
    fixed_settings: dict = field(default_factory=dict)  # --set values held fixed during the search (e.g. weights)
    cache_dir: str | None = None  # stored backbone features (None: <out>.cache; share one between methods)
    device: str = "cpu"

    def validate(self) -> "TuneConfig":
        unknown = [p for p in self.params if p not in SEARCH_SPACE]
        if unknown:
            raise DinoregError(f"Unknown tuning parameter '{unknown[0]}'; known: {', '.join(SEARCH_SPACE)}.")
        if self.rounds < 1 or self.pairs_per_task < 1:
            raise DinoregError("Tuning needs rounds >= 1 and pairs_per_task >= 1.")
        for name in ("min_gain", "max_sdlogj", "max_folding_pct"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise DinoregError(f"The tuning setting {name}={v} must be a finite number >= 0.")
        return self


def canonical(settings: dict) -> str:
    """The search log's key of a settings dict (sorted JSON)."""
    return json.dumps({k: settings[k] for k in sorted(settings)}, sort_keys=True, default=str)


def tuning_pairs(dataset_json, tasks, pairs_per_task: int) -> list[dict]:
    """The first ``pairs_per_task`` pairs of each task of a *tuning* cohort; refuses other roles."""
    from ..data.cohorts import load_pairs

    p = Path(dataset_json)
    jp = p if p.is_file() else next(iter(sorted(p.glob("*_dataset.json"))), p)
    if jp.is_file():
        role = json.loads(jp.read_text()).get("role")
        if role is not None and role != TUNING_ROLE:
            raise DinoregError(f"The cohort {jp} has the role '{role}'; presets are tuned on a '{TUNING_ROLE}' "
                               f"cohort only (dinoreg_core.data.cohorts), never on evaluation or validation pairs.")
    return load_pairs(p, kinds=tuple(tasks), n_per_kind=int(pairs_per_task))


MODALITY = {"ctct": ("ct", "ct"), "mrmr": ("mr", "mr"), "mrct": ("ct", "mr"), "mrmr_heldout": ("mr", "mr"),
            "mrct_heldout": ("ct", "mr")}  # task -> (fixed, moving) modality


def align_pairs(entries: list[dict]) -> list:
    """Each entry aligned once (init none: cohort pairs share a world frame), modalities from the task."""
    from ..pipeline import align

    out = []
    for e in entries:
        fm, mm = MODALITY[e["task"]]
        out.append(align(e["fixed"], e["moving"], fixed_labels=e["fixed_label"], moving_labels=e["moving_label"],
                         fixed_modality=fm, moving_modality=mm))
    return out


def tuning_spacing_mm(pairs) -> float | list:
    """The voxel spacing (mm) of the fixed scans the search ran on: one number when they are isotropic and equal
    (ConvexAdam's ``disp_hw`` / ``grid_sp`` count voxels, so a preset is tied to it), else the list of (z,y,x)."""
    spacings = sorted({tuple(round(float(v), 4) for v in p.fixed.spacing) for p in pairs})
    if len(spacings) == 1 and len(set(spacings[0])) == 1:
        return spacings[0][0]
    return [list(s) for s in spacings]


def score(pairs, entries, method: str, settings: dict, device: str = "cpu") -> dict:
    """Register every aligned pair with ``settings`` (``--set`` names, no preset under them) -> per-pair mean Dice
    over labels and the means of Dice, SDlogJ and folding (the pipeline's stages; no HD95, which the search does
    not use)."""
    import torch

    from ..evaluation.metrics import dice_per_label, field_metrics
    from ..pipeline import get_registration_method, warp_moving
    from ..pipeline.config import config_from

    per_pair, sd, fold = {}, [], []
    reg = get_registration_method(method)
    for pair, e in zip(pairs, entries):
        cfg = config_from(method, settings, preset="official", device=device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        disp = reg.register(pair, cfg.method_options(), device=torch.device(device))
        _, warped_lab = warp_moving(pair, disp)
        ids = sorted((set(np.unique(pair.fixed_labels).tolist())
                      & set(np.unique(pair.moving_labels_on_fixed).tolist())) - {0})
        dice = dice_per_label(pair.fixed_labels, warped_lab, ids)
        fm = field_metrics(disp.on_box())
        name = f"{e['task']}:{Path(e['fixed']).name}->{Path(e['moving']).name}"
        per_pair[name] = float(np.nanmean([dice[i] for i in ids]))
        sd.append(float(fm["sdlogj"]))
        fold.append(float(fm["folding_pct"]))
    return {"per_pair": per_pair, "dice": float(np.mean(list(per_pair.values()))), "sdlogj": float(np.mean(sd)),
            "folding_pct": float(np.mean(fold))}


def candidates(param: str, current, method: str, factors=None) -> list:
    """Candidate values of ``param`` around ``current`` (:data:`SEARCH_SPACE`; ``factors`` replace the factors)."""
    kind, values = SEARCH_SPACE[param]
    if kind == "factor":
        values = tuple(factors) if factors else values
        return [float(f"{float(current) * f:.6g}") for f in values]
    return [v for v in values if str(v) != str(current)]


def current_value(param: str, settings: dict, method: str):
    """The value ``param`` has under ``settings`` (the code default when unset)."""
    from ..pipeline.config import config_from

    if param in settings:
        return settings[param]
    cfg = config_from(method, {}, preset="official")
    if param.startswith("feat."):
        return cfg.feature_options.get(param[5:], UNSET_FEATURE_DEFAULTS.get(param))
    if hasattr(cfg, param):
        return getattr(cfg, param)
    return getattr(cfg.convex, param)


def tune(dataset_json, out, cfg: TuneConfig, *, progress: bool = True) -> dict:
    """Run the search of the module docstring; writes ``out`` (the preset) and ``<out>.log.jsonl``; returns the
    preset file's content."""
    from tqdm.auto import tqdm

    from ..features.registry import get_feature_method
    from ..pipeline.methods import get_registration_method
    from ..pipeline.presets import available_presets, load_preset, write_preset_file
    from .feature_memo import memoized_extraction

    cfg.validate()
    method = cfg.method
    if get_registration_method(method).kind != "features":
        raise DinoregError(f"The method '{method}' is a peer; only feature methods have presets to tune.")
    why = get_registration_method(method).check(dict(cfg.fixed_settings))
    if why:
        raise DinoregError(why)
    out = Path(out)
    if out.suffix != ".json":
        raise DinoregError(f"The tuned preset {out} must be a .json file.")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.stem + ".log.jsonl")
    done: dict[str, dict] = {}
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    entries = tuning_pairs(dataset_json, cfg.tasks, cfg.pairs_per_task)
    joint = get_feature_method(method).joint_pca
    params = [p for p in cfg.params if (joint or p not in JOINT_PCA_ONLY)
              and method in METHOD_ONLY.get(p, (method,))]
    pairs = align_pairs(entries)
    bar = tqdm(desc=f"tune {method}", unit="candidate", disable=not progress)
    t0 = time.perf_counter()

    def evaluate(settings: dict, why: str) -> dict:
        full = {**settings, **cfg.fixed_settings}
        key = canonical(full)
        if key not in done:
            rec = {"key": key, "settings": full, "why": why, **score(pairs, entries, method, full, cfg.device)}
            rec["admissible"] = bool(rec["sdlogj"] <= cfg.max_sdlogj and rec["folding_pct"] <= cfg.max_folding_pct)
            rec["elapsed_s"] = round(time.perf_counter() - t0, 1)
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            done[key] = rec
        bar.update(1)
        bar.set_postfix(dice=f"{done[key]['dice']:.3f}")
        return done[key]

    with memoized_extraction(cache_dir=cfg.cache_dir or out.with_name(out.stem + ".cache")):
        have = available_presets(method)
        starts = []
        for name in [s for s in cfg.starts if s in have]:
            settings = dict(load_preset(method, name).settings)
            starts.append((name, settings, evaluate(settings, f"start: {name}")))
        ok = [s for s in starts if s[2]["admissible"]] or starts
        start_name, current, best = max(ok, key=lambda s: s[2]["dice"])
        for _ in range(cfg.rounds):
            for param in params:
                value = current_value(param, current, method)
                trials = []
                for v in candidates(param, value, method, cfg.factors):
                    trial = {**current, param: v}
                    trials.append((v, evaluate(trial, f"{param}={v} (from {value})")))
                good = [t for t in trials if t[1]["admissible"]]
                if good:
                    v, rec = max(good, key=lambda t: t[1]["dice"])
                    if rec["dice"] >= best["dice"] + cfg.min_gain:
                        current, best = {**current, param: v}, rec
    bar.close()
    extra = {"name": "tuned", "search_log": log_path.name, "spacing_mm": tuning_spacing_mm(pairs),
             "objective": {"dice": best["dice"], "sdlogj": best["sdlogj"], "folding_pct": best["folding_pct"],
                           "per_pair": best["per_pair"]},
             "tuning": {"dataset": str(dataset_json), "start": start_name, "params": params,
                        "rounds": cfg.rounds, "max_sdlogj": cfg.max_sdlogj, "max_folding_pct": cfg.max_folding_pct,
                        "min_gain": cfg.min_gain, "factors": list(cfg.factors or []), "candidates_scored": len(done),
                        "pairs": [f"{e['task']}:{Path(e['fixed']).name}->{Path(e['moving']).name}" for e in entries]}}
    source = (f"dinoreg tune --method {method}: coordinate descent over {', '.join(params)} from the "
              f"'{start_name}' preset on {len(entries)} tuning-cohort pairs (mean Dice {best['dice']:.3f}, "
              f"SDlogJ <= {cfg.max_sdlogj}, folding <= {cfg.max_folding_pct} %).")
    settings = {k: v for k, v in current.items() if k not in cfg.fixed_settings}
    write_preset_file(out, method, settings, source=source, extra=extra)
    return json.loads(out.read_text())
