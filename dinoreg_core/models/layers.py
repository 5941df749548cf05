"""Building blocks of the 3D ViT: patch embedding, 3D rotary embedding, attention, SwiGLU MLP, block.

Shapes: B batch, N tokens, C embedding channels, h heads, Dh = C // h channels per head.
All layers are plain PyTorch and autocast (bf16) friendly: the rotary tables are cast to the dtype of q/k.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patch embedding: Conv3d with kernel = stride = ``patch_size``.

    (B, in_chans, D, H, W) with D,H,W multiples of ``patch_size`` -> (B, N, C), N = d*h*w tokens in raster
    order over (d,h,w), d = D // patch_size.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# 3D rotary position embedding
# ----------------------------------------------------------------------------------------------------------

def rope_frequencies(head_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Angular frequencies (radians per token) of the 3D rotary embedding, shape (head_dim // 6,).

    The head channels are split into three equal chunks, one per axis (d, h, w); each chunk holds
    ``head_dim // 6`` rotated pairs with frequencies ``temperature ** (-i / n)``, i = 0..n-1.
    This is the layout of timm's ``RotaryEmbeddingCat(dim=head_dim * 2 // 3, in_pixels=False)`` used by
    EVA / Primus (``build_rotary_pos_embed`` with ``num_bands = dim // 4`` per axis, pairs interleaved).
    """
    if head_dim % 6:
        raise ValueError(f"3D RoPE needs a head dimension divisible by 6, got {head_dim}")
    n = head_dim // 6
    return temperature ** (-torch.arange(n, dtype=torch.float64) / n)


def rope_tables(positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sin and cos tables (N, 6n) for token ``positions`` (N, 3) (token units, any real values).

    Channel layout (per head): [axis d | axis h | axis w], each axis chunk holding n interleaved pairs
    (2i, 2i+1) rotated by angle ``pos_axis * freqs[i]``.
    """
    ang = positions.to(torch.float64)[:, :, None] * freqs.to(positions.device)[None, None, :]  # (N,3,n)
    ang = ang.reshape(positions.shape[0], -1).repeat_interleave(2, dim=-1)  # (N, 6n)
    return ang.sin().float(), ang.cos().float()


def grid_positions(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """Integer token coordinates (N, 3) of a (d,h,w) grid in raster order (float32)."""
    axes = [torch.arange(s, device=device, dtype=torch.float32) for s in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last axis."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of ``x`` (..., N, Dh) by the angles of the (N, Dh) tables."""
    sin = sin.to(x.dtype)
    cos = cos.to(x.dtype)
    return x * cos + _rotate_pairs(x) * sin


# ----------------------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and RoPE on the patch tokens.

    forward(x (B,N,C), rope=(sin, cos) each (N_patch, Dh) or None, num_prefix: int) -> (B,N,C).
    The first ``num_prefix`` tokens (cls, registers) are not rotated; the rest must be the N_patch patch tokens.
    ``inner_norm`` adds a LayerNorm on the concatenated head outputs before ``proj`` (EVA "scale_attn_inner").
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, inner_norm: bool = False,
                 norm_eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if inner_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope=None, num_prefix: int = 0) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            sin, cos = rope
            q = torch.cat((q[:, :, :num_prefix], apply_rope(q[:, :, num_prefix:], sin, cos)), dim=2)
            k = torch.cat((k[:, :, :num_prefix], apply_rope(k[:, :, num_prefix:], sin, cos)), dim=2)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(self.norm(x.transpose(1, 2).reshape(B, N, C)))


class SwiGLU(nn.Module):
    """SwiGLU MLP: fc2(norm(silu(fc1_g(x)) * fc1_x(x))), hidden width ``hidden``.

    ``norm`` is a LayerNorm on the hidden units when ``hidden_norm`` (EVA-02 / Primus "scale_mlp"), else identity.
    """

    def __init__(self, dim: int, hidden: int, hidden_norm: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=norm_eps) if hidden_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma`` (initialised to ``init``)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability ``p`` (rescaled)."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), with drop-path.

    ``layerscale_init=None`` disables LayerScale (ls1, ls2 become identities).
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool, layerscale_init: float | None,
                 drop_path: float, *, mlp_norm: bool = True, attn_norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, inner_norm=attn_norm, norm_eps=norm_eps)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden, hidden_norm=mlp_norm, norm_eps=norm_eps)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, rope=None, num_prefix: int = 0) -> torch.Tensor:
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), rope, num_prefix)), self.drop_path, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)
        return x
