"""The one way a run's train state comes to be: model -> trainable/frozen split -> sharded (abstract or real)
TrainState with its shardings, for training, restoring and ahead-of-time compilation alike.

Owns: `setup_state` (what `trainer.run`, `trainer.restore_state`, `bench/aot.py` and `train.py --dry-run` call)
and the order of weight sources before step 1: `train.init_from` (the previous stage's parameters, read
without its optimizer state), else `init_weights` (released checkpoints, `cig_jax.convert.init`), else the
model's initialisation. Every path is checked before any model is built.

Owns too: `TrainState`, the optimizer (`make_optimizer`) and the shardings of the state (`state_shardings`,
`abstract_state`, `init_state`, `sharded_abstract`). `trainer.py` imports this module, never the reverse.

Does not own: the step and the loop (`trainer.py`), the checkpoint layout (`checkpoint.py`), the
converters (`cig_jax/convert/`), which parts train (`stages.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cig_jax import fs, sharding
from cig_jax.config import Config, OptimizerConfig
from cig_jax.convert import init as pretrained
from cig_jax.models.cig import added_by_later_stage
from cig_jax.train.checkpoint import CheckpointMismatchError, check_init_from, restore_params
from cig_jax.train.stages import Task, build_task


@dataclasses.dataclass
class RunState:
    """What `setup_state` returns. `state` holds arrays on the mesh, or (abstract=True) ShapeDtypeStructs that
    carry their shardings; `shardings` is the TrainState of NamedShardings either way."""

    graphdef: Any
    state: TrainState
    shardings: TrainState
    tx: optax.GradientTransformation
    task: Task
    trainable_params: int
    frozen_params: int
    source: str  # where the weights came from: 'init', the previous stage's checkpoint, 'init_weights llm, vit...'


def _count(state) -> int:
    return sum(getattr(x, "size", 0) for x in jax.tree.leaves(state))


def setup_state(cfg: Config, mesh, *, task: Optional[Task] = None, abstract: bool = False, load: bool = True,
                total_steps: Optional[int] = None, say: Callable = print) -> RunState:
    """The TrainState of run `cfg` on `mesh`.

    abstract=True: shapes, dtypes and shardings only (nothing allocated, no weight read; paths still checked
    when `load`), for AOT compilation, dry runs and restore targets. abstract=False: the model built on the
    mesh and, when `load`, its weights from `train.init_from` or `init_weights` (pass load=False when a
    checkpoint of this run will be restored over it). `total_steps` (default train.steps) sets the schedule.
    """
    task = task or build_task(cfg)
    rules = cfg.mesh.axis_rules
    prev_cfg = None
    if load and cfg.train.init_from:
        prev_cfg = check_init_from(cfg.train.init_from, cfg)  # fails before the model is built
    elif load:
        pretrained.check_paths(cfg)  # every named file exists, before the model is built
    tx = make_optimizer(cfg.optimizer, total_steps or cfg.train.steps)
    source = "init"
    if abstract:
        graphdef, params, frozen = nnx.split(nnx.eval_shape(task.make_model), task.trainable, ...)
        params = sharded_abstract(params, mesh, rules)
        frozen = sharded_abstract(frozen, mesh, rules) if jax.tree.leaves(frozen) else None
        state, shardings = abstract_state(params, tx, mesh, frozen)
    else:
        if prev_cfg is not None:
            model = model_from(task.make_model, cfg.train.init_from, mesh, rules)
            source = f"whole model from the latest checkpoint of {cfg.train.init_from} (parameters only)"
        else:
            model = sharding.create_sharded(task.make_model, mesh, rules)
            if load and cfg.init_weights.named():
                loaded = pretrained.load_into(model, cfg, mesh, rules, say=say)
                source = "init_weights " + ", ".join(loaded)
        graphdef, params, frozen = nnx.split(model, task.trainable, ...)
        del model
        frozen = frozen if jax.tree.leaves(frozen) else None
        state, shardings = init_state(params, tx, mesh, rules, frozen)
        del params, frozen
    n_train, n_frozen = _count(state.params), _count(state.frozen)
    if n_train == 0:
        raise ValueError(f"stage {task.name!r}: train.trainable selects no parameters")
    return RunState(graphdef, state, shardings, tx, task, n_train, n_frozen, source)


def model_from(make: Callable[[], nnx.Module], workdir: str, mesh, rules) -> nnx.Module:
    """The model `make` builds, on the mesh, with the parameters of the latest checkpoint under `workdir` (the
    previous stage, already accepted by `check_init_from`), read parameters-only straight into this
    model's shardings. Only what that checkpoint lacks is initialised (`sharding.init_sharded`; the whole
    model's initialiser is never compiled): LoRA adapters the previous stage did not have keep their fresh
    initialisation (which leaves the base model unchanged); any other parameter missing there is an error,
    raised before anything is initialised."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    params = nnx.filter_state(abstract, nnx.Param)
    restored, step, missing = restore_params(fs.path(workdir) / "checkpoints",
                                             sharded_abstract(params, mesh, rules))
    added = {".".join(map(str, p)) for p, v in nnx.to_flat_state(params) if added_by_later_stage(p, v)}
    wrong = [m for m in missing if m not in added]
    if wrong:
        raise CheckpointMismatchError(f"train.init_from {workdir} (step {step}): parameters missing from its "
                                      f"checkpoint: {wrong[:20]}" + (f" (+{len(wrong) - 20} more)" if len(wrong) > 20 else ""))
    read = [(p, v) for p, v in nnx.to_flat_state(restored) if ".".join(map(str, p)) not in missing]
    done = {p for p, _ in read}
    fresh = [p for p, _ in nnx.to_flat_state(abstract) if p not in done]  # new adapters / heads, non-parameter state
    if fresh:
        read += list(nnx.to_flat_state(sharding.init_sharded(make, mesh, rules, fresh)[1]))
    return nnx.merge(graphdef, nnx.from_flat_state(read))


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any  # nnx.State of the trainable parameters
    opt_state: Any  # optimizer state of those parameters only (frozen ones have none)
    step: jax.Array  # [] int32
    frozen: Any = None  # nnx.State of everything else (frozen params, buffers): a jit argument, never updated

    def model_state(self):
        """params and frozen together: the whole model's state (for `nnx.merge` / `nnx.update`)."""
        return nnx.merge_state(self.params, self.frozen) if self.frozen is not None else self.params


