"""Declared options of the built-in feature extractors (the ``feat.NAME`` settings), one dataclass per method.

The registry (:mod:`dinoreg_core.features.registry`) checks a method's options against its dataclass before
extracting, so a misspelt option is an error instead of being ignored. ``dinov2`` declares
:class:`dinoreg_core.models.dinov2_slices.Dinov2SliceConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class IntensityOptions:
    """The ``intensity`` method has no options."""


@dataclass
class MindOptions:
    """Options of ``mind`` (MIND-SSC): the official ConvexAdam defaults."""

    mind_r: int = 1  # patch radius (voxels)
    mind_d: int = 2  # neighbour dilation (voxels)


@dataclass
class Dino3DOptions:
    """Options of ``dino3d`` (see :mod:`dinoreg_core.features.dino3d`; None: the extractor's default)."""

    weights: str | None = None  # backbone .safetensors (+ .json) or an authors' .ckpt/.pt/.pth; None: demo weights
    blocks: Any = None  # block index or indices: -1, [-2, -1] or "-2,-1"; None: the last block
    memory_budget_gb: float | None = None  # sliding-window budget (ExtractConfig)
    window: Any = None  # window size in voxels (int or three ints)
    overlap: float | None = None  # window overlap fraction
    blend: str | None = None  # "gaussian" | "uniform"
    fit: str | None = None  # "resample" | "pad"
    progress: bool | None = None  # progress bar over windows
    amp: bool | None = None  # bf16 autocast on CUDA
    mode: str | None = None  # extraction plan: auto | memory | full | sliding (ExtractConfig.mode)
    window_batch: int | None = None  # sliding windows per forward pass (ExtractConfig.window_batch)
    spacing_aware: bool | None = None  # resample to the weights' training spacing first (default off)
    spacing_mm: Any = None  # the image's voxel size (mm; one value or three); the pipeline fills it in
    train_spacing_mm: Any = None  # override of the spacing the weights were trained at (mm)
    cache_dir: str | None = None  # on-disk feature cache (dinoreg_core.features.cache); None: no cache
