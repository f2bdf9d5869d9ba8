"""Checkpoints: orbax CheckpointManager over the train state, the grain iterator state and the config.

Owns: where checkpoints live (`<workdir>/checkpoints/<step>/`), what a checkpoint holds (`state`: the
TrainState pytree; `data`: every process's grain iterator state; `config`: the run's config as JSON),
asynchronous saves every N steps keeping the last K, local or remote directories (`cig_jax.fs`), restoring the latest onto *the current* mesh
(orbax reshards to the target shardings, so a checkpoint from 8 devices restores on 4 or on 1), and the
check that a checkpoint belongs to the config that is restoring it.

Does not own: what the state contains (trainer) or how the iterator is built (data pipeline).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from cig_jax import fs, sharding
from cig_jax.cli import UserError
from cig_jax.config import Config, field_paths
from cig_jax.config_base import from_dict, to_dict
from cig_jax.config_io import dump_yaml
from cig_jax.config_model import ModelConfig
from cig_jax.data.chat_template import ChatTemplate, load_tokenizer
from cig_jax.train.stages import build_task, stage_tokenizer


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint was written by a run whose model differs from this config."""


def _grain_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler


def _reader(directory) -> ocp.CheckpointManager:
    """A manager for reading `directory` with a handler for every item the trainer saves, so orbax has no "Item
    ... was found in the checkpoint, but could not be restored" to warn about whatever is read."""
    _, _, grain_handler = _grain_args()
    return ocp.CheckpointManager(directory, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(), "data": grain_handler()})


