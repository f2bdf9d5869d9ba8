"""The training command line: `python train.py` (or `cig-train`).

Owns: turning `--config FILE [--set KEY=VALUE ...] [--print-config | --dry-run]` into one stage run
(`trainer.run`) or a recipe (`recipe.run_recipe`), with every config of a recipe checked before anything runs.
`--print-config` prints the fully resolved config(s) as YAML; `--dry-run` builds the mesh and the model
abstractly (no parameter memory), compiles the training step ahead of time and prints per-device memory and
FLOPs per step, then exits without writing anything.

Does not own: the loop (`trainer`), the config format (`cig_jax.config`), the AOT compile itself
(`trainer.compile_step`, reached through `cig_jax.bench.aot.compile_train_step`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from cig_jax import cli
from cig_jax.config import ConfigError, dump_yaml, load_config

DESCRIPTION = """Train one stage, or a recipe of stages, from a YAML config.

configs it can take (paths are relative to the repository):
  configs/demo.yaml                    the tiny 3-stage recipe on CPU (README command 1)
  configs/stage1_detokenizer.yaml      one stage of the demo (also stage2_personalize, stage3_multiround)
  configs/*_13b.yaml, configs/*_1b.yaml  full-size stages (SEED-X 13B / 1.1B sizes)
  configs/smoke.yaml                   a 10-second LLM-only job

examples:
  python train.py --config configs/demo.yaml
  python train.py --config configs/demo.yaml --set train.steps=20 --set recipe.data.num_train=200
  python train.py --config configs/stage2_personalize.yaml --print-config
  python train.py --config configs/stage2_personalize.yaml --dry-run"""

EPILOG = ("A recipe passes every --set to each of its stages, except keys under 'recipe.' (e.g. "
          "recipe.data.num_train), which change the recipe. Re-running a config resumes from its workdir.")


def _stages(path: str, overrides: Sequence[str]) -> tuple[bool, list]:
    """(is a recipe, [(label, Config)]): every config loaded and checked."""
    from cig_jax.train import recipe

    if recipe.is_recipe(path):
        _, stages = recipe.load_recipe(path, overrides)
        return True, [(str(p), c) for p, c in stages]
    return False, [(path, load_config(path, overrides))]


def print_configs(stages: list) -> None:
    for i, (label, cfg) in enumerate(stages, 1):
        if len(stages) > 1:
            print(f"# --- stage {i}/{len(stages)}: {label}" + ("" if i == 1 else "\n---"))
        print(dump_yaml(cfg), end="")


def dry_run(cfg, label: str) -> dict:
    """Mesh + abstract model + ahead-of-time compile of the stage's training step; prints memory and FLOPs."""
    import jax

    from cig_jax import sharding
    from cig_jax.bench.aot import compile_train_step
    from cig_jax.train.flops import FORMULA, task_flops
    from cig_jax.train.stages import build_task

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = cli.prog(script="train.py", console="cig-train")
    ap = cli.parser(prog, DESCRIPTION, EPILOG)
    ap.add_argument("--config", metavar="FILE", help="a stage config or a recipe (required)")
    cli.add_overrides(ap)
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--print-config", action="store_true",
                      help="print the fully resolved config as YAML (a recipe: each stage's) and exit")
    what.add_argument("--dry-run", action="store_true",
                      help="compile the training step ahead of time, print per-device memory and FLOPs, and exit "
                           "without writing a checkpoint")
    args = ap.parse_args(argv)
    if not args.config:
        ap.print_usage(sys.stderr)
        return cli.fail(prog, "--config FILE is required (e.g. --config configs/demo.yaml); see --help")
    if not Path(args.config).is_file():
        return cli.fail(prog, f"config file not found: {args.config}")
    try:
        is_recipe, stages = _stages(args.config, args.overrides)
        if args.print_config:
            print_configs(stages)
            return 0
        if args.dry_run:
            for label, cfg in stages:
                dry_run(cfg, label)
            return 0
    except ConfigError as e:
        return cli.fail(prog, str(e))
    if is_recipe:
        from cig_jax.train import recipe

        recipe.run_recipe(args.config, args.overrides)
    else:
        from cig_jax.train import trainer

        trainer.run(stages[0][1])
    return 0


def console() -> None:
    """The `cig-train` console script."""
    cli.run_main(main)
