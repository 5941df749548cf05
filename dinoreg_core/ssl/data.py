"""Pretraining data: where volumes come from, how a global sample index becomes views, and which rank gets which.

Sources (:class:`VolumeSource`), all giving (D,H,W) float32 volumes in [0,1] (canonical RAS):

* a corpus folder built by :mod:`dinoreg_core.data.corpus` (it holds ``index.json``): volumes are read as cached;
* a folder of NIfTI files (searched recursively; label maps and masks left out by name), a Learn2Reg
  ``*_dataset.json`` or a folder holding one, or a folder made by ``dinoreg data fetch``: each scan is found by
  :func:`dinoreg_core.data.corpus.discover_sources` and preprocessed on first use exactly like a corpus volume
  (resampled to ``spacing_mm``, cropped to the body, intensity-normalised with the CT window or MR percentiles,
  modality guessed when not known).

Partners (``augment.partner_prob > 0``): scans of the same case in another modality, co-registered in world
space (Learn2Reg naming ``<TASK>_<case>_<modality>.nii.gz``: the same name up to the last ``_NNNN``). A sample then
also loads a partner, resampled onto its grid through the two affines, and the views mix the two modalities (see
:func:`dinoreg_core.data.augment.make_views`). Volumes without a partner give single-modality views.

Sample stream (:class:`PretrainViews`): global sample index ``i`` (0, 1, 2, ... over the whole run) picks volume
``perm_e[i % n]`` where ``perm_e`` is a permutation of the n volumes drawn from (seed, epoch e = i // n); all
random choices of its views and masks come from a generator seeded with (seed, i). A sample is therefore a pure
function of (seed, i): which process computes it, and whether the run was interrupted, does not matter.

Batches (:class:`StepBatchSampler`): counting from the first step ``s0`` of this run, step ``s`` uses the global
samples ``offset + (s-s0)*B .. offset + (s-s0)*B + B-1`` (B = global batch, ``offset`` = samples consumed before
``s0``, stored in the checkpoint); rank r of W processes takes the contiguous slice ``r*B/W .. (r+1)*B/W - 1``.
"""

from __future__ import annotations

import math
import os
import re
import sys
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..data.augment import AugmentConfig, make_views
from ..data.render import FAMILIES, RenderConfig, check_families, render
from ..errors import DinoregError

# what loading a damaged scan raises (io and corpus loaders wrap most in DinoregError; the rest come from nibabel,
# gzip and numpy); such a scan is skipped, not fatal
SCAN_ERRORS = (DinoregError, OSError, EOFError, ValueError, RuntimeError, zlib.error)
from .masking import random_block_mask


