"""The Qwen-VL-style resampler: shapes, sin-cos tables, key-grid resizing, torch-equivalent math, gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cig_jax.config_model import ResamplerConfig
from cig_jax.models.resampler import Resampler, resize_grid, sincos_2d


def _tiny(**kw):
    base = dict(num_queries=4, embed_dim=32, num_heads=4, kv_dim=48)
    return Resampler(ResamplerConfig(**{**base, **kw}), rngs=nnx.Rngs(0))


def test_output_shapes_for_input_and_output_directions():
    x = jnp.ones((3, 16, 48))
    assert _tiny()(x).shape == (3, 4, 32)  # 16 keys (4x4) -> 4 queries, kv 48 -> 32
    assert _tiny(out_dim=20)(x).shape == (3, 4, 20)  # with ln_post + proj
    same = _tiny(kv_dim=None)
    assert same.kv_proj is None and same(jnp.ones((2, 4, 32))).shape == (2, 4, 32)  # 64 -> 64 style, no kv proj
    with pytest.raises(ValueError, match="square grid"):
        _tiny()(jnp.ones((1, 5, 48)))


def test_sincos_table_matches_independent_numpy():
    dim, side = 16, 3
    expect = np.zeros((side * side, dim))
    quarter = dim // 4
    for r in range(side):
        for c in range(side):
            for i in range(quarter):
                w = 1.0 / 10000 ** (i / quarter)
                # first half: column coordinate (sin, then cos); second half: row coordinate.
                expect[r * side + c, i] = math.sin(c * w)
                expect[r * side + c, quarter + i] = math.cos(c * w)
                expect[r * side + c, 2 * quarter + i] = math.sin(r * w)
                expect[r * side + c, 3 * quarter + i] = math.cos(r * w)
    np.testing.assert_allclose(sincos_2d(dim, side), expect, atol=1e-6)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("src,dst", [((2, 2), (4, 4)), ((4, 4), (6, 6)), ((6, 6), (4, 4)), ((4, 4), (3, 5))])
def test_key_grid_resize_matches_torch_interpolate(method, src, dst):
    table = np.random.default_rng(0).standard_normal((src[0] * src[1], 8)).astype(np.float32)
    ours = np.asarray(resize_grid(jnp.asarray(table), src, dst, method))
    grid = torch.from_numpy(table).reshape(1, *src, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=dst, mode=method, align_corners=False)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).reshape(-1, 8).numpy(), atol=1e-5)


def _torch_reference(model: Resampler, x: np.ndarray) -> np.ndarray:
    """Qwen-VL resampler math written with torch nn.MultiheadAttention and F.interpolate, our weights copied in."""
    cfg = model.cfg
    e = cfg.embed_dim
    t = lambda a: torch.tensor(np.asarray(a[...], np.float32))  # noqa: E731
    mha = torch.nn.MultiheadAttention(e, cfg.num_heads, batch_first=True)
    a = model.attn
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([t(a.q.kernel).T, t(a.k.kernel).T, t(a.v.kernel).T]))
        mha.in_proj_bias.copy_(torch.cat([t(a.q.bias), t(a.k.bias), t(a.v.bias)]))
        mha.out_proj.weight.copy_(t(a.o.kernel).T)
        mha.out_proj.bias.copy_(t(a.o.bias))
    ln = lambda h, m: torch.nn.functional.layer_norm(h, (e,), t(m.scale), t(m.bias), cfg.layer_norm_eps)  # noqa
    side, k_side = math.isqrt(cfg.num_queries), math.isqrt(x.shape[1])
    q_pos = torch.tensor(sincos_2d(e, side))
    k_pos = torch.nn.functional.interpolate(q_pos.reshape(1, side, side, e).permute(0, 3, 1, 2),
                                            size=(k_side, k_side), mode="bicubic", align_corners=False)
    k_pos = k_pos.permute(0, 2, 3, 1).reshape(-1, e)
    with torch.no_grad():
        h = torch.from_numpy(x) @ t(model.kv_proj.kernel)
        h = ln(h, model.ln_kv)
        q = (ln(t(model.query), model.ln_q) + q_pos).expand(x.shape[0], -1, -1)
        out = mha(q, h + k_pos, h)[0]
        if model.proj is not None:
            out = ln(out, model.ln_post) @ t(model.proj.kernel)
    return out.numpy()


def test_matches_torch_multihead_attention_reference_with_key_interpolation():
    model = _tiny(out_dim=24)
    x = np.random.default_rng(1).standard_normal((2, 36, 48)).astype(np.float32)  # 6x6 keys vs 2x2 queries
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), _torch_reference(model, x), atol=1e-4, rtol=1e-4)


def test_gradients_reach_queries_and_kv_projection():
    model = _tiny()
    x = jax.random.normal(jax.random.key(0), (2, 16, 48))
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    for g in (grads["query"], grads["kv_proj"]["kernel"], grads["attn"]["q"]["kernel"]):
        assert float(jnp.abs(g[...]).sum()) > 0
