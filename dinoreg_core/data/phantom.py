"""Synthetic abdominal CT/MR cohort with the 13 Learn2Reg AbdomenCTCT organ labels.

Each subject is drawn from a seed (:mod:`.phantom_anatomy`): body habitus, spine, diaphragm and ~60 structures
(liver, spleen, kidneys with cortex/medulla/pelvis, stomach with an air-fluid level, pancreas, gallbladder,
esophagus, aorta, IVC, portal/splenic vein, adrenal glands, bowel loops with gas, colon with stool, psoas and
back muscles, vertebrae, ribs, lung bases, heart, pelvis). Shapes are smooth unions of ellipsoids and tubes
roughened by smooth random fields; between subjects organs change volume by up to +-25 %, move by 5-15 mm
and rotate by a few degrees, and the whole body is deformed by a smooth random field.

Every subject gets a CT (HU; native, arterial or portal-venous phase); the subjects chosen by
``mr_fraction`` / ``mr_subjects`` also get an MR (T1- or T2-like) of the same anatomy in another breathing state
and pose (:mod:`.phantom_raster`, :mod:`.phantom_appearance`), with its own label map.

Grid: canonical RAS, array axis 0 towards the patient's Right, 1 Anterior, 2 Superior; the affine is diagonal
(positive spacing), so ``nibabel.aff2axcodes(affine) == ('R','A','S')``; the liver lies at high axis-0
indices and the spleen at low ones, as in a real CT loaded with :func:`dinoreg_core.io.load_volume`.

:func:`generate_cohort` writes the Learn2Reg layout (``imagesTr/``, ``labelsTr/``, ``masksTr/``,
``<TASK>_dataset.json``) with CT-CT inter-patient pairs (``registration_val``) and MR-CT intra-patient pairs
(``registration_mrct``: fixed = CT, moving = MR of the same subject).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json_atomic
from ..errors import DinoregError
from .phantom_anatomy import LABELS, TISSUES, sample_anatomy
from .phantom_appearance import CT_PHASES, MR_CONTRASTS, render_ct, render_mr
from .phantom_geometry import NoiseField
from .phantom_raster import Pose, SubjectNoise, coordinate_field, grid_affine, rasterize

GENERATOR_VERSION = 1
_PROGRESS_FILE = ".phantom_progress.json"


@dataclass
class PhantomConfig:
    """Settings of a synthetic cohort (defaults: the demo cohort, 16 subjects at 3 mm).

    Attributes:
        n_subjects: number of subjects (cases 1..n_subjects).
        spacing_mm: isotropic voxel size (mm).
        shape: grid (D,H,W) in canonical RAS voxel order (axis 0 -> Right, 1 -> Anterior, 2 -> Superior).
            Learn2Reg AbdomenCTCT size: ``shape=(192, 160, 256), spacing_mm=2.0``.
        seed: cohort seed; subject ``c`` uses the seed ``subject_seed(seed, c)``.
        task: Learn2Reg task name (file prefix).
        modalities: "CT" and/or "MR" ("MR" alone is not allowed: pairs are defined against the CT).
        mr_fraction: fraction of subjects that also get an MR (spread evenly over the cases) ...
        mr_subjects: ... unless the case numbers (1-based) are listed here explicitly.
        mr_contrasts: MR contrast families cycled over the MR subjects ("t1", "t2").
        ct_phases: CT contrast phases drawn from per subject ("native", "arterial", "portal").
        n_val_subjects: the last ``n_val_subjects`` cases form ``registration_val`` (all unordered CT-CT pairs).
        variation: scales every between-subject variation (0 = the same nominal anatomy for all).
        deform_mm: standard deviation of each subject's smooth anatomy displacement (mm).
        fov_jitter_mm: standard deviation of the table position (field-of-view centre) per axis (mm).
        fov_centre_mm: body-frame point at the centre of the field of view (mm from the L1 vertebral body).
        breath_mm: range of the CT breathing state (inferior shift of the upper-abdominal organs, mm).
        mr_breath_change_mm: range of the breathing difference between a subject's MR and CT (mm).
        mr_pose_mm, mr_pose_deg: standard deviation of the MR's rigid pose change (mm per axis, deg per axis).
        threads: torch threads per process while generating (1 is fastest on a shared, busy CPU).
        workers: processes generating subjects in parallel in :func:`generate_cohort` (1 = in this process).
    """

    n_subjects: int = 16
    spacing_mm: float = 3.0
    shape: tuple = (128, 104, 112)
    seed: int = 0
    task: str = "SynthAbdomen"
    modalities: tuple = ("CT", "MR")
    mr_fraction: float = 0.5
    mr_subjects: tuple | None = None
    mr_contrasts: tuple = ("t1", "t2")
    ct_phases: tuple = ("native", "arterial", "portal")
    n_val_subjects: int = 5
    variation: float = 1.0
    deform_mm: float = 4.0
    fov_jitter_mm: float = 5.0
    fov_centre_mm: tuple = (0.0, 45.0, -20.0)
    breath_mm: tuple = (0.0, 15.0)
    mr_breath_change_mm: tuple = (6.0, 15.0)
    mr_pose_mm: float = 4.0
    mr_pose_deg: float = 2.0
    threads: int = 1
    workers: int = 2

    def validate(self) -> None:
        """Raise :class:`DinoregError` (one sentence) for an inconsistent configuration."""
        if int(self.workers) < 1 or int(self.threads) < 1:
            raise DinoregError(f"workers and threads must be at least 1, got {self.workers} and {self.threads}.")
        if int(self.n_subjects) < 1:
            raise DinoregError(f"n_subjects must be at least 1, got {self.n_subjects}.")
        if not float(self.spacing_mm) > 0:
            raise DinoregError(f"spacing_mm must be positive, got {self.spacing_mm}.")
        if len(tuple(self.shape)) != 3 or min(int(s) for s in self.shape) < 8:
            raise DinoregError(f"shape must be three sizes of at least 8 voxels, got {self.shape}.")
        mods = {m.upper() for m in self.modalities}
        if "CT" not in mods or not mods <= {"CT", "MR"}:
            raise DinoregError(f"modalities must be ('CT',) or ('CT', 'MR'), got {self.modalities}.")
        if not 0.0 <= float(self.mr_fraction) <= 1.0:
            raise DinoregError(f"mr_fraction must lie in [0, 1], got {self.mr_fraction}.")
        bad = [c for c in self.mr_contrasts if c not in MR_CONTRASTS]
        if bad or not self.mr_contrasts:
            raise DinoregError(f"mr_contrasts must be taken from {MR_CONTRASTS}, got {self.mr_contrasts}.")
        bad = [p for p in self.ct_phases if p not in CT_PHASES]
        if bad or not self.ct_phases:
            raise DinoregError(f"ct_phases must be taken from {CT_PHASES}, got {self.ct_phases}.")
        if self.mr_subjects is not None:
            bad = [c for c in self.mr_subjects if not 1 <= int(c) <= int(self.n_subjects)]
            if bad:
                raise DinoregError(f"mr_subjects holds case numbers outside 1..{self.n_subjects}: {bad}.")
        if not self.task or not str(self.task).replace("_", "").isalnum():
            raise DinoregError(f"task must be a non-empty name of letters, digits and underscores, got '{self.task}'.")

    def mr_cases(self) -> list[int]:
        """Case numbers (1-based) that get an MR."""
        if "MR" not in {m.upper() for m in self.modalities}:
            return []
        if self.mr_subjects is not None:
            return sorted({int(c) for c in self.mr_subjects})
        k = int(round(float(self.mr_fraction) * self.n_subjects))
        if k == 0:
            return []
        return sorted({int(c) for c in np.round(np.linspace(1, self.n_subjects, k)).astype(int)})

    def as_dict(self) -> dict:
        """The settings that determine the cohort's content, as JSON-compatible values (``threads`` and
        ``workers`` only change the speed and are left out)."""
        d = asdict(self)
        d.pop("threads")
        d.pop("workers")
        return json.loads(json.dumps(d))  # tuples -> lists, so it compares equal to the JSON round trip


def subject_seed(cohort_seed: int, case: int) -> int:
    """Seed of case ``case`` (1-based) in a cohort with seed ``cohort_seed``."""
    return int(np.random.SeedSequence([int(cohort_seed), int(case)]).generate_state(1)[0])


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    if n and n > 0:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _streams(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(n)]


def generate_subject(seed: int, cfg: PhantomConfig | None = None, *, with_mr: bool = True,
                     mr_contrast: str | None = None, ct_phase: str | None = None, images: bool = True) -> dict:
    """Generate one synthetic subject in memory.

    Args:
        seed: the subject's seed (same seed and config -> identical arrays).
        cfg: grid, variation and acquisition settings (:class:`PhantomConfig`; defaults if None).
        with_mr: also make an MR of the same anatomy in another breathing state and pose.
        mr_contrast: "t1" or "t2" (default: drawn from ``cfg.mr_contrasts``).
        ct_phase: "native", "arterial" or "portal" (default: drawn from ``cfg.ct_phases``).
        images: False: no CT or MR rendering (``ct`` / ``mr`` are None); the maps are the same as with True
            (the renderers draw from their own random streams), for callers that render the tissue map themselves.

    Returns:
        dict with
        ``ct`` (D,H,W) float32 HU; ``labels`` (D,H,W) uint8 Learn2Reg ids 0..13; ``mask`` (D,H,W) uint8 body mask;
        ``tissue`` (D,H,W) uint8 tissue ids (names in ``tissue_names``); ``affine`` (4,4) RAS voxel -> mm;
        ``spacing`` (mm); when ``with_mr``: ``mr`` (D,H,W) float32 (>= 0, arbitrary units), ``mr_labels``,
        ``mr_mask``, ``mr_tissue`` on the same grid; ``meta``: the drawn settings (phase, contrast, breathing
        states, poses, per-tissue mean intensities).
    """
    cfg = cfg or PhantomConfig()
    cfg.validate()
    shape, sp = tuple(int(s) for s in cfg.shape), float(cfg.spacing_mm)
    r_anat, r_noise, r_pose, r_ct, r_mr, r_mrpose = _streams(seed, 6)
    with _torch_threads(cfg.threads):
        anat = sample_anatomy(r_anat, variation=cfg.variation)
        noise = SubjectNoise.sample(r_noise)
        v = float(cfg.variation)
        phase = ct_phase or str(r_pose.choice(list(cfg.ct_phases)))
        contrast = mr_contrast or str(r_pose.choice(list(cfg.mr_contrasts)))
        centre = np.asarray(cfg.fov_centre_mm, np.float64) + v * cfg.fov_jitter_mm * np.clip(r_pose.normal(size=3), -2.5, 2.5)
        rot = v * np.clip(r_pose.normal(0.0, 2.0, 3), -5.0, 5.0)
        b_ct = float(r_pose.uniform(*cfg.breath_mm))
        pose_ct = Pose(centre, rot, b_ct, cfg.deform_mm * v)
        f = coordinate_field(shape, sp, anat, noise, pose_ct)
        tissue, labels = rasterize(anat, noise, f)
        del f
        ct, ct_info = render_ct(tissue, r_ct, sp, phase) if images else (None, {"noise_hu": None, "blur_mm": None,
                                                                                "means": np.zeros(len(TISSUES))})
        out = dict(ct=ct, labels=labels.numpy(), mask=(tissue > 0).numpy().astype(np.uint8), tissue=tissue.numpy(),
                   affine=grid_affine(shape, sp), spacing=sp, tissue_names=TISSUES)
        meta = dict(seed=int(seed), ct_phase=phase, ct_breath_mm=b_ct, ct_fov_centre_mm=centre.tolist(),
                    ct_rotation_deg=rot.tolist(), ct_noise_hu=ct_info["noise_hu"], ct_blur_mm=ct_info["blur_mm"],
                    ct_tissue_means=dict(zip(TISSUES, ct_info["means"].tolist())))
        if with_mr:
            lo, hi = cfg.mr_breath_change_mm
            change = float(r_mrpose.uniform(lo, hi))
            up = b_ct + change <= cfg.breath_mm[1] + 5.0
            down = b_ct - change >= cfg.breath_mm[0] - 5.0
            sign = (1.0 if r_mrpose.random() < 0.5 else -1.0) if (up and down) else (1.0 if up else -1.0)
            b_mr = b_ct + sign * change
            c_mr = centre + r_mrpose.normal(0.0, cfg.mr_pose_mm, 3)
            rot_mr = rot + np.clip(r_mrpose.normal(0.0, cfg.mr_pose_deg, 3), -3 * cfg.mr_pose_deg, 3 * cfg.mr_pose_deg)
            extra = NoiseField(r_mrpose, (-260, -200, -420), (260, 260, 420), 30.0, 3, 1.2)
            pose_mr = Pose(c_mr, rot_mr, b_mr, cfg.deform_mm * v, extra_mm=2.0)
            f = coordinate_field(shape, sp, anat, noise, pose_mr, extra=extra)
            mr_tissue, mr_labels = rasterize(anat, noise, f)
            del f
            mr, mr_info = render_mr(mr_tissue, r_mr, sp, contrast) if images else (
                None, {"bias_sd": None, "noise_sd": None, "means": np.zeros(len(TISSUES))})
            out.update(mr=mr, mr_labels=mr_labels.numpy(), mr_mask=(mr_tissue > 0).numpy().astype(np.uint8),
                       mr_tissue=mr_tissue.numpy())
            meta.update(mr_contrast=contrast, mr_breath_mm=b_mr, mr_fov_centre_mm=c_mr.tolist(),
                        mr_rotation_deg=rot_mr.tolist(), mr_bias_sd=mr_info["bias_sd"], mr_noise_sd=mr_info["noise_sd"],
                        mr_tissue_means=dict(zip(TISSUES, mr_info["means"].tolist())))
        out["meta"] = meta
    return out


# --------------------------------------------------------------------------------------------- cohort

def _names(task: str, case: int) -> dict:
    return {m: f"{task}_{case:04d}_{m}.nii.gz" for m in ("0000", "0001")}


def _files_of_case(root: Path, task: str, case: int, with_mr: bool) -> list[Path]:
    n = _names(task, case)
    mods = ["0000", "0001"] if with_mr else ["0000"]
    return [root / d / n[m] for m in mods for d in ("imagesTr", "labelsTr", "masksTr")]


def dataset_json(cfg: PhantomConfig, subjects_meta: list[dict]) -> dict:
    """The ``<TASK>_dataset.json`` content of a cohort (paths relative to the json, Learn2Reg style)."""
    task, n = cfg.task, int(cfg.n_subjects)
    mr = set(cfg.mr_cases())
    img = lambda c, m: f"./imagesTr/{task}_{c:04d}_{m}.nii.gz"
    training = []
    for c in range(1, n + 1):
        for m in (["0000", "0001"] if c in mr else ["0000"]):
            training.append({"image": img(c, m), "label": img(c, m).replace("imagesTr", "labelsTr"),
                             "mask": img(c, m).replace("imagesTr", "masksTr")})
    val_cases = list(range(max(1, n - int(cfg.n_val_subjects) + 1), n + 1))
    val = [{"fixed": img(a, "0000"), "moving": img(b, "0000")} for a, b in itertools.combinations(val_cases, 2)]
    mrct = [{"fixed": img(c, "0000"), "moving": img(c, "0001")} for c in sorted(mr)]
    labels = {"0": "background", **{str(k): v for k, v in LABELS.items()}}
    return {
        "name": task,
        "description": "Synthetic abdominal CT/MR cohort (dinoreg phantom): 13 Learn2Reg AbdomenCTCT organ labels, "
                       "inter-patient CT-CT pairs and intra-patient MR-CT pairs (MR in another breathing state and pose).",
        "tensorImageSize": "3D",
        "tensorImageShape": {"0": list(cfg.shape)},
        "modality": {"0": "CT", "1": "MR"},
        "labels": labels,
        "numTraining": len(training),
        "training": training,
        "registration_val": val,
        "registration_mrct": mrct,
        "subjects": subjects_meta,
        "generator": {"config": cfg.as_dict(), "seed": int(cfg.seed), "version": GENERATOR_VERSION},
    }


def _write_case(root: Path, cfg: PhantomConfig, case: int, with_mr: bool) -> dict:
    from ..io import save_nifti  # local import keeps the generator importable without nibabel at import time

    seed = subject_seed(cfg.seed, case)
    contrasts = list(cfg.mr_contrasts)
    mr_cases = cfg.mr_cases()
    contrast = contrasts[mr_cases.index(case) % len(contrasts)] if with_mr else None
    s = generate_subject(seed, cfg, with_mr=with_mr, mr_contrast=contrast)
    n = _names(cfg.task, case)
    aff = s["affine"]
    ct = np.clip(np.rint(s["ct"]), -1024, 3071).astype(np.int16)
    save_nifti(ct, aff, root / "imagesTr" / n["0000"])
    save_nifti(s["labels"].astype(np.uint8), aff, root / "labelsTr" / n["0000"])
    save_nifti(s["mask"].astype(np.uint8), aff, root / "masksTr" / n["0000"])
    if with_mr:
        mr = np.clip(np.rint(s["mr"]), 0, 32767).astype(np.int16)
        save_nifti(mr, aff, root / "imagesTr" / n["0001"])
        save_nifti(s["mr_labels"].astype(np.uint8), aff, root / "labelsTr" / n["0001"])
        save_nifti(s["mr_mask"].astype(np.uint8), aff, root / "masksTr" / n["0001"])
    meta = {k: v for k, v in s["meta"].items() if not k.endswith("tissue_means")}
    meta["case"] = case
    write_json_atomic(root / "imagesTr" / f".{cfg.task}_{case:04d}.meta.json", meta)
    return meta


def generate_cohort(out_dir, cfg: PhantomConfig | None = None, *, progress: bool = True) -> Path:
    """Write a synthetic cohort in the Learn2Reg layout and return the path of its ``<TASK>_dataset.json``.

    Files: ``imagesTr/<TASK>_CCCC_0000.nii.gz`` (CT, int16 HU), ``imagesTr/<TASK>_CCCC_0001.nii.gz`` (MR, int16),
    the same names under ``labelsTr/`` (uint8, Learn2Reg ids) and ``masksTr/`` (uint8 body masks). Every file is
    written atomically; the json comes last.

    Resumable and idempotent: a folder that already holds a complete cohort made with the same config is
    returned at once; an interrupted run with the same config resumes at the first incomplete case. A folder
    holding a cohort (or part of one) made with another config raises :class:`DinoregError`.
    """
    from tqdm.auto import tqdm

    cfg = cfg or PhantomConfig()
    cfg.validate()
    root = Path(out_dir)
    want = cfg.as_dict()
    json_path = root / f"{cfg.task}_dataset.json"
    mr = set(cfg.mr_cases())
    cases = list(range(1, int(cfg.n_subjects) + 1))
    if json_path.exists():
        try:
            have = json.loads(json_path.read_text()).get("generator", {}).get("config")
        except (OSError, json.JSONDecodeError):
            have = None
        if have != want:
            raise DinoregError(f"The folder {root} already holds a cohort {json_path.name} made with another "
                               f"configuration; choose another folder or delete it.")
        if all(p.exists() for c in cases for p in _files_of_case(root, cfg.task, c, c in mr)):
            return json_path
    try:
        for d in ("imagesTr", "labelsTr", "masksTr"):
            (root / d).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DinoregError(f"The output folder {root} cannot be created ({e.strerror or e}).") from None
    marker = root / _PROGRESS_FILE
    if marker.exists():
        try:
            have = json.loads(marker.read_text()).get("config")
        except (OSError, json.JSONDecodeError):
            have = None
        if have != want:
            raise DinoregError(f"The folder {root} holds part of a cohort made with another configuration; "
                               f"choose another folder or delete it.")
    write_json_atomic(marker, {"config": want, "version": GENERATOR_VERSION})
    metas: dict[int, dict] = {}
    todo = []
    for case in cases:
        meta_path = root / "imagesTr" / f".{cfg.task}_{case:04d}.meta.json"
        if meta_path.exists() and all(p.exists() for p in _files_of_case(root, cfg.task, case, case in mr)):
            metas[case] = json.loads(meta_path.read_text())
        else:
            todo.append(case)
    bar = tqdm(total=len(cases), initial=len(cases) - len(todo), desc="phantom cohort", unit="subject",
               disable=not progress)
    workers = min(int(cfg.workers), len(todo))
    if workers <= 1:
        for case in todo:
            metas[case] = _write_case(root, cfg, case, case in mr)
            bar.update(1)
    else:
        # spawned (not forked) processes: a forked OpenMP runtime can deadlock
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_write_case, root, cfg, case, case in mr): case for case in todo}
            for fut in as_completed(futures):
                metas[futures[fut]] = fut.result()
                bar.update(1)
    bar.close()
    metas = [metas[c] for c in cases]
    write_json_atomic(json_path, dataset_json(cfg, metas))
    marker.unlink(missing_ok=True)
    return json_path
