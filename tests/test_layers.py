"""Shared layers: the attention paths agree with each other and with a plain numpy softmax attention."""
import jax
import jax.numpy as jnp
import numpy as np

from cig_jax.models import layers


def _numpy_attention(q, k, v, mask):
    b, t, h, d = q.shape
    g = h // k.shape[2]
    k = np.repeat(k, g, axis=2)
    v = np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_attention_paths_match_reference_with_gqa_and_padding():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 256, 8, 16)).astype(np.float32)
    k = rng.normal(size=(2, 256, 2, 16)).astype(np.float32)
    v = rng.normal(size=(2, 256, 2, 16)).astype(np.float32)
    causal = np.tril(np.ones((256, 256), bool))
    pad = np.ones((2, 256), bool)
    pad[1, :40] = False  # left padding on row 1
    mask = causal[None, None] & pad[:, None, None, :]
    mask |= np.eye(256, dtype=bool)[None, None]  # every query sees itself, so no row is empty
    ref = _numpy_attention(q, k, v, mask)
    for kw in ({"implementation": "xla"}, {"implementation": "einsum"},
               {"implementation": "einsum", "causal_block": 64}):
        got = np.asarray(layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask), **kw))
        np.testing.assert_allclose(got, ref, atol=2e-5, err_msg=str(kw))


def test_fully_masked_rows_stay_finite():
    q = jnp.ones((1, 4, 2, 8))
    mask = jnp.zeros((1, 1, 4, 4), bool)
    assert np.isfinite(np.asarray(layers.attention(q, q, q, mask=mask, implementation="einsum"))).all()


def test_scan_or_loop_agree():
    xs = jnp.arange(12.0).reshape(4, 3)
    body = lambda c, x: (c * 0.5 + x.sum(), c)
    a = layers.scan_or_loop(body, jnp.float32(1.0), xs, scan=True, length=4)
    b = layers.scan_or_loop(body, jnp.float32(1.0), xs, scan=False, length=4)
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-6), a, b)


def test_scan_or_loop_gradients_agree_with_a_tree_of_stacked_weights():
    """The unrolled path's unstack has its own VJP (one stack): gradients of every stacked leaf, of a tuple
    inside the tree and of the carry equal those of lax.scan."""
    rng = np.random.default_rng(0)
    xs = {"w": jnp.asarray(rng.standard_normal((3, 4, 4)), jnp.float32),
          "pair": (jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), jnp.arange(3.0))}

    def body(c, x):
        c = jnp.tanh(c @ x["w"] + x["pair"][0]) * x["pair"][1]
        return c, jnp.sum(c)

    def loss(xs, c0, scan):
        c, ys = layers.scan_or_loop(body, c0, xs, scan=scan, length=3)
        return jnp.sum(c ** 2) + jnp.sum(ys * jnp.arange(1.0, 4.0))

    c0 = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    a = jax.grad(loss, argnums=(0, 1))(xs, c0, True)
    b = jax.grad(loss, argnums=(0, 1))(xs, c0, False)
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-6), a, b)


def test_cpu_attention_gradients_match_autodiff_of_the_xla_path():
    """The CPU paths' hand-written backward (cpu_attention) against autodiff of jax.nn.dot_product_attention:
    causal self-attention with GQA and left padding (whole and in query blocks) and cross-attention over
    padded keys, gradients of q, k and v within 1e-5."""
    rng = np.random.default_rng(1)
    t, s = 128, 48
    q = jnp.asarray(rng.normal(size=(2, t, 4, 16)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(2, t, 2, 16)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(2, t, 2, 16)).astype(np.float32))
    pad = np.ones((2, t), bool)
    pad[1, :20] = False
    causal_mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None, None] & pad[:, None, None, :]
                              | np.eye(t, dtype=bool)[None, None])
    kc = jnp.asarray(rng.normal(size=(2, s, 2, 16)).astype(np.float32))
    vc = jnp.asarray(rng.normal(size=(2, s, 2, 16)).astype(np.float32))
    key_pad = np.ones((2, s), bool)
    key_pad[0, 30:] = False
    cross_mask = jnp.asarray(key_pad[:, None, None, :])
    w = jnp.asarray(rng.normal(size=(2, t, 4, 16)).astype(np.float32))  # a random cotangent

    def grads(kk, vv, mask, **kw):
        f = lambda q_, k_, v_: jnp.sum(w * layers.attention(q_, k_, v_, mask=mask, **kw))  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, kk, vv)

    for kk, vv, mask, paths in ((k, v, causal_mask, ({}, {"causal_block": 32})), (kc, vc, cross_mask, ({},))):
        ref = grads(kk, vv, mask, implementation="xla")
        for kw in paths:
            got = grads(kk, vv, mask, implementation="einsum", **kw)
            for name, a, b in zip("qkv", got, ref):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=f"d{name} {kw}")
