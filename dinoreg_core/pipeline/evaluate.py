"""Stage 3, :func:`evaluate`: warp the moving image and labels of an :class:`AlignedPair` by a
:class:`Displacement` and measure the result.

Metrics (DESIGN.md section 2): per label present in both the fixed map and the moving map (on the fixed grid,
before warping) Dice before and after, HD95 in mm and in voxels after; their means over labels (NaN left out);
the field's SDlogJ (plain and Learn2Reg variant) and % folding, on the box the field was computed on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..evaluation.metrics import dice_per_label, field_metrics, hd95_per_label
from ..registration.warp import warp, warp_labels
from ..registration.whole_transform import warp_whole
from .align import AlignedPair, map_label_ids
from .displacement import Displacement


@dataclass
class Metrics:
    """Stage 3's value: the warped moving image and labels and their measures."""

    warped: np.ndarray  # (D,H,W) float32: moving_on_fixed warped by the field
    warped_labels: np.ndarray | None  # (D,H,W) int32, or None without moving labels
    field: dict  # sdlogj, sdlogj_l2r, folding_pct (field_metrics on the registered box)
    registered_box: list  # [[lo...], [hi...]]
    labels: list | None = None  # one dict per label: label, name, dice_initial, dice, hd95_mm, hd95_vox
    summary: dict | None = None  # means over labels of dice_initial, dice, hd95_mm, hd95_vox
    learn2reg: dict | None = None  # the Learn2Reg file of the whole transform and its official metrics (write stage)

    def to_dict(self) -> dict:
        """The ``metrics`` entry of ``metrics.json`` (no arrays)."""
        d: dict = {"field": self.field, "registered_box": self.registered_box}
        if self.labels is not None:
            d["labels"] = self.labels
            d["summary"] = self.summary
        if self.learn2reg is not None:
            d["learn2reg"] = self.learn2reg
        return d


def label_metrics(fixed_labels: np.ndarray, moving_labels: np.ndarray, warped_labels: np.ndarray, spacing,
                  label_names: dict | None = None, moving_original: np.ndarray | None = None) -> list[dict]:
    """One row per label present in both the fixed map and the moving map: Dice before/after, HD95 (mm, voxels)
    after, with Learn2Reg's rule (a label that vanished after warping is Dice 0, HD95 inf).

    ``moving_labels`` is the moving map on the fixed grid before warping; ``moving_original`` the moving map on its
    own grid with fixed ids (default ``moving_labels``), which decides which labels are present (as in the
    Learn2Reg evaluation).
    """
    mo = moving_labels if moving_original is None else moving_original
    ids = sorted((set(np.unique(fixed_labels).tolist()) & set(np.unique(mo).tolist())) - {0})
    before = dice_per_label(fixed_labels, moving_labels, ids, moving_labels=mo)
    after = dice_per_label(fixed_labels, warped_labels, ids, moving_labels=mo)
    hd_mm = hd95_per_label(fixed_labels, warped_labels, spacing, ids, moving_labels=mo)
    hd_vox = hd95_per_label(fixed_labels, warped_labels, (1.0, 1.0, 1.0), ids, moving_labels=mo)
    rows = []
    for i in ids:
        rows.append({"label": i, "name": (label_names or {}).get(i, str(i)), "dice_initial": before[i],
                     "dice": after[i], "hd95_mm": hd_mm[i], "hd95_vox": hd_vox[i]})
    return rows


def nanmean(values) -> float:
    """Mean of the finite values (None and NaN left out); NaN when there are none."""
    v = np.array([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def summarise_labels(rows: list[dict]) -> dict:
    """Means over labels of the per-label rows of :func:`label_metrics`."""
    return {k: nanmean(r[k] for r in rows) for k in ("dice_initial", "dice", "hd95_mm", "hd95_vox")}


def warp_moving(pair: AlignedPair, disp: Displacement) -> tuple[np.ndarray, np.ndarray | None]:
    """(warped image, warped labels or None) of the pair's moving scan on the fixed grid, (D,H,W) each.

    When the moving scan was resampled (another grid or an initial alignment), the moving *file* is sampled once
    through the whole transform (:func:`dinoreg_core.registration.whole_transform.warp_whole`), as ITK, ANTs and the
    Learn2Reg evaluation apply our exported transforms; on one grid the field warps the moving array directly.
    """
    u = disp.field
    if not pair.same_grid:
        field = disp.numpy()
        warped = warp_whole(pair.moving, pair.fixed, field, pair.world_transform)
        warped_lab = None
        if pair.moving_labels is not None:
            lab = warp_whole(pair.moving_labels, pair.fixed, field, pair.world_transform, labels=True)
            warped_lab = map_label_ids(lab, pair.label_map) if pair.label_map else lab
        elif pair.moving_labels_on_fixed is not None:  # labels given on the fixed grid only
            lab = torch.from_numpy(pair.moving_labels_on_fixed)[None, None].to(u.device)
            warped_lab = warp_labels(lab, u)[0, 0].cpu().numpy()
        return warped, warped_lab
    with torch.no_grad():
        mov_t = torch.from_numpy(np.ascontiguousarray(pair.moving_on_fixed))[None, None].to(u.device)
        warped = warp(mov_t, u)[0, 0].cpu().numpy()
        warped_lab = None
        if pair.moving_labels_on_fixed is not None:
            lab = torch.from_numpy(pair.moving_labels_on_fixed)[None, None].to(u.device)
            warped_lab = warp_labels(lab, u)[0, 0].cpu().numpy()
    return warped, warped_lab


def evaluate(pair: AlignedPair, disp: Displacement) -> Metrics:
    """Warp and measure (see the module docstring)."""
    warped, warped_lab = warp_moving(pair, disp)
    m = Metrics(warped, warped_lab, field_metrics(disp.on_box()), [list(map(int, b)) for b in disp.box])
    if pair.fixed_labels is not None and warped_lab is not None:
        m.labels = label_metrics(pair.fixed_labels, pair.moving_labels_on_fixed, warped_lab, pair.fixed.spacing,
                                 pair.label_names, moving_original=pair.moving_labels_mapped())
        m.summary = summarise_labels(m.labels)
    return m
