"""The calls the notebook suite (``notebooks/0*.ipynb``) makes, so no logic lives only in a notebook.

* datasets and pairs: :func:`prepare_dataset` (the synthetic cohort generated into the run folder, a fetched
  Learn2Reg dataset by manifest name, or any folder in the Learn2Reg layout) and :func:`task_pairs` (CT-CT
  inter-patient or MR-CT pairs of it);
* methods: :func:`method_status` / :func:`usable_methods` (which of intensity, mind, dino3d, dinov2 can run here and,
  if not, why);
* the 3D DINO weights: :func:`pretrain_or_shipped` (train, or use the shipped demo weights);
* one pair with every method: :func:`register_methods`, :func:`results_summary` (notebook 00, the qualitative
  panel of notebook 04);
* features of one scan as PCA-RGB on the image grid: :func:`feature_rgb` (notebook 02);
* hand-over between notebooks: :func:`write_handoff` / :func:`read_handoff` (``RUN_DIR/handoff/<name>.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import write_json_atomic
from ..errors import DinoregError
from .runner import PairSpec

TASKS = {"ctct": "CT-CT", "mrct": "MR-CT"}
ALL_METHODS = ("intensity", "mind", "dino3d", "dinov2")


# ---------------------------------------------------------------------------------------------- hand-over files
def write_handoff(run_dir, name: str, obj: dict) -> Path:
    """Write ``RUN_DIR/handoff/<name>.json`` atomically (what a later notebook reads)."""
    p = Path(run_dir) / "handoff" / f"{name}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, obj)
    return p


def read_handoff(run_dir, name: str, *, producer: str = "an earlier notebook") -> dict:
    """Read ``RUN_DIR/handoff/<name>.json``; one sentence naming the notebook to run first when it is missing."""
    p = Path(run_dir) / "handoff" / f"{name}.json"
    if not p.is_file():
        raise DinoregError(f"{p} does not exist; run {producer} with the same run_dir first.")
    return json.loads(p.read_text())


# ---------------------------------------------------------------------------------------------- datasets
def prepare_dataset(dataset: str, run_dir, *, n_subjects: int = 8, n_val_subjects: int = 3, seed: int = 0,
                    spacing_mm: float = 3.0, shape=None, workers: int = 1, data_dir: str = "data",
                    progress: bool = True, paired: bool = False) -> Path:
    """The ``<TASK>_dataset.json`` of ``dataset``:

    * ``"synthetic"``: a synthetic cohort (``n_subjects`` at ``spacing_mm``, the last ``n_val_subjects`` forming the
      CT-CT pairs, half of the subjects with an MR) generated into ``RUN_DIR/data/synthetic_seed<seed>`` (reused when
      complete; resumed when interrupted). ``paired``: every subject gets an MR co-registered with its CT (no
      breathing or pose change; ``RUN_DIR/data/synthetic_seed<seed>_paired``), the pretraining data of the demo
      config (``augment.partner_prob``);
    * a manifest name such as ``"l2r_abdomen_ctct"``: the data fetched by ``dinoreg data fetch NAME --dest DATA_DIR``;
    * a folder (or json file) in the Learn2Reg layout.
    """
    if dataset == "synthetic":
        from ..data.phantom import PhantomConfig, generate_cohort

        kw = {"n_subjects": int(n_subjects), "n_val_subjects": int(n_val_subjects), "seed": int(seed),
              "spacing_mm": float(spacing_mm), "workers": int(workers)}
        if shape is not None:
            kw["shape"] = tuple(int(s) for s in shape)
        if paired:
            kw.update(mr_fraction=1.0, mr_breath_change_mm=(0.0, 0.0), mr_pose_mm=0.0, mr_pose_deg=0.0)
        out = Path(run_dir) / "data" / (f"synthetic_seed{int(seed)}" + ("_paired" if paired else ""))
        return Path(generate_cohort(out, PhantomConfig(**kw), progress=progress))
    p = Path(dataset).expanduser()
    if p.exists():
        from ..io import read_l2r_dataset

        return read_l2r_dataset(p).root / _json_name(p)
    from ..data.download import data_root
    from ..data.manifests import get_manifest

    m = get_manifest(dataset)
    if m.access == "generated":
        raise DinoregError(f"The dataset '{dataset}' is generated; use dataset='synthetic'.")
    root = data_root(m, data_dir)
    jp = Path(data_dir) / m.name / m.layout.dataset_json if m.layout.dataset_json else root
    if not jp.exists():
        raise DinoregError(f"The dataset '{dataset}' is not in {Path(data_dir) / m.name}; fetch it with "
                           f"`dinoreg data fetch {dataset} --dest {data_dir}`.")
    return jp


def _json_name(p: Path) -> str:
    if p.is_file():
        return p.name
    found = sorted(p.glob("*_dataset.json"))
    return found[0].name if found else ""


def task_pairs(dataset_json, task: str, *, limit: int | None = None, init: str = "none") -> tuple[list[PairSpec], dict, str]:
    """Pairs of ``task`` (``"ctct"``: inter-patient CT-CT, the ``registration_val`` list; ``"mrct"``: MR-CT, the
    ``registration_mrct`` list of the synthetic cohort or the validation/paired list of a Learn2Reg MR-CT dataset),
    at most ``limit`` of them. Returns (pairs, label names, dataset label such as ``"SynthAbdomen CT-CT"``).
    Modalities come from the json's ``modality`` entry (channel ``_0000`` / ``_0001``)."""
    from ..io import read_l2r_dataset

    if task not in TASKS:
        raise DinoregError(f"Unknown task '{task}'; use one of {', '.join(TASKS)}.")
    ds = read_l2r_dataset(dataset_json)
    mods = {f"{int(k):04d}": str(v).lower() for k, v in (ds.raw.get("modality") or {}).items()}
    if task == "ctct":
        keys = ["registration_val"]
    else:
        keys = ["registration_mrct", "registration_val", "training_paired_images"]
    key = next((k for k in keys if ds.pairs.get(k)), None)
    if key is None:
        raise DinoregError(f"The dataset {ds.name} ({dataset_json}) has no {TASKS[task]} pair list "
                           f"({' or '.join(keys)}).")
    from .runner import pairs_from_l2r

    pairs = pairs_from_l2r(ds, key, init=init, limit=limit, modalities=mods or None)
    want = {"ctct": {("ct", "ct")}, "mrct": {("ct", "mr"), ("mr", "ct")}}[task]
    if mods and any((p.fixed_modality, p.moving_modality) not in want for p in pairs):
        raise DinoregError(f"The pair list {key} of {ds.name} is not {TASKS[task]}; choose the other task.")
    if not pairs:
        raise DinoregError(f"The pair list {key} of {ds.name} is empty.")
    return pairs, dict(ds.labels), f"{ds.name} {TASKS[task]}"


