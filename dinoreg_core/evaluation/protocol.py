"""The evaluation protocol in one place (DESIGN.md section 7): :func:`run_protocol`.

* **Cohort**: the *evaluation* role cohort of :mod:`dinoreg_core.data.cohorts` (its own seed; never used for
  pretraining, tuning or checkpoint selection), at :attr:`ProtocolConfig.spacing_mm` (3 mm: the phantom's
  128x104x112 grid; 2 mm: 192x160x256, the Learn2Reg size), or any cohort folder in that layout.
* **Tasks**: inter-patient CT-CT and MR-MR (the paper's two) and MR-CT (CT fixed, MR moving), plus the held-back
  MR appearance (``mrmr_heldout``, ``mrct_heldout``) when asked; ``pairs_per_task`` pairs each.
* **Rows**: every method with each of its presets (``official`` and ``tuned``; a method without the preset is
  skipped with a note), written as ``method[preset]``, beside the unregistered ``initial`` row. Each pair is aligned
  once (the cohort's scans share a world frame: ``init none``) and every row registered on that same alignment.
* **Statistics**: per task and preset, mean ± sd over pairs and the paired Wilcoxon signed-rank test of per-pair
  mean Dice against ``mind`` with the same preset (:func:`dinoreg_core.evaluation.tables.results_table`); a
  per-organ Dice table.
* **Order and resumption**: pairs are visited round-robin over the tasks (pair 1 of every task, then pair 2, ...),
  so an interrupted run has comparable numbers for every task; each finished (pair, row) appends its label rows to
  ``rows.csv`` and a rerun skips what is there. Backbone features are extracted once per volume
  (:mod:`dinoreg_core.evaluation.feature_memo`, stored in ``OUT/feature_cache``).
* **Real pair** (optional): the real MR -> CT pair of ``../shared/data/real`` (``init affine``, MR labels mapped to
  CT ids) as one more dataset row.

Outputs in ``OUT``: ``rows.csv`` (tidy, one row per pair x row x label), ``results.csv|md`` (per task x row),
``per_organ.csv|md``, ``protocol.json`` (the configuration and the presets' settings as run).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import write_json_atomic
from ..errors import DinoregError

log = logging.getLogger("dinoreg")

TASK_NAMES = {"ctct": "CT-CT", "mrmr": "MR-MR", "mrct": "MR-CT", "mrmr_heldout": "MR-MR held-back appearance",
              "mrct_heldout": "MR-CT held-back appearance"}
SHAPES = {3.0: (128, 104, 112), 2.0: (192, 160, 256)}  # phantom grid per spacing (2 mm: the Learn2Reg size)
REFERENCE = "mind"
ROW_COLUMNS = ("dataset", "task", "pair", "method", "base_method", "preset", "label", "label_name", "dice",
               "dice_initial", "hd95_mm", "sdlogj", "sdlogj_l2r", "folding_pct", "runtime_s")


@dataclass
class ProtocolConfig:
    """Settings of :func:`run_protocol` (see the module docstring)."""

    methods: tuple = ("intensity", "mind", "dino3d", "dino3d+mind")
    presets: tuple = ("official", "tuned")
    tasks: tuple = ("ctct", "mrmr", "mrct")
    pairs_per_task: int = 10
    spacing_mm: float = 3.0
    n_subjects: int = 10  # cohort cases (n cases give n cyclic pairs per task)
    cohort: str | None = None  # an existing evaluation cohort (json or folder) instead of generating one
    method_settings: dict = field(default_factory=dict)  # {method: {--set: value}} on top of every preset
    tag: str = ""  # rows are named method@tag[preset] (e.g. other dino3d weights beside the shipped ones)
    real_pair: str | None = None  # folder of the real MR/CT pair (../shared/data/real), None: no real row
    hd95: bool = True
    cache_dir: str | None = None  # where backbone features are stored (None: OUT/feature_cache)
    device: str = "cpu"

    def validate(self) -> "ProtocolConfig":
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown:
            raise DinoregError(f"Unknown protocol task '{unknown[0]}'; known: {', '.join(TASK_NAMES)}.")
        if self.pairs_per_task < 1 or self.n_subjects < 2:
            raise DinoregError("The protocol needs pairs_per_task >= 1 and n_subjects >= 2.")
        if not float(self.spacing_mm) > 0:
            raise DinoregError(f"The protocol spacing {self.spacing_mm} mm must be positive.")
        return self


def row_name(method: str, preset: str) -> str:
    """``mind[official]``: a table row of ``method`` run with ``preset``."""
    return f"{method}[{preset}]"


def evaluation_cohort(out: Path, cfg: ProtocolConfig) -> Path:
    """The evaluation cohort's dataset json (generated into ``OUT/cohort_<spacing>mm`` unless ``cfg.cohort``);
    refuses a cohort of another role."""
    from ..data.cohorts import generate_role_cohort

    if cfg.cohort:
        p = Path(cfg.cohort)
        jp = p if p.is_file() else next(iter(sorted(p.glob("*_dataset.json"))), None)
        if jp is None or not jp.is_file():
            raise DinoregError(f"The evaluation cohort {p} has no *_dataset.json.")
        role = json.loads(jp.read_text()).get("role")
        if role not in (None, "evaluation"):
            raise DinoregError(f"The cohort {jp} has the role '{role}'; the protocol evaluates on an 'evaluation' "
                               f"cohort only.")
        return jp
    sp = float(cfg.spacing_mm)
    kw = {"spacing_mm": sp}
    if sp in SHAPES:
        kw["shape"] = SHAPES[sp]
    return generate_role_cohort(out / f"cohort_{sp:g}mm", "evaluation", cfg.n_subjects, progress=False, **kw)


def round_robin(entries: list[dict], tasks) -> list[dict]:
    """Entries ordered pair 1 of every task, pair 2 of every task, ..."""
    by_task = {t: [e for e in entries if e["task"] == t] for t in tasks}
    out = []
    for i in range(max((len(v) for v in by_task.values()), default=0)):
        out += [v[i] for v in by_task.values() if i < len(v)]
    return out


def plan_rows(cfg: ProtocolConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """([(method, preset)] that can run here, [notes on what is skipped and why])."""
    from ..pipeline import method_status
    from ..pipeline.presets import available_presets

    rows, notes = [], []
    status = method_status(cfg.methods, {m: cfg.method_settings.get(m, {}) for m in cfg.methods})
    for m in cfg.methods:
        if status[m]:
            notes.append(f"{m}: skipped ({status[m]})")
            continue
        have = available_presets(m, _feature_options(cfg.method_settings.get(m, {})))
        for p in cfg.presets:
            if p in have or Path(p).is_file():
                rows.append((m, p))
            else:
                notes.append(f"{row_name(m, p)}: skipped (no '{p}' preset)")
    return rows, notes


def _feature_options(settings: dict) -> dict:
    w = settings.get("feat.weights") or settings.get("weights")
    return {"weights": w} if w else {}


WEIGHTED_METHODS = ("dino3d", "dino3d+mind")  # rows whose numbers depend on a dino3d weights file


def weights_used(cfg: "ProtocolConfig") -> dict:
    """{method: {"path", "sha256"}} of the dino3d weights each weighted method of ``cfg`` runs with (``feat.weights``,
    else the demo weights): recorded in ``protocol.json`` so a resumed run cannot mix rows of two weights files."""
    from ..features.dino3d import DEFAULT_WEIGHTS
    from ..outputs import sha256

    out = {}
    for m in cfg.methods:
        if m in WEIGHTED_METHODS:
            w = Path(str(_feature_options(cfg.method_settings.get(m, {})).get("weights") or DEFAULT_WEIGHTS))
            out[m] = {"path": str(w), "sha256": sha256(w) if w.is_file() else None}
    return out


def check_same_weights(out: Path, used: dict) -> None:
    """Refuse to resume ``out`` when a weighted method's weights file changed since its rows were written."""
    p = out / "protocol.json"
    if not (p.is_file() and (out / "rows.csv").is_file()):
        return
    before = json.loads(p.read_text()).get("weights") or {}
    for m, w in used.items():
        old = before.get(m)
        if old and old.get("sha256") and old["sha256"] != w["sha256"]:
            raise DinoregError(f"The {m} weights {w['path']} differ from the ones the rows in {out} were made with "
                               f"({old['path']}, sha256 {old['sha256'][:12]}); use another --out or --tag.")


