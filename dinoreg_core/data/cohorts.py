"""Cohorts by role: one place that fixes the seeds of the pretraining stream and of the tuning, validation and
evaluation cohorts, and writes each cohort in the Learn2Reg layout with inter-patient pairs.

Roles (:data:`ROLE_SEEDS`; DESIGN.md section 7):

* ``pretrain``: the seed of the streamed pretraining subjects (:mod:`dinoreg_core.data.stream`; the pretraining
  config's ``stream.seed`` defaults to it);
* ``tuning``: registration presets are tuned on it (``dinoreg tune``);
* ``validation``: checkpoints are selected on it during pretraining (:mod:`dinoreg_core.ssl.select`);
* ``evaluation``: the README tables; it also holds an appearance that pretraining never uses (the held-back
  ``pd`` family of :mod:`dinoreg_core.data.render`).

Subject c (1-based) of a cohort has the phantom seed ``subject_seed(ROLE_SEEDS[role], c)``; stream subject k has
``subject_seed(ROLE_SEEDS["pretrain"], k + 1)``. These are hashes of (role seed, index), so no subject of one role
is a subject of another (:func:`role_subject_seeds`; a test checks the first 20,000 stream subjects against every
cohort case).

Every case of a cohort has a CT (``_0000``) and an MR (``_0001``, T1 or T2 alternating) of the same anatomy in
another breathing state and pose; the evaluation cohort also an MR with the held-back appearance (``_0002``,
rendered from the MR's own tissue map, so ``labelsTr/..._0001`` serves it too). Pairs in ``<TASK>_dataset.json``
(inter-patient only: cases (c, c+1), cyclically, so n cases give n pairs per task):

* ``registration_ctct``: CT of c -> CT of c+1 (fixed, moving);
* ``registration_mrmr``: MR of c -> MR of c+1;
* ``registration_mrct``: CT of c (fixed) -> MR of c+1 (moving), the AbdomenMRCT direction;
* evaluation only: ``registration_mrmr_heldout`` (held-back MR -> held-back MR) and ``registration_mrct_heldout``
  (CT fixed, held-back MR moving);

each entry holds ``fixed``, ``moving``, ``fixed_label``, ``moving_label`` (paths relative to the json). The
phantom's own lists (``registration_val``, intra-patient ``registration_mrct`` of the generator) are replaced by
these.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json_atomic
from ..errors import DinoregError
from .phantom import PhantomConfig, generate_cohort, generate_subject, subject_seed

ROLE_SEEDS = {"pretrain": 14_001, "tuning": 14_002, "validation": 14_003, "evaluation": 14_004}
COHORT_ROLES = ("tuning", "validation", "evaluation")
HELD_BACK_FAMILY = "pd"                        # dinoreg_core.data.render.HELD_BACK_FAMILIES
HELD_BACK_MODALITY = "0002"
TASKS = ("ctct", "mrmr", "mrct")
HELD_BACK_TASKS = ("mrmr_heldout", "mrct_heldout")


def role_config(role: str, n_subjects: int = 10, **overrides) -> PhantomConfig:
    """The phantom settings of a role's cohort: every case with CT and MR, 3 mm, the role's seed."""
    if role not in COHORT_ROLES:
        raise DinoregError(f"Unknown cohort role '{role}'; choose from {', '.join(COHORT_ROLES)}.")
    base = PhantomConfig(n_subjects=int(n_subjects), seed=ROLE_SEEDS[role], task=f"Synth{role.capitalize()}",
                         mr_fraction=1.0, n_val_subjects=0)
    return replace(base, **overrides)


def role_subject_seeds(role: str, n: int) -> list[int]:
    """Phantom seeds of the first ``n`` subjects of ``role`` (stream subjects for ``pretrain``)."""
    if role == "pretrain":
        from .stream import stream_subject_seed

        return [stream_subject_seed(ROLE_SEEDS["pretrain"], k) for k in range(int(n))]
    return [subject_seed(ROLE_SEEDS[role], c) for c in range(1, int(n) + 1)]


def _entry(task: str, kind: str, fixed_case: int, moving_case: int) -> dict:
    mod = {"ct": "0000", "mr": "0001", "heldout": HELD_BACK_MODALITY}
    lab = {"ct": "0000", "mr": "0001", "heldout": "0001"}           # the held-back MR shares the MR's labels
    f_kind, m_kind = kind.split("-")

    def path(d, case, m):
        return f"./{d}/{task}_{case:04d}_{m}.nii.gz"

    return {"fixed": path("imagesTr", fixed_case, mod[f_kind]), "moving": path("imagesTr", moving_case, mod[m_kind]),
            "fixed_label": path("labelsTr", fixed_case, lab[f_kind]),
            "moving_label": path("labelsTr", moving_case, lab[m_kind])}


def inter_patient_pairs(task: str, n_subjects: int, *, held_back: bool = False) -> dict[str, list[dict]]:
    """The pair lists of a cohort (module docstring): key ``registration_<kind>`` -> entries."""
    n = int(n_subjects)
    if n < 2:
        raise DinoregError(f"An inter-patient cohort needs at least 2 subjects, got {n}.")
    cycle = [(c, c % n + 1) for c in range(1, n + 1)] if n > 2 else [(1, 2)]
    kinds = {"ctct": "ct-ct", "mrmr": "mr-mr", "mrct": "ct-mr"}
    if held_back:
        kinds.update(mrmr_heldout="heldout-heldout", mrct_heldout="ct-heldout")
    return {f"registration_{name}": [_entry(task, kind, a, b) for a, b in cycle] for name, kind in kinds.items()}


def _write_held_back(root: Path, cfg: PhantomConfig, case: int) -> None:
    """``imagesTr/<TASK>_CCCC_0002.nii.gz``: the held-back appearance rendered from case's MR tissue map."""
    from ..io import save_nifti
    from .render import render_hu_like

    out = root / "imagesTr" / f"{cfg.task}_{case:04d}_{HELD_BACK_MODALITY}.nii.gz"
    if out.exists():
        return
    seed = subject_seed(cfg.seed, case)
    s = generate_subject(seed, cfg, with_mr=True, images=False)
    img = render_hu_like(torch.from_numpy(s["mr_tissue"]), seed + 1, HELD_BACK_FAMILY, float(cfg.spacing_mm))
    save_nifti(np.clip(np.rint(img), 0, 32767).astype(np.int16), s["affine"], out)


