"""Gradient accumulation (`train.grad_accum_steps`): k micro-batches give the step of one batch k times the size."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cig_jax.config_model import LLMConfig
from cig_jax.data.lm_smoke import permutation_walk
from cig_jax.models.llm import LLM
from cig_jax.train.stages import lm_loss
from cig_jax.train.state import TrainState
from cig_jax.train.trainer import make_train_step

CFG = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                remat_policy="none")


def _batch(rows: int) -> dict:
    walks = [permutation_walk(i, vocab=64, seq_len=24, seed=3) for i in range(rows)]
    return {k: jnp.asarray(np.stack([w[k] for w in walks])) for k in ("tokens", "loss_mask")}


def _step(accum_steps: int, batch: dict):
    graphdef, params = nnx.split(LLM(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optax.sgd(1.0)  # the update is the gradient itself: parameters after the step compare gradients
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    new, metrics = jax.jit(make_train_step(graphdef, tx, lm_loss, accum_steps))(state, batch)
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(new.params)}, metrics


def test_four_micro_batches_equal_one_batch_of_four_times_the_size():
    batch = _batch(8)
    whole, m1 = _step(1, batch)  # the reference: one batch of 8, no accumulation code
    accum, m4 = _step(4, batch)  # 4 micro-batches of 2
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert whole.keys() == accum.keys()
    for path in whole:
        np.testing.assert_allclose(accum[path], whole[path], atol=1e-6, err_msg=str(path))
