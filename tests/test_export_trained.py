"""Export of a *trained* checkpoint round-trips: a stage-2 run started from released weights trains 3 steps (the
LLM's LoRA adapters and the other trained parts move off their released values), `train.export` writes it, and
importing the export again gives the trained parameters bit for bit (not the released ones)."""
import dataclasses

import numpy as np
import pytest
from flax import nnx

from cig_jax.config_io import load_config
from cig_jax.train import export as export_lib
from cig_jax.models import layers
from cig_jax.sample.session import default_mesh
from cig_jax.train import trainer
from cig_jax.train.checkpoint import load_trained
from cig_jax.train.state import setup_state
from test_pretrained import STAGE2, released_weights, stage2_overrides

pytestmark = pytest.mark.long  # minutes: `python -m pytest -m long` (.ci/run), not the default suite


def _flat(module, kind=nnx.Param) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, kind))}


def _model(cfg):
    setup = setup_state(cfg, default_mesh(), say=lambda *a, **k: None)
    return nnx.merge(setup.graphdef, setup.state.model_state())


def test_export_of_a_trained_checkpoint_reimports_the_trained_parameters(tmp_path):
    w = released_weights(tmp_path / "released")
    cfg = load_config(STAGE2, stage2_overrides(w, tmp_path / "run"))
    released = _model(cfg)  # the parts as released (LoRA B as in the PEFT folder)
    trainer.run(cfg)
    trained = load_trained(cfg, mesh=default_mesh())
    moved = [p for p, a in _flat(trained.mllm.llm, layers.LoRAParam).items()
             if not np.array_equal(a, _flat(released.mllm.llm, layers.LoRAParam)[p])]
    assert moved  # trained: the adapters are not the released ones

    out = tmp_path / "out"
    export_lib.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    again = dataclasses.replace(cfg, init_weights=dataclasses.replace(
        cfg.init_weights, llm=str(out / "llm_base"), llm_adapters=str(out / "llm_adapters"), vit=str(out / "vit"),
        vae=str(out / "vae"), dit=str(out / "dit"), tokenizer=str(out / "llm")))
    reimported = _model(again)
    for part in (lambda m: m.mllm.llm, lambda m: m.mllm.vit, lambda m: m.detokenizer.vae, lambda m: m.detokenizer.dit):
        want, got = _flat(part(trained)), _flat(part(reimported))
        assert want.keys() == got.keys()
        assert [p for p in want if not np.array_equal(want[p], got[p])] == []
