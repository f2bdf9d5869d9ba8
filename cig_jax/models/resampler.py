"""Qwen-VL-style resampler: learned queries cross-attend once to a grid of features.

Owns: the `Resampler` module (SEED-X input resampler, output resampler, and the Qwen-VL ViT attention pool),
the cross-attention it shares with the SigLIP MAP head (`CrossAttention`, torch `nn.MultiheadAttention`
layout), the 2-D sin-cos tables of the query grid, and `resize_grid`, the one position-table resize
(torch `F.interpolate(..., align_corners=False)` semantics, bicubic or bilinear) that `vit.py` also uses.

Does not own: where its inputs come from or go (the MLLM wires the resamplers; `vit.py` the attention pool),
nor checkpoint names (`cig_jax/convert/`).

Math (Qwen-VL `Resampler`): with q_pos the sin-cos table of the query grid and k_pos the same table resized
(bicubic) to the key grid,
    x   = ln_kv(kv_proj(inputs))                         # [batch, keys, embed]
    out = MHA(query=ln_q(queries) + q_pos, key=x + k_pos, value=x)
    out = proj(ln_post(out))                             # only when out_dim is set
"""
from __future__ import annotations

import math
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cig_jax.config_model import ResamplerConfig
from cig_jax.models import layers
from cig_jax.models.layers import dtype_of


