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

from cig_jax.config_model import LLMConfig
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
def _proj(cfg: LLMConfig, name: str, din: int, dout: int, names, *, rngs, use_bias=False):
    """A projection of the decoder, with a LoRA adapter when `name` is among `cfg.lora_targets`."""
    rank = cfg.lora_rank if name in cfg.lora_targets else 0
    return layers.Dense(din, dout, names, rngs=rngs, use_bias=use_bias, dtype=dtype_of(cfg.dtype),
                        param_dtype=dtype_of(cfg.param_dtype), lora_rank=rank, lora_alpha=cfg.lora_alpha)


def _dropout_keys(rng, n: int):
    return [None] * n if rng is None else list(jax.random.split(rng, n))


class Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim()
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd
        self.attention_impl, self.lora_dropout = cfg.attention_impl, cfg.lora_dropout
        self.q_proj = _proj(cfg, "q_proj", d, h * hd, ("embed", "heads"), rngs=rngs, use_bias=cfg.qkv_bias)
        self.k_proj = _proj(cfg, "k_proj", d, kvh * hd, ("embed", "kv_heads"), rngs=rngs, use_bias=cfg.qkv_bias)
        self.v_proj = _proj(cfg, "v_proj", d, kvh * hd, ("embed", "kv_heads"), rngs=rngs, use_bias=cfg.qkv_bias)
        self.o_proj = _proj(cfg, "o_proj", h * hd, d, ("heads", "embed"), rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, index=None, rng=None, layer=None):
        """cache_k / cache_v: the whole stacked cache [layers, b, max_len, kv_heads, head_dim]; this layer
        (`layer`, traced) writes its chunk at [index, index + t) in place and attends over its slice."""
        b, t, _ = x.shape
        kq, kk, kv, ko = _dropout_keys(rng, 4)
        drop = self.lora_dropout
        q = self.q_proj(x, dropout_rng=kq, dropout_rate=drop).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, dropout_rng=kk, dropout_rate=drop).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, dropout_rng=kv, dropout_rate=drop).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_k is not None:  # only the chunk is written: no copy of the cache per call
            zero = jnp.zeros((), jnp.int32)
            at = (layer, zero, index, zero, zero)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype)[None], at)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype)[None], at)
            k = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False).astype(q.dtype)
            v = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False).astype(q.dtype)
        block = None if cache_k is not None else CAUSAL_BLOCK  # no cache: the mask is causal over q == k
        out = layers.attention(q, k, v, mask=mask, implementation=self.attention_impl, causal_block=block)
        return self.o_proj(out.reshape(b, t, -1), dropout_rng=ko, dropout_rate=drop), cache_k, cache_v


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.lora_dropout = cfg.lora_dropout
        self.gate_proj = _proj(cfg, "gate_proj", d, f, ("embed", "mlp"), rngs=rngs)
        self.up_proj = _proj(cfg, "up_proj", d, f, ("embed", "mlp"), rngs=rngs)
        self.down_proj = _proj(cfg, "down_proj", f, d, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x, rng=None):
        kg, ku, kd = _dropout_keys(rng, 3)
        drop = self.lora_dropout
        h = jax.nn.silu(self.gate_proj(x, dropout_rng=kg, dropout_rate=drop)) * self.up_proj(
            x, dropout_rng=ku, dropout_rate=drop)
        return self.down_proj(h, dropout_rng=kd, dropout_rate=drop)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        pd = dtype_of(cfg.param_dtype)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, index=None, rng=None, layer=None):
        ka, km = _dropout_keys(rng, 2)
        h, cache_k, cache_v = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_k, cache_v, index, ka,
                                             layer)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), km)
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
            self.lm_head = layers.Dense(
                cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dt, param_dtype=pd,
                kernel_init=nnx.initializers.normal(0.02),
            )

    # -- pieces ----------------------------------------------------------------------------------------
    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, len] -> [batch, len, hidden] in the compute dtype."""
        return self.embed_tokens(tokens)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [batch, len, hidden] -> logits [batch, len, vocab] in `cfg.logits_dtype` (fp32 by
        default; the loss takes its log-softmax in fp32 either way)."""
        if self.cfg.tie_word_embeddings:
            table = self.embed_tokens.embedding.value.astype(hidden.dtype)
            out = jnp.einsum("bld,vd->blv", hidden, table)
        else:
            out = self.lm_head(hidden)
        return out.astype(dtype_of(self.cfg.logits_dtype))

    def _run_layers(self, x, cos, sin, mask, cache: Optional[KVCache], dropout_rng=None):
        graphdef, state = nnx.split(self.layers)
        index = None if cache is None else cache.index

        rngs = None if dropout_rng is None else jax.random.split(dropout_rng, self.cfg.num_layers)
        if cache is None:
            def body(x, xs):
                layer_state, rng = xs
                return nnx.merge(graphdef, layer_state)(x, cos, sin, mask, rng=rng)[0], None

            body = layers.remat(body, self.cfg.remat_policy, scanned=self.cfg.scan_layers)
            x, _ = layers.scan_or_loop(body, x, (state, rngs), scan=self.cfg.scan_layers, length=self.cfg.num_layers)
            return x, None, None

        # With a cache, the whole stacked cache is the loop carry and each layer writes only its new chunk
        # into it: under jit with the cache donated, XLA updates the buffer in place (the cost of a call
        # no longer grows with the cache size through copies of it).
        def cached_body(carry, xs):
            x, ks, vs = carry
            layer_state, i, rng = xs
            x, ks, vs = nnx.merge(graphdef, layer_state)(x, cos, sin, mask, ks, vs, index, rng, layer=i)
            return (x, ks, vs), None

        cached_body = layers.remat(cached_body, self.cfg.remat_policy, scanned=self.cfg.scan_layers)
        xs = (state, jnp.arange(self.cfg.num_layers, dtype=jnp.int32), rngs)
        (x, ks, vs), _ = layers.scan_or_loop(cached_body, (x, cache.k, cache.v), xs, scan=self.cfg.scan_layers,
                                             length=self.cfg.num_layers)
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
        dropout_rng: Optional[jax.Array] = None,  # LoRA dropout (training); None = deterministic
    ) -> LLMOutput:
        x = self.embed(tokens) if inputs_embeds is None else inputs_embeds.astype(dtype_of(self.cfg.dtype))
        b, t, _ = x.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        offset = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
        if positions is None:
            positions = offset[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        cos, sin = rope_tables(positions, rope_inv_freq(self.cfg))  # constants, folded under jit

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

        x, ks, vs = self._run_layers(x, cos, sin, mask, cache, dropout_rng)
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

    `targets[:, i]` is the token that should follow position i (callers shift; `shifted_token_loss` does it
    without slicing the logits). Returns (loss, token count).
    """
    weights = weights.astype(jnp.float32)
    count = jnp.sum(weights)
    return _weighted_nll_sum(logits, targets.astype(jnp.int32), weights) / jnp.maximum(count, 1.0), count


def shifted_token_loss(logits: jax.Array, tokens: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`next_token_loss(logits[:, :-1], tokens[:, 1:], weights[:, 1:])` without the slice of the logits (a copy
    of b x l x vocab floats): the targets shift left instead and the last position gets weight 0.
    logits [b, l, v]; tokens, weights [b, l], unshifted."""
    shift = lambda x: jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)  # noqa: E731
    return next_token_loss(logits, shift(tokens), shift(weights))


