"""Ahead-of-time compile of a stage's training step from abstract arrays: `train.py --dry-run` and the
`python -m cig_jax.bench.aot` command line both run it.

Owns: the abstract batch of a task (`abstract_batch`), lowering and compiling the trainer's own step against
`ShapeDtypeStruct`s carrying the NamedShardings of `cig_jax.sharding.state_shardings` (`compile_train_step`: no
weight is ever allocated), and the dry-run report (`dry_run`: mesh, parameters, per-device memory, FLOPs per
step by XLA and by the trainer's count).

Does not own: the step itself, the optimizer or the memory print (`trainer`), the state setup (`state.setup_state`),
the simulated device count or TPU topology (`cig_jax/bench/aot.py`, which must set them before jax is imported).
"""
from __future__ import annotations

import time

import jax

from cig_jax import sharding
from cig_jax.config_base import ConfigError
from cig_jax.train import trainer
from cig_jax.train.flops import FORMULA, task_flops
from cig_jax.train.stages import build_task
from cig_jax.train.state import setup_state


def abstract_batch(task, mesh, rules, global_batch: int) -> dict:
    """ShapeDtypeStructs (with batch shardings) of one global batch of `task`."""
    out = {}
    for k, (shape, dtype) in task.batch_spec(global_batch).items():
        names = ("batch",) + (None,) * (len(shape) - 1)
        out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.logical_sharding(names, mesh, rules, shape))
    return out


def compile_train_step(cfg, mesh, *, per_device_batch: int = 1, verbose: bool = True) -> dict:
    """Lowers and compiles the training step of stage `cfg.train.stage` on `mesh` from abstract arrays, exactly
    as the trainer builds it (`state.setup_state(abstract=True)` + `trainer.make_train_step`, frozen parts as an
    argument).
    Returns a report: memory stats (bytes), compile seconds, parameter counts, global batch."""
    rules = cfg.mesh.axis_rules
    setup = setup_state(cfg, mesh, abstract=True, load=False, total_steps=1000)
    task, graphdef, state, shardings, tx = setup.task, setup.graphdef, setup.state, setup.shardings, setup.tx
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = per_device_batch * batch_shards * cfg.train.grad_accum_steps
    batch = abstract_batch(task, mesh, rules, global_batch)
    step = trainer.make_train_step(graphdef, tx, task.loss_fn, cfg.train.grad_accum_steps, cfg.train.seed,
                                   weight_by=task.accum_weight)
    t0 = time.perf_counter()
    with sharding.activation_sharding(mesh, rules):  # the trainer's own jit + lower + compile
        compiled = trainer.compile_step(step, state, batch, shardings, jax.tree.map(lambda x: x.sharding, batch), mesh,
                                        verbose=False)
    t_compile = time.perf_counter() - t0
    stats = trainer.print_memory(compiled) if verbose else {}
    return dict(compiled=compiled, memory=stats, compile_s=t_compile, trainable_params=setup.trainable_params,
                frozen_params=setup.frozen_params, global_batch=global_batch, mesh=dict(mesh.shape), stage=task.name)


def dry_run(cfg, label: str) -> dict:
    """Mesh + abstract model + ahead-of-time compile of the stage's training step; prints memory and FLOPs."""
    mesh = sharding.make_mesh(cfg.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * cfg.train.grad_accum_steps
    if cfg.data.global_batch_size % shards:
        raise ConfigError(f"{label}: 'data.global_batch_size' ({cfg.data.global_batch_size}) must divide by the batch "
                          f"shards x train.grad_accum_steps ({shards})")
    print(f"[dry-run] {label}: stage {cfg.train.stage!r}, mesh {dict(mesh.shape)} over {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), global batch {cfg.data.global_batch_size}", flush=True)
    report = compile_train_step(cfg, mesh, per_device_batch=cfg.data.global_batch_size // shards)
    cost = report["compiled"].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    compiled_flops = float((cost or {}).get("flops", 0.0))
    task = build_task(cfg)
    count = task_flops(task, cfg.data.global_batch_size)
    counted = count.total
    print(f"[dry-run] parameters: {report['trainable_params'] / 1e6:,.2f}M trainable, "
          f"{report['frozen_params'] / 1e6:,.2f}M frozen; compiled in {report['compile_s']:.1f}s")
    print(f"[dry-run] FLOPs per step: {compiled_flops:.4g} per device (XLA cost analysis), "
          f"{counted / jax.device_count():.4g} per device, {counted:.4g} in all (the trainer's MFU count)")
    print(f"[dry-run] the trainer's count: {count.summary()}; {FORMULA}")
    m = cfg.model
    scanned = [k for k, part in (("llm", m.llm), ("vit", m.vit), ("dit", m.dit)) if part.scan_layers]
    remat = [k for k, part in (("llm", m.llm), ("vit", m.vit), ("dit", m.dit)) if part.remat_policy != "none"]
    if scanned or remat:
        print(f"[dry-run] XLA's count differs by design: it counts a lax.scan body once (scan_layers: "
              f"{', '.join(scanned) or 'none'}), remat's recompute (remat_policy set: {', '.join(remat) or 'none'}) "
              "and elementwise ops; with scan_layers false and remat_policy none the two agree within 10% "
              "(tests/test_flops.py)")
    print(f"[dry-run] nothing written; {cfg.train.workdir} untouched", flush=True)
    return dict(report, compiled_flops=compiled_flops, counted_flops=counted)
