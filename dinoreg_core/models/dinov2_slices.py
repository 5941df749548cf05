"""The ``dinov2`` feature method: a 2D DINOv2 (natural images) applied slice by slice to a 3D volume.

This is the baseline the paper compares against (as in DINO-Reg): every slice of the volume along one
array axis goes through a frozen 2D DINOv2; the patch tokens of each slice become one plane of a 3D feature
volume; the pipeline then reduces fixed and moving features jointly with PCA and runs ConvexAdam on them.

Steps of :func:`extract_dinov2_features` (image (1,1,D,H,W), roughly [0,1], see the feature registry):

1. Slicing. ``slice_axis`` is an array axis of the canonical RAS volume: 0 = D (sagittal slices, i / R),
   1 = H (coronal, j / A), 2 = W (axial, k / S; the default). ``slice_axis="all"`` runs the three
   orthogonal directions and concatenates (``combine="concat"``) or averages (``combine="mean"``) them.
2. Intensities. Each slice is clamped to [0,1] (``slice_norm="clip"``: keeps the volume-wide normalisation
   of :func:`dinoreg_core.preprocess.normalize_intensity`, so slices stay comparable with each other and with
   the other image) or stretched to [0,1] by its own min/max (``slice_norm="minmax"``), replicated to three
   channels and normalised with the ImageNet mean/std the model was trained with.
3. Resizing. The two in-plane axes, in array order (a, b), are resized bilinearly so that the token grid is
   (ta, tb) with ``target_tokens`` tokens along the longer in-plane axis and the shorter one in proportion of
   voxel counts (``keep_aspect=True``), or ``target_tokens`` along both (``keep_aspect=False``; the DINO-Reg
   baseline: 896 px -> 64 x 64 tokens for a /14 model). Input pixels = tokens * patch size.
4. Encoding. Slices go through the backbone in batches of ``batch_size``; the final-layer-norm patch tokens
   (cls and register tokens dropped) are reshaped to (C, ta, tb).
5. Stacking. Features keep the image's axis order: the output is (1, C, d, h, w) where the slice axis keeps
   one plane per image slice (same size and spacing as the image along it) and each in-plane axis has t
   tokens. Token centre t of an axis with n voxels lies at voxel coordinate (t + 0.5) * n / T - 0.5
   (spacing n / T voxels), i.e. the ``align_corners=False`` convention, so trilinear upsampling with
   ``align_corners=False`` back to (D,H,W) puts every feature where it was computed; in mm the token spacing
   is n * spacing / T. Example: axial slices of a 192x160x192 volume at 2 mm with target_tokens=64 give
   (1, C, 64, 53, 192) with spacings (6.0, 6.04, 2.0) mm; for ViT-L (C=1024) that is 2.7 GB of float32.
   With ``slice_axis="all"`` the three volumes (each on its own grid) are resampled trilinearly
   (``align_corners=False``) to one token grid: along each axis the larger of the two token counts that axis
   gets as an in-plane axis (e.g. (64, 53, 64) for 192x160x192), then concatenated or averaged.
6. Every k-th slice (``every_k`` > 1, the authors' baseline uses 6): only slices 0, k, 2k, ... and the last
   slice are encoded; the planes between are linear interpolations of the two nearest encoded planes.

Backbones (``weights`` option):

* a local folder written by ``save_pretrained`` (``config.json`` + weights) of a Hugging Face
  ``Dinov2Model`` or ``Dinov2WithRegistersModel``;
* a hub id (e.g. ``facebook/dinov2-large``), read from the local Hugging Face cache only (nothing is
  downloaded unless ``allow_download=True`` and ``HF_HUB_OFFLINE`` is unset);
* an official facebookresearch/dinov2 checkpoint ``.pth`` (``dinov2_vits14_pretrain.pth``,
  ``dinov2_vitl14_reg4_pretrain.pth``, ...): its state dict is mapped onto the Hugging Face model by
  :func:`official_to_hf` (config read from the tensor shapes; heads = width / 64 as in all official models).

Without ``weights`` the environment variable ``DINOREG_DINOV2_WEIGHTS`` is used, else the hub id of ``arch``
(default ``vitl14_reg4``: ``facebook/dinov2-with-registers-large``) is looked up in the local cache; if nothing
is found a :class:`DinoregError` says what to provide.

Note: the features are computed by the Hugging Face implementation; its position-embedding interpolation for
non-native sizes differs slightly from the official code (bicubic to the exact grid, no 0.1 offset).
"""

