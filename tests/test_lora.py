"""LoRA adapters on the LLM: start as a no-op, train alone, and merge into the base for export."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cig_jax.config import LLMConfig
from cig_jax.data.lm_smoke import permutation_walk
from cig_jax.models import layers
from cig_jax.models.llm import LLM, merge_lora, next_token_loss

BASE = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
LORA = dataclasses.replace(BASE, lora_rank=16, lora_alpha=16.0, lora_dropout=0.05)
TOKENS = jnp.asarray(np.stack([permutation_walk(i, vocab=64, seq_len=32, seed=0)["tokens"] for i in range(4)]))


def _adapted(seed=0):
    model = LLM(LORA, rngs=nnx.Rngs(seed))
    base = LLM(BASE, rngs=nnx.Rngs(seed))
    return model, base


def test_adapters_start_as_the_base_model():
    model, _ = _adapted()
    adapters = [p for p, _ in nnx.to_flat_state(nnx.state(model, layers.LoRAParam))]
    assert len(adapters) == 2 * 7  # a and b on q, k, v, o, gate, up, down (stacked over layers)
    ref = merge_lora(model)(TOKENS).logits
    np.testing.assert_allclose(np.asarray(model(TOKENS).logits), np.asarray(ref), atol=1e-6)


def test_training_adapters_leaves_base_frozen_and_merge_reproduces_logits():
    model, _ = _adapted()
    # SEED-X's recipe: adapters and norms train, everything else is frozen
    trainable = nnx.Any(layers.LoRAParam, nnx.PathContains("norm"))
    graphdef, lora, rest = nnx.split(model, trainable, ...)
    base_before = jax.tree.map(np.asarray, rest)
    tx = optax.adam(3e-2)
    opt = tx.init(lora)

    def loss_fn(lora, key):
        m = nnx.merge(graphdef, lora, rest)
        logits = m(TOKENS, dropout_rng=key).logits
        return next_token_loss(logits[:, :-1], TOKENS[:, 1:], jnp.ones_like(TOKENS[:, 1:]))[0]

    @jax.jit
    def step(lora, opt, key):
        loss, g = jax.value_and_grad(loss_fn)(lora, key)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    losses = []
    for i in range(60):
        lora, opt, loss = step(lora, opt, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, rest), base_before)

    trained = nnx.merge(graphdef, lora, rest)
    merged = merge_lora(trained)
    assert merged.cfg.lora_rank == 0
    assert not list(nnx.to_flat_state(nnx.state(merged, layers.LoRAParam)))
    np.testing.assert_allclose(np.asarray(merged(TOKENS).logits), np.asarray(trained(TOKENS).logits), atol=1e-5)
    # dropout is active only when a key is given
    a = trained(TOKENS, dropout_rng=jax.random.key(1)).logits
    assert not np.allclose(np.asarray(a), np.asarray(trained(TOKENS).logits))
