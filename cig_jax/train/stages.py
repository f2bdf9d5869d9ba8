"""Training stages: for each `train.stage`, what trains, what is frozen, which loss and which data.

Owns: `Task`, the stage's contract with the loop in `trainer.py`, and `build_task(cfg)`, the one place a
stage name becomes a model factory, a trainable-parameter filter, a loss and a dataset.

Stages:
    lm           the LLM alone on token data (smoke job and LLM benchmarks)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import jax
from flax import nnx

from cig_jax.config import Config
from cig_jax.data.lm_smoke import lm_smoke_dataset
from cig_jax.models.llm import LLM, next_token_loss, train_flops_per_token


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    make_model: Callable[[], nnx.Module]  # builds the model (run under jit with sharded outputs)
    trainable: Any  # nnx filter selecting the parameters that train; everything else is frozen
    loss_fn: Callable[[nnx.Module, dict], tuple[jax.Array, dict]]
    make_dataset: Callable[[int, int], grain.IterDataset]  # (process_index, process_count) -> host batches
    flops_per_example: float  # model FLOPs of one example's forward + backward (for MFU)
    tokens_per_example: int


def lm_loss(model: LLM, batch: dict) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy on `batch['tokens']` weighted by `batch['loss_mask']`."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    logits = model(tokens, attention_mask=batch.get("attention_mask")).logits
    loss, count = next_token_loss(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
    return loss, {"lm_loss": loss, "loss_tokens": count}


def _lm_task(cfg: Config) -> Task:
    llm, data = cfg.model.llm, cfg.data
    if data.source != "random_tokens":
        raise ValueError(f"stage 'lm': data.source must be 'random_tokens', got {data.source!r}")

    def make_dataset(process_index: int, process_count: int):
        return lm_smoke_dataset(vocab=llm.vocab_size, seq_len=data.seq_len,
                                local_batch=data.global_batch_size // process_count, seed=data.seed,
                                process_index=process_index, process_count=process_count)

    return Task(
        name="lm",
        make_model=lambda: LLM(llm, rngs=nnx.Rngs(cfg.train.seed)),
        trainable=nnx.Param,
        loss_fn=lm_loss,
        make_dataset=make_dataset,
        flops_per_example=train_flops_per_token(llm, data.seq_len) * data.seq_len,
        tokens_per_example=data.seq_len,
    )


STAGES = {"lm": _lm_task}


def build_task(cfg: Config) -> Task:
    if cfg.train.stage not in STAGES:
        raise ValueError(f"train.stage: unknown stage {cfg.train.stage!r} (known: {sorted(STAGES)})")
    return STAGES[cfg.train.stage](cfg)