def selected_token_loss(model: "LLM", hidden: jax.Array, tokens: jax.Array, weights: jax.Array,
                        num_selected: int) -> tuple[jax.Array, jax.Array]:
    """`shifted_token_loss(model.logits(hidden), tokens, weights)` with the LM head run only at the positions
    whose shifted weight is > 0: on a prompt + answer batch the [b, l, vocab] head (a fifth of SmolLM2-135M's
    FLOPs) shrinks to [num_selected, vocab]. hidden [b, l, d] (final-normed, `return_logits=False`); tokens,
    weights [b, l], unshifted. `num_selected` is static and must be >= the number of such positions (the
    caller counts them on the host); unused slots take weight 0, positions past it would be dropped."""
    b, t, d = hidden.shape
    shift = lambda x: jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)  # noqa: E731
    targets, w = shift(tokens).reshape(-1), shift(weights).reshape(-1).astype(jnp.float32)
    (index,) = jnp.nonzero(w > 0, size=num_selected, fill_value=0)  # [k]
    used = jnp.arange(num_selected) < jnp.sum(w > 0)
    picked = hidden.reshape(b * t, d)[index]  # [k, d]
    return next_token_loss(model.logits(picked[None]), targets[index][None], jnp.where(used, w[index], 0.0)[None])


def _log_sum_exp(x):  # [..., v] fp32 -> [...]
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return (m + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)))[..., 0]


@jax.custom_vjp
def _weighted_nll_sum(logits, targets, weights):
    """sum(weights * -log_softmax(logits)[targets]) in fp32. logits [b, l, v]; targets int32, weights fp32 [b, l].
    The VJP is written out, (softmax - one_hot) * weight: autodiff of log_softmax + take_along_axis gives
    XLA:CPU a scatter and a second pass over the logits (the LM head's loss was ~10% of the CPU step)."""
    return _weighted_nll_sum_fwd(logits, targets, weights)[0]


def _weighted_nll_sum_fwd(logits, targets, weights):
    x = logits.astype(jnp.float32)
    lse = _log_sum_exp(x)  # [b, l]
    picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * weights), (logits, targets, weights, lse)


def _weighted_nll_sum_bwd(res, g):
    logits, targets, weights, lse = res
    x = logits.astype(jnp.float32)
    one_hot = jnp.arange(x.shape[-1], dtype=jnp.int32) == targets[..., None]
    dx = (jnp.exp(x - lse[..., None]) - one_hot) * (g * weights)[..., None]
    return dx.astype(logits.dtype), None, None


_weighted_nll_sum.defvjp(_weighted_nll_sum_fwd, _weighted_nll_sum_bwd)


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


def merge_lora(model: "LLM") -> "LLM":
    """A copy of `model` with every LoRA adapter folded into its kernel (lora_rank 0), for export."""
    base_cfg = dataclasses.replace(model.cfg, lora_rank=0)
    merged = nnx.eval_shape(lambda: LLM(base_cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(merged)
    values = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("lora_a", "lora_b"):
            continue
        values[path] = var.value
    for path, module in model.iter_modules():
        if isinstance(module, layers.Dense) and module.lora_a is not None:
            a, b = module.lora_a.value, module.lora_b.value  # stacked: [layers, in, r], [layers, r, out]
            values[tuple(path) + ("kernel",)] = module.kernel.value + jnp.einsum("...ir,...ro->...io", a, b) * module.lora_scale
    _, abstract_state = nnx.split(merged)
    flat = [(p, var.replace(values[p])) for p, var in nnx.to_flat_state(abstract_state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
