"""Initial (global) alignment of scans whose world coordinates are unrelated.

Every function returns a (4,4) matrix ``T`` mapping *fixed world* points (mm, RAS) to *moving world* points,
so the moving image resampled onto the fixed grid is ``moving(T @ world(x))``
(:func:`dinoreg_core.preprocess.resample_to` with ``world_transform=T``).

Methods:

* ``none`` — identity: trust the scanners' world coordinates.
* ``com`` — translation that superimposes the centres of mass of the two body masks (assumes both scans show
  the same body region).
* ``affine`` — for scans that may share only PART of their extent (a chest-abdomen CT against an
  abdomen-pelvis CT, an MR slab against a full CT): a coarse search over rotations (0 and +-15 degrees about
  each world axis), optional scales and *every* translation, scored by the MIND-SSC SSD on the overlap only;
  the best few starts plus the centre-of-mass and header starts are refined by an affine Adam fit on the same
  overlap cost and the one with the highest MIND concordance correlation on the overlap wins
  (:mod:`dinoreg_core.registration.overlap_search`). MIND makes it work across MR and CT. It refuses, in one
  sentence, when no start reaches a plausible score.

:func:`initial_alignment_report` returns the transform and an :class:`InitReport` (which start won, its score,
the shared body fraction, every candidate) for metrics.json; :func:`initial_alignment` returns the transform.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import DinoregError
from ..io import Volume
from ..preprocess import foreground_mask, guess_modality, world_overlap_fraction
from .overlap_search import (candidate_grid, coarse_scan, fixed_spectra, overlap_score, overlap_translation_search,
                             refine_affine, rotation_matrix, shift_to_transform)


def _com_world(vol: Volume, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return vol.affine[:3, :3] @ idx + vol.affine[:3, 3]


def translation(v: np.ndarray) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = v
    return t


def com_alignment(fixed: Volume, moving: Volume, fixed_modality: str, moving_modality: str) -> np.ndarray:
    """Translation superimposing the body-mask centres of mass (fixed world -> moving world)."""
    mf = foreground_mask(fixed.array, fixed_modality)
    mm = foreground_mask(moving.array, moving_modality)
    if not mf.any() or not mm.any():
        raise DinoregError("The centre-of-mass alignment found no body in one of the scans.")
    return translation(_com_world(moving, mm) - _com_world(fixed, mf))


@dataclass
class InitConfig:
    """Settings of the partial-field-of-view ``affine`` alignment (:mod:`.overlap_search`).

    ``min_score`` calibration (MIND concordance on the overlap, measured): an unrelated smooth-noise "body"
    against a real CT about 0.15; the real MR slab against the real CT (different people) 0.30-0.37; the real
    CT against a rotated, shifted part of itself 0.95-0.98.
    """

    search_mm: float = 8.0               # grid spacing of the rotation x scale x translation search (mm)
    refine_mm: float = 3.0               # grid spacing of the final affine refinement and of the score (mm)
    rotations_deg: float = 15.0          # candidate rotations: 0 and +-this about each world axis
    scales: tuple = (1.0,)               # candidate isotropic scales of the moving body
    min_overlap: float = 0.2             # shared body voxels >= this x the smaller body (search and result)
    min_score: float = 0.25              # refuse below this MIND concordance on the overlap (calibration above)
    n_refine: int = 3                    # best search candidates refined by Adam (plus the com/header starts)
    top_per_candidate: int = 2           # shifts kept per rotation/scale candidate
    coarse_iterations: int = 40          # Adam iterations refining every start on the search grid
    coarse_points: int = 8000            # fixed voxels drawn per iteration there
    iterations: int = 150                # Adam iterations refining the winner on the refine grid
    points: int = 20000                  # fixed voxels drawn per iteration there
    duplicate_mm: float = 6.0            # starts whose refined maps move the fixed body by less are duplicates
    lr: float = 0.01                     # Adam learning rate (normalised units)
    linear_penalty: float = 10.0         # weight of |A^T A / s0^2 - I|^2: scaling/shear off the start's scale s0
    mind_r: int = 1
    mind_d: int = 1


@dataclass
class InitReport:
    """What the initial alignment did, for metrics.json (:meth:`as_dict`).

    method: "none" | "com" | "affine"; chosen: which start won ("search", "com", "header" or the method);
    score: concordance correlation of MIND-SSC on the overlap at the result (1 = identical, ~0 = unrelated;
    None for "none"/"com"); shared_fraction: shared body voxels / smaller body; candidates: one dict per refined
    start (start, rotation_deg, scale, search_cost, score, shared_fraction); seconds: wall time.
    """

    method: str
    chosen: str
    score: float | None = None
    shared_fraction: float | None = None
    candidates: list = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _linear_candidates(cfg: InitConfig) -> list[tuple[tuple, float, np.ndarray]]:
    rots = [(0.0, 0.0, 0.0)]
    if cfg.rotations_deg:
        for axis in range(3):
            for sign in (-1.0, 1.0):
                r = [0.0, 0.0, 0.0]
                r[axis] = sign * cfg.rotations_deg
                rots.append(tuple(r))
    out = []
    for s in cfg.scales:
        if not s > 0:
            raise DinoregError(f"Initial-alignment scale {s} must be positive.")
        for r in rots:
            out.append((r, float(s), s * rotation_matrix(r)))
    return out


def affine_alignment_report(fixed: Volume, moving: Volume, fixed_modality: str, moving_modality: str,
                            cfg: InitConfig | None = None) -> tuple[np.ndarray, InitReport]:
    """Affine fixed-world -> moving-world transform for scans that may share only part of their extent.

    Search (``search_mm``): for 0 and +-``rotations_deg`` about each world axis (times each of ``scales``) every
    translation is scored by the MIND SSD over the overlap only (:func:`overlap_translation_search`); the
    ``n_refine`` best, the centre-of-mass translation and the scanners' own world coordinates (when the scans
    overlap there) are each refined briefly by Adam on the search grid; the one with the highest MIND
    concordance correlation on the overlap wins and is refined further on the ``refine_mm`` grid. Raises
    :class:`DinoregError` when no start reaches ``min_score`` with at least ``min_overlap`` of the smaller body
    shared (checked after the coarse stage and again at the end).
    """
    cfg = cfg or InitConfig()
    t0 = time.perf_counter()
    fs = coarse_scan(fixed, fixed_modality, cfg.search_mm, cfg.mind_r, cfg.mind_d)
    ms = coarse_scan(moving, moving_modality, cfg.search_mm, cfg.mind_r, cfg.mind_d)
    if not fs.body.any() or not ms.body.any():
        which = "moving" if fs.body.any() else "fixed"
        raise DinoregError(f"The affine alignment found no body in the {which} scan.")
    cands_lin = [(rot, scale, lin, candidate_grid(ms, lin, cfg.search_mm, cfg.mind_r, cfg.mind_d))
                 for rot, scale, lin in _linear_candidates(cfg)]
    biggest = np.max([c.feat.shape[1:] for *_, c in cands_lin], axis=0)
    spectra = fixed_spectra(fs, tuple(int(f + m) for f, m in zip(fs.feat.shape[1:], biggest)))
    found = []
    for rot, scale, lin, cand in cands_lin:
        for c in overlap_translation_search(fs, cand, cfg.min_overlap, cfg.top_per_candidate, spectra=spectra):
            found.append((c.cost, rot, scale, shift_to_transform(fs, cand, lin, c.shift)))
    found.sort(key=lambda f: f[0])
    starts = [("search", rot, scale, cost, t) for cost, rot, scale, t in found[:cfg.n_refine]]
    try:
        starts.append(("com", None, 1.0, None, com_alignment(fixed, moving, fixed_modality, moving_modality)))
    except DinoregError:
        pass
    if world_overlap_fraction(fixed, moving) > 0.0:
        starts.append(("header", None, 1.0, None, np.eye(4)))
    # every start: a short Adam refinement and its score on the search grid; duplicates are dropped
    centre = _body_centre_world(fs)
    refined, cands = [], []
    for name, rot, scale, cost, t in starts:
        t = refine_affine(fs, ms, t, cfg.coarse_iterations, cfg.lr, cfg.linear_penalty, cfg.coarse_points)
        score, shared = overlap_score(fs, ms, t)
        dup = any(np.linalg.norm((t - r[3])[:3] @ np.append(centre, 1.0)) < cfg.duplicate_mm for r in refined)
        cands.append({"start": name, "rotation_deg": list(rot) if rot else None, "scale": scale,
                      "search_cost": cost, "score": score, "shared_fraction": shared, "duplicate": bool(dup)})
        if not dup:
            refined.append((score, shared, name, t))
    ok = [r for r in refined if r[1] >= cfg.min_overlap]
    best = max(ok, key=lambda r: r[0]) if ok else None
    if best is None or best[0] < cfg.min_score:
        _refuse(fixed, moving, cfg, best[0] if best else None, best[1] if best else None)
    _, _, name, t = best
    # the winner: a longer refinement on the finer grid, scored there
    fr = coarse_scan(fixed, fixed_modality, cfg.refine_mm, cfg.mind_r, cfg.mind_d)
    mr = coarse_scan(moving, moving_modality, cfg.refine_mm, cfg.mind_r, cfg.mind_d)
    t = refine_affine(fr, mr, t, cfg.iterations, cfg.lr, cfg.linear_penalty, cfg.points)
    score, shared = overlap_score(fr, mr, t)
    if score < cfg.min_score or shared < cfg.min_overlap:
        _refuse(fixed, moving, cfg, score, shared)
    return t, InitReport("affine", name, score, shared, cands, time.perf_counter() - t0)


def _refuse(fixed: Volume, moving: Volume, cfg: InitConfig, score, shared) -> None:
    got = (f"best MIND concordance {score:.3f} with {100 * shared:.0f}% of the smaller body shared" if score is not None
           else "no position shares enough body")
    raise DinoregError(f"The scans {fixed.path or 'fixed'} and {moving.path or 'moving'} show no plausible common "
                       f"anatomy ({got}; needs >= {cfg.min_score} and >= {100 * cfg.min_overlap:.0f}%), so no initial "
                       "alignment was made.")


def _body_centre_world(scan) -> np.ndarray:
    idx = np.argwhere(scan.body.numpy() > 0).mean(0)
    return scan.vol.affine[:3, :3] @ idx + scan.vol.affine[:3, 3]


def affine_alignment(fixed: Volume, moving: Volume, fixed_modality: str, moving_modality: str,
                     cfg: InitConfig | None = None) -> np.ndarray:
    """Partial-field-of-view affine alignment (fixed world -> moving world); see :func:`affine_alignment_report`."""
    return affine_alignment_report(fixed, moving, fixed_modality, moving_modality, cfg)[0]


def initial_alignment_report(fixed: Volume, moving: Volume, method: str = "none", *,
                             fixed_modality: str | None = None, moving_modality: str | None = None,
                             cfg: InitConfig | None = None) -> tuple[np.ndarray, InitReport]:
    """((4,4) fixed-world -> moving-world transform, :class:`InitReport`) by ``method`` in {none, com, affine}."""
    fm = fixed_modality or guess_modality(fixed.array)
    mm = moving_modality or guess_modality(moving.array)
    t0 = time.perf_counter()
    if method == "none":
        return np.eye(4), InitReport("none", "none", seconds=0.0)
    if method == "com":
        t = com_alignment(fixed, moving, fm, mm)
        return t, InitReport("com", "com", seconds=time.perf_counter() - t0)
    if method == "affine":
        return affine_alignment_report(fixed, moving, fm, mm, cfg)
    raise DinoregError(f"Unknown initial alignment '{method}'; use none, com or affine.")


def initial_alignment(fixed: Volume, moving: Volume, method: str = "none", *, fixed_modality: str | None = None,
                      moving_modality: str | None = None, cfg: InitConfig | None = None) -> np.ndarray:
    """(4,4) fixed-world -> moving-world transform by ``method`` in {"none", "com", "affine"}."""
    return initial_alignment_report(fixed, moving, method, fixed_modality=fixed_modality,
                                    moving_modality=moving_modality, cfg=cfg)[0]
