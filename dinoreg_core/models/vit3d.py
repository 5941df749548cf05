"""A 3D Vision Transformer of the Primus / EVA family, the backbone of the DINO pretraining.

Architecture (read top to bottom in :class:`ViT3D`):

1. the input (B, in_chans, D, H, W) is zero-padded at the far end of each axis up to a multiple of
   ``patch_size`` (a volume smaller than one patch is padded to one patch, so any size >= 1 voxel works; the
   padded voxels are 0, i.e. air / background after :func:`dinoreg_core.preprocess.normalize_intensity`);
2. a Conv3d with kernel = stride = ``patch_size`` gives one token per patch: grid (d,h,w), N = d*h*w tokens
   in raster order over (d,h,w);
3. iBOT masking: where ``masks`` is True the patch embedding is replaced by a learnable mask token,
   BEFORE position information is added;
4. a learned absolute position embedding, stored on the token grid ``pos_grid`` and resampled trilinearly
   (``align_corners=True``: first and last tokens of the grid keep the corner values) to the actual grid;
5. a cls token (with its own position embedding) and ``num_register_tokens`` register tokens (no position
   embedding) are prepended;
6. ``depth`` pre-norm blocks: multi-head attention (``F.scaled_dot_product_attention``) with 3D rotary
   embedding on q and k of the patch tokens (cls and registers are not rotated), SwiGLU MLP with a LayerNorm
   on its hidden units (EVA-02 / Primus), LayerScale (initialised to ``layerscale_init`` = 0.1, as in
   PrimusS..L; ``None`` disables it) and drop-path (rate increasing linearly from 0 to ``drop_path_rate``);
7. a final LayerNorm.

Rotary embedding: each head's channels are split into three chunks (axes d, h, w) of interleaved pairs that
are rotated by ``position * temperature ** (-i / n)``, n = head_dim // 6, positions = integer token indices
on the actual grid (so attention logits depend only on token offsets); the head dimension
``embed_dim // num_heads`` must therefore be divisible by 6. The table layout is that of timm's
``RotaryEmbeddingCat`` as used by Primus (see :mod:`dinoreg_core.models.primus_keys`).

The model is autocast (bf16) friendly and supports activation checkpointing (``set_grad_checkpointing``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .layers import Block, PatchEmbed3D, grid_positions, rope_frequencies, rope_tables


@dataclass
class ViT3DConfig:
    """Hyper-parameters of :class:`ViT3D` (defaults: the paper's small backbone, 180 channels, depth 8)."""

    patch_size: int = 4                 # voxels per patch edge (the paper: 4; small patches matter for registration)
    in_chans: int = 1                   # image channels
    embed_dim: int = 180                # token channels C
    depth: int = 8                      # number of transformer blocks
    num_heads: int = 6                  # attention heads; embed_dim // num_heads must be divisible by 6 (3D RoPE)
    mlp_ratio: float = 8 / 3            # SwiGLU hidden width = int(mlp_ratio * embed_dim)
    num_register_tokens: int = 0        # extra learnable tokens without position (DINOv2 "registers")
    pos_grid: tuple = (32, 32, 32)      # token grid of the learned absolute position embedding (128^3 crops / 4)
    use_rope: bool = True               # 3D rotary embedding on q, k of patch tokens
    drop_path_rate: float = 0.0         # stochastic depth rate of the last block
    layerscale_init: float | None = 1e-1  # LayerScale initial value (PrimusS..L use 0.1); None = no LayerScale
    qkv_bias: bool = True               # bias in the fused qkv projection
    rope_temperature: float = 10000.0   # RoPE base: frequencies temperature ** (-i/n), i < n = head_dim // 6 (timm/EVA)
    mlp_norm: bool = True               # LayerNorm on the SwiGLU hidden units (EVA-02 / Primus "scale_mlp")
    attn_norm: bool = False             # LayerNorm on the attention output before proj (EVA "scale_attn_inner")
    norm_eps: float = 1e-6              # epsilon of every LayerNorm (timm's LayerNorm default)
    # Input shift and scale, applied after padding: x -> (x - input_mean) / input_std. Our images are in [0, 1];
    # mapping them to [-1, 1] matters: a near-constant patch embeds as c * v (one fixed vector v scaled by the
    # intensity c), and with c >= 0 every LayerNorm maps all such tokens onto the same direction, so the tokens
    # (and the DINO/iBOT targets) of different tissues start out almost identical and self-distillation
    # collapses. Centred input gives tokens of both signs. The authors' checkpoints keep (0, 1).
    input_mean: float = 0.5
    input_std: float = 0.5

    def __post_init__(self):
        self.pos_grid = tuple(int(s) for s in self.pos_grid)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.embed_dim)


CONFIGS: dict[str, ViT3DConfig] = {
    # CPU demos (64^3 crops -> 16^3 tokens)
    "tiny": ViT3DConfig(embed_dim=96, depth=4, num_heads=4, pos_grid=(16, 16, 16)),
    # the paper's smallest backbone (patch 4, embed 180, depth 8, 6 heads)
    "paper": ViT3DConfig(embed_dim=180, depth=8, num_heads=6),
    # wider variants (head dims 72 and 144, divisible by 6 for 3D RoPE)
    "base": ViT3DConfig(embed_dim=432, depth=8, num_heads=6),
    "large": ViT3DConfig(embed_dim=864, depth=8, num_heads=6),
}


