"""DINO + iBOT + KoLeo pretraining of the 3D ViT: the whole training loop, top to bottom.

Run it through the CLI (``dinoreg pretrain --config cfg.json --data DIR --out RUN_DIR``) or call :func:`train`.
The same code runs on one process or many: ``torchrun --nproc_per_node N -m dinoreg_core.cli pretrain ...``
(gloo on CPU, NCCL on CUDA; see :mod:`dinoreg_core.ssl.dist`). ``batch_size`` is the *global* batch.

What one step does:

1. schedules: lr (warm-up + cosine, layer-wise decayed per parameter group), weight decay (cosine), teacher
   momentum (cosine 0.992 -> 0.998), teacher temperature (warm-up 0.04 -> 0.07), prototypes frozen early on;
2. teacher (no gradient) on the clean global crops -> cls targets (centering or Sinkhorn-Knopp) and patch
   targets at the masked tokens;
3. student on the augmented, flipped, masked global crops and the local crops -> DINO loss (cls, cross-view),
   iBOT loss (masked patches, flipped back onto the teacher's grid), optionally the same loss at the unmasked
   patches (``dense_weight``: the student's token of an intensity-remapped view must match the teacher's token
   of the clean view at the same place), optionally the cross-view correspondence loss (``contrast_weight``,
   :mod:`dinoreg_core.ssl.dense`: a point seen in both global crops gets the same embedding, other points of the
   region a different one), KoLeo (spread of the global cls tokens);
4. backward, gradient all-reduce (several processes), clipping, AdamW step;
5. teacher <- EMA of the student; centers <- EMA of the teacher outputs;
6. log (CSV, TensorBoard when installed, tqdm), checkpoint every ``ckpt_every`` steps (atomic).

At the end the teacher backbone is exported with :func:`dinoreg_core.models.checkpoint.save_backbone`
(``RUN_DIR/teacher_backbone.safetensors`` + ``.json`` with provenance).

Run folder: ``config.json`` (resolved config), ``checkpoint.pt`` (latest; ``torch.load(weights_only=True)``
safe: RNG states are stored as tensors), ``log.csv``, ``teacher_backbone.*``.

Exact resume: every random choice of the data is a pure function of (seed, global sample index) and every
schedule a pure function of the step; the checkpoint holds student, teacher, centers, optimiser, grad scaler,
the RNG states (python, numpy, torch, CUDA) of every process and the number of samples consumed. On CPU a
resumed run reproduces an uninterrupted one bit for bit.

Collapse monitors in the log: ``teacher_entropy`` (mean entropy of the teacher's cls targets, nats; near
log K = uniform collapse), ``teacher_marginal_entropy`` (entropy of their batch mean; near 0 = all samples on
one prototype; equal to ``teacher_entropy`` = every sample gets the same target), the same two for the patch
targets at the masked tokens (``patch_entropy``, ``patch_marginal_entropy``), ``cls_std`` and ``patch_std`` (standard deviation of the L2-normalised teacher cls tokens over
the batch, and of the patch tokens over each view, times sqrt(C): about 1 for well spread features, 0 for
collapse).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import settings
from ..atomic import atomic_path, write_json_atomic
from ..data.augment import AugmentConfig
from ..errors import DinoregError
from ..models.vit3d import CONFIGS, ViT3D, ViT3DConfig
from . import checkpoints as ckpts
from . import dist as D
from .data import (MaskConfig, PretrainViews, StepBatchSampler, StreamConfig, StreamViews, VolumeSource,
                   collate_views, sample_seed)
from .dense import DenseProjector, dense_correspondence_loss
from .heads import DINOHead, cancel_last_layer_grads
from .losses import Center, cross_entropy, dino_cls_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp
from .meta import SSLNet
from .schedules import cosine, warmup_constant, warmup_cosine
from .select import ValConfig, ValLog, validate_and_select, validation_pairs

STREAM_ONLY = "stream"           # --data value: streamed phantom subjects only (stream.enabled), no scans

LOG_FIELDS = ["step", "samples", "loss", "dino_loss", "ibot_loss", "dense_loss", "contrast_loss", "koleo_loss", "lr",
              "weight_decay", "momentum", "teacher_temp", "grad_norm", "teacher_entropy", "teacher_marginal_entropy",
              "patch_entropy", "patch_marginal_entropy", "cls_std", "patch_std", "contrast_top1", "mask_ratio",
              "sec_per_step", "val_dice", "val_dice_ctct", "val_dice_mrmr", "val_dice_mrct"]


@dataclass
class PretrainConfig:
    """Every knob of a pretraining run (defaults: the paper's settings on the "paper" backbone where known)."""

    # backbone
    model: str = "paper"                       # name in dinoreg_core.models.vit3d.CONFIGS
    model_overrides: dict = field(default_factory=dict)  # ViT3DConfig fields to change, e.g. {"depth": 2}
    drop_path_rate: float = 0.0                # student stochastic depth (teacher: none)
    init_backbone: str = ""                    # exported backbone (X.safetensors) to start from (heads: fresh);
                                               # its architecture must equal model + model_overrides ("": random)
    grad_checkpointing: bool = False           # recompute block activations in backward (saves memory)
    # projection heads
    head_out_dim: int = 8192                   # DINO prototypes K (paper: 8192)
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    ibot_separate_head: bool = False           # a second head for the patch tokens (else shared with cls)
    freeze_last_layer_steps: int = 100         # prototypes frozen for these first steps
    # losses
    dino_weight: float = 1.0
    dino_unmasked_pass: bool = False           # the authors' DINO loss: a second, unmasked student pass over the
                                               # same global view(s), cls vs the teacher's cls of the same view
                                               # (allows n_global=1); False: DINO's cross-view loss
    ibot_weight: float = 1.0                   # paper: 1.0
    dense_weight: float = 0.0                  # iBOT-style loss at the *unmasked* tokens too: the student's patch
                                               # tokens of the augmented view predict the teacher's at the same
                                               # place of the clean view (ours; paper: 0, masked tokens only)
    contrast_weight: float = 0.0               # cross-view correspondence loss (ours, dinoreg_core.ssl.dense; 0: off)
    contrast_temp: float = 0.2                 # its InfoNCE temperature
    contrast_exclude: float = 6.0              # negatives closer than this to the point are left out (voxels)
    contrast_dim: int = 64                     # its projector's output dimension
    koleo_weight: float = 0.1                  # paper: 0.1
    centering: str = "center"                  # "center" (running mean) or "sinkhorn" (Sinkhorn-Knopp, 3 iters)
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp_end: float = 0.07
    teacher_temp_warmup_steps: int = 1000
    momentum_start: float = 0.992              # teacher EMA momentum, cosine to momentum_end
    momentum_end: float = 0.998
    # iBOT masking of the global views
    mask_ratio_min: float = 0.4
    mask_ratio_max: float = 0.7
    mask_probability: float = 0.5              # fraction of global views that are masked
    # views (crop sizes must be multiples of the patch size)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # data
    stream: StreamConfig = field(default_factory=StreamConfig)  # streamed phantom subjects, two appearances per
                                               # sample (enabled: --data may be "stream" = no real scans)
    spacing_mm: float = 2.0                    # resampling of NIfTI / dataset sources (corpus volumes: as cached)
    cache_volumes: int = 64                    # volumes kept in memory per data process
    num_workers: int = 0                       # DataLoader worker processes (0: views made in the main process)
    # optimisation
    steps: int = 10000
    batch_size: int = 8                        # global batch (samples per step, over all processes)
    lr: float = 5e-4                           # peak learning rate (after warm-up)
    min_lr: float = 1e-6
    warmup_steps: int = 500
    weight_decay: float = 0.04                 # cosine to weight_decay_end
    weight_decay_end: float = 0.2
    layer_decay: float = 0.9                   # lr of block i scaled by layer_decay ** (depth - i)
    clip_grad: float = 3.0                     # max gradient norm (0: no clipping)
    betas: tuple = (0.9, 0.999)
    amp: str = "auto"                          # "auto" (bf16 on CUDA, none on CPU), "bf16", "fp16", "none"
    # run
    seed: int = 0
    device: str = "auto"                       # "auto", "cpu", "cuda"
    threads: int = 0                           # torch CPU threads per process (0: torch's default)
    ckpt_every: int = 500                      # steps between checkpoints (the last step always saves)
    val: ValConfig = field(default_factory=ValConfig)  # checkpoint selection by registration (ssl/select.py):
                                               # every val.every steps the teacher registers the validation pairs
    snapshot_every: int = 0                    # >0: also export the teacher backbone every so many steps to
                                               #     RUN_DIR/snapshots/step_NNNNNN.* (for selection afterwards)
    log_every: int = 10                        # steps between log rows
    steps_per_run: int = 0                     # >0: this invocation stops (with a checkpoint) after so many steps;
                                               #     --resume continues (time-sliced jobs); 0: run to ``steps``
    progress: bool = True                      # tqdm bar

    def check(self) -> None:
        """Raise DinoregError (one sentence) on an inconsistent setting."""
        if self.model not in CONFIGS:
            raise DinoregError(f"Unknown model '{self.model}'; choose one of {', '.join(CONFIGS)}.")
        p = self.model_config().patch_size
        a = self.augment
        for name, size in (("augment.global_size", a.global_size), ("augment.local_size", a.local_size)):
            if size < p or size % p:
                raise DinoregError(f"The crop size {name}={size} must be a positive multiple of the patch size {p}.")
        if a.n_global < 2 and not self.dino_unmasked_pass:
            raise DinoregError(f"augment.n_global={a.n_global}: the DINO loss needs at least 2 global crops (or "
                               f"dino_unmasked_pass=true).")
        if self.centering not in ("center", "sinkhorn"):
            raise DinoregError(f"centering='{self.centering}' is not known; use 'center' or 'sinkhorn'.")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise DinoregError(f"amp='{self.amp}' is not known; use auto, bf16, fp16 or none.")
        if self.steps < 1 or self.batch_size < 1:
            raise DinoregError(f"steps={self.steps} and batch_size={self.batch_size} must both be at least 1.")
        if not 0.0 <= self.mask_ratio_min <= self.mask_ratio_max <= 1.0:
            raise DinoregError(f"The mask ratios {self.mask_ratio_min}..{self.mask_ratio_max} must lie in [0, 1].")
        if self.stream.enabled:
            self.stream.check()
        self.val.check()
        if self.val.every > 0 and self.val.every % self.log_every:
            raise DinoregError(f"val.every={self.val.every} must be a multiple of log_every={self.log_every} (the "
                               f"Dice is logged beside the losses).")
        if self.snapshot_every < 0:
            raise DinoregError(f"snapshot_every={self.snapshot_every} must be 0 (off) or a number of steps.")

    def model_config(self) -> ViT3DConfig:
        base = CONFIGS[self.model]
        known = {f.name for f in fields(ViT3DConfig)}
        bad = sorted(set(self.model_overrides) - known)
        if bad:
            raise DinoregError(f"model_overrides has unknown ViT3DConfig field '{bad[0]}'.")
        return replace(base, **self.model_overrides)


# ------------------------------------------------------------------------------------------ config files

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # pretrain_<name>.json shipped with the package


def resolve_config_path(value: str | None, run_dir: Path, resume: bool) -> Path | None:
    """The config file for ``--config VALUE`` (a path or a packaged name); on resume default RUN_DIR/config.json."""
    if value is None:
        saved = Path(run_dir) / "config.json"
        return saved if resume and saved.is_file() else None
    p = Path(value)
    if p.is_file():
        return p
    packaged = PACKAGED_CONFIGS / f"pretrain_{value}.json"
    if "/" not in value and packaged.is_file():
        return packaged
    names = sorted(q.stem.replace("pretrain_", "") for q in PACKAGED_CONFIGS.glob("pretrain_*.json"))
    raise DinoregError(f"The config {value} is neither a file nor a packaged config name ({', '.join(names)}).")


def config_to_dict(cfg: PretrainConfig) -> dict:
    return settings.to_dict(cfg)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """A :class:`PretrainConfig` from a JSON (or YAML, with PyYAML installed) file and ``key=value`` overrides.

    Parsed by :mod:`dinoreg_core.settings` (strict keys and types, the rules every command shares): override keys
    may be dotted for nested fields (``augment.global_size=32``); values are converted to the field's type
    (``true``, ``[1,2]`` or ``1,2``, ``{"depth": 2}``).
    """
    d = settings.load_file(path, what="config file") if path is not None else {}
    cfg = settings.from_dict(PretrainConfig, d)
    settings.apply(cfg, settings.parse_assignments(overrides))
    cfg.check()
    return cfg


# -------------------------------------------------------------------------------------------- building blocks

def build_net(cfg: PretrainConfig, vit_cfg: ViT3DConfig) -> SSLNet:
    """Backbone + DINO head (+ separate iBOT head)."""
    C = vit_cfg.embed_dim

    def head():
        return DINOHead(C, cfg.head_out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_layers)

    dense = DenseProjector(C, out_dim=cfg.contrast_dim) if cfg.contrast_weight > 0 else None
    return SSLNet(ViT3D(vit_cfg), head(), head() if cfg.ibot_separate_head else None, dense)


def init_from_backbone(net: SSLNet, path: str, vit_cfg: ViT3DConfig) -> None:
    """Load an exported backbone's weights into ``net.backbone`` (DinoregError if the architectures differ)."""
    from ..models.checkpoint import load_backbone

    model, cfg, _ = load_backbone(path)
    if replace(cfg, drop_path_rate=vit_cfg.drop_path_rate) != vit_cfg:
        raise DinoregError(f"init_backbone {path} is a different ViT ({cfg}) from the configured one ({vit_cfg}).")
    net.backbone.load_state_dict(model.state_dict())


def param_groups(net: SSLNet, layer_decay: float) -> list[dict]:
    """AdamW groups: layer-wise lr decay, no weight decay on biases/norms/tokens/position embeddings.

    Layer ids: tokens, position embeddings and patch embedding 0; block i -> i+1; final norm and heads depth+1.
    Each group carries "lr_scale", "wd_scale" and "last_layer" (the prototypes, frozen early on).
    """
    depth = net.backbone.cfg.depth
    groups: dict = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("backbone.") and not name.startswith("backbone.norm."):
            layer = 0
        else:
            layer = depth + 1
        lr_scale = layer_decay ** (depth + 1 - layer)
        wd_scale = 0.0 if (p.ndim <= 1 or name.endswith(("token", "tokens", "pos_embed"))) else 1.0
        last = name.endswith("prototypes")
        key = (layer, wd_scale, last)
        g = groups.setdefault(key, {"params": [], "lr_scale": lr_scale, "wd_scale": wd_scale, "last_layer": last})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states as tensors and numbers (loadable with weights_only=True)."""
    py = random.getstate()
    npy = np.random.get_state()
    st = {"python": torch.tensor(py[1], dtype=torch.int64), "python_version": int(py[0]),
          "python_gauss": py[2], "numpy": torch.from_numpy(npy[1].astype(np.int64)), "numpy_pos": int(npy[2]),
          "numpy_has_gauss": int(npy[3]), "numpy_gauss": float(npy[4]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate((st["python_version"], tuple(int(v) for v in st["python"].tolist()), st["python_gauss"]))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], st["numpy_has_gauss"],
                         st["numpy_gauss"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of a probability matrix (M,K) -> (M,)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def spread(x: torch.Tensor, dim: int) -> float:
    """std along ``dim`` of L2-normalised features, averaged over channels, times sqrt(C) (1 = isotropic, 0 = collapse)."""
    x = F.normalize(x.float(), dim=-1)
    return float(x.std(dim=dim).mean() * math.sqrt(x.shape[-1]))


class CsvLog:
    """Append-only CSV log; on resume rows after the resumed step are dropped (they were not checkpointed)."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        rows = []
        if start_step > 0 and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= start_step]
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=start_step + 1)
        except Exception:  # noqa: BLE001 - TensorBoard is optional
            self.tb = None

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow({k: row.get(k, "") for k in LOG_FIELDS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DinoregError("device='cuda' was requested but no CUDA device is available.")
        return torch.device("cuda", local_rank)
    return torch.device(name)


# ------------------------------------------------------------------------------------------------- the loop

def train(cfg: PretrainConfig, data: str | os.PathLike, out: str | os.PathLike, *, resume: bool = False) -> dict:
    """Pretrain (or resume) into the run folder ``out``; returns a summary dict (rank 0: with the export path)."""
    cfg.check()
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"

    # ---- processes, device, precision, seeds
    rank, world, local_rank = D.init()
    master = rank == 0
    device = pick_device(cfg.device, local_rank)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    if cfg.batch_size % world:
        raise DinoregError(f"batch_size={cfg.batch_size} is not divisible by the {world} processes.")
    if master:
        if (ckpt_path.exists() or (out / ckpts.PREVIOUS).exists()) and not resume:
            raise DinoregError(f"The run folder {out} already holds a checkpoint; pass --resume to continue it or "
                               f"choose another --out.")
    ck, ck_used = None, ckpt_path
    if resume and (ckpt_path.exists() or (out / ckpts.PREVIOUS).exists()):  # verified before anything is written
        ck, ck_used = ckpts.load_verified(out)
        ckpts.check_config(ck["config"], config_to_dict(cfg), ck_used)
    seed_everything(cfg.seed)                     # the same initial weights on every process

    # ---- data: global sample index -> views (pure function of (seed, index))
    vit_cfg = cfg.model_config()
    masks_cfg = MaskConfig(cfg.mask_ratio_min, cfg.mask_ratio_max, cfg.mask_probability)
    if str(data) == STREAM_ONLY and not cfg.stream.enabled:
        raise DinoregError(f"--data {STREAM_ONLY} needs stream.enabled=true (streamed phantom subjects).")
    real = None
    if str(data) != STREAM_ONLY:
        source = VolumeSource(data, spacing_mm=cfg.spacing_mm)
        real = PretrainViews(source, cfg.augment, masks_cfg, vit_cfg.patch_size, cfg.seed, cfg.cache_volumes)
    if cfg.stream.enabled:
        dataset = StreamViews(cfg.stream, cfg.augment, masks_cfg, vit_cfg.patch_size, cfg.seed,
                              real=real if cfg.stream.real_ratio > 0 else None)
    else:
        dataset = real
    describe_data = dataset.describe if cfg.stream.enabled else dataset.source.describe

    # ---- student, teacher (EMA copy, no gradients), centers, optimiser, grad scaler
    student = build_net(cfg, replace(vit_cfg, drop_path_rate=cfg.drop_path_rate)).to(device)
    student.backbone.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.init_backbone:
        init_from_backbone(student, cfg.init_backbone, replace(vit_cfg, drop_path_rate=cfg.drop_path_rate))
    D.broadcast_module_(student)
    teacher = build_net(cfg, vit_cfg).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.eval().requires_grad_(False)
    dino_center = Center(cfg.head_out_dim, cfg.center_momentum).to(device)
    ibot_center = Center(student.patch_head.out_dim, cfg.center_momentum).to(device)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.layer_decay), lr=0.0, betas=tuple(cfg.betas))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    torch.manual_seed(sample_seed(cfg.seed, rank, salt=2))   # per-process stream (drop path)

    # ---- resume (the checkpoint was read and its config checked above; now its tensors against the networks)
    step, samples = 0, 0
    if ck is not None:
        ckpts.check_shapes(ck, {"student": student, "teacher": teacher, "dino_center": dino_center,
                                "ibot_center": ibot_center}, ck_used)
    if master:  # config.json only now: a refused resume leaves the run folder as it was
        out.mkdir(parents=True, exist_ok=True)
        ckpts.sweep(out)
        write_json_atomic(out / "config.json", config_to_dict(cfg))
    D.barrier()
    if ck is not None:
        student.load_state_dict(ck["student"])
        teacher.load_state_dict(ck["teacher"])
        dino_center.load_state_dict(ck["dino_center"])
        ibot_center.load_state_dict(ck["ibot_center"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        step, samples = int(ck["step"]), int(ck["samples"])
        if len(ck["rng"]) == world:
            set_rng_state(ck["rng"][rank])
        if master:
            print(f"dinoreg pretrain: resumed {ck_used} at step {step}", file=sys.stderr)
            if ck.get("data") != describe_data():
                print(f"dinoreg pretrain: warning: the data {describe_data()} differ from the checkpoint's "
                      f"{ck.get('data')}; the sample stream continues on the new data", file=sys.stderr)
            if len(ck["rng"]) != world:
                print(f"dinoreg pretrain: warning: {world} processes now, {len(ck['rng'])} before; RNG states "
                      f"(drop path) are reseeded instead of restored", file=sys.stderr)
    elif resume and master:
        print(f"dinoreg pretrain: no checkpoint in {out}; starting a new run there", file=sys.stderr)

    def save_checkpoint() -> None:
        rngs = D.gather_objects(rng_state())
        if master:
            state = {"step": step, "samples": samples, "world_size": world, "config": config_to_dict(cfg),
                     "data": describe_data(),
                     "student": student.state_dict(), "teacher": teacher.state_dict(),
                     "dino_center": dino_center.state_dict(), "ibot_center": ibot_center.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rngs}
            ckpts.save(state, out)  # atomic; the previous checkpoint kept as checkpoint.prev.pt

    def export_teacher(stem: Path) -> Path:
        from ..models.checkpoint import save_backbone

        prov = {"data": describe_data(), "steps": step, "samples": samples, "seed": cfg.seed, "world_size": world,
                "run_dir": str(out.resolve()), "pretrain_config": config_to_dict(cfg), "final_log": last_row}
        return save_backbone(teacher.backbone, vit_cfg, stem, prov)

    def targets(logits: torch.Tensor, center: Center, temp: float, weights=None) -> torch.Tensor:
        if cfg.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temp, weights=weights, all_reduce=D.all_reduce_ if D.active() else None)
        return center.probs(logits, temp)

    end = min(cfg.steps, step + cfg.steps_per_run) if cfg.steps_per_run > 0 else cfg.steps
    sampler = StepBatchSampler(step, end, cfg.batch_size, rank, world, samples)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_views,
                                         num_workers=cfg.num_workers,   # own generator: keeps the global RNG
                                         generator=torch.Generator().manual_seed(cfg.seed))  # stream untouched
    log = CsvLog(out / "log.csv", step) if master else None
    val_pairs = validation_pairs(cfg.val) if (master and cfg.val.every > 0) else []
    val_log = ValLog(out / "val_log.csv", step) if val_pairs else None
    bar = tqdm(total=cfg.steps, initial=step, disable=not (master and cfg.progress), desc="pretrain", unit="step")
    G, L = cfg.augment.n_global, cfg.augment.n_local
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    student.train()
    t_last, last_row = time.time(), {}

    for batch in loader:
        # 1. schedules (pure functions of the step)
        lr = warmup_cosine(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        wd = cosine(step, cfg.steps, cfg.weight_decay, cfg.weight_decay_end)
        momentum = cosine(step, cfg.steps, cfg.momentum_start, cfg.momentum_end)
        teacher_temp = warmup_constant(step, cfg.teacher_temp_warmup_steps, cfg.teacher_temp_start,
                                       cfg.teacher_temp_end)
        frozen = step < cfg.freeze_last_layer_steps
        for g in optimizer.param_groups:
            g["lr"] = 0.0 if (g["last_layer"] and frozen) else lr * g["lr_scale"]
            g["weight_decay"] = wd * g["wd_scale"]
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        masks = batch["masks"]                                           # (G*b, N), teacher frame
        n_masked = masks.sum(1)
        weights = (1.0 / n_masked.clamp(min=1).float()).repeat_interleave(n_masked)   # per masked token
        dense = cfg.dense_weight > 0
        if dense:
            n_visible = masks.shape[1] - n_masked
            vis_weights = (1.0 / n_visible.clamp(min=1).float()).repeat_interleave(n_visible)

        # 2. teacher targets
        with torch.no_grad():
            with autocast:
                t = teacher.forward_teacher(batch["teacher_global"], masks, visible=dense)
            t_cls = targets(t["cls_logits"], dino_center, teacher_temp)
            t_patch = targets(t["masked_logits"], ibot_center, teacher_temp, weights)
            t_visible = targets(t["visible_logits"], ibot_center, teacher_temp, vis_weights) if dense else None

        # 3. student and losses
        with autocast:
            s = student(batch["student_global"], masks, batch["student_flips"], batch["local"], visible=dense)
        student_views = list(s["cls_logits"].chunk(G)) + (list(s["local_cls_logits"].chunk(L)) if L else [])
        if cfg.dino_unmasked_pass:                                       # same view, unmasked, vs the teacher
            with autocast:
                s_full = student(batch["student_global"], torch.zeros_like(masks), batch["student_flips"])
            dino = cross_entropy(t_cls, s_full["cls_logits"], cfg.student_temp).mean()
        else:
            dino = dino_cls_loss(student_views, list(t_cls.chunk(G)), cfg.student_temp)
        ibot = ibot_patch_loss(s["masked_logits"], t_patch, weights, masks.shape[0], cfg.student_temp)
        dense_loss = (ibot_patch_loss(s["visible_logits"], t_visible, vis_weights, masks.shape[0], cfg.student_temp)
                      if dense else ibot.new_zeros(()))
        b = masks.shape[0] // G
        koleo = sum(koleo_loss(c, D.all_gather_grad, offset=rank * b) for c in s["cls"].chunk(G))
        loss = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
        if dense:
            loss = loss + cfg.dense_weight * dense_loss
        contrast_loss, contrast_top1 = ibot.new_zeros(()), float("nan")
        if cfg.contrast_weight > 0:
            with torch.no_grad(), autocast:
                t_emb = teacher.dense_head(t["patch_tokens"])
            with autocast:
                s_emb = student.dense_head(s["patch_tokens"])
            grid = (cfg.augment.global_size // vit_cfg.patch_size,) * 3
            contrast_loss, cst = dense_correspondence_loss(s_emb, t_emb, batch["global_boxes"], grid, G, valid=~masks,
                                                           temp=cfg.contrast_temp, exclude=cfg.contrast_exclude)
            contrast_top1 = cst["top1"]
            loss = loss + cfg.contrast_weight * contrast_loss

        # 4. backward, gradient average over processes, clipping, optimiser step
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        D.all_reduce_grads(student.parameters())
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else 1e30)
        if frozen:
            for h in student.heads():
                cancel_last_layer_grads(h)
        scaler.step(optimizer)
        scaler.update()

        # 5. teacher = EMA of the student; centers = EMA of the teacher outputs
        with torch.no_grad():
            for p_t, p_s in zip(teacher.parameters(), student.parameters()):
                p_t.lerp_(p_s.detach(), 1.0 - momentum)
            if cfg.centering == "center":
                dino_center.update(D.all_reduce_(t["cls_logits"].float().mean(0), "mean"))
                patch_sum = D.all_reduce_(torch.cat([t["masked_logits"].float().sum(0),
                                                     n_masked.sum().float()[None]]), "sum")
                if patch_sum[-1] > 0:
                    ibot_center.update(patch_sum[:-1] / patch_sum[-1])
        step += 1
        samples += cfg.batch_size

        # 6. validation by registration (rank 0; its seeding of the global RNGs is undone), log and checkpoint
        val_row = {}
        if val_log is not None and step % cfg.val.every == 0:
            state = rng_state()
            w = export_teacher(out / "snapshots" / f"step_{step:06d}")
            val_row = validate_and_select(out, step, w, val_pairs, val_log, cfg.val.register)
            set_rng_state(state)
        if step % cfg.log_every == 0 or step == end:
            with torch.no_grad():
                stats = torch.tensor([loss.item(), float(dino), float(ibot), float(dense_loss),
                                      float(contrast_loss), float(contrast_top1), float(koleo),
                                      float(entropy(t_cls).mean()), float(entropy(t_cls.mean(0, keepdim=True))),
                                      float(entropy(t_patch).mean()) if len(t_patch) else float("nan"),
                                      float(entropy(t_patch.mean(0, keepdim=True))) if len(t_patch) else float("nan"),
                                      spread(t["cls"], 0), spread(t["patch_tokens"], 1),
                                      float(n_masked.float().mean() / masks.shape[1])], dtype=torch.float64)
            D.all_reduce_(stats, "mean")
            now = time.time()
            last_row = dict(zip(["loss", "dino_loss", "ibot_loss", "dense_loss", "contrast_loss", "contrast_top1",
                                 "koleo_loss", "teacher_entropy",
                                 "teacher_marginal_entropy", "patch_entropy", "patch_marginal_entropy", "cls_std",
                                 "patch_std", "mask_ratio"], stats.tolist()))
            last_row.update(step=step, samples=samples, lr=lr, weight_decay=wd, momentum=momentum,
                            teacher_temp=teacher_temp, grad_norm=float(grad_norm),
                            sec_per_step=(now - t_last) / cfg.log_every,
                            **{k: v for k, v in val_row.items() if k.startswith("val_dice")})
            t_last = now
            if master:
                log.write(last_row)
                bar.set_postfix(loss=f"{last_row['loss']:.3f}", H_t=f"{last_row['teacher_entropy']:.2f}")
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step == end:
            save_checkpoint()
        if master and cfg.snapshot_every > 0 and step % cfg.snapshot_every == 0 and not val_row:
            export_teacher(out / "snapshots" / f"step_{step:06d}")
    bar.close()

    # ---- export the teacher backbone
    result = {"run_dir": str(out), "step": step, "samples": samples, "world_size": world, "rank": rank,
              "last": last_row, "skipped_scans": [real.source.name(v) for v in sorted(real.skipped)] if real else []}
    if step >= cfg.steps and master:
        result["export"] = str(export_teacher(out / "teacher_backbone"))
    if log is not None:
        log.close()
    D.barrier()
    return result