def state_shardings(params_sds, tx, mesh, frozen_sds=None) -> TrainState:
    """Shardings of the whole TrainState given sharded abstract params (and frozen state): each optimizer-state
    leaf that mirrors a parameter (Adam's moments) takes that parameter's sharding, everything else (counts)
    is replicated. (Not the compiled output shardings of `tx.init`: XLA replicates zeros that depend on no
    input.)"""
    params_shardings = jax.tree.map(lambda x: x.sharding, params_sds)
    opt_shardings = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params_sds),
                                          params_shardings, transform_non_params=lambda _: sharding.replicated(mesh))
    frozen = None if frozen_sds is None else jax.tree.map(lambda x: x.sharding, frozen_sds)
    return TrainState(params_shardings, opt_shardings, sharding.replicated(mesh), frozen)


def abstract_state(params_sds, tx, mesh, frozen_sds=None) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStructs with shardings of the TrainState, its shardings) from sharded abstract params."""
    shardings = state_shardings(params_sds, tx, mesh, frozen_sds)
    opt = jax.eval_shape(tx.init, params_sds)
    opt = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), opt, shardings.opt_state)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step)
    return TrainState(params_sds, opt, step, frozen_sds), shardings


def init_state(params, tx, mesh, rules, frozen=None):
    """Places params (and the frozen state) on the mesh and builds the optimizer state with matching shardings."""
    params = jax.device_put(params, sharding.state_shardings(params, mesh, rules))
    if frozen is not None:
        frozen = jax.device_put(frozen, sharding.state_shardings(frozen, mesh, rules))
    shardings = state_shardings(params, tx, mesh, frozen)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    state = TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), shardings.step), frozen)
    return state, shardings


def sharded_abstract(state, mesh, rules):
    """ShapeDtypeStructs carrying the logical-rule NamedShardings of an (abstract) nnx.State."""
    shard = sharding.state_shardings(state, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shard)