from __future__ import annotations

import math
import os
import warnings
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import settings
from ..errors import DinoregError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_HEAD_DIM = 64  # every official DINOv2 backbone (S/B/L/g) uses 64 channels per attention head

# official architecture name -> (embedding width, Hugging Face hub id)
ARCHS = {
    "vits14": (384, "facebook/dinov2-small"),
    "vitb14": (768, "facebook/dinov2-base"),
    "vitl14": (1024, "facebook/dinov2-large"),
    "vitg14": (1536, "facebook/dinov2-giant"),
    "vits14_reg4": (384, "facebook/dinov2-with-registers-small"),
    "vitb14_reg4": (768, "facebook/dinov2-with-registers-base"),
    "vitl14_reg4": (1024, "facebook/dinov2-with-registers-large"),
    "vitg14_reg4": (1536, "facebook/dinov2-with-registers-giant"),
}
WEIGHTS_ENV = "DINOREG_DINOV2_WEIGHTS"
DEFAULT_ARCH = "vitl14_reg4"  # the DINO-Reg baseline: ViT-L/14 with 4 registers


@dataclass
class Dinov2SliceConfig:
    """Options of the ``dinov2`` method (keys of the ``options`` dict; unknown keys are errors)."""

    weights: str | None = None  # HF folder, hub id (local cache) or official .pth; None: cache of `arch`, then $DINOREG_DINOV2_WEIGHTS
    arch: str | None = None  # official name (vits14 .. vitg14, optional _reg4): hub id when no weights (default
    #                          vitl14_reg4), and a check of a .pth's width and registers
    slice_axis: int | str = 2  # 0 (D, sagittal), 1 (H, coronal), 2 (W, axial) or "all" (three orthogonal axes)
    combine: str = "concat"  # with slice_axis="all": "concat" (3C channels) or "mean" (C channels)
    target_tokens: int = 64  # tokens along the longer in-plane axis (64 * 14 = 896 px for a /14 model)
    keep_aspect: bool = True  # False: target_tokens along both in-plane axes
    every_k: int = 1  # encode every k-th slice (and the last), interpolate linearly in between
    slice_norm: str = "clip"  # "clip" (keep the volume normalisation) or "minmax" (per slice)
    batch_size: int = 8  # slices per forward pass
    num_heads: int | None = None  # .pth only: attention heads if the width is not 64 per head
    cache_dir: str | None = None  # Hugging Face cache folder (None: the default, HF_HOME / HF_HUB_CACHE)
    allow_download: bool = False  # let transformers download a hub id (never in tests)
    progress: bool = True  # tqdm bar over slice batches

    @classmethod
    def from_options(cls, options: dict | None) -> "Dinov2SliceConfig":
        """Build a config from an options dict (strict: unknown keys and wrong types are errors, see
        :mod:`dinoreg_core.settings`), then check the values' ranges."""
        cfg = settings.from_dict(cls, options, prefix="feat.")
        cfg._coerce()
        return cfg

    def _coerce(self) -> None:
        if isinstance(self.slice_axis, str) and self.slice_axis != "all":
            if not self.slice_axis.lstrip("-").isdigit():
                raise DinoregError(f"dinov2 option slice_axis={self.slice_axis!r} is invalid; use 0, 1, 2 or 'all'.")
            self.slice_axis = int(self.slice_axis)
        if self.slice_axis != "all" and self.slice_axis not in (0, 1, 2):
            raise DinoregError(f"dinov2 option slice_axis={self.slice_axis!r} is invalid; use 0, 1, 2 or 'all'.")
        for name in ("target_tokens", "every_k", "batch_size"):
            value = int(getattr(self, name))
            if value < 1:
                raise DinoregError(f"dinov2 option {name}={value} is invalid; it must be a positive integer.")
            setattr(self, name, value)
        if self.num_heads is not None:
            self.num_heads = int(self.num_heads)
        for name in ("keep_aspect", "allow_download", "progress"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, value.strip().lower() in ("1", "true", "yes", "on"))
        if self.combine not in ("concat", "mean"):
            raise DinoregError(f"dinov2 option combine={self.combine!r} is invalid; use 'concat' or 'mean'.")
        if self.slice_norm not in ("clip", "minmax"):
            raise DinoregError(f"dinov2 option slice_norm={self.slice_norm!r} is invalid; use 'clip' or 'minmax'.")
        if self.arch is not None and self.arch not in ARCHS:
            raise DinoregError(f"dinov2 option arch={self.arch!r} is unknown; use one of {', '.join(ARCHS)}.")


