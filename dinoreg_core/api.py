"""Register two scans in one call: :func:`register`.

The pipeline (DESIGN.md section 1)::

    load (canonical RAS) -> [initial alignment] -> moving resampled onto the fixed grid
    -> intensity normalisation -> features (registry) -> [joint PCA] -> upsample to the image grid
    -> ConvexAdam -> warp image and labels -> metrics -> files

The displacement is defined on the fixed grid, in fixed voxels, relative to the moving image *after* it was
resampled onto the fixed grid through the initial world transform ``T`` (identity for ``init="none"``):
``warped(x) = moving_on_fixed(x + u(x))`` with ``moving_on_fixed(x) = moving(T @ world_fixed(x))``.
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
import torch.nn.functional as F

from . import io
from .atomic import write_json_atomic
from .errors import DinoregError
from .evaluation.metrics import dice_per_label, field_metrics, hd95_per_label
from .features.registry import get_feature_method
from .preprocess import guess_modality, normalize_intensity, resample_to, world_overlap_fraction
from .registration.convex_adam import ConvexAdamConfig, ConvexAdamTimings, convex_adam
from .registration.initial import initial_alignment
from .registration.warp import warp, warp_labels


@dataclass
class RegisterConfig:
    """Everything :func:`register` needs besides the images (the CLI's ``--set key=value`` names)."""

    features: str = "mind"  # feature method name (see features.registry)
    init: str = "none"  # initial alignment: none | com | affine
    device: str = "cpu"
    pca_dim: int = 12  # channels after joint PCA (methods with joint_pca)
    fixed_modality: str | None = None  # "ct" | "mr" | None (guess from intensities)
    moving_modality: str | None = None
    seed: int = 0
    convex: ConvexAdamConfig = field(default_factory=ConvexAdamConfig)
    feature_options: dict = field(default_factory=dict)  # e.g. {"mind_r": 1, "mind_d": 2} or {"weights": path}

    def set(self, key: str, value: str) -> None:
        """Apply one ``key=value`` override (ConvexAdam fields by their own names, feature options as ``feat.X``)."""
        if key.startswith("feat."):
            self.feature_options[key[5:]] = _parse_value(value)
            return
        for target in (self, self.convex):
            if key in target.__dataclass_fields__ and key != "convex":
                cur = getattr(target, key)
                try:
                    new = _coerce(value, cur)
                except (TypeError, ValueError):
                    raise DinoregError(f"The setting {key}={value} has the wrong type (expected like {cur!r}).") from None
                setattr(target, key, new)
                return
        names = sorted([k for k in self.__dataclass_fields__ if k != "convex"] + list(self.convex.__dataclass_fields__))
        raise DinoregError(f"Unknown setting '{key}'; known settings: {', '.join(names)} (or feat.NAME for feature options).")


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def _coerce(value: str, current):
    if isinstance(current, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(value)
        return value.lower() in ("true", "1", "yes")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple):
        return tuple(float(x) for x in value.split(","))
    if current is None:
        return None if value.lower() == "none" else value
    return type(current)(value)


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


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 1024.0 / 1024.0


def _as_volume(x, what: str, labels: bool = False) -> io.Volume:
    if isinstance(x, io.Volume):
        return x
    return io.load_labels(x, what=what) if labels else io.load_volume(x, what=what)


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DinoregError(f"Device '{name}' was requested but CUDA is not available on this machine; use --device cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DinoregError(f"Unknown device '{name}'; use cpu or cuda.") from None


def compute_features(method_name: str, fixed_img: np.ndarray, moving_img: np.ndarray, *, fixed_modality: str,
                     moving_modality: str, device: torch.device, pca_dim: int = 12, options: dict | None = None,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of two normalised images on one grid, ready for ConvexAdam: (1,C,D,H,W) each, same C.

    Applies the method's extractor, joint PCA to ``pca_dim`` channels when the method asks for it, and trilinear
    upsampling to the image grid.
    """
    method = get_feature_method(method_name)
    opts = dict(options or {})
    ft = torch.from_numpy(np.ascontiguousarray(fixed_img))[None, None].to(device)
    mt = torch.from_numpy(np.ascontiguousarray(moving_img))[None, None].to(device)
    with torch.no_grad():
        ff = method.extract(ft, modality=fixed_modality, device=device, options=opts)
        mf = method.extract(mt, modality=moving_modality, device=device, options=opts)
        if method.joint_pca:
            from .features.pca import joint_project

            ff, mf = joint_project(ff, mf, k=pca_dim, seed=seed)
        size = fixed_img.shape
        if tuple(ff.shape[2:]) != tuple(size):
            ff = F.interpolate(ff, size=size, mode="trilinear", align_corners=False)
        if tuple(mf.shape[2:]) != tuple(size):
            mf = F.interpolate(mf, size=size, mode="trilinear", align_corners=False)
    return ff.float(), mf.float()


def label_metrics(fixed_labels: np.ndarray, moving_labels: np.ndarray, warped_labels: np.ndarray, spacing,
                  label_names: dict | None = None, moving_original: np.ndarray | None = None) -> list[dict]:
    """One row per label present in both the fixed map and the moving map: Dice before/after, HD95 (mm, voxels)
    after, with Learn2Reg's rule (a label that vanished after warping is Dice 0, HD95 inf).

    ``moving_labels`` is the moving map on the fixed grid before warping; ``moving_original`` the moving map on its
    own grid (default ``moving_labels``), which decides which labels are present (as in the Learn2Reg evaluation).
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


def _nanmean(values) -> float:
    v = np.array([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def register(fixed, moving, *, fixed_labels=None, moving_labels=None, config: RegisterConfig | None = None,
             out_dir: str | os.PathLike | None = None, label_map: dict | None = None,
             label_names: dict | None = None, export: tuple = (), **overrides) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` and (optionally) evaluate and write the results.

    Args:
        fixed, moving: NIfTI paths or :class:`dinoreg_core.io.Volume` objects.
        fixed_labels, moving_labels: optional label maps (paths or Volumes) on their image's grid.
        config: :class:`RegisterConfig`; keyword ``overrides`` (e.g. ``features="mind"``, ``init="affine"``,
            ``grid_sp=4``) are applied on top by name.
        out_dir: when given, writes ``disp.nii.gz`` (fixed file's voxel axes, (D,H,W,3)), ``warped.nii.gz``,
            ``warped_labels.nii.gz``, ``metrics.json`` and ``config.json`` there (atomically), plus the Learn2Reg file
            of the whole transform (``disp_FFFF_MMMM.nii.gz`` or the long name, see
            :func:`dinoreg_core.io.l2r_displacement_name`) when the names follow the Learn2Reg pattern and both files
            share one grid; ``metrics.json["metrics"]["learn2reg"]`` holds its official-rule metrics or the reason.
        label_map: moving label id -> fixed label id (e.g. TotalSegmentator MR -> CT ids); unmapped ids become 0.
        label_names: fixed label id -> name for the metrics.
        export: extra transform formats to write into ``out_dir``: ``("itk",)`` writes the ITK/ANTs/Slicer files
            of :mod:`dinoreg_core.export_itk`.

    Returns:
        :class:`RegistrationResult`.
    """
    cfg = config or RegisterConfig()
    for k, v in overrides.items():
        cfg.set(k, str(v)) if not isinstance(v, dict) else cfg.feature_options.update(v)
    cfg.convex.validate()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = _device(cfg.device)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _prepare_out_dir(out)

    t0 = time.perf_counter()
    fvol = _as_volume(fixed, "fixed image")
    mvol = _as_volume(moving, "moving image")
    flab = _as_volume(fixed_labels, "fixed label", labels=True) if fixed_labels is not None else None
    mlab = _as_volume(moving_labels, "moving label", labels=True) if moving_labels is not None else None
    if flab is not None:
        io.check_same_grid(fvol, flab)
    if mlab is not None:
        io.check_same_grid(mvol, mlab)
    fmod = cfg.fixed_modality or guess_modality(fvol.array)
    mmod = cfg.moving_modality or guess_modality(mvol.array)
    t_load = time.perf_counter() - t0

    t = time.perf_counter()
    T = initial_alignment(fvol, mvol, cfg.init, fixed_modality=fmod, moving_modality=mmod)
    overlap = world_overlap_fraction(fvol, mvol, world_transform=T)
    if overlap < 0.05:
        hint = " (try --init com or --init affine)" if cfg.init == "none" else ""
        raise DinoregError(f"The moving scan {mvol.path or ''} does not overlap the fixed scan in world space "
                           f"({100 * overlap:.1f}% of fixed voxels covered){hint}.".replace("  ", " "))
    same_grid = cfg.init == "none" and fvol.shape == mvol.shape and np.allclose(fvol.affine, mvol.affine, atol=1e-3)
    if same_grid:
        mov_img = mvol.array
        mov_lab = mlab.array if mlab is not None else None
    else:
        mov_img = resample_to(mvol, fvol, world_transform=T)
        mov_lab = resample_to(mlab, fvol, labels=True, world_transform=T) if mlab is not None else None
    if mov_lab is not None and label_map:
        lut = np.zeros(int(max(mov_lab.max(), max(label_map))) + 1, dtype=np.int32)
        for k, v in label_map.items():
            lut[int(k)] = int(v)
        mov_lab = lut[mov_lab]
    t_init = time.perf_counter() - t

    # Register only where the moving scan has data (a partial field of view, e.g. an MR slab, leaves the rest
    # of the fixed grid empty); the field is extended outside that box by replicating its border values.
    box = overlap_box(mvol, fvol, T, same_grid)
    crop = (slice(box[0][0], box[1][0]), slice(box[0][1], box[1][1]), slice(box[0][2], box[1][2]))

    t = time.perf_counter()
    fn = normalize_intensity(fvol.array[crop], fmod)
    mn = normalize_intensity(mov_img[crop], mmod)
    ff, mf = compute_features(cfg.features, fn, mn, fixed_modality=fmod, moving_modality=mmod, device=device,
                              pca_dim=cfg.pca_dim, options=cfg.feature_options, seed=cfg.seed)
    t_feat = time.perf_counter() - t

    t = time.perf_counter()
    ct = ConvexAdamTimings()
    disp_crop = convex_adam(ff, mf, cfg.convex, ct)
    del ff, mf
    disp = _embed(disp_crop, box, fvol.shape)
    t_reg = time.perf_counter() - t

    with torch.no_grad():
        mov_t = torch.from_numpy(np.ascontiguousarray(mov_img))[None, None].to(device)
        warped = warp(mov_t, disp)[0, 0].cpu().numpy()
        warped_lab = None
        if mov_lab is not None:
            warped_lab = warp_labels(torch.from_numpy(mov_lab)[None, None].to(device), disp)[0, 0].cpu().numpy()
    disp_np = disp[0].cpu().numpy().astype(np.float32)
    if not same_grid:  # p15: sample the moving file once through the whole transform (as ITK / Learn2Reg do)
        from .registration.whole_transform import warp_whole

        warped = warp_whole(mvol, fvol, disp_np, T)
        if mlab is not None:
            warped_lab = _apply_label_map(warp_whole(mlab, fvol, disp_np, T, labels=True), label_map)
    timings = {"load_s": t_load, "init_s": t_init, "features_s": t_feat, "convex_adam_s": t_reg,
               "discrete_s": ct.seconds.get("discrete", 0.0), "adam_s": ct.seconds.get("adam", 0.0),
               "total_s": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}
    if device.type == "cuda":
        timings["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20

    metrics: dict = {"field": field_metrics(disp_crop), "registered_box": [list(map(int, b)) for b in box]}
    if flab is not None and warped_lab is not None:
        rows = label_metrics(flab.array, mov_lab, warped_lab, fvol.spacing, label_names,
                             moving_original=_apply_label_map(mlab.array, label_map))
        metrics["labels"] = rows
        metrics["summary"] = {
            "dice_initial": _nanmean(r["dice_initial"] for r in rows), "dice": _nanmean(r["dice"] for r in rows),
            "hd95_mm": _nanmean(r["hd95_mm"] for r in rows), "hd95_vox": _nanmean(r["hd95_vox"] for r in rows)}
    res = RegistrationResult(disp_np, fvol, mov_img, warped, T, flab.array if flab is not None else None, mov_lab,
                             warped_lab, metrics, timings, _config_dict(cfg, fmod, mmod))
    if out is not None:
        res.outputs = write_outputs(res, out, mvol, moving_labels=mlab, fixed_labels=flab, label_map=label_map,
                                    export=export)
    return res


def _apply_label_map(lab: np.ndarray, label_map: dict | None) -> np.ndarray:
    """Moving label ids -> fixed ids (unmapped ids become 0); ``lab`` unchanged without a map."""
    if not label_map:
        return lab
    lut = np.zeros(int(max(lab.max(), max(label_map))) + 1, dtype=np.int32)
    for k, v in label_map.items():
        lut[int(k)] = int(v)
    return lut[lab]


def overlap_box(mvol: io.Volume, fvol: io.Volume, T: np.ndarray, same_grid: bool):
    """Bounding box [lo, hi) (fixed voxels) of the fixed grid region covered by the moving scan."""
    if same_grid:
        return (0, 0, 0), tuple(fvol.shape)
    ones = io.Volume(np.ones(mvol.shape, np.float32), mvol.affine)
    valid = resample_to(ones, fvol, world_transform=T, cval=0.0) > 0.5
    if valid.all():
        return (0, 0, 0), tuple(fvol.shape)
    idx = np.argwhere(valid)
    lo, hi = idx.min(0), idx.max(0) + 1
    # keep at least 16 voxels per axis so the coarse grids stay meaningful
    for a in range(3):
        short = 16 - (hi[a] - lo[a])
        if short > 0:
            lo[a] = max(0, lo[a] - (short + 1) // 2)
            hi[a] = min(fvol.shape[a], lo[a] + 16)
    return tuple(int(x) for x in lo), tuple(int(x) for x in hi)


def _embed(disp: torch.Tensor, box, shape) -> torch.Tensor:
    """Place a (1,3,d,h,w) field computed on ``box`` into the full grid, replicating its border outside."""
    lo, hi = box
    if tuple(lo) == (0, 0, 0) and tuple(hi) == tuple(shape):
        return disp
    pads = []
    for a in (2, 1, 0):
        pads += [lo[a], shape[a] - hi[a]]
    return F.pad(disp, pads, mode="replicate")


def _config_dict(cfg: RegisterConfig, fmod: str, mmod: str) -> dict:
    d = asdict(cfg)
    d["fixed_modality"], d["moving_modality"] = fmod, mmod
    return d


def _prepare_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DinoregError(f"The output folder {out} cannot be created ({e.strerror or e}).") from None
    if not os.access(out, os.W_OK):
        raise DinoregError(f"The output folder {out} is not writable.")


def write_outputs(res: RegistrationResult, out: Path, moving: io.Volume, *, moving_labels: io.Volume | None = None,
                  fixed_labels: io.Volume | None = None, label_map: dict | None = None, export: tuple = ()) -> dict:
    """Write displacement, warped image/labels, metrics and config into ``out`` (each file atomically).

    Also the Learn2Reg file of the whole transform (with its metrics by the official rules in ``metrics.json``
    under ``learn2reg``), and with ``export=("itk",)`` the ITK/ANTs/Slicer transforms."""
    f = res.fixed
    files = {
        "displacement": io.save_displacement(res.displacement, f, out / "disp.nii.gz"),
        "warped": io.save_image(res.warped, f, out / "warped.nii.gz"),
    }
    if not np.allclose(res.init_transform, np.eye(4)) or moving.shape != f.shape:
        files["moving_on_fixed"] = io.save_image(res.moving_on_fixed, f, out / "moving_on_fixed_grid.nii.gz")
    if res.warped_labels is not None:
        files["warped_labels"] = io.save_labels(res.warped_labels, f, out / "warped_labels.nii.gz")
    from .evaluation.l2r_submission import pair_outputs  # p15: whole transform, official names and metrics

    l2r = pair_outputs(res.displacement, f, moving, res.init_transform, out, fixed_labels=fixed_labels,
                       moving_labels=moving_labels, moving_label_lut=label_map)
    if l2r["file"]:
        files["l2r_displacement"] = l2r["file"]
    res.metrics["learn2reg"] = {"file": l2r["file"], "note": l2r["note"], **(l2r["metrics"] or {})}
    if "itk" in export:
        from .export_itk import export_itk

        files.update(export_itk(res.displacement, f, res.init_transform, out))
    payload = {"fixed": f.path, "moving": moving.path, "init_transform_fixed_world_to_moving_world":
               res.init_transform.tolist(), "metrics": res.metrics, "timings": res.timings}
    write_json_atomic(out / "metrics.json", payload)
    write_json_atomic(out / "config.json", res.config)
    files["metrics"] = out / "metrics.json"
    files["config"] = out / "config.json"
    return {k: str(v) for k, v in files.items()}
