"""Partial-field-of-view test cases made from one labelled scan, with a known true alignment.

:func:`split_scan` crops a scan into an upper and a lower part along the cranio-caudal (canonical k) axis that
share only part of their extent, and moves the lower part's header by a rigid transform (a rotation about its
centre and a shift), so its world coordinates are unrelated to the upper part's. The true initial alignment
(upper world -> lower world) is that rigid transform. :func:`shared_dice` scores a transform by the Dice of the
organs present in both parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import dice_per_label
from ..io import Volume
from ..preprocess import resample_spacing, resample_to
from ..registration.overlap_search import rotation_matrix


@dataclass
class PartialCase:
    """fixed = upper part, moving = lower part (moved header); true_transform: fixed world -> moving world."""

    fixed: Volume
    fixed_labels: Volume
    moving: Volume
    moving_labels: Volume
    true_transform: np.ndarray
    shared_extent: tuple       # (shared slices / upper slices, shared slices / lower slices)


def rigid_about(centre, rotation_deg, shift_mm) -> np.ndarray:
    """(4,4) world map x -> R (x - c) + c + shift (R from :func:`rotation_matrix`, angles in degrees)."""
    r = rotation_matrix(rotation_deg)
    c = np.asarray(centre, dtype=np.float64)
    t = np.eye(4)
    t[:3, :3] = r
    t[:3, 3] = c - r @ c + np.asarray(shift_mm, dtype=np.float64)
    return t


def split_scan(image: Volume, labels: Volume, upper_start: float, lower_stop: float, *, rotation_deg=(0, 0, 15),
               shift_mm=(120.0, -80.0, 150.0), spacing_mm: float | None = None) -> PartialCase:
    """Crop ``image``/``labels`` (canonical, k = inferior -> superior) into two overlapping parts.

    Args:
        upper_start: the upper part is k in [upper_start * K, K) (fraction of the K slices).
        lower_stop: the lower part is k in [0, lower_stop * K); lower_stop > upper_start.
        rotation_deg, shift_mm: rigid change of the lower part's header (about its centre).
        spacing_mm: optionally resample both (isotropic) first, for small fast test volumes.
    """
    if spacing_mm is not None:
        image = resample_spacing(image, spacing_mm)
        labels = Volume(resample_to(labels, image, labels=True), image.affine, path=labels.path)
    K = image.shape[2]
    k0, k1 = int(round(upper_start * K)), int(round(lower_stop * K))
    if not 0 < k0 < k1 < K:
        raise ValueError(f"need 0 < upper_start < lower_stop < 1, got {upper_start}, {lower_stop}")

    def crop(vol: Volume, lo: int, hi: int, affine_change=np.eye(4)) -> Volume:
        aff = vol.affine.copy()
        aff[:3, 3] = vol.affine[:3, :3] @ np.array([0.0, 0.0, lo]) + vol.affine[:3, 3]
        aff = affine_change @ aff
        arr = np.ascontiguousarray(vol.array[:, :, lo:hi])
        return Volume(arr, aff, aff.copy(), arr.shape, vol.path)

    lower = crop(image, 0, k1)
    centre = lower.affine[:3, :3] @ ((np.array(lower.shape) - 1) / 2) + lower.affine[:3, 3]
    h = rigid_about(centre, rotation_deg, shift_mm)
    shared = k1 - k0
    return PartialCase(crop(image, k0, K), crop(labels, k0, K), crop(image, 0, k1, h), crop(labels, 0, k1, h), h,
                       (shared / (K - k0), shared / k1))


def shared_dice(case: PartialCase, transform: np.ndarray, ids=None) -> tuple[float, dict]:
    """(mean Dice, {label: Dice}) of the organs in both parts after resampling the moving labels by ``transform``."""
    moved = resample_to(case.moving_labels, case.fixed, labels=True, world_transform=transform)
    if ids is None:
        ids = sorted((set(np.unique(case.fixed_labels.array).tolist())
                      & set(np.unique(case.moving_labels.array).tolist())) - {0})
    d = dice_per_label(case.fixed_labels.array, moved, ids)
    vals = [v for v in d.values() if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan"), d