class Checkpointer:
    """Thin owner of an `ocp.CheckpointManager` with items state / data / config."""

    def __init__(self, directory: str | Path, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = fs.path(directory)  # local or remote (gs://...): orbax takes the epath as is
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(save_every, 1), enable_async_checkpointing=async_save,
            create=True,
        )
        _, _, grain_handler = _grain_args()
        handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                    "data": grain_handler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, cfg: Config, *, force: bool = False) -> bool:
        save, _, _ = _grain_args()
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(to_dict(cfg))}
        if data_iterator is not None:
            args["data"] = save(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any, cfg: Config) -> Any:
        """Restores `step` into the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
        self.check_config(step, cfg)
        _, restore, _ = _grain_args()
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = restore(data_iterator)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(
                f"{self.directory / str(step)}: the saved train state does not fit this config's model "
                f"({type(e).__name__}: {str(e)[:500]})"
            ) from None
        return out["state"]

    def check_config(self, step: int, cfg: Config) -> None:
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        diffs = model_config_diffs(saved.get("model", {}), to_dict(cfg)["model"])
        if diffs:
            raise CheckpointMismatchError(
                f"{self.directory / str(step)}: checkpoint was written with a different model config: "
                + "; ".join(diffs[:10]) + (f" (+{len(diffs) - 10} more)" if len(diffs) > 10 else "")
                + ". Point train.workdir elsewhere or restore with the original config."
            )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_config(directory: str | Path, step: Optional[int] = None) -> dict:
    """The config (as a dict) saved with checkpoint `step` (default: the latest) under `directory`."""
    directory = fs.path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints there")
    manager = _reader(directory)
    try:
        step = step if step is not None else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint there")
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    finally:
        manager.close()


def model_config_diffs(saved: dict, current: dict, ignore_kinds: tuple = ()) -> list[str]:
    """Differences between two `model` config dicts, execution fields (and those of `ignore_kinds`, see
    `cig_jax.config.field_paths`) aside."""
    ignore = frozenset().union(*(field_paths(k) for k in ("execution",) + tuple(ignore_kinds)))
    return _diff(_with_defaults(saved, to_dict(ModelConfig())), current, "model", ignore)


def _with_defaults(saved: Any, defaults: Any) -> Any:
    """A saved config dict with the fields it predates filled in at their defaults: a checkpoint written before a
    field existed was made with the default behaviour (e.g. a later model.mllm.identity_dim, 0 = none)."""
    if not (isinstance(saved, dict) and isinstance(defaults, dict)):
        return saved
    out = {k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}
    for k, v in defaults.items():
        out.setdefault(k, v)
    return out


def _diff(saved: Any, current: Any, prefix: str, ignore: frozenset = frozenset()) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            if f"{prefix}.{k}" in ignore:
                continue
            if k not in current:
                out.append(f"{prefix}.{k} only in the checkpoint")
            elif k not in saved:
                out.append(f"{prefix}.{k} not in the checkpoint")
            else:
                out += _diff(saved[k], current[k], f"{prefix}.{k}", ignore)
        return out
    if isinstance(current, tuple):
        current = list(current)
    if json.loads(json.dumps(saved)) != json.loads(json.dumps(current)):
        return [f"{prefix}: checkpoint {saved!r} vs config {current!r}"]
    return []


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ----------------------------------------------------------------------------------------------------------
# Parameters-only loading (sampling, evaluation, train.init_from): the optimizer state is never read
# ----------------------------------------------------------------------------------------------------------
def _saved_paths(tree: Any) -> set[tuple[str, ...]]:
    """Leaf paths (as strings, without nnx's trailing 'value') of a saved subtree's metadata."""
    out = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        out.add(keys[:-1] if keys and keys[-1] == "value" else keys)
    return out


def restore_params(directory: str | Path, abstract: Any, step: Optional[int] = None) -> tuple[Any, int, list[str]]:
    """(model state, step, missing paths): the leaves of `abstract` (an nnx.State of ShapeDtypeStructs with
    shardings: the whole model's, however the saving run split it into trainable `params` and `frozen`) read
    from checkpoint `step` (default: the latest) under `directory` with an orbax partial restore of the `state`
    item's `params` and `frozen` subtrees: the optimizer moments are never read, so loading for sampling costs
    the weights' memory only. Leaves the checkpoint lacks keep their abstract value and are listed in
    `missing`, for the caller to judge (new LoRA adapters: fine; anything else: an error)."""
    from flax import nnx

    directory = fs.path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints there (train first, or check the path)")
    manager = _reader(directory)
    try:
        step = step if step is not None else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint to load (train first, or check train.workdir)")
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        groups = {g: _saved_paths(saved[g]) for g in ("params", "frozen") if saved.get(g) is not None}
        picked: dict[str, list] = {g: [] for g in groups}
        missing, kept = [], []
        for path, var in nnx.to_flat_state(abstract):
            key = tuple(str(p) for p in path)
            group = next((g for g, paths in groups.items() if key in paths), None)
            if group is None:
                missing.append(".".join(key))
                kept.append((path, var))
            else:
                picked[group].append((path, var))
        target = {g: nnx.from_flat_state(v) for g, v in picked.items() if v}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        try:
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True)))["state"]
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(f"{directory / str(step)}: the saved parameters do not fit this config's "
                                          f"model ({type(e).__name__}: {str(e)[:500]})") from None
    finally:
        manager.close()
    flat = kept + [pv for g in target for pv in nnx.to_flat_state(out[g])]
    return nnx.from_flat_state(flat), step, missing


def check_model_config(directory: str | Path, step: int, cfg: Config) -> None:
    """A `CheckpointMismatchError` if checkpoint `step` under `directory` was written with another model config
    (execution fields aside)."""
    diffs = model_config_diffs(read_config(directory, step).get("model", {}), to_dict(cfg)["model"])
    if diffs:
        raise CheckpointMismatchError(
            f"{Path(directory) / str(step)}: checkpoint was written with a different model config: "
            + "; ".join(diffs[:10]) + (f" (+{len(diffs) - 10} more)" if len(diffs) > 10 else "")
            + ". Point train.workdir elsewhere or restore with the original config.")


def load_trained(cfg: Config, *, step: Optional[int] = None, mesh=None, task=None,
                 workdir: Optional[str | Path] = None):
    """The model of a finished (or running) run, parameters only (no optimizer state is read), restored from
    `workdir` (default `cfg.train.workdir`) onto `mesh` (default: the config's mesh over all devices), with its
    trained and its frozen parameters. Checkpoints reshard: a run saved on 8 devices loads on 1."""
    from flax import nnx

    mesh = mesh or sharding.make_mesh(cfg.mesh)
    task = task or build_task(cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(task.make_model))
    shardings = sharding.state_shardings(abstract, mesh, cfg.mesh.axis_rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    directory = fs.path(workdir or cfg.train.workdir) / "checkpoints"
    if step is None and directory.is_dir():
        step = _latest_step(directory)
    if step is not None:
        check_model_config(directory, step, cfg)
    state, step, missing = restore_params(directory, abstract, step)
    if missing:
        raise CheckpointMismatchError(f"{directory / str(step)}: parameters missing from the checkpoint: "
                                      f"{missing[:20]}" + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
    return nnx.merge(graphdef, state)


def _latest_step(directory: Path) -> Optional[int]:
    manager = _reader(directory.absolute())
    try:
        return manager.latest_step()
    finally:
        manager.close()


def saved_config(workdir: str | Path, source: str = "train.init_from") -> Config:
    """The config a run wrote into its latest checkpoint."""
    return from_dict(Config, read_config(fs.path(workdir) / "checkpoints"), source=f"{source} {workdir}")


def check_init_from(workdir: str | Path, cfg: Config) -> Config:
    """The config of the run under `workdir` (the previous stage, its train.workdir set to `workdir`), after
    checking that its model is `cfg`'s (execution, adapter and objective fields aside); a `CheckpointMismatchError`
    naming the differences if not."""
    prev_cfg = saved_config(workdir)
    diffs = model_config_diffs(to_dict_model(prev_cfg), to_dict_model(cfg), ignore_kinds=("adapter", "objective"))
    if diffs:
        raise CheckpointMismatchError(f"train.init_from {workdir}: its model differs from this config's: "
                                      + "; ".join(diffs[:10]))
    return dataclasses.replace(prev_cfg, train=dataclasses.replace(prev_cfg.train, workdir=str(workdir)))


def to_dict_model(cfg: Config) -> dict:
    return to_dict(cfg)["model"]


def write_artifacts(cfg: Config, workdir) -> None:
    """Written before step 1: <workdir>/config.yaml (the resolved config; `train.py --config` takes it again) and
    what sampling needs beside the checkpoint: the tokenizer of MLLM stages, under <workdir>/tokenizer."""
    (workdir / "config.yaml").write_text(dump_yaml(cfg))
    if cfg.train.stage == "lm":
        return
    local = fs.local_cache(workdir, "tokenizer")  # Hugging Face writes local folders only
    stage_tokenizer(cfg).save_pretrained(local)
    if fs.is_remote(workdir):
        fs.mirror(local, workdir / "tokenizer")


def checkpoint_parts(directory, config: Optional[Config] = None) -> tuple[Config, ChatTemplate]:
    """(config, chat template) of a training workdir, without loading weights. Raises FileNotFoundError for a
    missing directory / checkpoint / tokenizer and CheckpointMismatchError when the tokenizer does not fit."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory not found")
    cfg = config if config is not None else saved_config(directory, source="checkpoint")
    if not (directory / "tokenizer").is_dir():
        raise FileNotFoundError(f"{directory / 'tokenizer'}: no tokenizer saved with this run "
                                "(MLLM stages save one)")
    tokenizer = load_tokenizer(directory / "tokenizer")
    if len(tokenizer) > cfg.model.llm.vocab_size:
        raise CheckpointMismatchError(f"{directory / 'tokenizer'}: {len(tokenizer)} tokens do not fit "
                                      f"model.llm.vocab_size {cfg.model.llm.vocab_size}")
    return cfg, ChatTemplate(tokenizer, cfg.model.mllm.num_image_tokens, cfg.model.mllm.chat_format,
                        cfg.model.mllm.person_slots)
