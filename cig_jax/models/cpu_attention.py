"""Causal self-attention for XLA:CPU: heads-major layout, query blocks that skip masked key blocks.

Owns: `causal_blocked`, the einsum path of `layers.attention` when the caller's mask is causal over aligned
queries and keys (`causal_block`). q, k, v are transposed once to heads-major ([b, kv_heads, group, t, d] and
[b, kv_heads, s, d]), so each block's two matmuls are plain batched GEMMs with leading batch dimensions (XLA:CPU's
fast dot path, no per-block transposes); query block i reads keys [0, (i + 1) * block) only, so the fully masked
upper triangle is never computed (as flash attention does), and the scores of one block at a time are all that
is materialised. The math is `layers.attention`'s einsum path, operation for operation (scores in fp32, scaled
after the dot, masked with finfo.min, softmax, cast to v's dtype).

Does not own: the dispatch (`layers.attention`), masks' no-key rows (fixed by the caller before it gets here).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_blocked(q, k, v, mask, scale: float, block: int):
    """q [b, t, h, d]; k, v [b, t, kvh, d]; mask None or bool broadcastable to [b, h, t, t] (causal AND key
    validity); t a multiple of `block`. -> [b, t, h, d]."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qh = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, t, d]
    kh = k.transpose(0, 2, 1, 3)  # [b, kvh, t, d]
    vh = v.transpose(0, 2, 1, 3)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, t))  # [b | 1, h | 1, t, t]
        mb, mh = mask.shape[:2]
        mask = mask.reshape(mb, 1, 1, t, t) if mh == 1 else mask.reshape(mb, kvh, g, t, t)
    outs = []
    for lo in range(0, t, block):
        hi = lo + block
        logits = jnp.einsum("bkgtd,bksd->bkgts", qh[:, :, :, lo:hi], kh[:, :, :hi]).astype(jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask[..., lo:hi, :hi], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs, vh[:, :, :hi]))  # [b, kvh, g, block, d]
    out = jnp.concatenate(outs, axis=3)  # [b, kvh, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