# ----------------------------------------------------------------------------------------------------------
# Official facebookresearch/dinov2 checkpoint -> Hugging Face Dinov2Model


def _strip_wrappers(sd: dict) -> dict:
    """Unwrap training checkpoints ({"teacher": ...}, {"model": ...}) and drop "module."/"backbone." prefixes."""
    for key in ("teacher", "model", "state_dict"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(module\.)?(backbone\.)?", "", k)
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # block-chunked (FSDP) layout
        out[k] = v
    return out


def official_config(sd: dict, *, num_heads: int | None = None) -> dict:
    """Dinov2Config keyword arguments read from an official state dict (already unwrapped).

    Width from ``cls_token`` (1,1,C), depth from the block indices, patch size from the patch-embedding conv,
    native image size from ``pos_embed`` (1, 1 + G*G, C) as G * patch, registers from ``register_tokens``
    (1,R,C), SwiGLU from ``mlp.w12``; heads = ``num_heads`` or C / 64.
    """
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise KeyError("cls_token/patch_embed.proj.weight/pos_embed")
    width = int(sd["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(sd["pos_embed"].shape[1]) - 1)
    swiglu = "blocks.0.mlp.w12.weight" in sd
    if swiglu:
        mlp_ratio = 4  # the SwiGLU hidden size is derived from 4 * width in both implementations
    else:
        mlp_ratio = int(sd["blocks.0.mlp.fc1.weight"].shape[0]) // width
    heads = num_heads or width // OFFICIAL_HEAD_DIM
    cfg = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=mlp_ratio,
               patch_size=patch, image_size=grid * patch, use_swiglu_ffn=swiglu,
               qkv_bias="blocks.0.attn.qkv.bias" in sd, layer_norm_eps=1e-6, hidden_act="gelu")
    if "register_tokens" in sd:
        cfg["num_register_tokens"] = int(sd["register_tokens"].shape[1])
    return cfg


def official_to_hf(sd: dict, depth: int) -> dict:
    """Rename/split an official DINOv2 state dict into Hugging Face ``Dinov2Model`` keys (transformers >= 5).

    Mapping (per block i; ``attn.qkv`` is fused (3C, C) in q, k, v order; ``mlp.w12`` is fused (2F, C) with the
    SiLU-gated half first)::

        cls_token, pos_embed, mask_token, register_tokens -> embeddings.{cls_token, position_embeddings, ...}
        patch_embed.proj                                   -> embeddings.patch_embeddings.projection
        blocks.i.norm1 / norm2                             -> encoder.layer.i.norm1 / norm2
        blocks.i.attn.qkv                                  -> encoder.layer.i.attention.{q,k,v}_proj
        blocks.i.attn.proj                                 -> encoder.layer.i.attention.o_proj
        blocks.i.ls1.gamma / ls2.gamma                     -> encoder.layer.i.layer_scale1/2.lambda1
        blocks.i.mlp.fc1 / fc2                             -> encoder.layer.i.mlp.fc1 / fc2
        blocks.i.mlp.w12 / w3                              -> encoder.layer.i.mlp.{gate_proj, up_proj} / down_proj
        norm                                               -> layernorm
    Layer-scale weights absent from the checkpoint (models trained without LayerScale) become ones.
    ``head.*`` keys (identity in the released backbones) are dropped; any other unknown key raises KeyError.
    """
    out: dict[str, torch.Tensor] = {}
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "mask_token": "embeddings.mask_token", "register_tokens": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    simple = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
              "mlp.fc2": "mlp.fc2", "mlp.w3": "mlp.down_proj"}
    for key, value in sd.items():
        if key in top:
            value = value.reshape(1, -1) if key == "mask_token" else value
            out[top[key]] = value
            continue
        if key.startswith("head."):
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if not m:
            raise KeyError(key)
        i, name, kind = m.groups()
        dst = f"encoder.layer.{i}."
        if name in ("ls1", "ls2") and kind == "gamma":
            out[dst + f"layer_scale{name[-1]}.lambda1"] = value
        elif name == "attn.qkv":
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[dst + f"attention.{part}.{kind}"] = chunk.clone()
        elif name == "mlp.w12":
            gate, up = value.chunk(2, dim=0)
            out[dst + f"mlp.gate_proj.{kind}"] = gate.clone()
            out[dst + f"mlp.up_proj.{kind}"] = up.clone()
        elif name in simple:
            out[dst + f"{simple[name]}.{kind}"] = value
        else:
            raise KeyError(key)
    width = sd["cls_token"].shape[-1]
    for i in range(depth):
        for j in (1, 2):
            out.setdefault(f"encoder.layer.{i}.layer_scale{j}.lambda1", torch.ones(width))
    return out


def _to_legacy_names(hf_sd: dict) -> dict:
    """Rename transformers >= 5 Dinov2 keys to the transformers 4.x module names."""
    out = {}
    pending_in: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_sd.items():
        key = key.replace("attention.q_proj", "attention.attention.query")
        key = key.replace("attention.k_proj", "attention.attention.key")
        key = key.replace("attention.v_proj", "attention.attention.value")
        key = key.replace("attention.o_proj", "attention.output.dense")
        key = key.replace("mlp.down_proj", "mlp.weights_out")
        m = re.match(r"(.*mlp\.)(gate_proj|up_proj)\.(weight|bias)$", key)
        if m:
            pending_in.setdefault(m.group(1) + "weights_in." + m.group(3), {})[m.group(2)] = value
            continue
        out[key] = value
    for key, parts in pending_in.items():
        out[key] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=0)
    return out


