"""Loading a run for sampling and for the next stage reads parameters only: a checkpoint whose optimizer
entries are deleted samples exactly as the full one does and still initialises the next stage, and the
shared `setup_state` gives the same abstract state the trainer's real one has."""
import dataclasses
import shutil

import jax
import pytest
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cig_jax.config import Config
from cig_jax.config_base import from_dict
from cig_jax.sample.session import ChatSession, default_mesh
from cig_jax.train import trainer
from cig_jax.train.checkpoint import Checkpointer, load_trained, read_config
from cig_jax.train.state import setup_state

pytestmark = pytest.mark.long  # minutes each: `python -m pytest -m long` (.ci/run), not the default suite


def _flat(state):
    return {p: np.asarray(v.value) for p, v in nnx.to_flat_state(state)}


def _strip_optimizer(run, out):
    """A copy of `run`'s checkpoint holding params, frozen state and step only (its optimizer entries deleted)."""
    cfg = from_dict(Config, read_config(run / "checkpoints"))
    state, _, step = trainer.restore_state(cfg, default_mesh(), workdir=run)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workdir=str(out)))
    ckpt = Checkpointer(out / "checkpoints", save_every=1, keep=1, async_save=False)
    ckpt.save(step, {"params": state.params, "frozen": state.frozen, "step": state.step}, None, cfg, force=True)
    ckpt.close()
    shutil.copytree(run / "tokenizer", out / "tokenizer")
    manager = ocp.CheckpointManager((out / "checkpoints").absolute(),
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    saved = manager.item_metadata(step)["state"]
    manager.close()
    assert set(getattr(saved, "tree", saved)) == {"params", "frozen", "step"}  # really no optimizer state
    return cfg, state


def test_checkpoint_without_optimizer_state_samples_and_chains(tiny_run, tmp_path):
    stripped = tmp_path / "stripped"
    cfg, full = _strip_optimizer(tiny_run, stripped)
    mesh = default_mesh()

    # sampling: the parameters-only load equals the whole train state's model, leaf for leaf
    got = _flat(nnx.state(load_trained(cfg, mesh=mesh)))
    full_model = _flat(full.model_state())
    assert got.keys() == full_model.keys()
    assert all(np.array_equal(got[p], full_model[p]) for p in got)
    a = ChatSession.from_checkpoint(tiny_run, identity_embedder=False)
    b = ChatSession.from_checkpoint(stripped, identity_embedder=False)
    ra = a.round("Draw Maya at the beach.", seed=3, options=a.options(max_new_tokens=3, num_steps=2, force_image=True))
    rb = b.round("Draw Maya at the beach.", seed=3, options=b.options(max_new_tokens=3, num_steps=2, force_image=True))
    assert ra.text == rb.text
    np.testing.assert_array_equal(np.asarray(ra.image), np.asarray(rb.image))

    # chaining: the next stage starts from the stripped checkpoint's weights (another seed: its own
    # initialisation differs everywhere, so equal weights come from the checkpoint)
    nxt = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(stripped), seed=7,
                                                             workdir=str(tmp_path / "next")))
    setup = setup_state(nxt, mesh, say=lambda *a, **k: None)
    assert setup.source.startswith("whole model from the latest checkpoint of")
    chained = _flat(setup.state.model_state())
    params = {p: v for p, v in full_model.items() if p in chained}
    assert params.keys() == chained.keys()
    assert all(np.array_equal(chained[p], params[p]) for p in chained)


def test_abstract_setup_state_matches_the_real_one(tiny_run):
    cfg = from_dict(Config, read_config(tiny_run / "checkpoints"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=""))
    mesh = default_mesh()
    abstract = setup_state(cfg, mesh, abstract=True, load=False)
    real = setup_state(cfg, mesh, load=False)
    spec = lambda t: jax.tree.map(lambda x: (x.shape, str(x.dtype), x.sharding), t)  # noqa: E731
    assert spec(abstract.state) == spec(real.state)
    assert jax.tree.structure(abstract.shardings) == jax.tree.structure(real.shardings)
    assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(abstract.state))
    assert abstract.trainable_params == real.trainable_params > 0
