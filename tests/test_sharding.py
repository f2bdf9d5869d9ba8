"""The LLM on a (data=2, fsdp=2, tensor=2) mesh of 8 simulated CPU devices equals the single-device LLM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cig_jax import sharding
from cig_jax.config import MeshConfig
from cig_jax.config_model import LLMConfig
from cig_jax.models.llm import LLM, next_token_loss

CFG = LLMConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                num_kv_heads=2, max_position_embeddings=128)
RULES = MeshConfig().axis_rules


def _loss_fn(params, graphdef, rest, tokens, mask):
    model = nnx.merge(graphdef, params, rest)
    logits = model(tokens, attention_mask=mask).logits
    loss, _ = next_token_loss(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
    return loss


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, size=(8, 32)).astype(np.int32)
    mask = np.ones((8, 32), np.int32)
    mask[3, :5] = 0
    return tokens, mask


def test_mesh_shape_resolves_minus_one_and_rejects_bad_products():
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="devices"):
        sharding.mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)


def test_logical_rules_skip_used_axes_and_indivisible_dims():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert sharding.logical_to_spec(("embed", "mlp"), RULES, mesh, (128, 512)) == jax.sharding.PartitionSpec("fsdp", "tensor")
    # 'vocab' and 'mlp' both want 'tensor': the second dimension takes its fallback rule, 'fsdp'
    assert sharding.logical_to_spec(("vocab", "mlp"), RULES, mesh, (512, 512)) == jax.sharding.PartitionSpec("tensor", "fsdp")
    # ... and is replicated when that is taken too
    assert sharding.logical_to_spec(("embed", "vocab", "mlp"), RULES, mesh, (8, 8, 8)) == jax.sharding.PartitionSpec("fsdp", "tensor")
    # an `embed` width that does not divide by fsdp leaves fsdp to the other dimension (ViT-G 1664 on 256)
    assert sharding.logical_to_spec(("embed", "mlp"), RULES, mesh, (7, 8)) == jax.sharding.PartitionSpec(None, "tensor")
    wide = sharding.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    assert sharding.logical_to_spec(("embed", "mlp"), RULES, wide, (12, 16)) == jax.sharding.PartitionSpec(None, "fsdp")
    # a dimension that does not divide by the axis size is replicated instead of failing
    assert sharding.logical_to_spec(("embed",), RULES, mesh, (7,)) == jax.sharding.PartitionSpec()


def test_loss_and_grads_on_mesh_equal_single_device():
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    tokens, mask = _batch()
    model = LLM(CFG, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad_fn = jax.value_and_grad(_loss_fn)

    ref_loss, ref_grads = jax.jit(grad_fn, static_argnums=1)(params, graphdef, rest, tokens, mask)

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    p_shard = sharding.state_shardings(params, mesh, RULES)
    r_shard = sharding.state_shardings(rest, mesh, RULES)
    b_shard = sharding.logical_sharding(("batch", None), mesh, RULES, tokens.shape)
    params_m = jax.device_put(params, p_shard)
    rest_m = jax.device_put(rest, r_shard)
    step = jax.jit(lambda p, r, t, m: grad_fn(p, graphdef, r, t, m),
                   in_shardings=(p_shard, r_shard, b_shard, b_shard),
                   out_shardings=(sharding.replicated(mesh), p_shard))
    loss, grads = step(params_m, rest_m, jax.device_put(tokens, b_shard), jax.device_put(mask, b_shard))

    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for (path, g), (_, rg) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
        g, rg = np.asarray(g.value), np.asarray(rg.value)
        scale = np.max(np.abs(rg)) + 1e-12
        assert np.max(np.abs(g - rg)) / scale < 1e-5, path

    # every parameter with >= 2^16 elements is split across devices, on the params and on the grads
    big = [p for p, v in nnx.to_flat_state(params_m) if v.value.size >= 2 ** 16]
    assert big, "the test model must have large parameters"
    assert sharding.unsharded_large_params(params_m) == []
    assert sharding.unsharded_large_params(grads) == []


def test_create_sharded_builds_params_on_the_mesh():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model = sharding.create_sharded(lambda: LLM(CFG, rngs=nnx.Rngs(0)), mesh, RULES)
    kernel = model.layers.mlp.up_proj.kernel.value  # [layers, embed, mlp]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    ref = LLM(CFG, rngs=nnx.Rngs(0)).layers.mlp.up_proj.kernel.value
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(ref))


def test_init_sharded_builds_only_the_leaves_asked_for():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    full = nnx.to_flat_state(nnx.state(sharding.create_sharded(lambda: LLM(CFG, rngs=nnx.Rngs(0)), mesh, RULES)))
    paths = [p for p, _ in full if p[-1] in ("kernel", "embedding")][:2]
    got = nnx.to_flat_state(sharding.init_sharded(lambda: LLM(CFG, rngs=nnx.Rngs(0)), mesh, RULES, paths)[1])
    assert [p for p, _ in got] == paths  # those leaves, nothing else
    for (_, a), (_, b) in zip(got, [pv for pv in full if pv[0] in paths]):  # the same values, the same shardings
        assert a[...].sharding == b[...].sharding
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))


def test_host_to_global_assembles_the_batch():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    tokens, _ = _batch()
    g = sharding.host_to_global({"tokens": tokens}, mesh, RULES)["tokens"]
    assert g.shape == tokens.shape
    assert g.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(g), tokens)


def test_optimizer_state_is_sharded_like_its_parameters():
    import optax

    from cig_jax.train import state as train_state

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = LLM(CFG, rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    state, _ = train_state.init_state(params, optax.adamw(1e-3), mesh, RULES)
    mu = state.opt_state[0].mu
    assert sharding.unsharded_large_params(mu) == []
    assert mu.layers.mlp.up_proj.kernel.value.sharding.spec == state.params.layers.mlp.up_proj.kernel.value.sharding.spec
