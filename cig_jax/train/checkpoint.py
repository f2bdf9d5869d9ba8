"""Checkpoints: orbax CheckpointManager over the train state, the grain iterator state and the config.

Owns: where checkpoints live (`<workdir>/checkpoints/<step>/`), what a checkpoint holds (`state`: the
TrainState pytree; `data`: every process's grain iterator state; `config`: the run's config as JSON),
asynchronous saves every N steps keeping the last K, local or remote directories (`cig_jax.fs`), restoring the latest onto *the current* mesh
(orbax reshards to the target shardings, so a checkpoint from 8 devices restores on 4 or on 1), and the
check that a checkpoint belongs to the config that is restoring it.

Does not own: what the state contains (trainer) or how the iterator is built (data pipeline).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from cig_jax import fs
from cig_jax.config import Config, to_dict


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a run whose model differs from this config."""


def _grain_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler


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
        diffs = _diff(saved.get("model", {}), to_dict(cfg)["model"], "model")
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
    manager = ocp.CheckpointManager(directory, item_handlers={"config": ocp.JsonCheckpointHandler()})
    try:
        step = step if step is not None else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint there")
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    finally:
        manager.close()


def model_config_diffs(saved: dict, current: dict, ignore: tuple = ()) -> list[str]:
    """Differences between two `model` config dicts, execution fields (and `ignore`) aside."""
    return _diff(saved, current, "model", tuple(ignore))


def _diff(saved: Any, current: Any, prefix: str, ignore: tuple = ()) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            if k in EXECUTION_FIELDS or k in ignore:
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


# Execution-only model fields: they may differ between the saving and the restoring run.
EXECUTION_FIELDS = ("scan_layers", "remat_policy", "attention_impl", "dtype")
