"""Attention for XLA:CPU: heads-major batched GEMMs with a hand-written backward, and causal block skipping.

Owns: the einsum path of `layers.attention` (what runs on CPU). q, k, v are transposed once to heads-major
([b, kv_heads, group, t, d] and [b, kv_heads, s, d]), so every matmul, forward and backward, is a plain batched
GEMM with leading batch dimensions (XLA:CPU's fast dot path). The core (`_core`) has a custom VJP: autodiff of
the einsum + softmax forward gives XLA:CPU a backward about 2x slower than the same math written as four GEMMs
and the softmax's row reduction (the gradient of one 8 x 256-token, 6-head attention: ~100 ms -> ~50 ms on 2
cores; torch's fused CPU kernel ~34 ms). The backward keeps the probabilities of the forward (b x h x t x s,
what autodiff keeps too). `causal_blocked` runs the core per query block over keys [0, (i + 1) * block) only, so
the fully masked upper triangle is never computed (as flash attention does).
The math is `layers.attention`'s einsum path, operation for operation: scores in fp32, scaled after the dot,
masked with finfo.min, softmax, probabilities cast to v's dtype; the backward is that of the same expression.

Does not own: the dispatch (`layers.attention`), masks' no-key rows (fixed by the caller before it gets here).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _probs(qh, kh, mask, scale):
    logits = jnp.einsum("bktd,bksd->bkts", qh, kh).astype(jnp.float32) * scale  # [b, kvh, g * t, s]
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)  # fp32


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(qh, kh, vh, mask, scale):
    """qh [b, kvh, g * t, d] (a kv head's query group, query-major within it); kh, vh [b, kvh, s, d]; mask None
    or bool broadcastable to [b, kvh, g * t, s]. -> [b, kvh, g * t, d]. One batch dimension pair per GEMM: the
    group shares its keys, so it rides along the query rows."""
    return jnp.einsum("bkts,bksd->bktd", _probs(qh, kh, mask, scale).astype(vh.dtype), vh)


def _core_fwd(qh, kh, vh, mask, scale):
    p = _probs(qh, kh, mask, scale)
    pv = p.astype(vh.dtype)
    return jnp.einsum("bkts,bksd->bktd", pv, vh), (qh, kh, vh, mask, pv)


def _core_bwd(scale, res, do):  # do [b, kvh, g * t, d]
    qh, kh, vh, mask, pv = res
    dv = jnp.einsum("bkts,bktd->bksd", pv, do.astype(vh.dtype))  # the group's rows sum into the shared kv head
    dp = jnp.einsum("bktd,bksd->bkts", do.astype(vh.dtype), vh).astype(jnp.float32)
    p = pv.astype(jnp.float32)
    # softmax backward, then the scale (masked keys have p = 0, so their ds is 0 as through the where)
    ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * scale).astype(qh.dtype)
    dq = jnp.einsum("bkts,bksd->bktd", ds, kh)
    dk = jnp.einsum("bkts,bktd->bksd", ds, qh)
    return dq, dk, dv, None


_core.defvjp(_core_fwd, _core_bwd)


def _heads_major(q, k, v, mask):
    """[b, t, h, d] / [b, s, kvh, d] -> q [b, kvh, g, t, d], k and v [b, kvh, s, d], the mask as
    [b | 1, kvh | 1, g | 1, t, s]."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    qh = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, t, d]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kvh, s, d]
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, s))  # [b | 1, h | 1, t, s]
        mb, mh = mask.shape[:2]
        mask = mask.reshape(mb, 1, 1, t, s) if mh == 1 else mask.reshape(mb, kvh, g, t, s)
    return qh, kh, vh, mask


def _grouped(qh, mask):
    """q [b, kvh, g, t, d] -> [b, kvh, g * t, d]; the mask [b | 1, kvh | 1, g | 1, t, s] -> [b | 1, kvh | 1, g * t
    or t, s] (broadcast over the group first where it differs per query row and the group is > 1)."""
    b, kvh, g, t, d = qh.shape
    if mask is not None:
        mb, mk, mg = mask.shape[:3]
        mask = jnp.broadcast_to(mask, (mb, mk, g) + mask.shape[3:]).reshape(mb, mk, g * t, mask.shape[-1])
    return qh.reshape(b, kvh, g * t, d), mask


def _tokens_major(out, g: int):  # [b, kvh, g * t, d] -> [b, t, h, d]
    b, kvh, gt, d = out.shape
    t = gt // g
    return out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, kvh * g, d)


def full(q, k, v, mask, scale: float):
    """q [b, t, h, d]; k, v [b, s, kvh, d]; mask None or bool broadcastable to [b, h, t, s]. -> [b, t, h, d]."""
    qh, kh, vh, mask = _heads_major(q, k, v, mask)
    qg, mask = _grouped(qh, mask)
    return _tokens_major(_core(qg, kh, vh, mask, scale), qh.shape[2])


def causal_blocked(q, k, v, mask, scale: float, block: int):
    """q [b, t, h, d]; k, v [b, t, kvh, d]; mask None or bool broadcastable to [b, h, t, t] (causal AND key
    validity); t a multiple of `block`. -> [b, t, h, d]."""
    t = q.shape[1]
    qh, kh, vh, mask = _heads_major(q, k, v, mask)
    g = qh.shape[2]
    outs = []
    for lo in range(0, t, block):
        hi = lo + block
        qg, m = _grouped(qh[:, :, :, lo:hi], None if mask is None else mask[..., lo:hi, :hi])
        out = _core(qg, kh[:, :, :hi], vh[:, :, :hi], m, scale)  # [b, kvh, g * block, d]
        outs.append(out.reshape(out.shape[0], out.shape[1], g, block, out.shape[-1]))
    out = jnp.concatenate(outs, axis=3)  # [b, kvh, g, t, d]
    return _tokens_major(out.reshape(out.shape[0], out.shape[1], g * t, out.shape[-1]), g)
