"""Splash attention (the Pallas TPU flash-attention kernel that ships with jax) behind our mask convention.

Owns: turning the masks our models build (key validity, optionally AND causal over aligned queries and keys)
into splash's segment ids with exactly the einsum path's semantics, padding sequence lengths to the kernel's
block sizes, grouped-query heads, and running the kernel per shard (`shard_map` over the batch and head mesh
axes when an activation-sharding context is active, since a Pallas call cannot be partitioned by XLA).

Does not own: which model uses it (`attention_impl: splash` in a model config, dispatched by
`layers.attention`), nor the einsum / XLA paths.

Mask semantics (those of `layers.attention`): a query attends the valid keys it may see (all of them, or those
at or before it when causal); a query that sees no valid key attends key 0 alone. As segment ids:
kv segment 1 = valid key, 2 = key 0 when it is not valid, -1 = padding to the block size, 0 = other
invalid keys; q segment 1 = sees a valid key, 2 = sees none (so it matches key 0, which is then invalid).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from cig_jax import sharding

NUM_LANES = 128  # the kernel's kv blocks are multiples of this


def _blocks(length: int) -> int:
    """The block size for a (padded) sequence length: 512 when it divides, else 128."""
    return 512 if length % 512 == 0 else NUM_LANES


def segment_ids(key_valid: jax.Array, q_len: int, causal: bool) -> tuple[jax.Array, jax.Array]:
    """(q segments [b, q_len], kv segments [b, kv_len]) int32 from key validity [b, kv_len]."""
    b, s = key_valid.shape
    if causal:  # query i sees keys [0, i]: it has a valid one iff the running count of valid keys is > 0
        sees = jnp.cumsum(key_valid.astype(jnp.int32), axis=1)[:, :q_len] > 0
    else:
        sees = jnp.broadcast_to(jnp.any(key_valid, axis=1, keepdims=True), (b, q_len))
    q_seg = jnp.where(sees, 1, 2).astype(jnp.int32)
    first = jnp.arange(s)[None, :] == 0
    kv_seg = jnp.where(key_valid, 1, jnp.where(first, 2, 0)).astype(jnp.int32)
    return q_seg, kv_seg


def _pad_to(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _kernel_call(q, k, v, q_seg, kv_seg, *, causal: bool, interpret: bool):
    """Per-shard call. q [b, t, h, d] (already scaled), k/v [b, s, kvh, d], segments [b, t] / [b, s]; t and s
    multiples of 128."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    s = k.shape[1]
    base = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
    bq, bkv = _blocks(t), _blocks(s)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([base] * h), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)

    def one(q1, k1, v1, qs, ks):  # q1 [h, t, d], k1/v1 [kvh, s, d]
        return kernel(q1, k1, v1, sk.SegmentIds(q=qs, kv=ks))

    out = jax.vmap(one)(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q_seg, kv_seg)
    return out.transpose(0, 2, 1, 3)  # [b, t, h, d]


def attention(q, k, v, key_valid=None, *, causal: bool, scale: float | None = None,
              interpret: bool | None = None) -> jax.Array:
    """q [b, t, h, d], k/v [b, s, kvh, d] (kvh divides h), key_valid [b, s] bool or None -> [b, t, h, d].
    causal: query i attends keys [0, i] (self-attention, t == s). interpret: run the kernel in Pallas interpret
    mode (default: when not on TPU, so CPU tests check the same kernel)."""
    b, t, h, d = q.shape
    s = k.shape[1]
    if causal and t != s:
        raise ValueError(f"splash attention: causal needs as many queries as keys, got {t} and {s}")
    ctx = sharding.active_activation_sharding()
    if interpret is None:  # the devices the step is compiled for (an AOT compile for TPU runs on a CPU host)
        platform = ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()
        interpret = platform != "tpu"
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    key_valid = jnp.ones((b, s), bool) if key_valid is None else key_valid.astype(bool)
    q_seg, kv_seg = segment_ids(key_valid, t, causal)
    tp, sp = -(-t // NUM_LANES) * NUM_LANES, -(-s // NUM_LANES) * NUM_LANES
    # Padded queries copy the last real query's segment (they see a superset of its keys: never an empty row);
    # padded keys take segment -1, which no query has. Their outputs are sliced off below.
    q_seg = jnp.concatenate([q_seg, jnp.broadcast_to(q_seg[:, -1:], (b, tp - t))], axis=1)
    kv_seg = _pad_to(kv_seg, 1, sp, -1)
    qp = _pad_to((q * scale).astype(q.dtype), 1, tp)
    kp, vp = _pad_to(k, 1, sp), _pad_to(v, 1, sp)
    call = functools.partial(_kernel_call, causal=causal, interpret=interpret)

    if ctx is not None:  # run per shard: batch over its mesh axes, heads over theirs when q and kv heads agree
        mesh, rules = ctx

        def spec(names, shape):
            out = tuple(sharding.logical_to_spec(names, rules, mesh, shape))
            return out + (None,) * (4 - len(out))

        qs, ks = spec(("batch", None, "heads", None), q.shape), spec(("batch", None, "kv_heads", None), k.shape)
        hb = qs[0] if qs[0] == ks[0] else None
        hh = qs[2] if qs[2] == ks[2] else None
        if hb is not None or hh is not None:
            x_spec, seg_spec = P(hb, None, hh, None), P(hb, None)
            call = jax.shard_map(call, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec, seg_spec),
                                 out_specs=x_spec, check_vma=False)
    out = call(qp, kp, vp, q_seg, kv_seg)
    return out[:, :t].astype(q.dtype)


def key_validity(mask, batch: int, kv_len: int):
    """The key validity [b, s] of a mask our models pass (`layers.attention`): key validity broadcast over
    queries ([b, 1, 1, s]), optionally AND causal over aligned q/k, whose last query row sees every key.
    None stays None."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    return jnp.broadcast_to(mask[:, 0, -1, :], (batch, kv_len))

