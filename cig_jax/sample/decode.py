"""Text decoding over the LLM's KV cache: prefill a prompt (in one or several chunks), then greedy,
temperature or top-p sampling one token at a time.

Owns: the token loop and the next-token choice. Does not own: images or chat rounds (see `session.py`).
The model is split once into (graphdef, state) and the step is a pure jitted function of the state.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from cig_jax.models.llm import LLM, KVCache


def choose_next(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
    """logits [batch, vocab] -> tokens [batch]. temperature 0 = greedy; top_p < 1 = nucleus sampling."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(4, 5))
def choose_rows(logits, seeds, step, banned, temperature, top_p):
    """Next token per row [b]: banned ids masked, then greedy / temperature / top-p with the row's own key."""
    logits = jnp.where(banned, -jnp.inf, logits)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 0), step))(seeds)
    return jax.vmap(lambda lg, k: choose_next(lg[None], k, temperature, top_p)[0])(logits, keys)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _forward(graphdef, state, tokens, cache, attention_mask):
    model = nnx.merge(graphdef, state)
    out = model(tokens, attention_mask=attention_mask, cache=cache)
    return out.logits[:, -1], out.cache


def prefill(model: LLM, tokens: jax.Array, cache: KVCache, attention_mask=None):
    """Feeds a chunk of tokens into the cache; returns (last-position logits [batch, vocab], cache)."""
    graphdef, state = nnx.split(model)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    return _forward(graphdef, state, tokens, cache, attention_mask)


def greedy_generate(model: LLM, prompt: jax.Array, *, max_new_tokens: int, cache_len: int,
                    attention_mask=None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> jax.Array:
    """Prompt [batch, len] -> generated tokens [batch, max_new_tokens] (no stopping; callers trim at EOS)."""
    b = prompt.shape[0]
    if prompt.shape[1] + max_new_tokens > cache_len:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceed cache_len {cache_len}")
    graphdef, state = nnx.split(model)
    cache = KVCache.init(model.cfg, b, cache_len)
    if attention_mask is None:
        attention_mask = jnp.ones(prompt.shape, bool)
    logits, cache = _forward(graphdef, state, prompt, cache, attention_mask)
    key = jax.random.key(seed)
    out = []
    ones = jnp.ones((b, 1), bool)
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok = choose_next(logits, sub, temperature, top_p)
        out.append(tok)
        logits, cache = _forward(graphdef, state, tok[:, None], cache, ones)
    return jnp.stack(out, axis=1)
