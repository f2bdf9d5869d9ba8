"""The one way a run's train state comes to be: model -> trainable/frozen split -> sharded (abstract or real)
TrainState with its shardings, for training, restoring and ahead-of-time compilation alike.

Owns: `setup_state` (what `trainer.run`, `trainer.restore_state`, `bench/aot.py` and `train.py --dry-run` call)
and the order of weight sources before step 1: `train.init_from` (the previous stage's parameters, read
without its optimizer state), else `init_weights` (released checkpoints, `cig_jax.convert.init`), else the
model's initialisation. Every path is checked before any model is built.

Does not own: the optimizer and the step (`trainer.py`), the checkpoint layout (`checkpoint.py`), the
converters (`cig_jax/convert/`), which parts train (`stages.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import optax
from flax import nnx

from cig_jax import fs, sharding
from cig_jax.config import Config
from cig_jax.train import trainer
from cig_jax.train.checkpoint import CheckpointMismatchError, restore_params
from cig_jax.train.stages import Task, build_task


@dataclasses.dataclass
class RunState:
    """What `setup_state` returns. `state` holds arrays on the mesh, or (abstract=True) ShapeDtypeStructs that
    carry their shardings; `shardings` is the TrainState of NamedShardings either way."""

    graphdef: Any
    state: trainer.TrainState
    shardings: trainer.TrainState
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
    from cig_jax.convert import init as pretrained

    task = task or build_task(cfg)
    rules = cfg.mesh.axis_rules
    prev_cfg = None
    if load and cfg.train.init_from:
        prev_cfg = trainer.check_init_from(cfg.train.init_from, cfg)  # fails before the model is built
    elif load:
        pretrained.check_paths(cfg)  # every named file exists, before the model is built
    tx = trainer.make_optimizer(cfg.optimizer, total_steps or cfg.train.steps)
    source = "init"
    if abstract:
        graphdef, params, frozen = nnx.split(nnx.eval_shape(task.make_model), task.trainable, ...)
        params = trainer.sharded_abstract(params, mesh, rules)
        frozen = trainer.sharded_abstract(frozen, mesh, rules) if jax.tree.leaves(frozen) else None
        state, shardings = trainer.abstract_state(params, tx, mesh, frozen)
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
        state, shardings = trainer.init_state(params, tx, mesh, rules, frozen)
        del params, frozen
    n_train, n_frozen = _count(state.params), _count(state.frozen)
    if n_train == 0:
        raise ValueError(f"stage {task.name!r}: train.trainable selects no parameters")
    return RunState(graphdef, state, shardings, tx, task, n_train, n_frozen, source)


def model_from(make: Callable[[], nnx.Module], workdir: str, mesh, rules) -> nnx.Module:
    """The model `make` builds, on the mesh, with the parameters of the latest checkpoint under `workdir` (the
    previous stage, already accepted by `trainer.check_init_from`), read parameters-only straight into this
    model's shardings. Only what that checkpoint lacks is initialised (`sharding.init_sharded`; the whole
    model's initialiser is never compiled): LoRA adapters the previous stage did not have keep their fresh
    initialisation (which leaves the base model unchanged); any other parameter missing there is an error,
    raised before anything is initialised."""
    from cig_jax.models.layers import LoRAParam

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    params = nnx.filter_state(abstract, nnx.Param)
    restored, step, missing = restore_params(fs.path(workdir) / "checkpoints",
                                             trainer.sharded_abstract(params, mesh, rules))
    lora = {".".join(map(str, p)) for p, v in nnx.to_flat_state(params) if isinstance(v, LoRAParam)}
    wrong = [m for m in missing if m not in lora]
    if wrong:
        raise CheckpointMismatchError(f"train.init_from {workdir} (step {step}): parameters missing from its "
                                      f"checkpoint: {wrong[:20]}" + (f" (+{len(wrong) - 20} more)" if len(wrong) > 20 else ""))
    read = [(p, v) for p, v in nnx.to_flat_state(restored) if ".".join(map(str, p)) not in missing]
    done = {p for p, _ in read}
    fresh = [p for p, _ in nnx.to_flat_state(abstract) if p not in done]  # new LoRA adapters, non-parameter state
    if fresh:
        read += list(nnx.to_flat_state(sharding.init_sharded(make, mesh, rules, fresh)[1]))
    return nnx.merge(graphdef, nnx.from_flat_state(read))
