"""Register two scans in one call: :func:`register`, the composition of the pipeline's four stages.

    align (load, canonical RAS, initial alignment, moving resampled onto the fixed grid, covered box)
    -> method.register (features -> joint PCA -> upsample -> ConvexAdam, or a peer) -> evaluate (warp, metrics)
    -> write (files)

(see :mod:`dinoreg_core.pipeline`). The displacement is defined on the fixed grid, in fixed voxels, relative to the
moving image *after* it was resampled onto the fixed grid through the initial world transform ``T`` (identity for
``init="none"``): ``warped(x) = moving_on_fixed(x + u(x))`` with ``moving_on_fixed(x) = moving(T @ world_fixed(x))``.
When fixed and moving share a grid and ``init="none"``, this is the Learn2Reg convention exactly.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import io
from .errors import DinoregError
from .pipeline import (AlignedPair, Displacement, Metrics, RegisterConfig, align, config_from, evaluate,
                       get_registration_method, write)
from .pipeline.evaluate import label_metrics  # noqa: F401 - re-exported (older callers)
from .pipeline.feature_path import compute_features  # noqa: F401 - re-exported (older callers)
from .outputs import check_not_inputs, check_out_dir, sweep
from .progress import stage
from .pipeline.checks import check_register_config, check_volume_size

__all__ = ["RegisterConfig", "RegistrationResult", "register", "register_aligned", "register_methods", "method_config",
           "compute_features", "label_metrics"]


@dataclass
class RegistrationResult:
    """What :func:`register` returns. Arrays are canonical (D,H,W) on the fixed grid."""

    displacement: np.ndarray  # (3,D,H,W) float32, fixed voxels, backward
    fixed: io.Volume
    moving_on_fixed: np.ndarray  # moving image resampled onto the fixed grid (after the initial transform)
    warped: np.ndarray  # moving_on_fixed warped by the displacement
    init_transform: np.ndarray  # (4,4) fixed world -> moving world
    fixed_labels: np.ndarray | None = None
    moving_labels_on_fixed: np.ndarray | None = None
    warped_labels: np.ndarray | None = None
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 1024.0 / 1024.0


def torch_device(name: str) -> torch.device:
    """``name`` as a torch device; one sentence when CUDA is asked for but absent or the name is unknown."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DinoregError(f"Device '{name}' was requested but CUDA is not available on this machine; use --device cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DinoregError(f"Unknown device '{name}'; use cpu or cuda.") from None


