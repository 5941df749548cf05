"""Datasets and pairs of the evaluation tasks: the synthetic cohort generated into a run folder, a fetched
Learn2Reg dataset by manifest name, or any folder in the Learn2Reg layout; CT-CT and MR-CT pair lists of them."""

from __future__ import annotations

from pathlib import Path

from ..errors import DinoregError
from .runner import PairSpec, pairs_from_l2r

TASKS = {"ctct": "CT-CT", "mrct": "MR-CT"}


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
    pairs = pairs_from_l2r(ds, key, init=init, limit=limit, modalities=mods or None)
    want = {"ctct": {("ct", "ct")}, "mrct": {("ct", "mr"), ("mr", "ct")}}[task]
    if mods and any((p.fixed_modality, p.moving_modality) not in want for p in pairs):
        raise DinoregError(f"The pair list {key} of {ds.name} is not {TASKS[task]}; choose the other task.")
    if not pairs:
        raise DinoregError(f"The pair list {key} of {ds.name} is empty.")
    return pairs, dict(ds.labels), f"{ds.name} {TASKS[task]}"


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