class VolumeSource:
    """The volumes of a pretraining source (see the module docstring): ``len``, ``name(i)``, ``load(i)``."""

    def __init__(self, path: str | os.PathLike, *, spacing_mm: float = 2.0):
        from ..data.corpus import CorpusConfig, discover_sources, load_corpus_index

        self.path = Path(path)
        if not self.path.exists():
            raise DinoregError(f"The pretraining data {self.path} does not exist.")
        self.kind = "corpus" if (self.path / "index.json").is_file() else "scans"
        if self.kind == "corpus":
            self.entries = load_corpus_index(self.path)
            self.names = [e.source for e in self.entries]
        else:
            self.corpus_cfg = CorpusConfig(spacing_mm=float(spacing_mm), progress=False)
            self.items, _, _ = discover_sources(self.path, self.corpus_cfg)
            self.names = [str(it.path) for it in self.items]
        self._grids: dict[int, tuple] = {}                                # volume -> (shape, affine), once loaded
        if not self.names:
            raise DinoregError(f"The pretraining data {self.path} holds no usable volume (no NIfTI scan, corpus "
                               f"entry or dataset image was found).")

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return self.names[i]

    def load(self, i: int) -> np.ndarray:
        """Volume ``i`` as (D,H,W) float32 in [0,1]."""
        return self.load_with_affine(i)[0]

    def load_with_affine(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Volume ``i`` as (D,H,W) float32 in [0,1] and its (4,4) voxel -> world (mm) affine (the grid is
        remembered, so a partner can later be resampled onto it without loading ``i`` again)."""
        if self.kind == "corpus":
            from ..data.corpus import load_corpus_volume

            e = self.entries[i]
            arr, aff = np.asarray(load_corpus_volume(e), dtype=np.float32), np.asarray(e.affine, dtype=np.float64)
        else:
            from ..data.corpus import preprocess_volume

            item = self.items[i]
            arr, info = preprocess_volume(item.path, self.corpus_cfg, item.modality)
            arr, aff = arr.astype(np.float32, copy=False), np.asarray(info["affine"], dtype=np.float64)
        self._grids[i] = (arr.shape, aff)
        return arr, aff

    def partners(self, i: int) -> list[int]:
        """The other volumes of volume ``i``'s case (same file name up to a final ``_NNNN`` modality index)."""
        if not hasattr(self, "_cases"):
            self._cases = []
            for n in self.names:
                stem = re.sub(r"\.nii(\.gz)?$|\.npy$", "", Path(n).name)
                m = re.fullmatch(r"(.+)_\d{4}", stem)
                self._cases.append(str(Path(n).parent / m.group(1)) if m else None)
        key = self._cases[i]
        return [j for j, k in enumerate(self._cases) if key is not None and k == key and j != i]

    def load_partner(self, i: int, j: int) -> np.ndarray:
        """Volume ``j`` resampled onto volume ``i``'s grid through their affines (0 outside j's field of view)."""
        from ..io import Volume
        from ..preprocess import resample_to

        if i not in self._grids:
            self.load_with_affine(i)
        shape_i, aff_i = self._grids[i]
        aj, fj = self.load_with_affine(j)
        return resample_to(Volume(aj, fj), Volume(np.empty(shape_i, np.float32), aff_i), cval=0.0)

    def describe(self) -> dict:
        """Provenance of the data: path, kind and number of volumes."""
        return {"path": str(self.path.resolve()), "kind": self.kind, "volumes": len(self)}


def sample_seed(seed: int, index: int, salt: int = 0) -> int:
    """A well-mixed 63-bit seed from (seed, index, salt)."""
    return int(np.random.SeedSequence([int(seed), int(index), int(salt)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass
class MaskConfig:
    """iBOT masking of the global views: with ``probability`` a view is masked at a ratio in [min, max]."""

    ratio_min: float = 0.4
    ratio_max: float = 0.7
    probability: float = 0.5
    min_block: int = 4


class PretrainViews(torch.utils.data.Dataset):
    """Global sample index -> views and masks of one sample (a pure function of (seed, index)).

    ``ds[i]`` returns :func:`dinoreg_core.data.augment.make_views`'s dict plus "masks" (n_global, N) bool
    (teacher frame, N = (global_size / patch_size)^3) and "volume" (int, the source volume index).
    """

    def __init__(self, source: VolumeSource, augment: AugmentConfig, masks: MaskConfig, patch_size: int,
                 seed: int, cache_size: int = 64):
        self.source = source
        self.augment = augment
        self.masks = masks
        self.patch_size = int(patch_size)
        self.seed = int(seed)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._partner_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._perm_epoch, self._perm = -1, None
        self.skipped: dict[int, str] = {}  # damaged scans met in this process: index -> reason

    def __len__(self) -> int:           # the stream is unbounded; a sampler picks the indices
        return 2 ** 62

    def volume_index(self, i: int) -> int:
        n = len(self.source)
        epoch = i // n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, salt=1))
            self._perm, self._perm_epoch = torch.randperm(n, generator=g), epoch
        return int(self._perm[i % n])

    def _skip(self, v: int, e: Exception) -> None:
        """Record the damaged scan ``v`` and say so once (stderr: this may run in a DataLoader worker)."""
        if v not in self.skipped:
            self.skipped[v] = " ".join(str(e).split())[:200]
            print(f"dinoreg pretrain: warning: skipped the damaged scan {self.source.name(v)} "
                  f"({len(self.skipped)} skipped so far): {self.skipped[v]}", file=sys.stderr)

    def good_volume(self, v: int) -> tuple[int, torch.Tensor]:
        """(index, tensor) of scan ``v``, or of the next readable scan after it when ``v`` is damaged (the same
        substitute every time, so the sample stream stays a pure function of (seed, index) and resumes exactly)."""
        n = len(self.source)
        for k in range(n):
            u = (v + k) % n
            if u in self.skipped:
                continue
            try:
                return u, self.volume(u)
            except SCAN_ERRORS as e:
                self._skip(u, e)
        raise DinoregError(f"Every scan of the pretraining data {self.source.path} is damaged or unreadable "
                           f"({len(self.skipped)} skipped).")

    def volume(self, v: int) -> torch.Tensor:
        if v in self._cache:
            self._cache.move_to_end(v)
            return self._cache[v]
        t = torch.from_numpy(np.ascontiguousarray(self.source.load(v)))
        if self.cache_size > 0:
            self._cache[v] = t
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return t

    def partner(self, v: int, g: torch.Generator) -> torch.Tensor | None:
        """A random partner of volume ``v`` on its grid (cached like the volumes), or None."""
        others = self.source.partners(v)
        if not others:
            return None
        j = others[int(torch.randint(len(others), (), generator=g))]
        key = (v, j)
        if key in self._partner_cache:
            self._partner_cache.move_to_end(key)
            return self._partner_cache[key]
        if j in self.skipped:
            return None
        try:
            t = torch.from_numpy(np.ascontiguousarray(self.source.load_partner(v, j)))
        except SCAN_ERRORS as e:
            self._skip(j, e)
            return None
        if self.cache_size > 0:
            self._partner_cache[key] = t
            while len(self._partner_cache) > self.cache_size:
                self._partner_cache.popitem(last=False)
        return t

    def __getitem__(self, i: int) -> dict:
        v = self.volume_index(int(i))
        g = torch.Generator().manual_seed(sample_seed(self.seed, int(i)))
        v, volume = self.good_volume(v)                # first: records v's grid for the partner; skips damaged scans
        partner = self.partner(v, g) if self.augment.partner_prob > 0 else None
        views = make_views(volume, self.augment, g, partner=partner)
        grid = (self.augment.global_size // self.patch_size,) * 3
        m = self.masks
        views["masks"] = torch.stack([
            random_block_mask(grid, g, ratio_min=m.ratio_min, ratio_max=m.ratio_max, probability=m.probability,
                              min_block=m.min_block) for _ in range(self.augment.n_global)])
        views["volume"] = v
        return views


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for steps ``start_step .. end_step-1``, this rank's global sample indices (see module docstring).

    ``sample_offset`` is the global index of the first sample of ``start_step``.
    """

    def __init__(self, start_step: int, end_step: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 sample_offset: int = 0):
        if global_batch % world_size:
            raise DinoregError(f"The batch size {global_batch} is not divisible by the {world_size} processes.")
        self.start, self.end = int(start_step), int(end_step)
        self.B, self.rank, self.W = int(global_batch), int(rank), int(world_size)
        self.offset = int(sample_offset)

    def indices(self, step: int) -> list[int]:
        b = self.B // self.W
        first = self.offset + (step - self.start) * self.B + self.rank * b
        return list(range(first, first + b))

    def __iter__(self):
        for s in range(self.start, self.end):
            yield self.indices(s)

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def collate_views(samples: list[dict]) -> dict:
    """Stack samples view-major: (B, V, ...) -> (V*B, ...), so ``x.chunk(V)`` splits by view.

    Returns "teacher_global", "student_global" (G*B,1,S,S,S), "student_flips" (G*B,3), "global_boxes"
    (G*B,2,3), "masks" (G*B,N), "local" (L*B,1,s,s,s) and "volumes" (B,) long; from :class:`StreamViews` also
    "spacing_mm" (B,) float64 and "families" (B,2) long.
    """
    out = {}
    for key in ("teacher_global", "student_global", "student_flips", "global_boxes", "masks", "local"):
        x = torch.stack([s[key] for s in samples])             # (B, V, ...)
        out[key] = x.transpose(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    out["volumes"] = torch.tensor([s["volume"] for s in samples], dtype=torch.long)
    if "spacing_mm" in samples[0]:                                       # streamed samples (StreamViews)
        out["spacing_mm"] = torch.tensor([s["spacing_mm"] for s in samples], dtype=torch.float64)
        out["families"] = torch.stack([s["families"] for s in samples])
    return out


# ------------------------------------------------------------------------------------- streamed phantom views

def _default_appearances() -> dict:
    return {"random": 0.6, "ct": 0.2, "mr": 0.2}


@dataclass
class StreamConfig:
    """Streamed phantom subjects rendered with two independent appearances (see :class:`StreamViews`).

    Lengths: ``spacing_mm`` is the phantom grid (mm); ``spacing_range_mm`` the physical voxel size of the crops
    the network sees (log-uniform per sample), so a crop of ``augment.global_size`` voxels covers
    ``global_size * spacing`` mm.
    """

    enabled: bool = False                    # False: views come from --data as before
    source: str = "phantom"                  # subjects: "phantom" (anatomy) or "shapes" (random label ensembles)
    seed: int = 14_001                       # stream seed (dinoreg_core.data.cohorts.ROLE_SEEDS["pretrain"])
    pool_size: int = 32                      # subjects usable at a time; no subject repeats in a block of this many
    new_every: int = 16                      # samples per new subject (pool turnover; generation cost ~4 s/subject)
    gen_threads: int = 1                     # background threads generating subjects
    spacing_mm: float = 3.0                  # phantom grid spacing (mm)
    shape: tuple = (128, 104, 112)           # phantom grid (voxels)
    spacing_range_mm: tuple = (2.0, 4.0)     # crop voxel size (mm), log-uniform per sample
    region_scale: float = 1.25               # every crop of a sample lies in a box of crop edge * region_scale
    max_air_fraction: float = 0.7            # redraw a region (up to 3 times) with more air than this
    appearances: dict = field(default_factory=_default_appearances)  # family -> weight (data.render.FAMILIES)
    second_appearance_prob: float = 1.0      # student's view in the other appearance (else the teacher's)
    real_ratio: float = 0.0                  # fraction of samples drawn from --data (real scans) instead
    render: RenderConfig = field(default_factory=RenderConfig)

    def __post_init__(self):
        self.shape = tuple(int(v) for v in self.shape)
        self.spacing_range_mm = tuple(float(v) for v in self.spacing_range_mm)

    def check(self) -> None:
        check_families(self.appearances)
        lo, hi = self.spacing_range_mm
        if not 0 < lo <= hi:
            raise DinoregError(f"stream.spacing_range_mm={self.spacing_range_mm} must be two sizes 0 < lo <= hi (mm).")
        if not 0.0 <= self.real_ratio <= 1.0:
            raise DinoregError(f"stream.real_ratio={self.real_ratio} must lie in [0, 1].")
        if self.source not in ("phantom", "shapes"):
            raise DinoregError(f"stream.source='{self.source}' is not known; use 'phantom' or 'shapes'.")
        if self.region_scale < 1.0:
            raise DinoregError(f"stream.region_scale={self.region_scale} must be at least 1.")

    def phantom_config(self):
        from ..data.phantom import PhantomConfig

        return PhantomConfig(shape=self.shape, spacing_mm=self.spacing_mm, seed=self.seed, threads=1, workers=1)


class StreamViews(torch.utils.data.Dataset):
    """Global sample index -> views of a streamed phantom subject under two appearances (pure in (seed, index)).

    Sample i: subject k from :class:`dinoreg_core.data.stream.SubjectSchedule`; a crop voxel size s (mm,
    log-uniform in ``spacing_range_mm``), so every crop box has an edge of about ``global_size * s / spacing_mm``
    phantom voxels (the aspect jitter of ``augment.max_aspect`` keeps the geometric mean); a region of
    ``region_scale`` times that edge (the crops of the sample lie in it); two renderings of the region's tissue
    map with independently drawn families and seeds (:func:`dinoreg_core.data.render.render`); then
    :func:`dinoreg_core.data.augment.make_views` with the second rendering as the "partner", so the teacher sees
    one appearance and the student (with ``second_appearance_prob``) the other, at the same box, flipped and
    intensity-augmented as before. With ``real_ratio > 0`` a sample is drawn from ``real`` (a
    :class:`PretrainViews`) instead, with that probability.

    Extra keys: "volume" (the stream subject k, or -1 - volume index for a real sample), "spacing_mm" (s; NaN for
    a real sample), "families" (the two appearance families, as indices into data.render.FAMILIES).
    """

    def __init__(self, cfg: StreamConfig, augment: AugmentConfig, masks: MaskConfig, patch_size: int, seed: int,
                 real: PretrainViews | None = None):
        from ..data.stream import SubjectPool, SubjectSchedule

        cfg.check()
        if cfg.real_ratio > 0 and real is None:
            raise DinoregError("stream.real_ratio > 0 needs real scans: pass them with --data.")
        self.cfg, self.augment, self.masks = cfg, augment, masks
        self.patch_size, self.seed, self.real = int(patch_size), int(seed), real
        self.schedule = SubjectSchedule(cfg.seed, cfg.pool_size, cfg.new_every)
        self.pool = SubjectPool(self.schedule, cfg.phantom_config(), threads=cfg.gen_threads, source=cfg.source)
        names = sorted(cfg.appearances)
        w = torch.tensor([float(cfg.appearances[n]) for n in names], dtype=torch.float64)
        self._families, self._weights = names, w / w.sum()

    def __len__(self) -> int:
        return 2 ** 62

    def describe(self) -> dict:
        c = self.cfg
        d = {"kind": "phantom-stream", "source": c.source, "stream_seed": c.seed, "pool_size": c.pool_size, "new_every": c.new_every,
             "spacing_mm": c.spacing_mm, "shape": list(c.shape), "appearances": dict(c.appearances)}
        if self.real is not None:
            d["real"] = self.real.source.describe()
            d["real_ratio"] = c.real_ratio
        return d

    def _family(self, g: torch.Generator) -> str:
        return self._families[int(torch.multinomial(self._weights, 1, generator=g))]

    def _masks(self, g: torch.Generator) -> torch.Tensor:
        grid = (self.augment.global_size // self.patch_size,) * 3
        m = self.masks
        return torch.stack([random_block_mask(grid, g, ratio_min=m.ratio_min, ratio_max=m.ratio_max,
                                              probability=m.probability, min_block=m.min_block)
                            for _ in range(self.augment.n_global)])

    def __getitem__(self, i: int) -> dict:
        c, a = self.cfg, self.augment
        g = torch.Generator().manual_seed(sample_seed(self.seed, int(i), salt=4))
        if c.real_ratio > 0 and float(torch.rand((), generator=g)) < c.real_ratio:
            views = self.real[int(i)]
            views["volume"] = -1 - int(views["volume"])
            views["spacing_mm"] = float("nan")
            views["families"] = torch.tensor([-1, -1])
            return views
        k, tissue = self.pool.get(int(i))
        lo, hi = c.spacing_range_mm
        s = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * float(torch.rand((), generator=g)))
        zoom = s / c.spacing_mm
        edge = a.global_size * zoom * a.max_aspect
        size = [min(n, int(math.ceil(edge * c.region_scale))) for n in tissue.shape]
        for _ in range(3):                                                   # avoid regions of mostly air
            start = [int(torch.randint(n - e + 1, (), generator=g)) for n, e in zip(tissue.shape, size)]
            region = tissue[start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]]
            if float((region == 0).float().mean()) <= c.max_air_fraction:
                break
        fa, fb = self._family(g), self._family(g)
        sa, sb = (int(torch.randint(2 ** 62, (), generator=g)) for _ in range(2))
        img_a = render(region, sa, fa, spacing_mm=c.spacing_mm, cfg=c.render)
        img_b = render(region, sb, fb, spacing_mm=c.spacing_mm, cfg=c.render)
        aug = replace(a, global_zoom=(zoom, zoom), local_zoom=(zoom, zoom), region_size=None,
                      partner_prob=c.second_appearance_prob)
        views = make_views(img_a, aug, g, partner=img_b)
        views["global_boxes"][:, 0] += torch.tensor(start, dtype=torch.float32)   # boxes in subject voxels
        views["masks"] = self._masks(g)
        views["volume"] = int(k)
        views["spacing_mm"] = float(s)
        views["families"] = torch.tensor([FAMILIES.index(fa), FAMILIES.index(fb)])
        return views
