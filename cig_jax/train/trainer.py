"""The training loop, one linear script in sections: mesh -> input -> model -> shard -> update step ->
resume -> loop (with checkpoints and metrics).

Owns: the optimizer (AdamW, warmup + cosine, clipping), the train state as explicit pytrees
(trainable params, optimizer state, step), the jitted update step with in/out shardings, donation and
gradient accumulation, ahead-of-time compilation with a per-device memory print, auto-resume, and
metrics (stdout, JSON lines, TensorBoard; tokens/s, examples/s and MFU).

Does not own: what a stage trains on (`stages.py`), the models, the data pipeline, the mesh rules
(`cig_jax/sharding.py`) or the checkpoint layout (`checkpoint.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cig_jax import sharding
from cig_jax.config import Config, OptimizerConfig
from cig_jax.train.checkpoint import Checkpointer, abstract_like
from cig_jax.train.stages import Task, build_task

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v4": 275.0, "TPU v6 lite": 918.0}


def known_peak_tflops() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    return next((peak for name, peak in PEAK_TFLOPS.items() if name.lower() in kind), None)


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
    params: Any  # nnx.State of the trainable parameters
    opt_state: Any  # optimizer state of those parameters only (frozen ones have none)
    step: jax.Array  # [] int32


def make_train_step(graphdef, frozen, tx: optax.GradientTransformation, loss_fn: Callable, accum_steps: int = 1):
    """(state, batch) -> (state, metrics). `frozen` is the non-trainable model state; with accum_steps > 1
    the batch's leading axis is split into that many microbatches whose gradients are averaged."""

    def grads_of(params, batch):
        def compute(p):
            return loss_fn(nnx.merge(graphdef, p, frozen), batch)

        (loss, aux), grads = jax.value_and_grad(compute, has_aux=True)(params)
        return grads, dict(aux, loss=loss)

    def step(state: TrainState, batch: dict):
        if accum_steps == 1:
            grads, metrics = grads_of(state.params, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

            def body(acc, mb):
                g, m = grads_of(state.params, mb)
                return jax.tree.map(jnp.add, acc, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, state.params,
                                                                jax.tree.map(lambda x: x[0], micro)))
            (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
            grads, metrics = jax.tree.map(lambda x: x / accum_steps, (grads, metrics))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
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


def state_shardings(params_sds, tx, mesh) -> TrainState:
    """Shardings of the whole TrainState given sharded abstract params: each optimizer-state leaf that mirrors
    a parameter (Adam's moments) takes that parameter's sharding, everything else (counts) is replicated.
    (Not the compiled output shardings of `tx.init`: XLA replicates zeros that depend on no input.)"""
    params_shardings = jax.tree.map(lambda x: x.sharding, params_sds)
    opt_shardings = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params_sds),
                                          params_shardings, transform_non_params=lambda _: sharding.replicated(mesh))
    return TrainState(params_shardings, opt_shardings, sharding.replicated(mesh))


def init_state(params, tx, mesh, rules):
    """Places params on the mesh and builds the optimizer state with matching shardings."""
    params = jax.device_put(params, sharding.state_shardings(params, mesh, rules))
    shardings = state_shardings(params, tx, mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    state = TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), shardings.step))
    return state, shardings


