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


def _step(accum_steps: int, batch: dict, weight_by=None):
    graphdef, params = nnx.split(LLM(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optax.sgd(1.0)  # the update is the gradient itself: parameters after the step compare gradients
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    new, metrics = jax.jit(make_train_step(graphdef, tx, lm_loss, accum_steps, weight_by=weight_by))(state, batch)
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


def _uneven_batch() -> dict:
    """8 rows whose loss masks are filled very unevenly: micro-batches of 2 rows hold 46, 6, 26 and 2 loss tokens
    (after the one-token shift), so the mean of micro-batch means differs from the per-token mean."""
    batch = _batch(8)
    keep = [24, 24, 4, 4, 24, 4, 2, 2]  # loss positions kept at the start of each row
    mask = np.zeros((8, 24), np.int32)
    for i, k in enumerate(keep):
        mask[i, :k] = 1
    return dict(batch, loss_mask=jnp.asarray(mask))


def test_uneven_loss_masks_are_normalised_per_token_over_the_whole_batch():
    """The LM task's loss is a per-token mean (`Task.accum_weight` 'loss_tokens'): 4 micro-batches with 46, 6, 26
    and 2 loss tokens must give the step of the one batch of 8, whose loss is the mean over its 80 tokens."""
    from cig_jax.train.stages import _lm_task
    from cig_jax.config import Config

    assert _lm_task(Config()).accum_weight == "loss_tokens"  # what the trainer passes as weight_by
    batch = _uneven_batch()
    whole, m1 = _step(1, batch)
    accum, m4 = _step(4, batch, weight_by="loss_tokens")
    assert float(m1["loss_tokens"]) == float(m4["loss_tokens"]) == 80  # the whole batch's count comes back
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["lm_loss"]), float(m1["lm_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for path in whole:
        np.testing.assert_allclose(accum[path], whole[path], atol=1e-6, err_msg=str(path))
    # the reference can tell: equal micro-batch weights (the mean of micro-batch means) give another step
    unweighted, m4u = _step(4, batch)
    assert abs(float(m4u["loss"]) - float(m1["loss"])) > 1e-3
    assert max(np.abs(unweighted[p] - whole[p]).max() for p in whole) > 1e-4


def test_a_micro_batch_without_loss_tokens_weighs_nothing():
    batch = _uneven_batch()
    mask = np.asarray(batch["loss_mask"]).copy()
    mask[2:4] = 0  # micro-batch 2 of 4: no loss token at all
    batch = dict(batch, loss_mask=jnp.asarray(mask))
    whole, m1 = _step(1, batch)
    accum, m4 = _step(4, batch, weight_by="loss_tokens")
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    for path in whole:
        np.testing.assert_allclose(accum[path], whole[path], atol=1e-6, err_msg=str(path))
