"""An independent PyTorch reference of the Qwen-VL visual encoder (the ViT SEED-X ships as `qwen_vit_G.pt`)
and of the Qwen-VL resampler (SEED-X's attention pool, input and output resamplers), for tests.

Written from the published architecture (Qwen-VL paper, Sec. 2.1, and the module layout of Qwen-VL-Chat's
`visual.py`, whose state-dict names these modules reproduce so `load_state_dict(strict=True)` checks them),
not from cig_jax: nothing here imports cig_jax.

    x   = conv1(pixels)                        # stride-p conv, no bias -> [B, width, gh, gw] -> [B, gh*gw, width]
    x   = x + bicubic(positional_embedding)    # learned square table resized to the patch grid
    x   = ln_pre(x)
    x   = resblocks(x)                         # pre-LN: x + attn(ln_1 x); x + mlp(ln_2 x); GELU (erf) MLP
    x   = attn_pool(x)                         # Qwen-VL resampler: learned queries, 2-D sin-cos positions
    out = ln_post(x) @ proj                    # proj is a bare [out, out] matrix

The ViT's self-attention packs q/k/v per head: `in_proj` produces, for each head in turn, that head's q, k
and v (the output viewed as [..., heads, 3 * head_dim]). The resampler uses `torch.nn.MultiheadAttention`
([q; k; v] blocks) with the query grid's sin-cos table added to the queries and the same table, resized
bicubically to the key grid, added to the keys (not to the values).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def mae_sincos_2d(dim: int, side: int) -> np.ndarray:
    """MAE's 2-D sin-cos table [side*side, dim], rows row-major; the first half encodes the column (x) index,
    the second half the row (y) index, each as [sin(pos * w), cos(pos * w)], w_i = 1 / 10000^(i / (dim/4))."""
    quarter = dim // 4
    w = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    ys, xs = np.divmod(np.arange(side * side), side)

    def axis(pos):
        a = np.outer(pos, w)
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return np.concatenate([axis(xs), axis(ys)], axis=1).astype(np.float32)


def resize_positions(table: torch.Tensor, n_out: int) -> torch.Tensor:
    """A square [n_in, dim] table resized (bicubic, align_corners=False) to a square grid of n_out positions."""
    side_in, side_out = math.isqrt(table.shape[0]), math.isqrt(n_out)
    if side_in == side_out:
        return table
    grid = table.float().T.reshape(1, -1, side_in, side_in)
    grid = F.interpolate(grid, size=(side_out, side_out), mode="bicubic", align_corners=False)
    return grid.reshape(table.shape[1], -1).T


class QwenResampler(nn.Module):
    """Learned queries on a square grid cross-attend once to a square grid of inputs."""

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int, eps: float):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.from_numpy(mae_sincos_2d(embed_dim, math.isqrt(num_queries))),
                                      requires_grad=False)
        self.query = nn.Parameter(0.02 * torch.randn(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, keys, kv_dim] -> [B, queries, embed]
        kv = self.ln_kv(self.kv_proj(x))
        key_pos = resize_positions(self.pos_embed, x.shape[1])
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)
        # nn.MultiheadAttention without batch_first: [length, batch, dim]
        out, _ = self.attn(q.transpose(0, 1), (kv + key_pos).transpose(0, 1), kv.transpose(0, 1),
                           need_weights=False)
        return out.transpose(0, 1)


class PerHeadPackedSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, width]
        b, n, w = x.shape
        hd = w // self.heads
        packed = self.in_proj(x).view(b, n, self.heads, 3 * hd)  # per head: [q | k | v]
        q, k, v = (t.transpose(1, 2) for t in packed.split(hd, dim=-1))  # [B, heads, L, hd]
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(b, n, w))


class ResBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = PerHeadPackedSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, mlp_width), "c_proj": nn.Linear(mlp_width, width)})

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_width, eps):
        super().__init__()
        self.resblocks = nn.ModuleList(ResBlock(width, heads, mlp_width, eps) for _ in range(layers))


class QwenVisual(nn.Module):
    """pixels [B, 3, H, W] -> (hidden states after the blocks [B, patches, width], pooled [B, queries, out])."""

    def __init__(self, *, patch: int, width: int, layers: int, heads: int, mlp_width: int, pos_side: int,
                 num_queries: int, out_dim: int, pool_heads: int, eps: float = 1e-6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(pos_side * pos_side, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps)
        self.transformer = Transformer(width, layers, heads, mlp_width, eps)
        self.attn_pool = QwenResampler(num_queries, out_dim, pool_heads, kv_dim=width, eps=eps)
        self.ln_post = nn.LayerNorm(out_dim, eps=eps)
        self.proj = nn.Parameter(out_dim ** -0.5 * torch.randn(out_dim, out_dim))

    def forward(self, pixels: torch.Tensor):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [B, gh*gw, width], row-major patch grid
        x = self.ln_pre(x + resize_positions(self.positional_embedding, x.shape[1]))
        for block in self.transformer.resblocks:
            x = block(x)
        return x, self.ln_post(self.attn_pool(x)) @ self.proj


def jitter(module: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Move every trainable parameter (unit LayerNorm scales, zero biases included) off its init; the fixed
    sin-cos tables stay as they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()
