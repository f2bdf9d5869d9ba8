"""Stage 0: released weights converted once into a checkpoint that `train.init_from` accepts and sampling loads.

    python -m cig_jax.train.stage0 --config configs/stage1_detokenizer_13b.yaml --out workdir/seedx13b/stage0

Owns: `write_stage0` (the model of a config with its `init_weights` loaded, saved at step 0, parameters only,
with the config and the tokenizer beside it) and its command line.

Does not own: where each released tensor lands (`cig_jax.convert.init.load_into`), the checkpoint layout
(`checkpoint.py`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
from flax import nnx

from cig_jax import cli, sharding
from cig_jax.config import Config
from cig_jax.config_io import load_config
from cig_jax.convert.init import check_paths, load_into
from cig_jax.train.checkpoint import Checkpointer, write_artifacts
from cig_jax.train.stages import build_task


def write_stage0(cfg: Config, out: str | Path, mesh=None, *, say: Callable = print) -> Path:
    """The model of `cfg` with its `init_weights` loaded, saved as a checkpoint under `out` (step 0, parameters
    only, the config and the tokenizer beside it) that `train.init_from: <out>` accepts and sampling loads."""
    out = Path(out)
    check_paths(cfg)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workdir=str(out), init_from=""))
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    task = build_task(cfg)
    model = sharding.create_sharded(task.make_model, mesh, cfg.mesh.axis_rules)
    load_into(model, cfg, mesh, cfg.mesh.axis_rules, say=say)
    ckpt = Checkpointer(out / "checkpoints", save_every=1, keep=1, async_save=False)
    ckpt.save(0, {"params": nnx.state(model), "step": jnp.zeros((), jnp.int32)}, None, cfg, force=True)
    ckpt.close()
    write_artifacts(cfg, out)
    say(f"[init] stage 0 checkpoint in {out / 'checkpoints' / '0'}")
    return out


def main(argv=None) -> Path:
    ap = cli.parser(cli.prog(module="cig_jax.train.stage0"), "Write a stage-0 checkpoint from a config's init_weights.")
    ap.add_argument("--config", required=True, help="a config whose init_weights section names the released weights")
    cli.add_overrides(ap)
    ap.add_argument("--out", required=True, help="workdir to write (give it to train.init_from)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.init_weights.named():
        raise SystemExit(f"{args.config}: init_weights names no part: nothing to convert")
    return write_stage0(cfg, args.out)


if __name__ == "__main__":
    cli.run_main(main)
