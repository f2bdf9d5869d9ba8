"""LLaMA-family decoder (LLaMA 2/3, Qwen2) in Flax NNX, with a KV cache that takes multi-token chunks.

Owns: the decoder (token embedding, RMSNorm, RoPE with llama3/linear scaling, grouped-query attention,
SwiGLU MLP, optional qkv bias and tied embeddings), the layer stack (stacked parameters run under
`lax.scan`, with a configurable remat policy), the KV cache, and the next-token loss.

Does not own: images (see `mllm.py`), decoding loops (see `cig_jax/sample/`), weight conversion
(see `cig_jax/convert/hf_llm.py`).

Layout: tensors are [batch, length, ...]. The cache is [layers, batch, max_len, kv_heads, head_dim];
all rows of a batch share one write offset (`KVCache.index`), and `KVCache.mask` marks which slots hold
real (non-padding) keys, so left-padded prompts and chunks of different true lengths work.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from cig_jax.config import LLMConfig
from cig_jax.models import layers
from cig_jax.models.layers import dtype_of

CAUSAL_BLOCK = 128  # query block for causal self-attention on the einsum path (skips masked key blocks)


# ----------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    mask: jax.Array  # [batch, max_len] bool: slot holds a real key
    lengths: jax.Array  # [batch] int32: real tokens seen so far (the next RoPE position)
    index: jax.Array  # [] int32: next slot to write (shared by the batch)

    @classmethod
    def init(cls, cfg: LLMConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype_of(dtype or cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim())
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch, max_len), bool),
            lengths=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


# ----------------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: LLMConfig) -> jnp.ndarray:
    """Inverse frequencies [head_dim // 2], with llama3 or linear scaling when configured."""
    dim = cfg.resolved_head_dim()
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    if rs.type == "linear":
        return inv_freq / rs.factor
    if rs.type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"model.llm.rope_scaling.type: unknown RoPE scaling {rs.type!r} (use 'llama3' or 'linear')")