def load_official_checkpoint(path: str | Path, *, arch: str | None = None, num_heads: int | None = None):
    """Build a Hugging Face Dinov2(WithRegisters)Model from an official ``.pth`` (loaded with weights_only=True)."""
    import transformers

    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise DinoregError(f"Cannot read the DINOv2 checkpoint {path} ({type(e).__name__}: {e}).") from e
    if not isinstance(sd, dict):
        raise DinoregError(f"The DINOv2 checkpoint {path} does not hold a state dict.")
    sd = _strip_wrappers(sd)
    try:
        cfg = official_config(sd, num_heads=num_heads)
    except (KeyError, ValueError) as e:
        raise DinoregError(f"{path} is not an official DINOv2 backbone checkpoint (missing {e}).") from e
    if arch is not None and (ARCHS[arch][0] != cfg["hidden_size"]
                             or arch.endswith("_reg4") != ("num_register_tokens" in cfg)):
        found = f"width {cfg['hidden_size']}, {cfg.get('num_register_tokens', 0)} registers"
        raise DinoregError(f"The DINOv2 checkpoint {path} ({found}) does not match arch={arch!r}; "
                           f"set the matching arch option or leave it out.")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise DinoregError(f"The DINOv2 checkpoint {path} has width {cfg['hidden_size']}, not divisible by "
                           f"{cfg['num_attention_heads']} heads; set the num_heads option.")
    prefix = "Dinov2WithRegisters" if "num_register_tokens" in cfg else "Dinov2"
    if not hasattr(transformers, prefix + "Model"):
        raise DinoregError(f"The DINOv2 checkpoint {path} has register tokens, which need transformers >= 4.48 "
                           f"(installed: {transformers.__version__}).")
    config = getattr(transformers, prefix + "Config")(**cfg)
    model = getattr(transformers, prefix + "Model")(config)
    try:
        hf_sd = official_to_hf(sd, cfg["num_hidden_layers"])
    except KeyError as e:
        raise DinoregError(f"The DINOv2 checkpoint {path} has an unexpected key {e}.") from e
    if any(".attention.attention.query." in k for k in model.state_dict()):
        hf_sd = _to_legacy_names(hf_sd)
    try:
        model.load_state_dict(hf_sd, strict=True)
    except RuntimeError as e:
        raise DinoregError(f"The DINOv2 checkpoint {path} does not fit the model built from it: "
                           f"{str(e).splitlines()[0]}") from e
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Backbone loading


def _no_weights_error(tried: str, arch: str) -> DinoregError:
    return DinoregError(
        f"No DINOv2 weights found ({tried}); give them (dinoreg register --weights, or options['weights']) as a "
        f"local Hugging Face folder, a hub id already in the local cache, or an official checkpoint file such as "
        f"dinov2_{arch}_pretrain.pth (or set ${WEIGHTS_ENV}), since nothing is downloaded unless allow_download "
        f"is true.")


