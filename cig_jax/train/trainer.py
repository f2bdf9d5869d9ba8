"""The training loop: mesh -> input -> model -> shard -> update step -> loop, in that order.

Owns: the optimizer (AdamW, warmup + cosine, clipping), the train state as explicit pytrees
(params, optimizer state, step), the jitted update step with in/out shardings and donation, ahead-of-time
compilation with a per-device memory print, and the loop with JSON-lines metrics.

Does not own: the model families (`cig_jax/models/`), data (`cig_jax/data/`), the mesh rules
(`cig_jax/sharding.py`).

The current task wired here is language modelling on random tokens (the smoke job); stage-specific losses
and data plug in through `loss_fn` and the batch iterator.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cig_jax import sharding
from cig_jax.config import Config, OptimizerConfig
from cig_jax.models.llm import LLM, next_token_loss, train_flops_per_token


# ----------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------
def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    decay = cfg.decay_steps or max(total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps, decay_steps=decay,
        end_value=cfg.learning_rate * cfg.end_learning_rate_ratio,
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay),
    )


# ----------------------------------------------------------------------------------------------------------
# Train state and step
# ----------------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any  # nnx.State of nnx.Param (the trainable part)
    opt_state: Any
    step: jax.Array


def lm_loss(model: LLM, batch: dict) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy on `batch['tokens']` weighted by `batch['loss_mask']`."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    logits = model(tokens, attention_mask=batch.get("attention_mask")).logits
    loss, count = next_token_loss(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
    return loss, {"lm_loss": loss, "tokens": count}


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, loss_fn: Callable):
    """(state, batch) -> (state, metrics). `rest` is the non-trainable model state (constants, frozen)."""

    def step(state: TrainState, batch: dict):
        def compute(params):
            model = nnx.merge(graphdef, params, rest)
            return loss_fn(model, batch)

        (loss, aux), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads))
        return TrainState(params, opt_state, state.step + 1), metrics

    return step


def compile_step(step_fn, state: TrainState, batch: dict, state_shardings, batch_shardings, mesh, *,
                 donate: bool = True, verbose: bool = True):
    """jit with shardings + donation, compiled ahead of time; prints per-device memory before step 1."""
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
    compiled = jitted.lower(*abstract).compile()
    if verbose:
        print_memory(compiled)
    return compiled


def print_memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        print("[memory] not reported by this backend")
        return {}
    stats = {k: getattr(mem, k, 0) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                "temp_size_in_bytes", "generated_code_size_in_bytes",
                                                "alias_size_in_bytes")}
    total = stats["argument_size_in_bytes"] + stats["output_size_in_bytes"] + stats["temp_size_in_bytes"] - stats[
        "alias_size_in_bytes"]
    print(f"[memory] per device: arguments {stats['argument_size_in_bytes'] / 2**30:.3f} GiB, "
          f"outputs {stats['output_size_in_bytes'] / 2**30:.3f} GiB, temp {stats['temp_size_in_bytes'] / 2**30:.3f} GiB, "
          f"aliased {stats['alias_size_in_bytes'] / 2**30:.3f} GiB -> total {total / 2**30:.3f} GiB")
    stats["total_bytes"] = total
    return stats


def init_state(model_state_params, tx, mesh, rules):
    """Places params on the mesh and builds the optimizer state with matching shardings."""
    p_shard = sharding.state_shardings(model_state_params, mesh, rules)
    params = jax.device_put(model_state_params, p_shard)
    opt_state = jax.jit(tx.init)(params)
    state = TrainState(params, opt_state, jnp.zeros((), jnp.int32))
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return state, state_shardings


# ----------------------------------------------------------------------------------------------------------
# Data for the smoke job
# ----------------------------------------------------------------------------------------------------------
def random_token_batches(vocab: int, batch: int, seq_len: int, seed: int) -> Iterator[dict]:
    """Deterministic random walks through a fixed random permutation of the vocabulary: each next token is
    `perm[token]`, so the loss can fall to ~0 once the model learns the map (a quick learning check)."""
    perm = np.random.default_rng(1234).permutation(vocab)
    rng = np.random.default_rng(seed)
    while True:
        tokens = np.empty((batch, seq_len), np.int32)
        tokens[:, 0] = rng.integers(0, vocab, size=batch)
        for t in range(1, seq_len):
            tokens[:, t] = perm[tokens[:, t - 1]]
        yield {"tokens": tokens, "loss_mask": np.ones_like(tokens), "attention_mask": np.ones_like(tokens)}


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
def run(cfg: Config) -> dict:
    """Trains the LLM on the configured data; writes metrics.jsonl under the workdir. Returns last metrics."""
    # --- mesh -------------------------------------------------------------------------------------------
    sharding.initialize_distributed()
    mesh = sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.axis_rules
    print(f"[mesh] {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{jax.process_count()} process(es)")

    # --- input pipeline ---------------------------------------------------------------------------------
    if cfg.data.source != "random_tokens":
        raise ValueError(f"data.source {cfg.data.source!r}: only 'random_tokens' is wired into this loop yet")
    local_batch = cfg.data.global_batch_size // jax.process_count()
    batches = random_token_batches(cfg.model.llm.vocab_size, local_batch, cfg.data.seq_len,
                                   cfg.data.seed + jax.process_index())

    # --- model, shard and transfer ----------------------------------------------------------------------
    model = sharding.create_sharded(lambda: LLM(cfg.model.llm, rngs=nnx.Rngs(cfg.train.seed)), mesh, rules)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(v.value.size for _, v in nnx.to_flat_state(params))
    print(f"[model] LLM with {n_params / 1e6:.2f}M parameters")
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    state, state_shardings = init_state(params, tx, mesh, rules)

    # --- update step --------------------------------------------------------------------------------------
    first = sharding.host_to_global(next(batches), mesh, rules)
    batch_shardings = jax.tree.map(lambda x: x.sharding, first)
    step = compile_step(make_train_step(graphdef, rest, tx, lm_loss), state, first, state_shardings,
                        batch_shardings, mesh)

    # --- loop ------------------------------------------------------------------------------------------
    workdir = Path(cfg.train.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    flops_per_token = train_flops_per_token(cfg.model.llm, cfg.data.seq_len)
    batch = first
    metrics: dict = {}
    t0 = time.perf_counter()
    with open(workdir / "metrics.jsonl", "a") as log:
        for i in range(cfg.train.steps):
            state, m = step(state, batch)
            if (i + 1) % cfg.train.log_every == 0 or i + 1 == cfg.train.steps:
                m = jax.device_get(m)
                dt = (time.perf_counter() - t0) / cfg.train.log_every
                tokens_per_s = cfg.data.global_batch_size * cfg.data.seq_len / dt
                metrics = {"step": i + 1, **{k: float(v) for k, v in m.items()}, "step_time_s": dt,
                           "tokens_per_s": tokens_per_s, "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12}
                print(f"[train] step {i + 1:5d}  loss {metrics['loss']:.4f}  grad_norm {metrics['grad_norm']:.3f}  "
                      f"{tokens_per_s:,.0f} tok/s", flush=True)
                log.write(json.dumps(metrics) + "\n")
                t0 = time.perf_counter()
            batch = sharding.host_to_global(next(batches), mesh, rules)
    return metrics
