"""Stage 1, :func:`align`: two scans (and their labels) -> one :class:`AlignedPair` on the fixed grid.

Everything later stages need about the pair is computed here, once: the modalities, the initial world transform
``T`` (fixed world -> moving world, :mod:`dinoreg_core.registration.initial`), the moving image and labels resampled
onto the fixed grid through ``T`` (moving ids mapped to fixed ids by ``label_map``), and the box of the fixed grid the
moving scan covers (registration runs there; a partial field of view, e.g. an MR slab, leaves the rest empty).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import io
from ..errors import DinoregError
from ..preprocess import guess_modality, resample_to, world_overlap_fraction
from ..registration.initial import initial_alignment_report
from ..validate import check_not_constant

log = logging.getLogger("dinoreg")

MIN_OVERLAP = 0.05  # fraction of fixed voxels the moving scan must cover in world space
MIN_BOX_VOXELS = 16  # the covered box keeps at least this many voxels per axis (coarse grids stay meaningful)


@dataclass
class AlignedPair:
    """A fixed scan and a moving scan brought onto the fixed grid. Arrays are canonical (D,H,W).

    ``moving_on_fixed(x) = moving(T @ world_fixed(x))``; a displacement of a later stage is defined on the fixed
    grid relative to ``moving_on_fixed`` (DESIGN.md section 2).
    """

    fixed: io.Volume  # the fixed scan (canonical RAS)
    moving: io.Volume  # the moving scan as loaded, on its own grid (its path names the outputs)
    moving_on_fixed: np.ndarray  # (D,H,W) float32: moving image resampled onto the fixed grid
    world_transform: np.ndarray  # (4,4) fixed world (mm) -> moving world (mm)
    box: tuple  # ((lo_i, lo_j, lo_k), (hi_i, hi_j, hi_k)): fixed voxels [lo, hi) the moving scan covers
    fixed_modality: str  # "ct" | "mr"
    moving_modality: str
    same_grid: bool  # the moving scan was already on the fixed grid (no resampling happened)
    fixed_labels: np.ndarray | None = None  # (D,H,W) int32
    moving_labels_on_fixed: np.ndarray | None = None  # (D,H,W) int32, ids mapped to fixed ids
    label_names: dict | None = None  # fixed label id -> name
    timings: dict = field(default_factory=dict)  # load_s, init_s
    moving_labels: io.Volume | None = None  # the moving label map as loaded, on the moving grid, its own ids
    label_map: dict | None = None  # moving label id -> fixed label id (None: ids already agree)
    init_report: dict | None = None  # which initial alignment was chosen and its score (registration.initial)

    def moving_labels_mapped(self) -> np.ndarray | None:
        """The moving label map on its own grid with ids mapped to fixed ids (which labels the moving scan has)."""
        if self.moving_labels is None:
            return None
        return map_label_ids(self.moving_labels.array, self.label_map) if self.label_map else self.moving_labels.array

    @property
    def crop(self) -> tuple:
        """The covered box as a tuple of three slices of the fixed grid."""
        lo, hi = self.box
        return tuple(slice(a, b) for a, b in zip(lo, hi))

    @property
    def full_box(self) -> bool:
        """True when the box is the whole fixed grid."""
        return tuple(self.box[0]) == (0, 0, 0) and tuple(self.box[1]) == tuple(self.fixed.shape)

    def cropped(self) -> tuple[io.Volume, io.Volume]:
        """(fixed, moving-on-fixed) raw intensities on the covered box, as Volumes sharing one grid (the affine is
        shifted to the box's first voxel); what every registration method receives."""
        lo = self.box[0]
        aff = self.fixed.affine.copy()
        aff[:3, 3] = aff[:3, :3] @ np.asarray(lo, dtype=float) + aff[:3, 3]
        if self.full_box:
            return io.Volume(self.fixed.array, self.fixed.affine), io.Volume(self.moving_on_fixed, self.fixed.affine)
        return io.Volume(self.fixed.array[self.crop], aff), io.Volume(self.moving_on_fixed[self.crop], aff.copy())


def _plain(obj):
    """``obj`` with numpy scalars and arrays as Python numbers and lists (JSON-ready)."""
    return json.loads(json.dumps(obj, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def as_volume(x, what: str, labels: bool = False) -> io.Volume:
    """A :class:`~dinoreg_core.io.Volume` as given, or loaded from a NIfTI path."""
    if isinstance(x, io.Volume):
        return x
    return io.load_labels(x, what=what) if labels else io.load_volume(x, what=what)


def covered_box(moving: io.Volume, fixed: io.Volume, world_transform: np.ndarray, same_grid: bool) -> tuple:
    """Bounding box [lo, hi) (fixed voxels) of the fixed grid region covered by the moving scan."""
    if same_grid:
        return (0, 0, 0), tuple(fixed.shape)
    ones = io.Volume(np.ones(moving.shape, np.float32), moving.affine)
    valid = resample_to(ones, fixed, world_transform=world_transform, cval=0.0) > 0.5
    if valid.all():
        return (0, 0, 0), tuple(fixed.shape)
    idx = np.argwhere(valid)
    lo, hi = idx.min(0), idx.max(0) + 1
    for a in range(3):
        short = MIN_BOX_VOXELS - (hi[a] - lo[a])
        if short > 0:
            lo[a] = max(0, lo[a] - (short + 1) // 2)
            hi[a] = min(fixed.shape[a], lo[a] + MIN_BOX_VOXELS)
    return tuple(int(x) for x in lo), tuple(int(x) for x in hi)


def map_label_ids(labels: np.ndarray, label_map: dict) -> np.ndarray:
    """Moving label ids -> fixed label ids through ``label_map`` ({moving id: fixed id}); unmapped ids become 0."""
    lut = np.zeros(int(max(labels.max(), max(label_map))) + 1, dtype=np.int32)
    for k, v in label_map.items():
        lut[int(k)] = int(v)
    return lut[labels]


def align(fixed, moving, *, fixed_labels=None, moving_labels=None, init: str = "none",
          fixed_modality: str | None = None, moving_modality: str | None = None, label_map: dict | None = None,
          label_names: dict | None = None) -> AlignedPair:
    """Load (paths or Volumes), check, align and resample a pair onto the fixed grid (see the module docstring).

    Args:
        fixed, moving: NIfTI paths or :class:`~dinoreg_core.io.Volume` objects.
        fixed_labels, moving_labels: optional label maps on their image's grid.
        init: initial alignment, ``none`` | ``com`` | ``affine``.
        fixed_modality, moving_modality: ``ct`` | ``mr``; None guesses from the intensities.
        label_map: moving label id -> fixed label id (unmapped ids become 0).
        label_names: fixed label id -> name, carried to the metrics.
    """
    t0 = time.perf_counter()
    fvol = as_volume(fixed, "fixed image")
    mvol = as_volume(moving, "moving image")
    flab = as_volume(fixed_labels, "fixed label", labels=True) if fixed_labels is not None else None
    mlab = as_volume(moving_labels, "moving label", labels=True) if moving_labels is not None else None
    if flab is not None:
        io.check_same_grid(fvol, flab)
    if mlab is not None:
        io.check_same_grid(mvol, mlab)
    for vol, what in ((fvol, "fixed image"), (mvol, "moving image")):
        check_not_constant(vol, what)
    fmod = fixed_modality or guess_modality(fvol.array)
    mmod = moving_modality or guess_modality(mvol.array)
    t_load = time.perf_counter() - t0

    t = time.perf_counter()
    T, report = initial_alignment_report(fvol, mvol, init, fixed_modality=fmod, moving_modality=mmod)
    if init != "none":
        log.info(f"initial alignment {init}: {report.chosen} (score {report.score})")
    overlap = world_overlap_fraction(fvol, mvol, world_transform=T)
    if overlap < MIN_OVERLAP:
        hint = " (try --init com or --init affine)" if init == "none" else ""
        raise DinoregError(f"The moving scan {mvol.path or ''} does not overlap the fixed scan in world space "
                           f"({100 * overlap:.1f}% of fixed voxels covered){hint}.".replace("  ", " "))
    same_grid = init == "none" and io.same_grid(fvol, mvol)
    if same_grid:
        mov_img = mvol.array
        mov_lab = mlab.array if mlab is not None else None
    else:
        mov_img = resample_to(mvol, fvol, world_transform=T)
        mov_lab = resample_to(mlab, fvol, labels=True, world_transform=T) if mlab is not None else None
    if mov_lab is not None and label_map:
        mov_lab = map_label_ids(mov_lab, label_map)
    t_init = time.perf_counter() - t
    box = covered_box(mvol, fvol, T, same_grid)
    return AlignedPair(fvol, mvol, mov_img, T, box, fmod, mmod, same_grid,
                       flab.array if flab is not None else None, mov_lab, label_names,
                       {"load_s": t_load, "init_s": t_init}, mlab, dict(label_map) if label_map else None,
                       _plain(report.as_dict()))


def save_pair(pair: AlignedPair, path) -> Path:
    """Write ``pair`` to an ``.npz`` file (atomically), e.g. to hand one alignment to several worker processes."""
    path = Path(path)
    arrays = {"fixed": pair.fixed.array, "fixed_affine": pair.fixed.affine, "moving": pair.moving.array,
              "moving_affine": pair.moving.affine, "moving_on_fixed": pair.moving_on_fixed,
              "world_transform": pair.world_transform, "box": np.array(pair.box)}
    if pair.fixed_labels is not None:
        arrays["fixed_labels"] = pair.fixed_labels
    if pair.moving_labels_on_fixed is not None:
        arrays["moving_labels_on_fixed"] = pair.moving_labels_on_fixed
    if pair.moving_labels is not None:
        arrays["moving_labels"] = pair.moving_labels.array
    meta = {"fixed_path": pair.fixed.path, "moving_path": pair.moving.path, "fixed_modality": pair.fixed_modality,
            "moving_modality": pair.moving_modality, "same_grid": pair.same_grid, "timings": pair.timings,
            "label_names": {str(k): v for k, v in (pair.label_names or {}).items()} or None,
            "label_map": {str(k): int(v) for k, v in (pair.label_map or {}).items()} or None,
            "moving_labels_path": pair.moving_labels.path if pair.moving_labels is not None else None,
            "init_report": pair.init_report}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, path)
    return path


def load_pair(path) -> AlignedPair:
    """Read an :class:`AlignedPair` written by :func:`save_pair`."""
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    meta = json.loads(str(d["meta"]))
    fixed = io.Volume(d["fixed"], d["fixed_affine"], path=meta["fixed_path"])
    moving = io.Volume(d["moving"], d["moving_affine"], path=meta["moving_path"])
    box = tuple(tuple(int(x) for x in b) for b in d["box"])
    names = {int(k): v for k, v in meta["label_names"].items()} if meta.get("label_names") else None
    return AlignedPair(fixed, moving, d["moving_on_fixed"], d["world_transform"], box, meta["fixed_modality"],
                       meta["moving_modality"], bool(meta["same_grid"]), d.get("fixed_labels"),
                       d.get("moving_labels_on_fixed"), names, dict(meta.get("timings") or {}),
                       io.Volume(d["moving_labels"], d["moving_affine"], path=meta.get("moving_labels_path"))
                       if "moving_labels" in d else None,
                       {int(k): int(v) for k, v in meta["label_map"].items()} if meta.get("label_map") else None,
                       meta.get("init_report"))