def run_timings(pair: AlignedPair, disp: Displacement, t0: float, device: torch.device) -> dict:
    """The ``timings`` of one registration (seconds; peak memory in MB)."""
    t = {"load_s": pair.timings["load_s"], "init_s": pair.timings["init_s"],
         "features_s": disp.timings.get("features_s", 0.0), "convex_adam_s": disp.timings.get("convex_adam_s", 0.0),
         "discrete_s": disp.timings.get("discrete_s", 0.0), "adam_s": disp.timings.get("adam_s", 0.0),
         "register_s": disp.timings.get("register_s", 0.0),
         "total_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        t["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return t


def resolved_config(cfg: RegisterConfig, pair: AlignedPair) -> dict:
    """``config.json``: the settings with the modalities as used (guessed ones filled in)."""
    d = asdict(cfg)
    d["fixed_modality"], d["moving_modality"] = pair.fixed_modality, pair.moving_modality
    return d


def result_of(pair: AlignedPair, disp: Displacement, metrics: Metrics, *, timings: dict, config: dict,
              outputs: dict | None = None) -> RegistrationResult:
    """The stages' values as one :class:`RegistrationResult`."""
    return RegistrationResult(disp.numpy(), pair.fixed, pair.moving_on_fixed, metrics.warped, pair.world_transform,
                              pair.fixed_labels, pair.moving_labels_on_fixed, metrics.warped_labels,
                              metrics.to_dict(), timings, config, dict(outputs or {}))


def register_aligned(pair: AlignedPair, cfg: RegisterConfig, *, out_dir: str | os.PathLike | None = None,
                     inputs=(), export=()) -> RegistrationResult:
    """Stages 2-4 on an aligned pair: register with method ``cfg.features``, evaluate, write (when ``out_dir``).

    Feature methods get :meth:`RegisterConfig.method_options`; peers get ``cfg.feature_options`` as their options.
    ``cfg.init`` and the modalities are those the pair was aligned with (they are recorded, not applied here).
    ``inputs``: input paths besides the pair's scans (label maps) that no output may replace.
    """
    t0 = time.perf_counter()
    method = get_registration_method(cfg.features)
    if method.kind == "features":
        lo, hi = pair.box
        check_volume_size([b - a for a, b in zip(lo, hi)], cfg.convex,
                          f"fixed image {pair.fixed.path or ''} (registered box)".replace("  ", " "))
    device = torch_device(cfg.device)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_out_dir(out)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    with stage(f"register ({cfg.features})"):
        t = time.perf_counter()
        options = cfg.method_options() if method.kind == "features" else dict(cfg.feature_options)
        disp = method.register(pair, options, device=device)
        disp.timings["register_s"] = time.perf_counter() - t
    with stage("evaluate"):
        metrics = evaluate(pair, disp)
    timings = run_timings(pair, disp, t0 - pair.timings["load_s"] - pair.timings["init_s"], device)
    config_dict = resolved_config(cfg, pair)
    outputs = None
    if out is not None:
        with stage("write"):
            outputs = write(out, pair, disp, metrics, config=config_dict, timings=timings, inputs=inputs,
                            export=export)
    return result_of(pair, disp, metrics, timings=timings, config=config_dict, outputs=outputs)


def register(fixed, moving, *, fixed_labels=None, moving_labels=None, config: RegisterConfig | None = None,
             out_dir: str | os.PathLike | None = None, label_map: dict | None = None,
             label_names: dict | None = None, preset: str | None = "default", export: tuple = (),
             **overrides) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` and (optionally) evaluate and write the results.

    Args:
        fixed, moving: NIfTI paths or :class:`dinoreg_core.io.Volume` objects.
        fixed_labels, moving_labels: optional label maps (paths or Volumes) on their image's grid.
        config: a complete :class:`RegisterConfig` (used as given: no preset is applied to it); keyword
            ``overrides`` (e.g. ``init="affine"``, ``grid_sp=4``, ``feature_options={...}``) are applied on top.
        preset: without ``config``, the method's settings start from this preset (:mod:`dinoreg_core.pipeline.presets`):
            ``default`` (the method's default preset), ``official``, ``authors``, ``tuned`` or a preset file;
            ``overrides`` (``features="mind"``, ``lambda_weight=2``, ...) are applied on top.
        out_dir: when given, writes the files of :func:`dinoreg_core.pipeline.write` there (atomically).
        label_map: moving label id -> fixed label id (e.g. TotalSegmentator MR -> CT ids); unmapped ids become 0.
        label_names: fixed label id -> name for the metrics.
        export: extra transform formats to write into ``out_dir``: ``("itk",)`` writes the ITK/ANTs/Slicer files
            of :mod:`dinoreg_core.export_itk`.

    Returns:
        :class:`RegistrationResult`.
    """
    if config is None:
        overrides = dict(overrides)
        method = overrides.pop("features", "mind")
        fixed_fields = {k: overrides.pop(k) for k in ("init", "device", "fixed_modality", "moving_modality")
                        if k in overrides}
        cfg = method_config(method, overrides, preset=preset, **fixed_fields)
    else:
        cfg = config
        cfg.update(overrides)
        cfg.validate()
    check_register_config(cfg)  # ranges, caps, feature options: before anything is loaded or written
    get_registration_method(cfg.features)
    torch_device(cfg.device)
    inputs = [str(x) for x in (fixed, moving, fixed_labels, moving_labels) if isinstance(x, (str, os.PathLike))]
    if out_dir is not None:  # checked now, created only when the files are written
        check_out_dir(out_dir)
        check_not_inputs(out_dir, inputs)
        sweep(out_dir)  # what a killed run left there
    with stage("align"):
        pair = align(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels, init=cfg.init,
                     fixed_modality=cfg.fixed_modality, moving_modality=cfg.moving_modality, label_map=label_map,
                     label_names=label_names)
    return register_aligned(pair, cfg, out_dir=out_dir, inputs=inputs, export=tuple(export))


def method_config(method: str, settings: dict | None = None, *, preset: str | None = "default",
                  **fixed) -> RegisterConfig:
    """The :class:`RegisterConfig` of registry method ``method``: a feature method starts from ``preset``
    (:mod:`dinoreg_core.pipeline.presets`; ``default`` = its default preset) with ``settings`` (``--set`` names) on top; a
    peer keeps ``settings`` as its own options."""
    if get_registration_method(method).kind == "features":
        return config_from(method, settings, preset=preset, **fixed)
    if preset not in (None, "default", "official"):
        raise DinoregError(f"The method '{method}' takes no presets (it is a peer with its own options).")
    items = settings.items() if hasattr(settings, "items") else (settings or [])
    opts = {}
    for k, v in items:  # a peer's options by their own names; the CLI's feat.NAME form is accepted
        k = str(k)
        for prefix in ("feat.", "feature_options."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        opts[k] = v
    return RegisterConfig(features=method, feature_options=opts, **fixed)


def register_methods(fixed, moving, methods, *, settings: dict | None = None, fixed_labels=None, moving_labels=None,
                     init: str = "none", fixed_modality: str | None = None, moving_modality: str | None = None,
                     label_map: dict | None = None, label_names: dict | None = None, device: str = "cpu",
                     out_dir: str | os.PathLike | None = None, progress: bool = False,
                     presets: str | dict | None = "default") -> dict[str, RegistrationResult]:
    """One pair, several methods: aligned once, then each method registered and evaluated on that same pair.

    ``settings``: {method: {setting: value}} (``--set`` names; a method's ``init`` setting, if any, aligns the pair
    again with that initial alignment), applied on top of each method's preset (``presets``: one name for all, or
    {method: name}; ``default`` = each method's default preset). ``out_dir``: files of method M go to ``out_dir/M``.
    Returns {method: :class:`RegistrationResult`} in the order of ``methods``.
    """
    from tqdm.auto import tqdm

    pairs: dict[tuple, AlignedPair] = {}
    results = {}
    for m in tqdm(list(methods), desc="methods", disable=not progress):
        preset = presets.get(m, "default") if isinstance(presets, dict) else presets
        cfg = method_config(m, (settings or {}).get(m), preset=preset, init=init, device=device,
                            fixed_modality=fixed_modality, moving_modality=moving_modality)
        key = (cfg.init, cfg.fixed_modality, cfg.moving_modality)
        if key not in pairs:
            with stage("align"):
                pairs[key] = align(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                                   init=cfg.init, fixed_modality=cfg.fixed_modality,
                                   moving_modality=cfg.moving_modality, label_map=label_map, label_names=label_names)
        results[m] = register_aligned(pairs[key], cfg, out_dir=None if out_dir is None else Path(out_dir) / m)
    return results
