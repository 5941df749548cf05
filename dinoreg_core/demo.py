"""The demo pair: a real CT warped by a known smooth random field.

Used by ``dinoreg demo`` (the README's main job), by the tests and by the benchmarks. ``fixed`` is the real CT of
``../shared/data/real`` (when present); ``moving`` is that CT warped by a smooth random displacement ``v`` with
largest vector ``max_disp_mm`` (``moving(y) = fixed(y + v(y))``). Registering ``moving`` to ``fixed`` should recover
``u* = v^{-1}`` (``u*(x) + v(x + u*(x)) = 0``), returned as ``true_disp``. Without the shared data, a synthetic
subject from :mod:`dinoreg_core.data.phantom` takes the place of the real CT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import io
from .errors import DinoregError
from .labels import TOTALSEG_MAIN_ABDOMEN, keep_labels
from .preprocess import foreground_mask
from .registration.warp import invert, smooth_random_field, warp, warp_labels


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository root (override with the DINOREG_SHARED_DATA variable)."""
    env = os.environ.get("DINOREG_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


DEMO_CT_NAME = "ct_abdomen_pelvis.nii.gz"
DATA_ENV = "DINOREG_SHARED_DATA"  # a folder holding real/ct_abdomen_pelvis.nii.gz (or the CT itself)


def find_demo_ct(data: str | os.PathLike | None = None) -> tuple[Path | None, list[str]]:
    """The real demo CT and the places looked at.

    ``data`` (``dinoreg demo --data``) may be the CT file or a folder holding it directly or in ``real/``; a
    ``data`` that holds no CT is an error. Without it: ``$DINOREG_SHARED_DATA`` (same forms), then
    ``../shared/data/real`` beside a checkout. Returns (path or None, the candidates tried).
    """
    def candidates(p: Path) -> list[Path]:
        return [p] if p.suffix == ".gz" or p.suffix == ".nii" else [p / DEMO_CT_NAME, p / "real" / DEMO_CT_NAME]

    if data is not None:
        cands = candidates(Path(data))
        for c in cands:
            if c.is_file():
                return c, [str(x) for x in cands]
        raise DinoregError(f"The demo data {data} holds no {DEMO_CT_NAME} (looked at {', '.join(map(str, cands))}).")
    tried = []
    env = os.environ.get(DATA_ENV)
    roots = ([Path(env)] if env else []) + [Path(__file__).resolve().parents[1].parent / "shared" / "data"]
    for r in roots:
        for c in candidates(r):
            tried.append(str(c))
            if c.is_file():
                return c, tried
    return None, tried


@dataclass
class DemoPair:
    fixed: io.Volume
    moving: io.Volume
    fixed_labels: io.Volume
    moving_labels: io.Volume
    true_disp: np.ndarray  # (3,D,H,W) voxels: the field that registers moving to fixed
    body_mask: np.ndarray  # (D,H,W) bool, fixed body
    label_names: dict
    source: str


def known_deformation_pair(max_disp_mm: float = 10.0, control_spacing: int = 10, seed: int = 0,
                           ct_path: str | Path | None = None) -> DemoPair:
    """Make the demo pair (see the module docstring). Labels are restricted to the 13 main abdominal organs."""
    data = shared_data_dir() / "real"
    ct_path = Path(ct_path) if ct_path else data / "ct_abdomen_pelvis.nii.gz"
    if ct_path.exists():
        fixed = io.load_volume(ct_path)
        flab = io.load_labels(str(ct_path).replace(".nii.gz", "_labels.nii.gz"))
        names = dict(TOTALSEG_MAIN_ABDOMEN)
        flab = flab.like(keep_labels(flab.array, names))
        source = str(ct_path)
    else:
        fixed, flab, names = _phantom_subject(seed)
        source = "synthetic subject (dinoreg_core.data.phantom)"
    body = foreground_mask(fixed.array, "ct")
    spacing = float(np.mean(fixed.spacing))
    v = smooth_random_field(fixed.shape, max_disp=max_disp_mm / spacing, control_spacing=control_spacing, seed=seed,
                            mask=torch.from_numpy(body))
    with torch.no_grad():
        img = torch.from_numpy(fixed.array)[None, None]
        moving = warp(img, v)[0, 0].numpy()
        mlab = warp_labels(torch.from_numpy(flab.array)[None, None], v)[0, 0].numpy()
        truth = invert(v, iterations=50)[0].numpy()
    return DemoPair(fixed, fixed.like(moving.astype(np.float32)), flab, flab.like(mlab.astype(np.int32)), truth, body,
                    names, source)


def _phantom_subject(seed: int):
    try:
        from .data import phantom
    except ImportError:
        raise DinoregError("Neither ../shared/data/real/ct_abdomen_pelvis.nii.gz nor the synthetic cohort "
                           "generator (dinoreg_core.data.phantom) is available for the demo.") from None
    from .labels import L2R_ABDOMEN_CT

    cfg = phantom.PhantomConfig(n_subjects=1)
    subj = phantom.generate_subject(seed, cfg, with_mr=False)
    aff = np.asarray(subj["affine"], dtype=np.float64)
    img = io.Volume(np.asarray(subj["ct"], np.float32), aff)
    lab = io.Volume(np.asarray(subj["labels"], np.int32), aff)
    return img, lab, dict(L2R_ABDOMEN_CT)