# ----------------------------------------------------------------------------------------------------------
# Position tables
# ----------------------------------------------------------------------------------------------------------
def grid_side(n: int, what: str) -> int:
    """sqrt(n) for a square grid of n positions; a clear error otherwise."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what}: {n} positions do not form a square grid")
    return side


@lru_cache(maxsize=64)
def sincos_2d(embed_dim: int, side: int) -> np.ndarray:
    """The 2-D sin-cos table of a side x side grid, [side*side, embed_dim] float32, rows in row-major order.

    The first half of the channels encodes the column (x) coordinate, the second half the row (y); each half
    is [sin(p * w), cos(p * w)] with w_i = 10000^(-i / (embed_dim / 4)) (MAE / Qwen-VL convention).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos positions need embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float32) / np.float32(quarter))  # [D/4]
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32), indexing="ij")

    def one_axis(pos):  # [side, side] -> [side*side, D/2]
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)
    table.setflags(write=False)  # cached: shared by every caller
    return table


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic-convolution weights of the 4 taps around a sample at fraction t (torch's A = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """[n_out, n_in] matrix that resizes one axis like torch F.interpolate(size=..., align_corners=False)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    if method == "bicubic":  # no clamp of the source coordinate; taps clamped to the border
        base = np.floor(src).astype(np.int64)
        w = _cubic_weights(src - base)
        for k in range(4):
            np.add.at(m, (rows, np.clip(base - 1 + k, 0, n_in - 1)), w[:, k])
    elif method == "bilinear":  # source coordinate clamped at 0
        src = np.maximum(src, 0.0)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        np.add.at(m, (rows, lo), 1.0 - frac)
        np.add.at(m, (rows, hi), frac)
    else:
        raise ValueError(f"position interpolation must be 'bicubic' or 'bilinear', got {method!r}")
    m = m.astype(np.float32)
    m.setflags(write=False)  # cached: shared by every caller
    return m


def resize_grid(table: jax.Array, src: tuple[int, int], dst: tuple[int, int], method: str = "bicubic") -> jax.Array:
    """A position table on a src grid [src_h*src_w, dim] resized to the dst grid -> [dst_h*dst_w, dim] (fp32)."""
    if tuple(src) == tuple(dst):
        return table
    grid = table.astype(jnp.float32).reshape(src[0], src[1], -1)
    mh = jnp.asarray(resize_matrix(src[0], dst[0], method))
    mw = jnp.asarray(resize_matrix(src[1], dst[1], method))
    out = jnp.einsum("yh,xw,hwd->yxd", mh, mw, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(dst[0] * dst[1], -1)


# ----------------------------------------------------------------------------------------------------------
# Cross-attention (torch nn.MultiheadAttention math, separate q/k/v/out projections)
# ----------------------------------------------------------------------------------------------------------
class CrossAttention(nnx.Module):
    """Multi-head attention of queries [batch, q, dim] over keys/values [batch, k, dim]; output [batch, q, dim]."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = None):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.attention_impl = num_heads, dim // num_heads, attention_impl
        init = nnx.initializers.normal(0.02)
        kw = dict(rngs=rngs, use_bias=True, dtype=dtype, param_dtype=param_dtype, kernel_init=init)
        self.q = layers.Dense(dim, dim, ("embed", "heads"), **kw)
        self.k = layers.Dense(dim, dim, ("embed", "heads"), **kw)
        self.v = layers.Dense(dim, dim, ("embed", "heads"), **kw)
        self.o = layers.Dense(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, q_in, k_in, v_in):
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.q(q_in)), split(self.k(k_in)), split(self.v(v_in))  # [batch, len, heads, head_dim]
        out = layers.attention(q, k, v, implementation=self.attention_impl)
        return self.o(out.reshape(*out.shape[:-2], -1))


# ----------------------------------------------------------------------------------------------------------
# Resampler
# ----------------------------------------------------------------------------------------------------------
class Resampler(nnx.Module):
    """[batch, keys, kv_dim] -> [batch, num_queries, out_dim or embed_dim]. Keys must form a square grid."""

    def __init__(self, cfg: ResamplerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.side = grid_side(cfg.num_queries, "resampler num_queries")
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dt
        e = cfg.embed_dim
        kv_dim = cfg.kv_dim if cfg.kv_dim is not None else e
        self.query = layers.param(rngs, nnx.initializers.truncated_normal(0.02), (cfg.num_queries, e),
                                  (None, "embed"), pd)
        self.kv_proj = (
            layers.Dense(kv_dim, e, ("mlp", "embed"), rngs=rngs, dtype=dt, param_dtype=pd,
                         kernel_init=nnx.initializers.truncated_normal(0.02))
            if kv_dim != e else None
        )
        ln = dict(eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pd, rngs=rngs)
        self.ln_q = layers.layer_norm(e, **ln)
        self.ln_kv = layers.layer_norm(e, **ln)
        self.attn = CrossAttention(e, cfg.num_heads, rngs=rngs, dtype=dt, param_dtype=pd,
                                   attention_impl=cfg.attention_impl)
        if cfg.out_dim is not None:
            self.ln_post = layers.layer_norm(e, **ln)
            self.proj = layers.Dense(e, cfg.out_dim, ("embed", "mlp"), rngs=rngs, use_bias=cfg.proj_bias, dtype=dt,
                                     param_dtype=pd, kernel_init=nnx.initializers.normal(e ** -0.5))
        else:
            self.ln_post = self.proj = None

    @property
    def num_queries(self) -> int:
        return self.cfg.num_queries

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim if self.cfg.out_dim is not None else self.cfg.embed_dim

    def positions(self, num_keys: int) -> tuple[jax.Array, jax.Array]:
        """(query positions [num_queries, embed], key positions [num_keys, embed]), fp32 constants."""
        q_pos = jnp.asarray(sincos_2d(self.cfg.embed_dim, self.side))
        k_side = grid_side(num_keys, "resampler keys")
        k_pos = resize_grid(q_pos, (self.side, self.side), (k_side, k_side), self.cfg.pos_interpolation)
        return q_pos, k_pos

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [batch, keys, kv_dim]
        q_pos, k_pos = self.positions(x.shape[1])
        x = x.astype(self.dtype)
        if self.kv_proj is not None:
            x = self.kv_proj(x)
        x = self.ln_kv(x)  # [batch, keys, embed]
        q = self.ln_q(self.query[...].astype(self.dtype))  # [num_queries, embed]
        q = jnp.broadcast_to((q + q_pos).astype(self.dtype), (x.shape[0], *q.shape))
        out = self.attn(q, (x + k_pos).astype(self.dtype), x)  # [batch, num_queries, embed]
        if self.proj is not None:
            out = self.proj(self.ln_post(out))  # [batch, num_queries, out_dim]
        return out