def rope_tables(positions: jax.Array, inv_freq: jax.Array):
    """positions [batch, len] -> cos, sin [batch, len, head_dim] (halves repeated, rotate-half layout)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, len, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, len, heads, head_dim]; rotate-half convention (as Hugging Face LLaMA checkpoints)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------
class Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim()
        kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd
        self.attention_impl = cfg.attention_impl
        self.q_proj = layers.dense(d, h * hd, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.k_proj = layers.dense(d, kvh * hd, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
        self.v_proj = layers.dense(d, kvh * hd, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
        self.o_proj = layers.dense(h * hd, d, ("heads", "embed"), **kw)

    def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, index=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_k is not None:  # write this chunk at [index, index + t) and attend over the whole cache
            cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, axis=1)
            cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=1)
            k, v = cache_k.astype(q.dtype), cache_v.astype(q.dtype)
        block = None if cache_k is not None else CAUSAL_BLOCK  # no cache: the mask is causal over q == k
        out = layers.attention(q, k, v, mask=mask, implementation=self.attention_impl, causal_block=block)
        return self.o_proj(out.reshape(b, t, -1)), cache_k, cache_v


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        self.gate_proj = layers.dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = layers.dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = layers.dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        pd = dtype_of(cfg.param_dtype)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, index=None):
        h, cache_k, cache_v = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_k, cache_v, index)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache_k, cache_v


# ----------------------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LLMOutput:
    logits: Optional[jax.Array]  # [batch, len, vocab] fp32 (None when not asked for)
    hidden_states: jax.Array  # [batch, len, hidden] after the final norm
    cache: Optional[KVCache]


class LLM(nnx.Module):
    """Decoder-only LM. Layer parameters are stacked on a leading 'layers' axis."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dt,
            param_dtype=pd,
            embedding_init=layers.logical(nnx.initializers.normal(0.02), "vocab", "embed"),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return DecoderLayer(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.dense(
                cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dt, param_dtype=pd,
                kernel_init=nnx.initializers.normal(0.02),
            )
        self.inv_freq = nnx.Cache(rope_inv_freq(cfg))  # a constant, not a parameter

    # -- pieces ----------------------------------------------------------------------------------------
    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, len] -> [batch, len, hidden] in the compute dtype."""
        return self.embed_tokens(tokens)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [batch, len, hidden] -> fp32 logits [batch, len, vocab]."""
        if self.cfg.tie_word_embeddings:
            table = self.embed_tokens.embedding.value.astype(hidden.dtype)
            out = jnp.einsum("bld,vd->blv", hidden, table)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def _run_layers(self, x, cos, sin, mask, cache: Optional[KVCache]):
        graphdef, state = nnx.split(self.layers)
        index = None if cache is None else cache.index

        def body(x, xs):
            layer_state, ck, cv = xs
            layer = nnx.merge(graphdef, layer_state)
            x, ck, cv = layer(x, cos, sin, mask, ck, cv, index)
            return x, (ck, cv)

        body = layers.remat(body, self.cfg.remat_policy, scanned=self.cfg.scan_layers)
        xs = (state, None, None) if cache is None else (state, cache.k, cache.v)
        x, (ks, vs) = layers.scan_or_loop(body, x, xs, scan=self.cfg.scan_layers, length=self.cfg.num_layers)
        return x, ks, vs

    # -- forward -----------------------------------------------------------------------------------------
    def __call__(
        self,
        tokens: Optional[jax.Array] = None,  # [batch, len] int
        *,
        inputs_embeds: Optional[jax.Array] = None,  # [batch, len, hidden] (instead of tokens)
        attention_mask: Optional[jax.Array] = None,  # [batch, len] 1 = real token, 0 = padding
        positions: Optional[jax.Array] = None,  # [batch, len] RoPE positions (default: from the mask)
        cache: Optional[KVCache] = None,
        return_logits: bool = True,
    ) -> LLMOutput:
        x = self.embed(tokens) if inputs_embeds is None else inputs_embeds.astype(dtype_of(self.cfg.dtype))
        b, t, _ = x.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        offset = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
        if positions is None:
            positions = offset[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        cos, sin = rope_tables(positions, self.inv_freq.value)

        if cache is None:
            key_valid = valid
            q_slot = jnp.arange(t)
            k_slot = jnp.arange(t)
        else:
            if t > cache.max_len:
                raise ValueError(f"chunk of {t} tokens does not fit a KV cache of {cache.max_len} slots")
            chunk_mask = jnp.zeros_like(cache.mask)
            chunk_mask = jax.lax.dynamic_update_slice_in_dim(chunk_mask, valid, cache.index, axis=1)
            key_valid = cache.mask | chunk_mask
            q_slot = cache.index + jnp.arange(t)
            k_slot = jnp.arange(cache.max_len)
        causal = k_slot[None, :] <= q_slot[:, None]  # [t, keys]
        mask = causal[None, None] & key_valid[:, None, None, :]  # [b, 1, t, keys]

        x, ks, vs = self._run_layers(x, cos, sin, mask, cache)
        hidden = self.norm(x)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                k=ks, v=vs, mask=key_valid, lengths=cache.lengths + valid.sum(axis=1).astype(jnp.int32),
                index=cache.index + t,
            )
        return LLMOutput(logits=self.logits(hidden) if return_logits else None, hidden_states=hidden, cache=new_cache)


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------
def next_token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over positions with weight > 0. logits [b, l, v], targets/weights [b, l].

    `targets[:, i]` is the token that should follow position i (callers shift). Returns (loss, token count).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    count = jnp.sum(weights)
    return jnp.sum(nll * weights) / jnp.maximum(count, 1.0), count


def num_params(cfg: LLMConfig) -> int:
    """Parameter count from the config (for MFU accounting)."""
    d, f, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    hd = cfg.resolved_head_dim()
    attn = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2
    if cfg.qkv_bias:
        attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    per_layer = attn + 3 * d * f + 2 * d
    return L * per_layer + v * d * (1 if cfg.tie_word_embeddings else 2) + d


def train_flops_per_token(cfg: LLMConfig, seq_len: int) -> float:
    """Model FLOPs per token of a training step (forward + backward = 3x forward), PaLM-style accounting:
    6 * (non-embedding params + lm_head) + 12 * layers * heads * head_dim * seq_len (attention scores)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    matmul_params = num_params(cfg) - v * d * (1 if cfg.tie_word_embeddings else 2) + v * d
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim() * seq_len
    return 6 * matmul_params + attn
