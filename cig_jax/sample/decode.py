"""The next-token choice: greedy, temperature or top-p (nucleus) sampling from a batch of logits.

Owns: `choose_next`. Does not own: the token loop over the KV cache, images and chat rounds (`session.py`,
`cache.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