# ---------------------------------------------------------------------------------------------- methods
def method_status(methods=ALL_METHODS, options: dict | None = None) -> dict[str, str | None]:
    """For each method: None when it can run here, else one sentence saying why not (missing weights or package).
    ``options``: {method: feature options}, e.g. {"dino3d": {"weights": "w.safetensors"}}."""
    from ..features.registry import get_feature_method

    out = {}
    for m in methods:
        opts = dict((options or {}).get(m, {}))
        try:
            get_feature_method(m)
            if m == "dino3d":
                from ..features.dino3d import resolve_weights

                resolve_weights(opts)
            elif m == "dinov2":
                from ..models.dinov2_slices import Dinov2SliceConfig, load_backbone

                load_backbone(Dinov2SliceConfig.from_options(opts))
            out[m] = None
        except (DinoregError, ImportError) as e:
            out[m] = " ".join(str(e).split())
    return out


def usable_methods(methods, options: dict | None = None, *, verbose: bool = True) -> list[str]:
    """``methods`` (a list, or ``"all"``) without those that cannot run here; says which were left out and why."""
    methods = list(ALL_METHODS) if methods in ("all", None) else list(methods)
    status = method_status(methods, options)
    for m, why in status.items():
        if why and verbose:
            print(f"left out {m}: {why}")
    ok = [m for m in methods if status[m] is None]
    if not ok:
        raise DinoregError(f"None of the methods {', '.join(methods)} can run here; see the reasons above.")
    return ok


# ---------------------------------------------------------------------------------------------- 3D DINO weights
def shipped_weights() -> Path | None:
    """The shipped demo weights ``dinoreg_core/weights/dino3d_demo.safetensors`` when they (and their json) exist."""
    from ..features.dino3d import DEFAULT_WEIGHTS
    from ..models.checkpoint import checkpoint_paths

    w, meta = checkpoint_paths(DEFAULT_WEIGHTS)
    return w if w.is_file() and meta.is_file() else None


