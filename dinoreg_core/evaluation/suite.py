"""The notebook workflow: the calls the notebooks (``notebooks/0*.ipynb``) make, so no logic lives only in a notebook.

Each piece lives with its domain; this module holds the notebook-level glue and re-exports the rest under one name:

* datasets and pairs: :func:`~dinoreg_core.evaluation.datasets.prepare_dataset`, :func:`task_pairs`
  (:mod:`dinoreg_core.evaluation.datasets`);
* methods: :func:`method_status` / :func:`usable_methods` (the registry's ``check``: which methods can run here and,
  if not, why);
* the 3D DINO weights: :func:`~dinoreg_core.ssl.weights.pretrain_or_shipped` (:mod:`dinoreg_core.ssl.weights`) and
  :func:`pretrain_step` (notebook 01 in one call);
* one pair with every method: :func:`register_methods` (:func:`dinoreg_core.api.register_methods`: aligned once,
  every method on the same stages), :func:`results_summary` (notebook 00, the qualitative panel of notebook 04);
* features of one scan as PCA-RGB: :func:`~dinoreg_core.viz.feature_maps.feature_rgb` (notebook 02);
* hand-over between notebooks: :mod:`dinoreg_core.evaluation.handoff`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DinoregError
from ..ssl.weights import pretrain_or_shipped, pretraining_needed, shipped_log, shipped_weights
from ..viz.feature_maps import feature_rgb
from .datasets import TASKS, dataset_scan, prepare_dataset, task_pairs
from .handoff import find_handoff, read_handoff, write_handoff

__all__ = ["TASKS", "ALL_METHODS", "dataset_scan", "prepare_dataset", "task_pairs", "find_handoff", "read_handoff",
           "write_handoff", "pretrain_or_shipped", "pretraining_needed", "shipped_log", "shipped_weights",
           "feature_rgb", "method_status", "usable_methods", "demo_pair", "register_methods", "results_summary",
           "label_metric_dict", "evaluation_handoff", "qualitative_example", "write_csv", "with_weights",
           "feature_options", "dino3d_weights", "pretrain_step", "evaluation_tasks", "tasks_table", "evaluate_tasks",
           "load_evaluation", "viewer_state"]

ALL_METHODS = ("intensity", "mind", "dino3d", "dino3d+mind", "dinov2")
log = logging.getLogger("dinoreg")


# ---------------------------------------------------------------------------------------------- methods
def method_status(methods=ALL_METHODS, settings: dict | None = None) -> dict[str, str | None]:
    """For each method: None when it can run here, else one sentence saying why not (missing weights or package,
    a bad setting). ``settings``: per-method settings in ``--set`` names, e.g. {"dino3d": {"feat.weights": "w"}}."""
    from ..pipeline import method_status as registry_status

    return registry_status(list(methods), settings)


def usable_methods(methods, settings: dict | None = None, *, verbose: bool = True) -> list[str]:
    """``methods`` (a list, or ``"all"``) without those that cannot run here; says which were left out and why."""
    methods = list(ALL_METHODS) if methods in ("all", None) else list(methods)
    status = method_status(methods, settings)
    for m, why in status.items():
        if why and verbose:
            log.warning(f"left out {m}: {why}")
    ok = [m for m in methods if status[m] is None]
    if not ok:
        raise DinoregError(f"None of the methods {', '.join(methods)} can run here; see the reasons above.")
    return ok


# ---------------------------------------------------------------------------------------------- 3D DINO weights


# ---------------------------------------------------------------------------------------------- one pair
def demo_pair(fixed=None, moving=None, fixed_labels=None, moving_labels=None, *, max_disp_mm: float = 10.0,
              seed: int = 0) -> dict:
    """The pair notebook 00 registers: the given files, or (``fixed`` None) the demo known-deformation pair (the
    real CT of ../shared/data/real, or a synthetic subject, warped by a smooth random field)."""
    if fixed is None:
        from ..demo import known_deformation_pair

        p = known_deformation_pair(max_disp_mm=max_disp_mm, seed=seed)
        return {"fixed": p.fixed, "moving": p.moving, "fixed_labels": p.fixed_labels,
                "moving_labels": p.moving_labels, "label_names": p.label_names, "true_disp": p.true_disp,
                "body_mask": p.body_mask, "source": p.source, "fixed_modality": "ct", "moving_modality": "ct"}
    if moving is None:
        raise DinoregError("A fixed scan was given without a moving scan; set both paths (or neither for the demo pair).")
    return {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels,
            "label_names": None, "true_disp": None, "body_mask": None, "source": f"{fixed} <- {moving}"}


def register_methods(pair: dict, methods, *, settings: dict | None = None, init: str = "none", device: str = "cpu",
                     fixed_modality: str | None = None, moving_modality: str | None = None, out_dir=None,
                     progress: bool = True, presets="default") -> dict:
    """Register ``pair`` (a :func:`demo_pair` dict) with each method; {method: RegistrationResult}.
    ``settings``: {method: {setting: value}} in ``--set`` names, on top of each method's preset (``presets``: one
    name for all or {method: name}; ``default``: each method's default preset). The pair is aligned once
    (:func:`dinoreg_core.api.register_methods`)."""
    from ..api import register_methods as register_all

    return register_all(pair["fixed"], pair["moving"], methods, settings=settings, fixed_labels=pair["fixed_labels"],
                        moving_labels=pair["moving_labels"], init=init,
                        fixed_modality=fixed_modality or pair.get("fixed_modality"),
                        moving_modality=moving_modality or pair.get("moving_modality"),
                        label_names=pair["label_names"], device=device, out_dir=out_dir, progress=progress,
                        presets=presets)


def results_summary(results: dict, true_disp: np.ndarray | None = None, body_mask: np.ndarray | None = None) -> pd.DataFrame:
    """One row per method: mean Dice before/after, HD95, SDlogJ, folding, time, peak memory (and the error against
    the known field when ``true_disp`` is given)."""
    from .metrics import displacement_error_mm

    rows = []
    for m, r in results.items():
        s, f = r.metrics.get("summary", {}), r.metrics["field"]
        row = {"method": m, "preset": r.config.get("preset") or "", "dice_before": s.get("dice_initial", np.nan), "dice_after": s.get("dice", np.nan),
               "hd95_mm": s.get("hd95_mm", np.nan), "sdlogj": f["sdlogj"], "folding_pct": f["folding_pct"],
               "time_s": r.timings["total_s"], "peak_rss_mb": r.timings["peak_rss_mb"]}
        if true_disp is not None:
            sp = r.fixed.spacing
            row["field_error_before_mm"] = displacement_error_mm(np.zeros_like(true_disp), true_disp, sp, body_mask)
            row["field_error_after_mm"] = displacement_error_mm(r.displacement, true_disp, sp, body_mask)
        rows.append(row)
    return pd.DataFrame(rows)


def label_metric_dict(result) -> dict:
    """{"dice": mean Dice, "sdlogj": ..., "folding_pct": ...} of one RegistrationResult (for the qualitative panel)."""
    s, f = result.metrics.get("summary", {}), result.metrics["field"]
    return {"dice": float(s.get("dice", np.nan)), "sdlogj": float(f["sdlogj"]), "folding_pct": float(f["folding_pct"])}


# ---------------------------------------------------------------------------------------------- features of a scan


# ---------------------------------------------------------------------------------------------- notebook 03 -> 04
def evaluation_handoff(csv, tasks: dict, methods, method_settings: dict, *, device: str = "cpu",
                       outputs=()) -> dict:
    """What notebook 03 hands to 04: the tidy CSV and, per task, the pairs and label names (for re-registering an
    example pair for the qualitative panel)."""
    from .shard import EvalSpec

    t = {}
    for task, (pairs, names, label) in tasks.items():
        spec = EvalSpec(pairs=pairs, methods=list(methods), dataset=label, label_names=names)
        d = spec.to_dict()
        t[task] = {"dataset": label, "pairs": d["pairs"], "label_names": d["label_names"]}
    return {"csv": str(csv), "tasks": t, "methods": list(methods), "method_settings": method_settings,
            "device": device, "outputs": [str(o) for o in outputs]}


def qualitative_example(handoff: dict, task: str | None = None, pair_index: int = 0, *, progress: bool = True) -> dict:
    """Register one evaluated pair again with every method (notebook 04's qualitative panel).

    Returns {"fixed_image", "fixed_labels", "moving_labels", "warped": {method: warped labels},
    "metrics": {method: {"dice", "sdlogj", "folding_pct"}}, "label_names", "pair", "dataset"} (arrays (D,H,W) on the
    fixed grid)."""
    from ..preprocess import normalize_intensity
    from .shard import EvalSpec

    tasks = handoff["tasks"]
    task = task or next(iter(tasks))
    if task not in tasks:
        raise DinoregError(f"The evaluation has no task '{task}'; it has {', '.join(tasks)}.")
    t = tasks[task]
    spec = EvalSpec.from_dict({"pairs": t["pairs"], "methods": handoff["methods"], "label_names": t["label_names"]})
    if not 0 <= int(pair_index) < len(spec.pairs):
        raise DinoregError(f"pair_index {pair_index} is outside 0..{len(spec.pairs) - 1} for task {task}.")
    p = spec.pairs[int(pair_index)]
    pair = {"fixed": p.fixed, "moving": p.moving, "fixed_labels": p.fixed_labels, "moving_labels": p.moving_labels,
            "label_names": spec.label_names}
    res = register_methods(pair, handoff["methods"], settings=handoff.get("method_settings"), init=p.init,
                           device=handoff.get("device", "cpu"), fixed_modality=p.fixed_modality,
                           moving_modality=p.moving_modality, progress=progress)
    first = next(iter(res.values()))
    if first.fixed_labels is None:
        raise DinoregError(f"The pair {p.name} has no label maps, so no qualitative panel can be drawn.")
    return {"fixed_image": normalize_intensity(first.fixed.array, p.fixed_modality or "ct"),
            "fixed_labels": first.fixed_labels, "moving_labels": first.moving_labels_on_fixed,
            "warped": {m: r.warped_labels for m, r in res.items()},
            "metrics": {m: label_metric_dict(r) for m, r in res.items()},
            "label_names": spec.label_names, "pair": p.name, "dataset": t["dataset"]}


# ---------------------------------------------------------------------------------------------- small glue
def write_csv(df: pd.DataFrame, path) -> Path:
    """Write ``df`` to ``path`` atomically (parent folders created)."""
    from ..atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def with_weights(settings: dict | None, *, dino3d: str | None = None, dinov2: str | None = None) -> dict:
    """Per-method settings with ``feat.weights`` added for dino3d / dinov2 when given (a copy)."""
    out = {m: dict(v) for m, v in (settings or {}).items()}
    for m, w in (("dino3d", dino3d), ("dinov2", dinov2)):
        if w:
            out.setdefault(m, {})["feat.weights"] = str(w)
    return out


def feature_options(settings: dict | None) -> dict:
    """{method: feature options} from per-method settings (their ``feat.X`` entries)."""
    return {m: {k[5:]: v for k, v in s.items() if k.startswith("feat.")} for m, s in (settings or {}).items()}


def dino3d_weights(weights: str | None, run_dir) -> str | None:
    """``weights`` when given, else the weights notebook 01 chose for this run (``RUN_DIR/handoff``), else None
    (the dino3d method then uses the shipped demo weights when they exist)."""
    if weights:
        return str(weights)
    hand = find_handoff(run_dir, "01_pretrain_3d_dino")
    return hand.get("weights") if hand else None


def pretrain_step(train: str, *, weights: str | None, corpus: str, run_dir, config: str | None, steps: int, seed: int = 0,
                  overrides=(), cohort: dict | None = None, progress: bool = True) -> dict:
    """Notebook 01 in one call: build the corpus when training is needed (``corpus="synthetic"``: a cohort with
    ``cohort`` settings, see :func:`prepare_dataset`; paired CT + MR unless ``cohort["paired"]`` is False), then :func:`pretrain_or_shipped`. ``overrides``: {field: value}
    (or ``"field=value"`` strings) on top of the config, after ``steps`` and ``seed``."""
    data = corpus
    if pretraining_needed(train, weights) and corpus == "synthetic":
        c = dict(cohort or {})
        c.setdefault("n_val_subjects", 0)
        c.setdefault("paired", True)          # co-registered CT + MR: what the demo config's partner views need
        data = str(prepare_dataset("synthetic", run_dir, progress=progress, **c))
    if isinstance(overrides, dict):
        overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    ov = [f"steps={int(steps)}", f"seed={int(seed)}"] + list(overrides or [])
    info = pretrain_or_shipped(train, data, run_dir, config=config, overrides=ov, weights=weights, progress=progress)
    info["data"] = str(data) if pretraining_needed(train, weights) else None
    return info


def evaluation_tasks(tasks, *, dataset: str, run_dir, mrct_dataset: str | None = None, pairs_per_task=None,
                     init: str = "none", cohort: dict | None = None, data_dir: str = "data") -> dict:
    """{task: (pairs, label names, dataset label)} for notebook 03 (datasets prepared as in :func:`prepare_dataset`)."""
    out = {}
    for task in tasks:
        ds = mrct_dataset if (task == "mrct" and mrct_dataset) else dataset
        jp = prepare_dataset(ds, run_dir, data_dir=data_dir, **(cohort or {}))
        out[task] = task_pairs(jp, task, limit=pairs_per_task, init=init)
    return out


def tasks_table(tasks: dict) -> pd.DataFrame:
    """One row per task: dataset label, number of pairs, labels, first pair."""
    return pd.DataFrame([{"task": t, "dataset": label, "pairs": len(p), "labels": len(names),
                          "first pair": f"{p[0].fixed.name} <- {p[0].moving.name}"}
                         for t, (p, names, label) in tasks.items()])


def evaluate_tasks(tasks: dict, methods, settings: dict, run_dir, *, device: str = "cpu", processes: int = 1,
                   progress: bool = True) -> pd.DataFrame:
    """Every task's pairs x methods through :func:`dinoreg_core.evaluation.shard.run_evaluation` (resumable per
    pair under ``RUN_DIR/evaluation``); the tidy table of all tasks."""
    from .shard import EvalSpec, run_evaluation

    frames = []
    for task, (pairs, names, label) in tasks.items():
        spec = EvalSpec(pairs=pairs, methods=list(methods), dataset=label, method_settings=settings,
                        label_names=names, device=device, out_dir=str(Path(run_dir) / "evaluation"))
        frames.append(run_evaluation(spec, processes=processes, progress=progress))
    return pd.concat(frames, ignore_index=True)


def load_evaluation(csv, run_dir) -> tuple[pd.DataFrame, dict | None]:
    """(tidy table, notebook 03's hand-over or None) from ``csv``, or from notebook 03's output in ``run_dir``."""
    hand = find_handoff(run_dir, "03_evaluate_registration")
    if csv is None:
        if hand is None:
            p = Path(run_dir) / "handoff" / "03_evaluate_registration.json"
            raise DinoregError(f"{p} does not exist; run notebook 03 with the same run_dir first or set evaluation_csv.")
        csv = hand["csv"]
    if not Path(csv).is_file():
        raise DinoregError(f"The evaluation table {csv} does not exist.")
    df = pd.read_csv(csv)
    df["settings"] = df["settings"].fillna("") if "settings" in df.columns else ""
    return df, hand


def viewer_state(result, view: dict | None) -> dict:
    """The viewer settings ``view`` (for ``SliceViewer.set``) without a label overlay when the pair has no labels and
    without the deformation grid when there is no displacement."""
    v = dict(view or {})
    if v.get("overlay") not in (None, "none") and result.fixed_labels is None:
        v.pop("overlay")
    if v.get("grid") and getattr(result, "displacement", None) is None:
        v.pop("grid")
    return v
