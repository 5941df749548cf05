"""Realism measurements of the synthetic cohort, with the reference ranges they are checked against.

Used by ``tests/test_phantom_realism.py`` (small cohort) and ``bench/phantom_realism.py`` (the demo cohort,
written to ``results/phantom_realism.csv``). All functions take plain numpy arrays in canonical (D,H,W) order.

Reference ranges (adult abdomen; Learn2Reg AbdomenCTCT):

* mean Dice over the 13 organs between distinct subjects, before registration: 0.20-0.40
  (real AbdomenCTCT pairs start around 0.25-0.30),
* organ volumes: liver 1.2-2.2 L, spleen 0.1-0.4 L, each kidney 0.1-0.25 L,
* CT: fat about -100 HU, muscle about 50 HU, liver 50-110 HU by contrast phase, bone 300-1000 HU,
  gas about -1000 HU, noise 10-25 HU,
* MR vs CT of the same subject: low rank correlation of the per-tissue mean intensities.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage
from scipy.stats import spearmanr

from .phantom_anatomy import LABELS, TISSUES

VOLUME_RANGES_L = {6: (1.2, 2.2), 1: (0.1, 0.4), 2: (0.1, 0.25), 3: (0.1, 0.25)}
DICE_RANGE = (0.20, 0.40)
CT_RANGES_HU = {"fat": (-120.0, -80.0), "muscle": (35.0, 75.0), "gas": (-1024.0, -950.0), "bone": (300.0, 1000.0)}
LIVER_HU_BY_PHASE = {"native": (50.0, 65.0), "arterial": (65.0, 80.0), "portal": (95.0, 110.0)}


def organ_dice(a: np.ndarray, b: np.ndarray, labels=LABELS) -> dict[int, float]:
    """Dice per label id between two label maps on one grid (NaN where the label is in neither)."""
    out = {}
    for k in labels:
        x, y = a == k, b == k
        s = int(x.sum()) + int(y.sum())
        out[k] = 2.0 * float((x & y).sum()) / s if s else float("nan")
    return out


def intersubject_dice(label_maps: list[np.ndarray]) -> tuple[float, dict[int, float], list[float]]:
    """Dice between every pair of distinct subjects (no registration).

    Returns (mean over pairs of the 13-organ mean, per-organ mean over pairs, per-pair 13-organ means)."""
    per_pair, per_organ = [], {k: [] for k in LABELS}
    for a, b in itertools.combinations(range(len(label_maps)), 2):
        d = organ_dice(label_maps[a], label_maps[b])
        per_pair.append(float(np.nanmean(list(d.values()))))
        for k, v in d.items():
            per_organ[k].append(v)
    return float(np.mean(per_pair)), {k: float(np.nanmean(v)) for k, v in per_organ.items()}, per_pair


def organ_volumes_l(labels: np.ndarray, spacing_mm: float) -> dict[int, float]:
    """Volume (litres) of every Learn2Reg label."""
    v = float(spacing_mm) ** 3 / 1e6
    return {k: float((labels == k).sum()) * v for k in LABELS}


def tissue_mean(image: np.ndarray, tissue: np.ndarray, names, *, erode: int = 1, min_voxels: int = 20) -> float:
    """Mean intensity over the voxels of the tissue(s) ``names`` (eroded by ``erode`` voxels to skip partial
    volume; falls back to the uneroded mask when erosion leaves fewer than ``min_voxels``). NaN if absent."""
    names = [names] if isinstance(names, str) else list(names)
    m = np.isin(tissue, [TISSUES.index(n) for n in names])
    if erode:
        e = ndimage.binary_erosion(m, iterations=erode)
        if e.sum() >= min_voxels:
            m = e
    return float(image[m].mean()) if m.any() else float("nan")


def tissue_std(image: np.ndarray, tissue: np.ndarray, name: str, *, erode: int = 2) -> float:
    """Standard deviation inside the eroded tissue ``name`` (noise plus the tissue's own texture)."""
    m = ndimage.binary_erosion(tissue == TISSUES.index(name), iterations=erode)
    return float(image[m].std()) if m.sum() > 20 else float("nan")


def mr_ct_rank_correlation(ct: np.ndarray, ct_tissue: np.ndarray, mr: np.ndarray, mr_tissue: np.ndarray,
                           min_voxels: int = 50) -> float:
    """Spearman correlation, across tissues present in both scans, of the per-tissue mean CT and MR values.

    An MR that were an intensity-mapped copy of the CT would give +-1."""
    ct_means, mr_means = [], []
    for i in range(1, len(TISSUES)):
        a, b = ct_tissue == i, mr_tissue == i
        if a.sum() >= min_voxels and b.sum() >= min_voxels:
            ct_means.append(float(ct[a].mean()))
            mr_means.append(float(mr[b].mean()))
    return float(spearmanr(ct_means, mr_means).statistic)


def centroid_mm(labels: np.ndarray, k: int, spacing_mm: float) -> np.ndarray:
    """Centroid (mm, array axes) of label ``k``."""
    return np.argwhere(labels == k).mean(0) * float(spacing_mm)
