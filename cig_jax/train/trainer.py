"""The training loop, one linear script in sections: mesh -> input -> model -> shard -> update step ->
resume -> loop (with checkpoints and metrics).

Owns: the jitted update step with in/out shardings, donation and
gradient accumulation, ahead-of-time compilation with a per-device memory print, auto-resume, and
metrics (stdout, JSON lines, TensorBoard; tokens/s of non-padding tokens, examples/s and MFU), one compiled step
per batch shape (a length bucket, `data.length_buckets`).

Does not own: the optimizer and the train state with its shardings (`state.py`, imported here, never the
reverse), the config and artifacts a run writes beside its checkpoints (`checkpoint.py`), what a stage trains on
(`stages.py`), the models, the data pipeline, the mesh rules
(`cig_jax/sharding.py`) or the checkpoint layout (`checkpoint.py`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cig_jax import fs, sharding
from cig_jax.config import Config
from cig_jax.train.checkpoint import Checkpointer, abstract_like, write_artifacts
from cig_jax.train.preemption import PreemptionWatch
from cig_jax.train.runtime import StepProfiler, use_compilation_cache
from cig_jax.train.stages import Task, build_task
from cig_jax.train.state import TrainState, learning_rate_schedule, setup_state

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v4": 275.0, "TPU v6 lite": 918.0}


def known_peak_tflops() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    return next((peak for name, peak in PEAK_TFLOPS.items() if name.lower() in kind), None)


# ----------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Train state and step
# ----------------------------------------------------------------------------------------------------------


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable, accum_steps: int = 1,
                    seed: int = 0, weight_by: Optional[str] = None):
    """(state, batch) -> (state, metrics). The frozen model state travels in `state.frozen` (an argument of the
    compiled step, not a constant baked into the program) and comes back unchanged. The loss sees
    `batch['rng']`, a key folded from (seed, step, microbatch). With accum_steps > 1 the batch's leading axis
    is split into that many microbatches whose gradients (and metrics) are combined as one batch would:

    weight_by None: each microbatch weighs 1 / accum_steps (the mean of microbatch means: one batch's value
    when every microbatch holds as much of what the loss averages over, e.g. a mean over examples).
    weight_by 'loss_tokens' (a metric of the loss: the count its loss is a mean over): microbatch i weighs
    n_i / sum(n), so a per-token loss is normalised per token over the whole batch however unevenly the
    microbatches' loss masks are filled; that metric itself comes back as the whole batch's sum."""

    def grads_of(params, frozen, batch):
        def compute(p):
            return loss_fn(nnx.merge(graphdef, p, frozen), batch)

        (loss, aux), grads = jax.value_and_grad(compute, has_aux=True)(params)
        return grads, dict(aux, loss=loss)

    def step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        frozen = state.frozen if state.frozen is not None else nnx.State({})
        if accum_steps == 1:
            grads, metrics = grads_of(state.params, frozen, dict(batch, rng=key))
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)
            micro = dict(micro, rng=jax.random.split(key, accum_steps))
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grads_of, state.params, frozen, first)
            if weight_by is None:
                def body(acc, mb):
                    return jax.tree.map(jnp.add, acc, grads_of(state.params, frozen, mb)), None

                (grads, metrics), _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, shapes), micro)
                grads, metrics = jax.tree.map(lambda x: x / accum_steps, (grads, metrics))
            else:  # sums of n_i x (gradient, metrics) in fp32, then / sum(n)
                f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731

                def body(acc, mb):
                    g, m = f32(grads_of(state.params, frozen, mb))
                    w = m[weight_by]
                    return jax.tree.map(jnp.add, acc, (jax.tree.map(lambda x: x * w, (g, m)), w)), None

                zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), (shapes, jnp.zeros(())))
                ((grads, metrics), total), _ = jax.lax.scan(body, zeros, micro)
                safe = jnp.where(total > 0, total, 1.0)  # no loss tokens anywhere: every weighted term is 0 anyway
                grads = jax.tree.map(lambda x, s: (x / safe).astype(s.dtype), grads, shapes[0])
                metrics = dict(jax.tree.map(lambda x: x / safe, metrics), **{weight_by: total})
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return TrainState(params, opt_state, state.step + 1, state.frozen), metrics

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


def step_tokens(host_batch: dict, examples: int, task: Task, nproc: int) -> tuple[float, float]:
    """(real, padded) tokens of one global batch: real = the attention mask's ones (this process's rows x the
    process count: exact with one process), padded = examples x the batch's length. Batches without a mask
    (LM smoke data, images) count `task.tokens_per_example` per example for both."""
    ids = host_batch.get("input_ids")
    mask = host_batch.get("attention_mask")
    if ids is None or mask is None:
        n = float(examples * task.tokens_per_example)
        return n, n
    return float(np.sum(mask)) * nproc, float(examples * ids.shape[1])


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
    use_compilation_cache(cfg.train.compilation_cache_dir)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.axis_rules
    pid, nproc = jax.process_index(), jax.process_count()
    is_main = pid == 0
    say = print if is_main else (lambda *a, **k: None)
    say(f"[mesh] {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{nproc} process(es)")
    task = task or build_task(cfg)
    workdir = fs.path(cfg.train.workdir)  # local or gs://...: everything below writes through cig_jax.fs

    # --- input pipeline ---------------------------------------------------------------------------------
    if cfg.data.global_batch_size % (nproc * cfg.train.grad_accum_steps):
        raise ValueError(f"data.global_batch_size {cfg.data.global_batch_size} must divide by processes x "
                         f"train.grad_accum_steps ({nproc} x {cfg.train.grad_accum_steps})")
    ckpt = Checkpointer(workdir / "checkpoints", save_every=max(cfg.train.checkpoint_every, 0) or cfg.train.steps,
                        keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoints)
    start = ckpt.latest_step() if cfg.train.resume else None
    if start is not None and start >= cfg.train.steps:  # a finished run: nothing to build or compile
        ckpt.close()
        say(f"[done] already trained to step {start} (train.steps {cfg.train.steps}); checkpoint in {ckpt.directory}")
        return {"step": start}
    data_iter = iter(task.make_dataset(pid, nproc))

    # --- model, shard and transfer ----------------------------------------------------------------------
    # a resumed run's checkpoint already holds its weights: only a fresh run reads init_from / init_weights
    setup = setup_state(cfg, mesh, task=task, load=start is None, say=say)
    graphdef, state, state_shardings, tx = setup.graphdef, setup.state, setup.shardings, setup.tx
    if setup.source != "init":
        say(f"[init] {setup.source}")
    say(f"[model] stage {task.name!r}: {setup.trainable_params / 1e6:.2f}M trainable, "
        f"{setup.frozen_params / 1e6:.2f}M frozen parameters")
    del setup

    # --- resume ------------------------------------------------------------------------------------------
    if start is not None:
        state = ckpt.restore(start, abstract_like(state), data_iter, cfg)
        say(f"[resume] from {ckpt.directory / str(start)} at step {start}")
    start = start or 0

    # --- update step --------------------------------------------------------------------------------------
    host_batch = next(data_iter)
    batch = sharding.host_to_global(host_batch, mesh, rules)
    step_fn = make_train_step(graphdef, tx, task.loss_fn, cfg.train.grad_accum_steps, cfg.train.seed,
                              weight_by=task.accum_weight)
    compiled: dict = {}  # batch shapes -> compiled step: one per length bucket (data.length_buckets), else one

    def step_for(batch):
        shapes = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if shapes not in compiled:
            t_compile = time.perf_counter()
            with sharding.activation_sharding(mesh, rules):  # activation constraints are read while tracing
                compiled[shapes] = compile_step(step_fn, state, batch, state_shardings,
                                                jax.tree.map(lambda x: x.sharding, batch), mesh, verbose=is_main)
            bucketed = cfg.data.length_buckets and "input_ids" in batch
            label = f"bucket {batch['input_ids'].shape[1]}: " if bucketed else ""
            say(f"[compile] {label}train step compiled in {time.perf_counter() - t_compile:.1f}s")
        return compiled[shapes]

    step_for(batch)  # the first batch's step before the loop; other buckets' on first use (untimed below)

    # --- loop ------------------------------------------------------------------------------------------
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        write_artifacts(cfg, workdir)
    writer = _tensorboard(workdir) if (cfg.train.tensorboard and is_main) else None
    peak = cfg.train.peak_tflops or known_peak_tflops()
    examples = cfg.data.global_batch_size
    metrics: dict = {}
    pending: list = []
    bar = _progress(cfg, start) if is_main else None
    t0 = time.perf_counter()
    preempted = False
    profiler = StepProfiler(workdir, cfg.train.profile_steps, enabled=is_main)
    with fs.AppendLog(workdir / "metrics.jsonl") if is_main else _null() as log, PreemptionWatch() as watch:
        for i in range(start, cfg.train.steps):
            fp = fingerprint(host_batch)
            profiler.before(i + 1)
            t_lookup = time.perf_counter()
            step = step_for(batch)
            t0 += time.perf_counter() - t_lookup  # a bucket's compile is not a training step's time
            state, m = step(state, batch)
            profiler.after(i + 1, m)
            pending.append((i + 1, fp, m, *step_tokens(host_batch, examples, task, nproc)))
            done = i + 1 == cfg.train.steps
            preempted = not done and watch.reached(i + 1)  # SIGTERM / the pod's notice: save this step, stop
            if (i + 1) % cfg.train.log_every == 0 or done or preempted:
                jax.block_until_ready(m)  # steps are dispatched asynchronously: time them once they finished
                dt = (time.perf_counter() - t0) / len(pending)
                real, padded = (sum(p[k] for p in pending) / len(pending) for k in (3, 4))  # tokens per step
                for s, fp_s, m_s, *_ in pending:
                    m_s = jax.device_get(m_s)
                    metrics = {"step": s, **{k: float(v) for k, v in m_s.items()}, "batch_fingerprint": fp_s,
                               "step_time_s": dt, "examples_per_s": examples / dt,
                               "tokens_per_s": real / dt, "padded_tokens_per_s": padded / dt,
                               "images_per_s": examples * task.images_per_example / dt,
                               "lr": float(learning_rate_schedule(cfg.optimizer, cfg.train.steps)(s - 1))}
                    if peak:
                        scale = padded / (examples * task.tokens_per_example) if task.tokens_per_example else 1.0
                        metrics["mfu"] = (examples * task.flops_per_example * scale / dt
                                          / (jax.device_count() * peak * 1e12))  # bucketed: FLOPs ~ its length
                    if is_main:
                        log.write(json.dumps(metrics) + "\n")
                    if writer is not None:
                        for k, v in metrics.items():
                            if isinstance(v, float):
                                writer.add_scalar(k, v, s)
                parts = "".join(f"  {k} {metrics[k]:.4f}" for k in ("lm_loss", "reg_loss", "diffusion_loss",
                                                                      "detokenizer_loss") if k in metrics)
                rate = (f"{metrics['tokens_per_s']:,.0f} tok/s" if task.tokens_per_example
                        else f"{metrics['images_per_s']:,.1f} img/s")
                say(f"[train] {task.name} step {metrics['step']:6d}/{cfg.train.steps}  loss {metrics['loss']:.4f}{parts}"
                    f"  grad_norm {metrics['grad_norm']:.3f}  {rate}"
                    + (f"  MFU {metrics['mfu'] * 100:.1f}%" if "mfu" in metrics else ""), flush=True)
                if is_main:
                    log.flush()
                if writer is not None:
                    writer.flush()
                pending = []
                t0 = time.perf_counter()
            if bar is not None:
                bar.update(1)
            every = cfg.train.checkpoint_every
            if every >= 0 and (every and (i + 1) % every == 0 or done or preempted):
                ckpt.save(i + 1, state, data_iter, cfg, force=done or preempted)
            if preempted:
                break
            if not done:  # after the save: the saved iterator state points at the batch of step i + 2
                host_batch = next(data_iter)
                batch = sharding.host_to_global(host_batch, mesh, rules)
    profiler.stop()
    ckpt.close()
    if writer is not None:
        writer.close()
    if bar is not None:
        bar.close()
    if preempted:  # the save above has finished (close waits): the next start resumes from it
        say(f"[preempted] stopped after step {metrics['step']}; checkpoint in {ckpt.directory}", flush=True)
        return dict(metrics, preempted=True)
    say(f"[done] {cfg.train.steps} steps; checkpoint in {ckpt.directory}")
    return metrics


def restore_state(cfg: Config, mesh, *, step: Optional[int] = None, task: Optional[Task] = None,
                  workdir: Optional[str | Path] = None) -> tuple[TrainState, Any, int]:
    """(TrainState, graphdef, step) of run `cfg` restored in full (optimizer state included: for resuming; to
    sample or chain stages use `checkpoint.load_trained` / `restore_params`, which read parameters only) from
    its workdir onto `mesh`. Checkpoints reshard: a run saved on 8 devices loads on 1."""
    setup = setup_state(cfg, mesh, task=task, abstract=True, load=False)
    directory = fs.path(workdir or cfg.train.workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints there (train first, or check the path)")
    ckpt = Checkpointer(directory, save_every=1, keep=cfg.train.keep_checkpoints, async_save=False)
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{ckpt.directory}: no checkpoint to load (train first, or check train.workdir)")
    state = ckpt.restore(step, setup.state, None, cfg)
    ckpt.close()
    return state, setup.graphdef, step


def _tensorboard(workdir):
    try:
        from cig_jax.train.tb import TensorBoardWriter
    except ImportError:  # optional: JSON lines are always written
        return None
    return TensorBoardWriter(workdir / "tensorboard")


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