def tagged(method: str, tag: str = "") -> str:
    """``dino3d@v4``: the method's name in the rows when the protocol runs with a tag."""
    return f"{method}@{tag}" if tag else method


def pair_rows(dataset: str, task: str, pair_name: str, method: str, preset: str, res, hd95_spacing,
              tag: str = "") -> list[dict]:
    """Label rows of one registration (Dice after and before, HD95 mm when computed, the field's metrics)."""
    fm = res.metrics["field"]
    out = []
    for r in res.metrics.get("labels", []):
        out.append({"dataset": dataset, "task": task, "pair": pair_name,
                    "method": row_name(tagged(method, tag), preset),
                    "base_method": method, "preset": preset, "label": r["label"], "label_name": r["name"],
                    "dice": r["dice"], "dice_initial": r["dice_initial"], "hd95_mm": r.get("hd95_mm", np.nan),
                    "sdlogj": fm["sdlogj"], "sdlogj_l2r": fm["sdlogj_l2r"], "folding_pct": fm["folding_pct"],
                    "runtime_s": res.timings.get("register_s", np.nan)})
    return out


def register_row(pair, method: str, preset: str, cfg: ProtocolConfig):
    """One row's registration of an aligned pair (Dice always; HD95 when ``cfg.hd95``) -> a result-like object."""
    import torch

    from ..api import method_config
    from ..evaluation.metrics import dice_per_label, field_metrics, hd95_per_label
    from ..pipeline import get_registration_method, warp_moving

    rc = method_config(method, cfg.method_settings.get(method), preset=preset, device=cfg.device,
                       fixed_modality=pair.fixed_modality, moving_modality=pair.moving_modality)
    torch.manual_seed(rc.seed)
    np.random.seed(rc.seed)
    t = time.perf_counter()
    disp = get_registration_method(method).register(pair, rc.method_options(), device=torch.device(cfg.device))
    t_reg = time.perf_counter() - t
    _, warped_lab = warp_moving(pair, disp)
    ids = sorted((set(np.unique(pair.fixed_labels).tolist()) & set(np.unique(pair.moving_labels_on_fixed).tolist()))
                 - {0})
    before = dice_per_label(pair.fixed_labels, pair.moving_labels_on_fixed, ids)
    after = dice_per_label(pair.fixed_labels, warped_lab, ids)
    hd = hd95_per_label(pair.fixed_labels, warped_lab, pair.fixed.spacing, ids) if cfg.hd95 else {}
    names = pair.label_names or {}
    labels = [{"label": i, "name": names.get(i, str(i)), "dice": after[i], "dice_initial": before[i],
               "hd95_mm": hd.get(i, np.nan)} for i in ids]

    class _Res:  # the fields pair_rows reads
        metrics = {"field": field_metrics(disp.on_box()), "labels": labels}
        timings = {"register_s": t_reg}

    return _Res(), rc