def load_dinov2_model(cfg: Dinov2SliceConfig) -> torch.nn.Module:
    """Return a frozen Hugging Face Dinov2Model / Dinov2WithRegistersModel in eval mode (on CPU).

    Raises :class:`DinoregError` (one sentence) if transformers is missing or no weights can be found.
    """
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise DinoregError("The dinov2 method needs the transformers package: "
                           "pip install 'dinoreg[dinov2]' (or pip install transformers).") from e
    weights = cfg.weights or os.environ.get(WEIGHTS_ENV) or ARCHS[cfg.arch or DEFAULT_ARCH][1]
    path = Path(os.path.expanduser(str(weights)))
    if path.suffix in (".pth", ".pt") or path.is_file():
        if not path.is_file():
            raise DinoregError(f"The DINOv2 checkpoint {path} does not exist; give the path of an official "
                               f".pth file (e.g. dinov2_vitl14_reg4_pretrain.pth) as options['weights'].")
        model = load_official_checkpoint(path, arch=cfg.arch, num_heads=cfg.num_heads)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise DinoregError(f"The DINOv2 folder {path} has no config.json; save the model there with "
                               f"save_pretrained or give an official .pth checkpoint instead.")
        model = _from_pretrained(str(path), cfg, local=True)
    else:
        model = _from_pretrained(str(weights), cfg, local=False)
    model.requires_grad_(False)
    return model.eval()


def _from_pretrained(name: str, cfg: Dinov2SliceConfig, *, local: bool):
    from transformers import AutoConfig, AutoModel

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    local_only = local or offline or not cfg.allow_download
    kwargs = dict(local_files_only=local_only, cache_dir=cfg.cache_dir)
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        if local:
            raise DinoregError(f"Cannot read the Hugging Face DINOv2 folder {name} ({e}).") from e
        where = f"hub id '{name}' not in the local Hugging Face cache" + (f" {cfg.cache_dir}" if cfg.cache_dir else "")
        raise _no_weights_error(where, cfg.arch or DEFAULT_ARCH) from e
    if config.model_type not in ("dinov2", "dinov2_with_registers"):
        raise DinoregError(f"The model '{name}' is a {config.model_type!r} model, not DINOv2.")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols of a file it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return AutoModel.from_pretrained(name, config=config, **kwargs)
    except (OSError, ValueError) as e:
        raise DinoregError(f"Cannot load the DINOv2 weights of '{name}' ({e}).") from e
    except Exception as e:  # noqa: BLE001 - e.g. a pickle .bin that weights_only loading refuses (no code runs)
        first = " ".join(str(e).split()).split(". ")[0][:120]
        raise DinoregError(f"The DINOv2 weights in '{name}' are damaged or not a plain tensor file "
                           f"({type(e).__name__}: {first}).") from None


# ----------------------------------------------------------------------------------------------------------
# Slice encoding


def token_grid(in_plane: tuple[int, int], target_tokens: int, keep_aspect: bool = True) -> tuple[int, int]:
    """Token grid (ta, tb) for an in-plane slice of (na, nb) voxels: target_tokens along the longer axis."""
    na, nb = in_plane
    if not keep_aspect:
        return target_tokens, target_tokens
    longer = max(na, nb)
    return (max(1, round(target_tokens * na / longer)), max(1, round(target_tokens * nb / longer)))


def _encoded_slices(n: int, every_k: int) -> list[int]:
    """Slice indices that are encoded: 0, k, 2k, ... and always the last one."""
    idx = list(range(0, n, every_k))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


def _prepare_slices(slices: torch.Tensor, grid: tuple[int, int], patch: int, slice_norm: str) -> torch.Tensor:
    """(B, na, nb) intensities -> (B, 3, ta*patch, tb*patch) ImageNet-normalised pixels."""
    x = slices.float()
    if slice_norm == "minmax":
        lo = x.amin(dim=(1, 2), keepdim=True)
        hi = x.amax(dim=(1, 2), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6)
    x = x.clamp(0.0, 1.0).unsqueeze(1)
    size = (grid[0] * patch, grid[1] * patch)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def _num_prefix_tokens(model) -> int:
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


def _patch_size(model) -> int:
    p = model.config.patch_size
    return int(p[0] if isinstance(p, (list, tuple)) else p)


def encode_slices(model, slices: torch.Tensor, grid: tuple[int, int], *, slice_norm: str = "clip") -> torch.Tensor:
    """Encode one batch of 2D slices (B, na, nb) in [0,1] -> patch-token features (B, C, ta, tb), float32.

    Runs on the model's device; bf16 autocast on CUDA, float32 on CPU.
    """
    device = next(model.parameters()).device
    x = _prepare_slices(slices.to(device), grid, _patch_size(model), slice_norm)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        tokens = model(pixel_values=x).last_hidden_state[:, _num_prefix_tokens(model):, :]
    return tokens.float().transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1])