class ViT3D(nn.Module):
    """3D ViT backbone; see the module docstring for the architecture."""

    def __init__(self, cfg: ViT3DConfig):
        super().__init__()
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        if cfg.use_rope and cfg.head_dim % 6:
            raise ValueError(f"3D RoPE needs embed_dim // num_heads divisible by 6, got {cfg.head_dim}")
        self.cfg = cfg
        C = cfg.embed_dim
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.in_chans, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, C))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, C, *cfg.pos_grid))   # patch-token position embedding
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, C))
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(C, cfg.num_heads, cfg.mlp_hidden, cfg.qkv_bias, cfg.layerscale_init, dpr[i],
                  mlp_norm=cfg.mlp_norm, attn_norm=cfg.attn_norm, norm_eps=cfg.norm_eps)
            for i in range(cfg.depth))
        self.norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        if cfg.use_rope:
            self.register_buffer("rope_freqs", rope_frequencies(cfg.head_dim, cfg.rope_temperature).float(),
                                 persistent=False)
        self.grad_checkpointing = False
        self._init_weights()

    # ------------------------------------------------------------------------------------------------------
    def _init_weights(self) -> None:
        for t in (self.cls_token, self.register_tokens, self.pos_embed, self.cls_pos_embed):
            nn.init.trunc_normal_(t, std=0.02)
        nn.init.normal_(self.mask_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (saves memory, costs ~30 % time)."""
        self.grad_checkpointing = bool(enable)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.cfg.num_register_tokens

    # ------------------------------------------------------------------------------------------------------
    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad (B,C,D,H,W) at the far end of each axis to a multiple of ``patch_size`` (>= one patch)."""
        p = self.cfg.patch_size
        pads = []
        for s in reversed(x.shape[2:]):
            pads += [0, max(p, -(-s // p) * p) - s]
        return F.pad(x, pads) if any(pads) else x

    def interpolate_pos_embed(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Position embedding of the patch tokens on ``grid``: (1, N, C), trilinear, align_corners=True."""
        pe = self.pos_embed
        if tuple(grid) != tuple(pe.shape[2:]):
            pe = F.interpolate(pe.float(), size=tuple(grid), mode="trilinear", align_corners=True).to(pe.dtype)
        return pe.flatten(2).transpose(1, 2)

    def rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sin, cos) tables (N, head_dim) for the integer token positions of ``grid``; None without RoPE."""
        if not self.cfg.use_rope:
            return None
        return rope_tables(grid_positions(grid, device), self.rope_freqs)

    @staticmethod
    def patch_grid(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Reshape patch tokens (B, N, C) in raster order to a feature volume (B, C, d, h, w)."""
        B, N, C = tokens.shape
        return tokens.transpose(1, 2).reshape(B, C, *grid)

    # ------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None, *, return_blocks=None) -> dict:
        """Run the backbone.

        Args:
            x: (B, in_chans, D, H, W) float32, any size >= 1 voxel (zero-padded internally, see module docstring).
            masks: optional (B, N) bool, True = that patch embedding is replaced by the mask token (iBOT).
            return_blocks: optional iterable of block indices (0-based; negative counts from the end) whose
                patch-token outputs are returned, each passed through the final norm.

        Returns:
            dict with "cls" (B,C) and "patch_tokens" (B,N,C) after the final norm, "grid" (d,h,w),
            "registers" (B,R,C) after the final norm, and "blocks" {requested index: (B,C,d,h,w)}
            (block outputs after the final norm, keyed by the indices exactly as requested).
        """
        if x.ndim != 5 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected input (B,{self.cfg.in_chans},D,H,W), got {tuple(x.shape)}")
        x = self.pad_input(x)                                       # padding = intensity 0 (air / background)
        if self.cfg.input_mean != 0.0 or self.cfg.input_std != 1.0:
            x = (x - self.cfg.input_mean) / self.cfg.input_std
        tok = self.patch_embed(x)                                   # (B, N, C)
        B, N, C = tok.shape
        p = self.cfg.patch_size
        grid = (x.shape[2] // p, x.shape[3] // p, x.shape[4] // p)
        if masks is not None:
            if masks.shape != (B, N):
                raise ValueError(f"masks must have shape {(B, N)}, got {tuple(masks.shape)}")
            tok = torch.where(masks[..., None], self.mask_token.to(tok.dtype), tok)
        tok = tok + self.interpolate_pos_embed(grid).to(tok.dtype)
        prefix = [(self.cls_token + self.cls_pos_embed).expand(B, -1, -1),
                  self.register_tokens.expand(B, -1, -1)]
        h = torch.cat([t.to(tok.dtype) for t in prefix] + [tok], dim=1)
        rope = self.rope(grid, x.device)
        npre = self.num_prefix_tokens

        wanted = {}
        for i in (return_blocks or ()):
            j = i + self.cfg.depth if i < 0 else i
            if not 0 <= j < self.cfg.depth:
                raise ValueError(f"block index {i} out of range for depth {self.cfg.depth}")
            wanted.setdefault(j, []).append(i)
        blocks = {}
        for j, blk in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(blk, h, rope, npre, use_reentrant=False)
            else:
                h = blk(h, rope, npre)
            if j in wanted:
                feat = self.patch_grid(self.norm(h[:, npre:]), grid)
                for i in wanted[j]:
                    blocks[i] = feat
        h = self.norm(h)
        return {"cls": h[:, 0], "patch_tokens": h[:, npre:], "grid": grid,
                "registers": h[:, 1:npre], "blocks": blocks}