def _append(path: Path, rows: list[dict]) -> None:
    df = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    df.to_csv(path, mode="a", header=not path.exists(), index=False, float_format="%.6g")


def _done(path: Path) -> set:
    if not path.exists():
        return set()
    df = pd.read_csv(path)
    return set(zip(df["dataset"], df["pair"], df["method"]))


def real_pair_rows(folder: Path, rows_plan, cfg: ProtocolConfig, done: set, rows_path: Path) -> None:
    """The real MR (moving) -> CT (fixed) pair of ``folder`` with ``init affine`` as one more dataset."""
    from ..labels import load_label_id_map
    from ..pipeline import align

    f = Path(folder)
    need = ["ct_abdomen_pelvis.nii.gz", "ct_abdomen_pelvis_labels.nii.gz", "mr_upper_abdomen.nii.gz",
            "mr_upper_abdomen_labels.nii.gz", "mr_label_ids_to_ct_label_ids.json"]
    missing = [n for n in need if not (f / n).is_file()]
    if missing:
        log.warning(f"real pair skipped: {f / missing[0]} does not exist")
        return
    dataset = "real MR-CT (init affine)"
    todo = [(m, p) for m, p in rows_plan if (dataset, "real", row_name(tagged(m, cfg.tag), p)) not in done]
    if not todo:
        return
    names = {}
    if (f / "label_names.json").is_file():
        raw = json.loads((f / "label_names.json").read_text())
        ct = next((v for k, v in raw.items() if k.startswith("ct_abdomen_pelvis_labels")), {})
        names = {int(k): str(v) for k, v in ct.items() if str(k).isdigit()} if isinstance(ct, dict) else {}
    pair = align(f / "ct_abdomen_pelvis.nii.gz", f / "mr_upper_abdomen.nii.gz",
                 fixed_labels=f / "ct_abdomen_pelvis_labels.nii.gz", moving_labels=f / "mr_upper_abdomen_labels.nii.gz",
                 init="affine", fixed_modality="ct", moving_modality="mr",
                 label_map=load_label_id_map(f / "mr_label_ids_to_ct_label_ids.json"), label_names=names or None)
    for m, p in todo:
        res, _ = register_row(pair, m, p, cfg)
        _append(rows_path, pair_rows(dataset, "real_mrct", "real", m, p, res, pair.fixed.spacing, cfg.tag))
        log.info(f"{dataset} {row_name(tagged(m, cfg.tag), p)}: Dice {np.nanmean([r['dice'] for r in res.metrics['labels']]):.3f}")