def _axis_features(model, volume: torch.Tensor, axis: int, cfg: Dinov2SliceConfig) -> torch.Tensor:
    """Features along one slice axis: volume (D,H,W) -> (1, C, d, h, w) in the image's axis order.

    The result is allocated once; encoded planes are written into it batch by batch and the others are
    interpolated in place, so peak memory is the output plus one batch of activations.
    """
    n = volume.shape[axis]
    in_plane = tuple(s for a, s in enumerate(volume.shape) if a != axis)
    grid = token_grid(in_plane, cfg.target_tokens, cfg.keep_aspect)
    shape = list(grid)
    shape.insert(axis, n)
    feat = torch.empty((1, model.config.hidden_size, *shape), device=volume.device)
    planes = feat[0].movedim(1 + axis, 0)  # (n, C, ta, tb) view into the output
    slices = volume.movedim(axis, 0)  # (n, na, nb) view
    idx = _encoded_slices(n, cfg.every_k)
    batches = [idx[j:j + cfg.batch_size] for j in range(0, len(idx), cfg.batch_size)]
    for batch in tqdm(batches, desc=f"dinov2 axis {axis}", disable=not cfg.progress, leave=False):
        planes[batch] = encode_slices(model, slices[batch], grid, slice_norm=cfg.slice_norm)
    fill_between_slices(planes, idx)
    return feat


def fill_between_slices(planes: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """In place: planes (n, ...) hold encoded planes at sorted ``idx`` (first 0, last n-1); fill the others.

    Plane i between encoded a < i < b becomes ((b - i) * planes[a] + (i - a) * planes[b]) / (b - a).
    """
    for a, b in zip(idx[:-1], idx[1:]):
        for i in range(a + 1, b):
            w = (i - a) / (b - a)
            torch.add(planes[a] * (1.0 - w), planes[b], alpha=w, out=planes[i])
    return planes


def extract_dinov2_features(image: torch.Tensor, *, modality: str = "ct", device=None, options=None,
                            model=None) -> torch.Tensor:
    """Slice-wise DINOv2 features of a volume (see the module docstring for the geometry).

    Args:
        image: (1,1,D,H,W) float32, intensities roughly [0,1].
        modality: "ct" or "mr" (unused: both go through the same natural-image model).
        device: where to compute; default the image's device.
        options: dict of :class:`Dinov2SliceConfig` fields.
        model: an already loaded backbone (skips loading; used by benchmarks and repeated calls).
    Returns:
        (1, C, d, h, w) float32 on ``device``; C = model width (3x width for slice_axis="all", combine="concat").
    """
    cfg = Dinov2SliceConfig.from_options(options)
    if image.dim() != 5 or image.shape[:2] != (1, 1):
        raise DinoregError(f"dinov2 features need an image of shape (1,1,D,H,W), got {tuple(image.shape)}.")
    device = torch.device(device) if device is not None else image.device
    if model is None:
        model = _cached_backbone(cfg)
    model = model.to(device)
    volume = image[0, 0].to(device, torch.float32)
    if cfg.slice_axis != "all":
        return _axis_features(model, volume, cfg.slice_axis, cfg)
    grids = [token_grid(tuple(s for a, s in enumerate(volume.shape) if a != axis), cfg.target_tokens,
                        cfg.keep_aspect) for axis in range(3)]
    # common grid: along each axis the token count it gets when it is in-plane (max over the two views)
    common = tuple(max(g[a - (a > axis)] for axis, g in enumerate(grids) if axis != a) for a in range(3))
    parts = []
    for axis in range(3):
        f = _axis_features(model, volume, axis, cfg)
        parts.append(F.interpolate(f, size=common, mode="trilinear", align_corners=False))
        del f
    if cfg.combine == "mean":
        return torch.stack(parts).mean(0)
    return torch.cat(parts, dim=1)


_BACKBONE_CACHE: dict[tuple, torch.nn.Module] = {}


def _cached_backbone(cfg: Dinov2SliceConfig) -> torch.nn.Module:
    """Load the backbone once per (weights, arch, num_heads, cache_dir) and keep it for the next volume."""
    key = (cfg.weights or os.environ.get(WEIGHTS_ENV), cfg.arch, cfg.num_heads, cfg.cache_dir)
    if key not in _BACKBONE_CACHE:
        _BACKBONE_CACHE.clear()  # keep one model in memory at most
        _BACKBONE_CACHE[key] = load_dinov2_model(cfg)
    return _BACKBONE_CACHE[key]
