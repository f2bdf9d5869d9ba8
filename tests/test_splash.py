"""Splash attention (the Pallas TPU kernel, run here in Pallas interpret mode on CPU) against the einsum path:
the same outputs and gradients in fp32, causal with left padding (the LLM's masks, grouped-query heads) and
non-causal (the DiT's self- and cross-attention, with a condition mask), and per shard on a mesh."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cig_jax import sharding
from cig_jax.config import MeshConfig
from cig_jax.config_model import LLMConfig
from cig_jax.models import dit, layers
from cig_jax.models.llm import LLM

TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(b, t, s, h, kvh, d, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (b, t, h, d)), jax.random.normal(k2, (b, s, kvh, d)),
            jax.random.normal(k3, (b, s, kvh, d)))


def _causal_mask(valid):  # the LLM's training mask: causal AND key validity, [b, 1, t, t]
    t = valid.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None, None] & valid[:, None, None, :]


def _assert_same_fwd_and_grads(mask, q, k, v, causal_block=None):
    def run(impl):
        def f(q, k, v):
            out = layers.attention(q, k, v, mask=mask, implementation=impl, causal_block=causal_block)
            return jnp.sum(jnp.sin(out)), out  # a loss whose cotangent differs per element

        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    out_e, grads_e = run("einsum")
    out_s, grads_s = run("splash")
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_e), **TOL)
    for name, ge, gs in zip("qkv", grads_e, grads_s):
        assert float(jnp.max(jnp.abs(ge))) > 0, name
        np.testing.assert_allclose(np.asarray(gs), np.asarray(ge), **TOL, err_msg=f"d{name}")


@pytest.mark.long
def test_splash_causal_left_padding_matches_einsum_forward_and_grads():
    """Rows 0..3 left-padded by 0, 5, 129 and all 130 tokens (so padding spans a whole kernel block and one row
    has no valid key at all); 4 query heads over 2 kv heads; 130 tokens pads to two 128-blocks inside."""
    b, t = 4, 130
    q, k, v = _qkv(b, t, t, 4, 2, 16)
    valid = jnp.arange(t)[None] >= jnp.array([[0], [5], [129], [130]])
    _assert_same_fwd_and_grads(_causal_mask(valid), q, k, v, causal_block=128)


@pytest.mark.long
def test_splash_non_causal_matches_einsum_forward_and_grads():
    """The DiT's self-attention (no mask) and cross-attention over a condition mask [b, 1, 1, m] with one
    example that has no valid condition token."""
    q, k, v = _qkv(2, 64, 64, 2, 2, 8, seed=1)
    _assert_same_fwd_and_grads(None, q, k, v)
    q, k, v = _qkv(3, 64, 20, 2, 2, 8, seed=2)
    cond_valid = jnp.arange(20)[None] < jnp.array([[20], [7], [0]])
    _assert_same_fwd_and_grads(cond_valid[:, None, None, :], q, k, v)


@pytest.mark.long
def test_llm_with_splash_equals_einsum_llm_on_left_padded_batch():
    """The dispatch: an LLM config with attention_impl 'splash' gives the einsum LLM's logits and parameter
    gradients on a left-padded batch."""
    cfg = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    attention_impl="einsum")
    tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, 64)
    mask = (jnp.arange(24)[None] >= jnp.array([[0], [9]])).astype(jnp.int32)

    def logits_and_grads(impl):
        model = LLM(dataclasses.replace(cfg, attention_impl=impl), rngs=nnx.Rngs(0))

        def loss(m):
            logits = m(tokens, attention_mask=mask).logits
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask), logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return logits, jax.tree.leaves(grads)

    logits_e, grads_e = logits_and_grads("einsum")
    logits_s, grads_s = logits_and_grads("splash")
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_e), **TOL)
    for ge, gs in zip(grads_e, grads_s):
        np.testing.assert_allclose(np.asarray(gs), np.asarray(ge), **TOL)


def test_dit_attention_with_splash_equals_einsum():
    """The DiT's attention module (diffusers layout) with impl 'splash' vs 'einsum', self and masked cross."""
    kw = dict(bias=True, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    ein = dit.Attention(32, 16, 2, 16, impl="einsum", **kw)
    spl = dit.Attention(32, 16, 2, 16, impl="splash", **dict(kw, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(4), (2, 40, 32))
    ctx = jax.random.normal(jax.random.key(5), (2, 12, 16))
    cmask = (jnp.arange(12)[None] < jnp.array([[12], [3]]))[:, None, None, :]
    sa = dit.Attention(32, 32, 2, 16, impl="splash", **dict(kw, rngs=nnx.Rngs(1)))
    se = dit.Attention(32, 32, 2, 16, impl="einsum", **dict(kw, rngs=nnx.Rngs(1)))
    np.testing.assert_allclose(np.asarray(sa(x)), np.asarray(se(x)), **TOL)
    np.testing.assert_allclose(np.asarray(spl(x, ctx, cmask)), np.asarray(ein(x, ctx, cmask)), **TOL)


def test_splash_runs_per_shard_on_a_mesh():
    """Under the trainer's activation-sharding context the kernel runs per shard (shard_map over batch and
    heads) on a data 2 x fsdp 2 x tensor 2 mesh and still equals the einsum path."""
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = MeshConfig().axis_rules
    q, k, v = _qkv(4, 40, 40, 4, 2, 8, seed=6)
    valid = jnp.arange(40)[None] >= jnp.array([[0], [3], [17], [39]])
    mask = _causal_mask(valid)
    ref = layers.attention(q, k, v, mask=mask, implementation="einsum", causal_block=128)
    with sharding.activation_sharding(mesh, rules):
        out = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask=mask, implementation="splash",
                                                       causal_block=128))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