def fingerprint(batch: dict) -> str:
    """A short hash of a host batch (to check data order across restarts)."""
    import hashlib

    h = hashlib.sha1()
    for k in sorted(batch):
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
def run(cfg: Config, task: Task | None = None) -> dict:
    """Trains `task` (default: the configured stage). Returns the last logged metrics."""
    # --- mesh -------------------------------------------------------------------------------------------
    sharding.initialize_distributed()
    mesh = sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.axis_rules
    pid, nproc = jax.process_index(), jax.process_count()
    is_main = pid == 0
    say = print if is_main else (lambda *a, **k: None)
    say(f"[mesh] {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{nproc} process(es)")
    task = task or build_task(cfg)
    workdir = Path(cfg.train.workdir)

    # --- input pipeline ---------------------------------------------------------------------------------
    if cfg.data.global_batch_size % (nproc * cfg.train.grad_accum_steps):
        raise ValueError(f"data.global_batch_size {cfg.data.global_batch_size} must divide by processes x "
                         f"train.grad_accum_steps ({nproc} x {cfg.train.grad_accum_steps})")
    data_iter = iter(task.make_dataset(pid, nproc))

    # --- model, shard and transfer ----------------------------------------------------------------------
    model = sharding.create_sharded(task.make_model, mesh, rules)
    graphdef, params, frozen = nnx.split(model, task.trainable, ...)
    n_train = sum(v.value.size for _, v in nnx.to_flat_state(params))
    n_frozen = sum(getattr(v.value, "size", 0) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))) - n_train
    say(f"[model] stage {task.name!r}: {n_train / 1e6:.2f}M trainable, {n_frozen / 1e6:.2f}M frozen parameters")
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    state, state_shardings = init_state(params, tx, mesh, rules)

    # --- resume ------------------------------------------------------------------------------------------
    ckpt = Checkpointer(workdir / "checkpoints", save_every=cfg.train.checkpoint_every or cfg.train.steps,
                        keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoints)
    start = ckpt.latest_step() if cfg.train.resume else None
    if start is not None:
        state = ckpt.restore(start, abstract_like(state), data_iter, cfg)
        say(f"[resume] from {ckpt.directory / str(start)} at step {start}")
    start = start or 0

    # --- update step --------------------------------------------------------------------------------------
    host_batch = next(data_iter)
    batch = sharding.host_to_global(host_batch, mesh, rules)
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
    step_fn = make_train_step(graphdef, frozen, tx, task.loss_fn, cfg.train.grad_accum_steps)
    t_compile = time.perf_counter()
    step = compile_step(step_fn, state, batch, state_shardings, batch_shardings, mesh, verbose=is_main)
    say(f"[compile] train step compiled in {time.perf_counter() - t_compile:.1f}s")

    # --- loop ------------------------------------------------------------------------------------------
    workdir.mkdir(parents=True, exist_ok=True)
    writer = _tensorboard(workdir) if (cfg.train.tensorboard and is_main) else None
    peak = cfg.train.peak_tflops or known_peak_tflops()
    examples = cfg.data.global_batch_size
    metrics: dict = {}
    pending: list = []
    bar = _progress(cfg, start) if is_main else None
    t0 = time.perf_counter()
    with open(workdir / "metrics.jsonl", "a") if is_main else _null() as log:
        for i in range(start, cfg.train.steps):
            fp = fingerprint(host_batch)
            state, m = step(state, batch)
            pending.append((i + 1, fp, m))
            done = i + 1 == cfg.train.steps
            if (i + 1) % cfg.train.log_every == 0 or done:
                dt = (time.perf_counter() - t0) / len(pending)
                for s, fp_s, m_s in pending:
                    m_s = jax.device_get(m_s)
                    metrics = {"step": s, **{k: float(v) for k, v in m_s.items()}, "batch_fingerprint": fp_s,
                               "step_time_s": dt, "examples_per_s": examples / dt,
                               "tokens_per_s": examples * task.tokens_per_example / dt,
                               "lr": float(learning_rate_schedule(cfg.optimizer, cfg.train.steps)(s - 1))}
                    if peak:
                        metrics["mfu"] = examples * task.flops_per_example / dt / (jax.device_count() * peak * 1e12)
                    if is_main:
                        log.write(json.dumps(metrics) + "\n")
                    if writer is not None:
                        for k, v in metrics.items():
                            if isinstance(v, float):
                                writer.add_scalar(k, v, s)
                say(f"[train] step {metrics['step']:6d}  loss {metrics['loss']:.4f}  grad_norm "
                    f"{metrics['grad_norm']:.3f}  {metrics['tokens_per_s']:,.0f} tok/s"
                    + (f"  MFU {metrics['mfu'] * 100:.1f}%" if "mfu" in metrics else ""), flush=True)
                if is_main:
                    log.flush()
                pending = []
                t0 = time.perf_counter()
            if bar is not None:
                bar.update(1)
            if cfg.train.checkpoint_every and (i + 1) % cfg.train.checkpoint_every == 0 or done:
                ckpt.save(i + 1, state, data_iter, cfg, force=done)
                if os.environ.get("CIG_DEBUG_STALL_AFTER_STEP") == str(i + 1):  # fault injection for tests
                    ckpt.wait()
                    print(f"[debug] stalled after step {i + 1}", flush=True)
                    time.sleep(3600)
            if not done:  # after the save: the saved iterator state points at the batch of step i + 2
                host_batch = next(data_iter)
                batch = sharding.host_to_global(host_batch, mesh, rules)
    ckpt.close()
    if writer is not None:
        writer.close()
    if bar is not None:
        bar.close()
    say(f"[done] {cfg.train.steps} steps; checkpoint in {ckpt.directory}")
    return metrics


def load_trained(cfg: Config, *, step: int | None = None, mesh=None, task: Task | None = None) -> nnx.Module:
    """The model of a finished (or running) run, restored from `cfg.train.workdir` onto `mesh` (default: the
    config's mesh over all devices). Checkpoints reshard: a run saved on 8 devices loads on 1."""
    task = task or build_task(cfg)
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.axis_rules
    abstract_model = nnx.eval_shape(task.make_model)
    graphdef, abstract_params, _ = nnx.split(abstract_model, task.trainable, ...)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    p_shard = sharding.state_shardings(abstract_params, mesh, rules)
    params_sds = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_params,
                              p_shard)
    shardings = state_shardings(params_sds, tx, mesh)
    abstract = TrainState(params_sds, jax.eval_shape(tx.init, params_sds), jax.ShapeDtypeStruct((), jnp.int32))
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
    ckpt = Checkpointer(Path(cfg.train.workdir) / "checkpoints", save_every=1, keep=cfg.train.keep_checkpoints,
                        async_save=False)
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{ckpt.directory}: no checkpoint to load (train first, or check train.workdir)")
    state = ckpt.restore(step, target, None, cfg)
    ckpt.close()
    model = sharding.create_sharded(task.make_model, mesh, rules)
    nnx.update(model, state.params)
    return model


def _tensorboard(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional: JSON lines are always written
        return None
    return SummaryWriter(str(workdir / "tensorboard"))


def _progress(cfg: Config, start: int):
    if not cfg.train.progress_bar:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start, unit="step")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def write(self, *_):
        pass

    def flush(self):
        pass