def initial_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The unregistered ``initial`` row set per (dataset, pair, label) from the recorded Dice before."""
    first = df.drop_duplicates(["dataset", "pair", "label"])
    ini = first.assign(method="initial", base_method="initial", preset="", dice=first["dice_initial"],
                       hd95_mm=np.nan, sdlogj=0.0, sdlogj_l2r=0.0, folding_pct=0.0, runtime_s=0.0)
    return ini


def tables(df: pd.DataFrame, presets) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results per task x row with Wilcoxon vs ``mind[<same preset>]``, per-organ Dice) of the tidy rows."""
    from .tables import per_organ_table, results_table

    full = pd.concat([initial_rows(df), df], ignore_index=True)
    parts = []
    for p in dict.fromkeys(df["preset"].tolist()):
        sub = full[(full["preset"] == p) | (full["method"] == "initial")]
        t = results_table(sub, reference=row_name(REFERENCE, p),
                          metrics=("dice", "hd95_mm", "sdlogj", "folding_pct", "runtime_s"))
        t["reference"] = f"{REFERENCE}[same preset]"
        if parts:
            t = t[t["method"] != "initial"]
        parts.append(t)
    res = pd.concat(parts, ignore_index=True)
    order = {d: i for i, d in enumerate(dict.fromkeys(full["dataset"].tolist()))}
    res = res.sort_values(["dataset"], key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    organ = per_organ_table(full, reference=row_name(REFERENCE, "official"))
    return res, organ


def untagged_name(row: str) -> str | None:
    """``dino3d[official]`` for the tagged row ``dino3d@v4[official]``; None for an untagged row."""
    m = re.fullmatch(r"(.+?)@[^\[\]]+\[(.+)\]", row)
    return row_name(m.group(1), m.group(2)) if m else None


def _against(df: pd.DataFrame, reference_of) -> pd.DataFrame:
    """Every row ``r`` with ``reference_of(r)`` present in ``df`` against that reference row, per task: pairs, means
    and the paired Wilcoxon of per-pair Dice (row - reference); empty when no row has its reference."""
    from .tables import results_table

    parts = []
    for row in dict.fromkeys(df["method"].tolist()):
        base = reference_of(row)
        if base is None or base not in set(df["method"]):
            continue
        t = results_table(df[df["method"].isin([row, base])], reference=base, metrics=("dice", "sdlogj",
                                                                                       "folding_pct", "runtime_s"))
        parts.append(t[t["method"] == row])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def tag_tables(df: pd.DataFrame) -> pd.DataFrame:
    """Every tagged row (other weights, ``--tag``) against its untagged row of the same method and preset, per task:
    pairs, means and the paired Wilcoxon of per-pair Dice (tagged - untagged); empty without tagged rows."""
    return _against(df, untagged_name)


def official_name(row: str) -> str | None:
    """``mind[official]`` for ``mind[tuned_2mm]`` (a tag stays: ``dino3d@x[tuned]`` -> ``dino3d@x[official]``); None
    for an ``official`` row or a name without a preset."""
    m = re.fullmatch(r"(.+)\[([^\[\]]+)\]", row)
    return row_name(m.group(1), "official") if m and m.group(2) != "official" else None


def preset_tables(df: pd.DataFrame) -> pd.DataFrame:
    """Every row with another preset against the same method (and tag) with its ``official`` preset, per task: does
    tuning help? Pairs, means and the paired Wilcoxon of per-pair Dice (row - official); empty without such pairs."""
    return _against(df, official_name)


def summary_table(res: pd.DataFrame) -> pd.DataFrame:
    """The results table wide, as strings: one line per row (``method[preset]``), one column per dataset (task) with
    ``mean Dice (pairs)`` and, where the row has a reference, ``Δ`` and the paired Wilcoxon p against it."""
    from .tables import format_p

    cols = list(dict.fromkeys(res["dataset"].tolist()))
    out = {}
    for _, r in res.iterrows():
        cell = f"{r['dice_mean']:.3f} ({int(r['pairs'])})"
        if np.isfinite(r.get("dice_diff_vs_ref", np.nan)):
            cell += f", {r['dice_diff_vs_ref']:+.3f} p {format_p(r['wilcoxon_p_vs_ref'])}"
        out.setdefault(r["method"], {})[r["dataset"]] = cell
    return pd.DataFrame([{"row": m, **{c: v.get(c, "") for c in cols}} for m, v in out.items()])


def write_tables(out: Path, df: pd.DataFrame, presets, title: str) -> dict:
    """``results.csv|md``, ``per_organ.csv|md`` and ``summary.csv|md`` of the tidy rows in ``out``;
    ``versus_untagged.csv|md`` too when there are tagged rows (``tag_tables``), ``versus_official.csv|md`` when
    there are rows of other presets beside their method's official row (``preset_tables``)."""
    from .tables import format_per_organ, format_results, write_table

    res, organ = tables(df, presets)
    a = write_table(res, format_results(res), out / "results", title=title)
    b = write_table(organ, format_per_organ(organ), out / "per_organ", title=title + ": Dice per organ")
    files = {"results": a, "per_organ": b}
    summ = summary_table(res)  # already strings: the numbers file and the formatted one are the same table
    files["summary"] = write_table(summ, summ, out / "summary",
                                   title=title + ": mean Dice (pairs), Δ and Wilcoxon p vs mind[same preset]")
    tt = tag_tables(df)
    if len(tt):
        files["versus_untagged"] = write_table(tt, format_results(tt), out / "versus_untagged",
                                               title=title + ": tagged rows against the same method and preset "
                                                             "untagged (reference = the untagged row)")
    pt = preset_tables(df)
    if len(pt):
        files["versus_official"] = write_table(pt, format_results(pt), out / "versus_official",
                                               title=title + ": each preset against the same method's official "
                                                             "preset (reference = the official row)")
    return files


def run_protocol(out, cfg: ProtocolConfig, *, progress: bool = True) -> dict:
    """Run (or resume) the protocol of the module docstring into ``out``; returns the written tables' paths."""
    from tqdm.auto import tqdm

    from ..data.cohorts import load_pairs
    from ..pipeline.presets import load_preset
    from .feature_memo import memoized_extraction
    from .tune import MODALITY

    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.csv"
    plan, notes = plan_rows(cfg)
    for n in notes:
        log.warning(n)
    if not plan:
        raise DinoregError("No method of the protocol can run here: " + "; ".join(notes))
    jp = evaluation_cohort(out, cfg)
    entries = round_robin(load_pairs(jp, kinds=tuple(cfg.tasks), n_per_kind=cfg.pairs_per_task), cfg.tasks)
    names_of = {(m, p): row_name(tagged(m, cfg.tag), p) for m, p in plan}
    presets_used = {names_of[m, p]: load_preset(m, p, _feature_options(cfg.method_settings.get(m, {}))).settings
                    for m, p in plan}
    used = weights_used(cfg)
    check_same_weights(out, used)
    write_json_atomic(out / "protocol.json", {"config": json.loads(json.dumps(asdict(cfg), default=str)),
                                              "cohort": str(jp), "rows": list(names_of.values()),
                                              "notes": notes, "presets": presets_used, "weights": used})
    meta = json.loads(Path(jp).read_text())
    cohort_name = meta.get("name", "cohort")
    names = {int(k): str(v) for k, v in (meta.get("labels") or {}).items() if str(k).isdigit()} or None
    done = _done(rows_path)
    from ..pipeline import align

    with memoized_extraction(cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else out / "feature_cache") as memo:
        bar = tqdm(total=len(entries) * len(plan), desc="protocol", unit="registration", disable=not progress)
        for e in entries:
            dataset = f"{cohort_name} {TASK_NAMES[e['task']]} {float(cfg.spacing_mm):g} mm"
            pair_name = f"{Path(e['fixed']).name.split('.')[0]}<-{Path(e['moving']).name.split('.')[0]}"
            todo = [(m, p) for m, p in plan if (dataset, pair_name, row_name(tagged(m, cfg.tag), p)) not in done]
            bar.update(len(plan) - len(todo))
            if not todo:
                continue
            fm, mm = MODALITY[e["task"]]
            pair = align(e["fixed"], e["moving"], fixed_labels=e["fixed_label"], moving_labels=e["moving_label"],
                         fixed_modality=fm, moving_modality=mm, label_names=names)
            for m, p in todo:
                res, _ = register_row(pair, m, p, cfg)
                _append(rows_path, pair_rows(dataset, e["task"], pair_name, m, p, res, pair.fixed.spacing, cfg.tag))
                bar.update(1)
                bar.set_postfix_str(f"{e['task']} {row_name(tagged(m, cfg.tag), p)} "
                                    f"{np.nanmean([r['dice'] for r in res.metrics['labels']]):.3f}")
        bar.close()
        if cfg.real_pair:
            real_pair_rows(Path(cfg.real_pair), plan, cfg, _done(rows_path), rows_path)
        log.info(f"feature memo: {memo.hits} hits, {memo.misses} extractions")
    df = pd.read_csv(rows_path)
    return write_tables(out, df, cfg.presets, f"Evaluation protocol ({float(cfg.spacing_mm):g} mm)")
