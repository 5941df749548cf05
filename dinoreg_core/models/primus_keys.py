"""Load the authors' released backbone checkpoints (Primus / EVA ViT, PyTorch Lightning) into our ViT3D.

Sources (read, not imported: the ``dynamic_network_architectures`` Primus needs timm < 1.0.23, whose
``timm.layers`` imports torchvision, which does not import beside our CPU torch build):

* EytanKats/med_ssl_3d (the paper's code): ``models/backbones/primus.py`` (a ``Primus`` wrapper with
  attributes ``down_projection`` (Conv3d patch embedding), ``up_projection`` (segmentation decoder),
  ``mask_token`` (a zero *buffer*), ``cls_token`` (``classification=True``), ``register_tokens``, ``vit``),
  ``models/backbones/core/eva.py`` (timm-style ``Eva``/``EvaBlock``/``EvaAttention``), ``models/meta_arch.py``
  and ``training/lightning_module.py`` (Lightning keys ``model.{teacher,student}_backbone.*``),
  ``configs/train.yaml`` + ``configs/models/primus.yaml`` (embed 180, depth 8, 6 heads, patch 4, 128^3 crops);
  ``scripts/utility/export_ckpt_to_nnunet.py`` (nnssl export: ``network_weights`` with ``vit`` renamed ``eva``).
* MIC-DKFZ/dynamic-network-architectures: ``architectures/primus.py``, ``building_blocks/eva.py``,
  ``building_blocks/patch_encode_decode.py``.
* timm ``layers/pos_embed_sincos.py``: ``RotaryEmbeddingCat(dim = head_dim / 1.5, in_pixels=False,
  feat_shape = ref_feat_shape = token grid)`` -> per axis ``dim // 4`` bands ``10000 ** (-i / bands)``, positions
  ``arange(s)``, tables laid out axis-major with interleaved pairs; applied by ``apply_rot_embed_cat`` to the
  tokens after the prefix (cls/registers).

The recorded key/shape list for the paper's configuration is ``tests/data/authors_primus_paper_keys.json``.

What maps exactly (authors' key -> ours; prefix ``model.student_backbone.`` or ``model.teacher_backbone.``
of a Lightning checkpoint, or none / ``eva.`` for an nnssl export):

    down_projection.proj.{weight,bias}         -> patch_embed.proj.{weight,bias}
    cls_token                                  -> cls_token
    mask_token (zero buffer)                   -> mask_token (a learnable parameter in our model, value copied)
    register_tokens (+ their pos_embed rows)   -> register_tokens (position rows folded in: both are additive)
    vit.pos_embed[:, 0]                        -> cls_pos_embed
    vit.pos_embed[:, 1+R:] (raster over grid)  -> pos_embed (1, C, d, h, w)
    vit.blocks.i.norm1 / norm2                 -> blocks.i.norm1 / norm2
    attn.q_proj, k_proj (no bias), v_proj      -> blocks.i.attn.qkv (rows [q; k; v], k bias = 0)
      or fused attn.qkv + q_bias + v_bias      -> blocks.i.attn.qkv
    attn.norm (scale_attn_inner)               -> blocks.i.attn.norm   (config attn_norm=True)
    attn.proj                                  -> blocks.i.attn.proj
    gamma_1 / gamma_2 (init_values set)        -> blocks.i.ls1.gamma / ls2.gamma (else layerscale_init=None)
    mlp.fc1_g, fc1_x, norm, fc2 (SwiGLU)       -> blocks.i.mlp.*       (config mlp_norm=True)
    mlp.fc1 (packed GluMlp, gate first), fc2   -> blocks.i.mlp.fc1_g / fc1_x / fc2 (mlp_norm=False)
    vit.norm                                   -> norm

Ignored: ``up_projection.*`` (the segmentation decoder), DINO/iBOT heads and every key outside the chosen
backbone prefix, and the non-persistent rope buffers.

Differences that do not change outputs on the training grid: RoPE is identical on the token grid the authors
trained on (timm rescales positions by ``ref_feat_shape / feat_shape``, a no-op there because Primus fixes both
to the training grid); on other grids the authors' model does not run at all, whereas ours interpolates the
absolute position embedding trilinearly and keeps integer token positions for RoPE. The authors' training
masks tokens with an off-by-one shift (their ``mask[:, 1:]``), which only affects training.

What does not map (a :class:`DinoregError` names the key): q/k normalisation (``attn.q_norm``/``k_norm``),
any other unknown backbone key, a checkpoint without a cls token (plain Primus, e.g. nnssl
pretraining; our ViT3D always has one, so its outputs would differ), non-cubic grids unless ``pos_grid`` is given.
Not recoverable from weights and therefore arguments: ``num_heads`` (default 6, the paper) and the LayerNorm
epsilon (1e-6, timm's LayerNorm used by the authors' Eva; the dynamic_network_architectures Eva uses torch's 1e-5).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import DinoregError
from .checkpoint import check_state_dict, save_backbone
from .vit3d import ViT3D, ViT3DConfig

_BACKBONE_PREFIXES = {"student": "model.student_backbone.", "teacher": "model.teacher_backbone."}
_IGNORED = ("up_projection.",)
_BLOCK = re.compile(r"^vit\.blocks\.(\d+)\.(.+)$")


def read_state_dict(path) -> dict:
    """Read a checkpoint's tensors without unpickling code: ``.safetensors`` or torch.load(weights_only=True).

    Returns the inner state dict (Lightning ``state_dict``, nnssl ``network_weights``, or the file itself).
    """
    path = Path(path)
    if not path.is_file():
        raise DinoregError(f"Checkpoint file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise DinoregError(f"Checkpoint file {path} is unreadable (truncated or corrupt: {e}).") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unsafe or corrupt pickles
        raise DinoregError(
            f"Checkpoint {path} cannot be read safely with torch.load(weights_only=True) ({type(e).__name__}); "
            "in a trusted environment save just its tensors, e.g. torch.save(torch.load(p, weights_only=False)"
            "['state_dict'], 'state_dict.pt'), and load that file instead.") from None
    for key in ("state_dict", "network_weights", "model", "teacher", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if isinstance(obj, dict):
        return obj
    raise DinoregError(f"Checkpoint {path} holds a {type(obj).__name__}, not a state dict.")


def _strip_prefix(state: dict, which: str) -> dict:
    """Backbone tensors with names relative to the Primus wrapper (``vit.*``, ``cls_token``, ...)."""
    if which not in _BACKBONE_PREFIXES:
        raise DinoregError(f"Unknown backbone '{which}'; use 'student' or 'teacher'.")
    pre = _BACKBONE_PREFIXES[which]
    if any(k.startswith(pre) for k in state):
        sub = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
    elif any(k.startswith("model.") and "_backbone." in k for k in state):
        raise DinoregError(f"The checkpoint has no '{pre}*' tensors (choose the other backbone).")
    else:
        sub = dict(state)
    # nnssl export renames vit -> eva
    return {("vit." + k[4:] if k.startswith("eva.") else k): v for k, v in sub.items()}


def map_authors_state_dict(state: dict, *, which: str = "student", num_heads: int = 6,
                           pos_grid: tuple | None = None, norm_eps: float = 1e-6) -> tuple[ViT3DConfig, dict, list]:
    """Map an authors' Primus state dict onto ViT3D names -> (config, our state dict, notes).

    Args:
        state: full checkpoint state dict (Lightning keys, an nnssl export or a bare Primus state dict).
        which: "student" (what the authors' export and validation code use) or "teacher" (the EMA).
        num_heads: attention heads (not recoverable from the weights; the paper uses 6).
        pos_grid: token grid (d,h,w) of the position embedding; inferred as a cube when None.
        norm_eps: LayerNorm epsilon of the source model.
    """
    sd = _strip_prefix(state, which)
    notes: list[str] = []
    for need in ("down_projection.proj.weight", "vit.norm.weight"):
        if need not in sd:
            raise DinoregError(f"The checkpoint has no backbone tensor '{need}'; it is not a Primus backbone.")
    if "cls_token" not in sd:
        raise DinoregError("The checkpoint has no 'cls_token' (a Primus trained without classification=True); "
                           "our ViT3D always prepends a cls token, so it cannot reproduce this model.")
    w_pe = sd["down_projection.proj.weight"]
    C, in_chans, p = int(w_pe.shape[0]), int(w_pe.shape[1]), int(w_pe.shape[2])
    if tuple(w_pe.shape[2:]) != (p, p, p):
        raise DinoregError(f"Non-cubic patch size {tuple(w_pe.shape[2:])} in 'down_projection.proj.weight' "
                           "is not supported.")
    regs = sd.get("register_tokens")
    R = 0 if regs is None else int(regs.shape[1])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK.match(k))), default=-1)
    b0 = "vit.blocks.0."
    if depth == 0:
        raise DinoregError("The checkpoint has no 'vit.blocks.*' tensors.")
    if b0 + "mlp.fc1_g.weight" in sd:
        hidden, mlp_norm = int(sd[b0 + "mlp.fc1_g.weight"].shape[0]), b0 + "mlp.norm.weight" in sd
    elif b0 + "mlp.fc1.weight" in sd:
        hidden, mlp_norm = int(sd[b0 + "mlp.fc1.weight"].shape[0]) // 2, b0 + "mlp.norm.weight" in sd
    else:
        raise DinoregError("The checkpoint's MLP is neither SwiGLU (mlp.fc1_g) nor GluMlp (mlp.fc1); "
                           "only SwiGLU-type Primus backbones map onto ViT3D.")
    if mlp_norm and b0 + "mlp.fc1.weight" in sd:
        raise DinoregError(f"Unsupported MLP layout in '{b0}mlp' (packed fc1 with a hidden norm).")
    ls = b0 + "gamma_1" in sd
    pe = sd.get("vit.pos_embed")
    if pe is None:
        raise DinoregError("The checkpoint has no 'vit.pos_embed' (absolute position embedding), which ViT3D needs.")
    n_total = int(pe.shape[1])
    # prefix rows: cls + registers (Lightning training) or none (nnssl export with the cls row removed)
    for n_pre in (1 + R, R):
        n_patch = n_total - n_pre
        grid = tuple(pos_grid) if pos_grid is not None else _cube(n_patch)
        if grid is not None and grid[0] * grid[1] * grid[2] == n_patch:
            break
    else:
        raise DinoregError(f"'vit.pos_embed' has {n_total} rows, which is not 1 + {R} prefix rows plus a token grid"
                           f"{'' if pos_grid is None else ' of ' + str(tuple(pos_grid))}; pass pos_grid.")
    if n_pre == R:
        notes.append("pos_embed has no cls row (nnssl export); cls position embedding set to zero, so outputs "
                     "differ slightly from the trained model")
    cfg = ViT3DConfig(patch_size=p, in_chans=in_chans, embed_dim=C, depth=depth, num_heads=num_heads,
                      mlp_ratio=hidden / C, num_register_tokens=R, pos_grid=grid, use_rope=True,
                      layerscale_init=0.1 if ls else None, qkv_bias=True, rope_temperature=10000.0,
                      mlp_norm=mlp_norm, attn_norm=b0 + "attn.norm.weight" in sd, norm_eps=norm_eps,
                      input_mean=0.0, input_std=1.0)   # their images come z-scored, not in [0, 1]
    if cfg.mlp_hidden != hidden:
        raise DinoregError(f"MLP hidden width {hidden} cannot be expressed as int(mlp_ratio * {C}).")
    if C % num_heads or (C // num_heads) % 6:
        raise DinoregError(f"num_heads={num_heads} does not suit embed_dim {C} (head dim must be a multiple of 6).")

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(k):
        used.add(k)
        return sd[k].float()

    out["patch_embed.proj.weight"] = take("down_projection.proj.weight")
    out["patch_embed.proj.bias"] = take("down_projection.proj.bias")
    out["cls_token"] = take("cls_token").reshape(1, 1, C)
    out["mask_token"] = take("mask_token").reshape(1, 1, C) if "mask_token" in sd else torch.zeros(1, 1, C)
    pe = take("vit.pos_embed")
    out["cls_pos_embed"] = pe[:, :1].clone() if n_pre == 1 + R else torch.zeros(1, 1, C)
    reg = take("register_tokens") if R else torch.zeros(1, 0, C)
    out["register_tokens"] = reg + pe[:, n_pre - R:n_pre] if R else reg
    out["pos_embed"] = pe[:, n_pre:].transpose(1, 2).reshape(1, C, *grid).contiguous()
    out["norm.weight"], out["norm.bias"] = take("vit.norm.weight"), take("vit.norm.bias")
    for i in range(depth):
        a, o = f"vit.blocks.{i}.", f"blocks.{i}."
        for n in ("norm1", "norm2"):
            out[o + n + ".weight"], out[o + n + ".bias"] = take(a + n + ".weight"), take(a + n + ".bias")
        if a + "attn.q_proj.weight" in sd:
            out[o + "attn.qkv.weight"] = torch.cat([take(a + "attn.q_proj.weight"), take(a + "attn.k_proj.weight"),
                                                    take(a + "attn.v_proj.weight")], 0)
            qb, vb = take(a + "attn.q_proj.bias"), take(a + "attn.v_proj.bias")
        elif a + "attn.qkv.weight" in sd:
            out[o + "attn.qkv.weight"] = take(a + "attn.qkv.weight")
            qb, vb = take(a + "attn.q_bias"), take(a + "attn.v_bias")
        else:
            raise DinoregError(f"Block {i} has neither 'attn.q_proj.weight' nor 'attn.qkv.weight'.")
        out[o + "attn.qkv.bias"] = torch.cat([qb, torch.zeros_like(qb), vb], 0)
        for n in ("attn.proj",) + (("attn.norm",) if cfg.attn_norm else ()):
            out[o + n + ".weight"], out[o + n + ".bias"] = take(a + n + ".weight"), take(a + n + ".bias")
        if ls:
            out[o + "ls1.gamma"], out[o + "ls2.gamma"] = take(a + "gamma_1"), take(a + "gamma_2")
        if a + "mlp.fc1_g.weight" in sd:
            for n in ("fc1_g", "fc1_x", "fc2") + (("norm",) if mlp_norm else ()):
                out[o + f"mlp.{n}.weight"] = take(a + f"mlp.{n}.weight")
                out[o + f"mlp.{n}.bias"] = take(a + f"mlp.{n}.bias")
        else:  # GluMlp, gate_last=False: first half of fc1 is the gate
            w, b = take(a + "mlp.fc1.weight"), take(a + "mlp.fc1.bias")
            out[o + "mlp.fc1_g.weight"], out[o + "mlp.fc1_x.weight"] = w[:hidden], w[hidden:]
            out[o + "mlp.fc1_g.bias"], out[o + "mlp.fc1_x.bias"] = b[:hidden], b[hidden:]
            out[o + "mlp.fc2.weight"], out[o + "mlp.fc2.bias"] = take(a + "mlp.fc2.weight"), take(a + "mlp.fc2.bias")

    left = sorted(k for k in sd if k not in used and not k.startswith(_IGNORED))
    if left:
        raise DinoregError(f"The checkpoint tensor '{left[0]}' has no counterpart in ViT3D "
                           f"({len(left)} such tensor{'s' if len(left) > 1 else ''}).")
    return cfg, out, notes


def _cube(n: int) -> tuple[int, int, int] | None:
    s = round(n ** (1 / 3))
    for c in (s - 1, s, s + 1):
        if c > 0 and c ** 3 == n:
            return (c, c, c)
    return None


def load_authors_checkpoint(path, device="cpu", *, which: str = "student", num_heads: int = 6,
                            pos_grid: tuple | None = None, norm_eps: float = 1e-6):
    """Load an authors' checkpoint file -> (ViT3D in eval mode, config, meta dict with source and notes)."""
    state = read_state_dict(path)
    cfg, mapped, notes = map_authors_state_dict(state, which=which, num_heads=num_heads, pos_grid=pos_grid,
                                                norm_eps=norm_eps)
    model = ViT3D(cfg)
    check_state_dict(model, mapped, source=str(path))
    model.load_state_dict(mapped, strict=True)
    model.to(device).eval()
    return model, cfg, {"source": str(path), "which": which, "notes": notes}


def convert_authors_checkpoint(src, dst, *, which: str = "student", num_heads: int = 6,
                               pos_grid: tuple | None = None, norm_eps: float = 1e-6) -> Path:
    """Convert an authors' checkpoint to our format (``dst.safetensors`` + ``dst.json``); returns the weights path."""
    model, cfg, meta = load_authors_checkpoint(src, which=which, num_heads=num_heads, pos_grid=pos_grid,
                                               norm_eps=norm_eps)
    prov = {"converted_from": str(Path(src).resolve()), "source_format": "authors' Primus (med_ssl_3d) checkpoint",
            "backbone": which, "notes": meta["notes"]}
    return save_backbone(model, cfg, dst, prov)
