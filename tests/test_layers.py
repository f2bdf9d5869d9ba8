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