def shipped_log() -> Path | None:
    """A pretraining log shipped beside the demo weights (``dino3d_demo*.csv``), if any."""
    from ..features.dino3d import DEFAULT_WEIGHTS

    found = sorted(DEFAULT_WEIGHTS.parent.glob(DEFAULT_WEIGHTS.stem + "*.csv"))
    return found[0] if found else None


def pretrain_or_shipped(mode: str, data, run_dir, *, config: str | None = "demo", overrides=(), weights: str | None = None,
                        progress: bool = True) -> dict:
    """The dino3d weights for the rest of the suite.

    ``config``: a packaged pretraining config name (``demo``), a JSON/YAML file, or None (the
    :class:`~dinoreg_core.ssl.train.PretrainConfig` defaults: the paper's model).
    ``mode``: ``"auto"`` — ``weights`` when given, else the shipped demo weights when present, else pretrain;
    ``"train"`` — always pretrain (``dinoreg pretrain --config CONFIG --data DATA --out RUN_DIR/pretrain --set ...``;
    an interrupted run resumes); ``"skip"`` — ``weights`` or the shipped weights, an error when neither exists.
    Returns {"weights", "source" ("given" | "shipped" | "trained"), "log" (log.csv or None), "message", "seconds"}.
    """
    if mode not in ("auto", "train", "skip"):
        raise DinoregError(f"train must be 'auto', 'train' or 'skip', got '{mode}'.")
    t0 = time.perf_counter()
    if mode != "train":
        if weights:
            from ..features.dino3d import resolve_weights

            w = resolve_weights({"weights": weights})
            return {"weights": str(w), "source": "given", "log": None, "seconds": 0.0,
                    "message": f"using the given dino3d weights {w} (no pretraining)"}
        w = shipped_weights()
        if w is not None:
            log = shipped_log()
            return {"weights": str(w), "source": "shipped", "log": str(log) if log else None, "seconds": 0.0,
                    "message": f"using the shipped demo weights {w} (no pretraining)"}
        if mode == "skip":
            raise DinoregError("train='skip' needs dino3d weights, but none were given and the shipped demo weights "
                               "dinoreg_core/weights/dino3d_demo.safetensors do not exist; use train='auto'.")
    from ..commands.pretrain import resolve_config_path
    from ..ssl import dist
    from ..ssl.train import config_to_dict, load_config, train

    out = Path(run_dir) / "pretrain"
    done = out / "teacher_backbone.safetensors"
    cfg_path = resolve_config_path(config, out, False)
    cfg = load_config(cfg_path, list(overrides) + ([] if progress else ["progress=false"]))
    why = "the shipped demo weights do not exist" if mode == "auto" else "train='train'"
    saved = out / "config.json"
    same = lambda d: {k: v for k, v in d.items() if k != "progress"}  # noqa: E731
    if done.is_file() and saved.is_file() and \
            same(json.loads(saved.read_text())) == same(json.loads(json.dumps(config_to_dict(cfg)))):
        return {"weights": str(done), "source": "trained", "log": str(out / "log.csv"), "seconds": 0.0,
                "message": f"{why}; using the finished pretraining run {out} ({cfg.steps} steps, same config)"}
    import torch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"pretraining 3D DINO ({why}): config {config or 'paper defaults'}, {cfg.steps} steps on {data} -> {out}")
    resume = (out / "checkpoint.pt").exists()
    try:
        res = train(cfg, data, out, resume=resume)
    finally:
        dist.cleanup()
    if not done.is_file():
        raise DinoregError(f"Pretraining stopped at step {res.get('step')} of {cfg.steps} without exporting {done}.")
    return {"weights": str(done), "source": "trained", "log": str(out / "log.csv"),
            "seconds": round(time.perf_counter() - t0, 1),
            "message": f"{why}, so 3D DINO was pretrained for {cfg.steps} steps ({time.perf_counter() - t0:.0f} s on "
                       f"{device}): {done}"}


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
                     progress: bool = True) -> dict:
    """Register ``pair`` (a :func:`demo_pair` dict) with each method; {method: RegistrationResult}.
    ``settings``: {method: {setting: value}} as in :meth:`RegisterConfig.set`."""
    from tqdm.auto import tqdm

    from ..api import RegisterConfig, register

    results = {}
    fixed_modality = fixed_modality or pair.get("fixed_modality")
    moving_modality = moving_modality or pair.get("moving_modality")
    for m in tqdm(list(methods), desc="methods", disable=not progress):
        cfg = RegisterConfig(features=m, init=init, device=device, fixed_modality=fixed_modality,
                             moving_modality=moving_modality)
        for k, v in (settings or {}).get(m, {}).items():
            cfg.set(k, str(v))
        results[m] = register(pair["fixed"], pair["moving"], fixed_labels=pair["fixed_labels"],
                              moving_labels=pair["moving_labels"], config=cfg, label_names=pair["label_names"],
                              out_dir=None if out_dir is None else Path(out_dir) / m)
    return results


