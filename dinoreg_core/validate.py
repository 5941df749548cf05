"""Checks run before any work starts, of the lowest layer: ranges of pretraining settings, NIfTI headers that
declare more data than their file holds, images of constant intensity. (The registration settings are checked by
:mod:`dinoreg_core.pipeline.checks`.)

Every check raises :class:`~dinoreg_core.errors.DinoregError` with one sentence naming the value at fault. The
ranges and caps are named constants below, each with the reason for its bound (the README's reliability section
lists them).
"""

from __future__ import annotations

import math

from .errors import DinoregError

def in_range(value, lo, hi, what: str) -> None:
    """Raise unless ``lo <= value <= hi`` (and finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise DinoregError(f"The setting {what}={value!r} is not a finite number.")
    if not lo <= value <= hi:
        raise DinoregError(f"The setting {what}={value!r} is out of range; allowed {lo}..{hi}.")


# --- pretraining ---------------------------------------------------------------------------------------------
MAX_PRETRAIN_STEPS = 10_000_000  # 1e7 steps: ~100x the paper's schedule; a larger number is a typo
MAX_BATCH = 4096  # global batch of 3D crops; beyond this no machine holds the views
MAX_HEAD_OUT_DIM = 131072  # DINO prototypes; the paper uses 8192, DINOv2 131072 at most
MAX_LR = 1.0  # AdamW peak learning rate; ViTs diverge far below this


def check_pretrain_config(cfg) -> None:
    """Ranges of :class:`~dinoreg_core.ssl.train.PretrainConfig` fields beyond its own ``check``."""
    in_range(cfg.steps, 1, MAX_PRETRAIN_STEPS, "steps")
    in_range(cfg.batch_size, 1, MAX_BATCH, "batch_size")
    in_range(cfg.head_out_dim, 1, MAX_HEAD_OUT_DIM, "head_out_dim")
    in_range(cfg.lr, 0.0, MAX_LR, "lr")
    in_range(cfg.min_lr, 0.0, MAX_LR, "min_lr")
    in_range(cfg.ckpt_every, 1, MAX_PRETRAIN_STEPS, "ckpt_every")
    in_range(cfg.log_every, 1, MAX_PRETRAIN_STEPS, "log_every")
    in_range(cfg.warmup_steps, 0, MAX_PRETRAIN_STEPS, "warmup_steps")
    in_range(cfg.spacing_mm, 0.1, 20.0, "spacing_mm")
    in_range(cfg.num_workers, 0, 256, "num_workers")
    in_range(cfg.steps_per_run, 0, MAX_PRETRAIN_STEPS, "steps_per_run")
    for name in ("student_temp", "teacher_temp_start", "teacher_temp_end", "contrast_temp"):
        v = getattr(cfg, name)
        if not 0.0 < v <= 10.0:
            raise DinoregError(f"The setting {name}={v!r} is out of range; allowed (0, 10].")
    for name in ("momentum_start", "momentum_end", "center_momentum"):
        in_range(getattr(cfg, name), 0.0, 1.0, name)
    for name in ("dino_weight", "ibot_weight", "dense_weight", "contrast_weight", "koleo_weight", "weight_decay",
                 "weight_decay_end", "clip_grad", "drop_path_rate"):
        in_range(getattr(cfg, name), 0.0, 1000.0 if "weight" in name or name == "clip_grad" else 1.0, name)


# --- files ---------------------------------------------------------------------------------------------------
MAX_DEFLATE_RATIO = 1032  # deflate (gzip) cannot expand data more than ~1032:1, so a .nii.gz whose header
#                           declares more bytes than this times its size is damaged, whatever it claims


def check_nifti_size(img, path, what: str) -> None:
    """Refuse a NIfTI file whose header declares more voxel data than the file can hold ("damaged or truncated"),
    before any of it is allocated (a 1 KB file claiming 2000^3 voxels is not an out-of-memory case)."""
    import numpy as np

    from pathlib import Path

    hdr = img.header
    shape = tuple(int(s) for s in hdr.get_data_shape())
    nbytes = int(np.prod(shape, dtype=np.float64)) * int(hdr.get_data_dtype().itemsize)
    offset = int(hdr["vox_offset"]) if "vox_offset" in hdr else 0
    size = Path(path).stat().st_size
    if str(path).endswith(".gz"):
        damaged = nbytes > MAX_DEFLATE_RATIO * size + offset
    else:
        damaged = offset + nbytes > size
    if damaged:
        raise DinoregError(f"The {what} file {path} is damaged or truncated: its header declares shape {shape} "
                           f"({nbytes} bytes of voxels) but the file holds {size} bytes.")


CONSTANT_RANGE = 1e-6  # an image whose max - min is below this has no structure to register


def check_not_constant(vol, what: str) -> None:
    """Refuse an image of (almost) constant intensity, naming its file and value."""
    import numpy as np

    a = np.asarray(vol.array)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < CONSTANT_RANGE:
        raise DinoregError(f"The {what} {vol.path or ''} has constant intensity {lo:g} in every voxel; there is "
                           f"nothing to register.".replace("  ", " "))