def generate_role_cohort(out_dir, role: str, n_subjects: int = 10, *, progress: bool = True,
                         **overrides) -> Path:
    """Write the cohort of ``role`` (Learn2Reg layout, module docstring) and return its dataset json path.

    Resumable like :func:`dinoreg_core.data.phantom.generate_cohort` (the same folder and settings return at once).
    ``overrides`` change :class:`PhantomConfig` fields (e.g. ``spacing_mm=4.0, shape=(96, 78, 84)`` for a small
    validation cohort); the seed is the role's.
    """
    if "seed" in overrides:
        raise DinoregError("A role cohort's seed is fixed by its role (dinoreg_core.data.cohorts.ROLE_SEEDS).")
    cfg = role_config(role, n_subjects, **overrides)
    root = Path(out_dir)
    json_path = generate_cohort(root, cfg, progress=progress)
    held_back = role == "evaluation"
    if held_back:
        for case in range(1, cfg.n_subjects + 1):
            _write_held_back(root, cfg, case)
    d = json.loads(json_path.read_text())
    d.pop("registration_val", None)
    d.pop("registration_mrct", None)
    d.update(inter_patient_pairs(cfg.task, cfg.n_subjects, held_back=held_back))
    d["role"] = role
    d["description"] = (f"Synthetic abdominal cohort for the '{role}' role (dinoreg phantom, seed "
                        f"{cfg.seed}): CT (_0000) and MR (_0001) of every case; inter-patient CT-CT, MR-MR and "
                        f"MR-CT pairs" + (f"; held-back MR appearance '{HELD_BACK_FAMILY}' (_0002)" if held_back
                                          else "") + ".")
    if held_back:
        d["modality"] = {"0": "CT", "1": "MR", "2": "MR"}
        d["held_back_appearance"] = HELD_BACK_FAMILY
    write_json_atomic(json_path, d)
    return json_path


def load_pairs(dataset_json, kinds=TASKS, n_per_kind: int | None = None) -> list[dict]:
    """Absolute-path pair entries of a role cohort: ``[{"task", "fixed", "moving", "fixed_label", "moving_label"}]``,
    the first ``n_per_kind`` of each kind (all when None)."""
    p = Path(dataset_json)
    if p.is_dir():
        found = sorted(p.glob("*_dataset.json"))
        if not found:
            raise DinoregError(f"The folder {p} holds no *_dataset.json.")
        p = found[0]
    if not p.is_file():
        raise DinoregError(f"The cohort dataset json {p} does not exist.")
    d = json.loads(p.read_text())
    out = []
    for kind in kinds:
        entries = d.get(f"registration_{kind}")
        if entries is None:
            raise DinoregError(f"The cohort {p} has no 'registration_{kind}' pairs (was it made by "
                               f"dinoreg_core.data.cohorts?).")
        for e in entries[: n_per_kind if n_per_kind is not None else len(entries)]:
            out.append({"task": kind, **{k: str((p.parent / v).resolve()) for k, v in e.items()}})
    return out