def results_summary(results: dict, true_disp: np.ndarray | None = None, body_mask: np.ndarray | None = None) -> pd.DataFrame:
    """One row per method: mean Dice before/after, HD95, SDlogJ, folding, time, peak memory (and the error against
    the known field when ``true_disp`` is given)."""
    from .metrics import displacement_error_mm

    rows = []
    for m, r in results.items():
        s, f = r.metrics.get("summary", {}), r.metrics["field"]
        row = {"method": m, "dice_before": s.get("dice_initial", np.nan), "dice_after": s.get("dice", np.nan),
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
def feature_rgb(image, methods, *, modality: str | None = None, options: dict | None = None, device: str = "cpu",
                seed: int = 0, progress: bool = True) -> tuple[np.ndarray, dict, dict]:
    """Features of one scan per method as PCA-RGB volumes on the image grid.

    ``image``: a NIfTI path or :class:`dinoreg_core.io.Volume`. Returns (normalised image (D,H,W) in [0,1],
    {method: (D,H,W,3) float32 in [0,1]}, {method: seconds}). The first three principal components of each
    method's features are fitted on this scan alone (:func:`dinoreg_core.features.pca.pca_rgb`), then resized
    trilinearly to the image grid.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .. import io
    from ..features.pca import pca_rgb
    from ..features.registry import get_feature_method
    from ..preprocess import guess_modality, normalize_intensity

    vol = image if isinstance(image, io.Volume) else io.load_volume(image, what="image")
    mod = modality or guess_modality(vol.array)
    img = normalize_intensity(vol.array, mod)
    dev = torch.device(device)
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None].to(dev)
    rgb, secs = {}, {}
    for m in tqdm(list(methods), desc="features", disable=not progress):
        t0 = time.perf_counter()
        with torch.no_grad():
            f = get_feature_method(m).extract(t, modality=mod, device=dev, options=dict((options or {}).get(m, {})))
            c = pca_rgb(f.float().cpu(), seed=seed)                             # (d,h,w,3)
            c = torch.from_numpy(np.ascontiguousarray(c)).permute(3, 0, 1, 2)[None].float()
            if tuple(c.shape[2:]) != tuple(img.shape):
                c = F.interpolate(c, size=img.shape, mode="trilinear", align_corners=False)
        rgb[m] = c[0].permute(1, 2, 3, 0).clamp(0, 1).numpy().astype(np.float32)
        secs[m] = round(time.perf_counter() - t0, 2)
    return img, rgb, secs


def pretraining_needed(mode: str, weights: str | None = None) -> bool:
    """Whether :func:`pretrain_or_shipped` will train (so notebook 01 only builds a corpus when it is used)."""
    return mode == "train" or (mode == "auto" and not weights and shipped_weights() is None)


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
    p = Path(run_dir) / "handoff" / "01_pretrain_3d_dino.json"
    if p.is_file():
        return json.loads(p.read_text()).get("weights")
    return None


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


def dataset_scan(scan, dataset: str, case: int, run_dir, *, cohort: dict | None = None, data_dir: str = "data") -> tuple[Path, str]:
    """(path, modality) of the scan notebook 02 shows: ``scan`` when given, else image ``case`` of the dataset's
    ``training`` list (the synthetic cohort: generated into run_dir with ``cohort`` settings)."""
    if scan:
        return Path(scan), ""
    from ..io import read_l2r_dataset

    jp = prepare_dataset(dataset, run_dir, data_dir=data_dir, **(cohort or {}))
    ds = read_l2r_dataset(jp)
    items = ds.raw.get("training") or []
    if not 0 <= int(case) < len(items):
        raise DinoregError(f"case {case} is outside 0..{len(items) - 1} for the dataset {ds.name}.")
    p = (ds.root / items[int(case)]["image"]).resolve()
    mods = {f"{int(k):04d}": str(v).lower() for k, v in (ds.raw.get("modality") or {}).items()}
    return p, mods.get(p.name.split("_")[-1].split(".")[0], "")


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
    hand = None
    p = Path(run_dir) / "handoff" / "03_evaluate_registration.json"
    if p.is_file():
        hand = json.loads(p.read_text())
    if csv is None:
        if hand is None:
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
