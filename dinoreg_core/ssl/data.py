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

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.augment import AugmentConfig, make_views
from ..errors import DinoregError
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

    def __len__(self) -> int:           # the stream is unbounded; a sampler picks the indices
        return 2 ** 62

    def volume_index(self, i: int) -> int:
        n = len(self.source)
        epoch = i // n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, salt=1))
            self._perm, self._perm_epoch = torch.randperm(n, generator=g), epoch
        return int(self._perm[i % n])

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
        t = torch.from_numpy(np.ascontiguousarray(self.source.load_partner(v, j)))
        if self.cache_size > 0:
            self._partner_cache[key] = t
            while len(self._partner_cache) > self.cache_size:
                self._partner_cache.popitem(last=False)
        return t

    def __getitem__(self, i: int) -> dict:
        v = self.volume_index(int(i))
        g = torch.Generator().manual_seed(sample_seed(self.seed, int(i)))
        volume = self.volume(v)                                          # first: records v's grid for the partner
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
    (G*B,2,3), "masks" (G*B,N), "local" (L*B,1,s,s,s) and "volumes" (B,) long.
    """
    out = {}
    for key in ("teacher_global", "student_global", "student_flips", "global_boxes", "masks", "local"):
        x = torch.stack([s[key] for s in samples])             # (B, V, ...)
        out[key] = x.transpose(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    out["volumes"] = torch.tensor([s["volume"] for s in samples], dtype=torch.long)
    return out
