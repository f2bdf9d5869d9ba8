"""The training command line: `python train.py` (or `cig-train`).

Owns: turning `--config FILE [--set KEY=VALUE ...] [--print-config | --dry-run]` into one stage run
(`trainer.run`) or a recipe (`recipe.run_recipe`), with every config of a recipe checked before anything runs.
`--print-config` prints the fully resolved config(s) as YAML; `--dry-run` builds the mesh and the model
abstractly (no parameter memory), compiles the training step ahead of time and prints per-device memory and
FLOPs per step, then exits without writing anything.

Does not own: the loop (`trainer`), the config format (`cig_jax.config`), the AOT compile itself
(`cig_jax.train.compile`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from cig_jax import cli
from cig_jax.config_base import ConfigError
from cig_jax.config_io import dump_yaml, load_config

DESCRIPTION = """Train one stage, or a recipe of stages, from a YAML config.

configs it can take (paths are relative to the repository):
  configs/demo.yaml                    the 3-stage recipe on CPU from SmolLM2-135M (README command 1)
  configs/stage1_detokenizer_smollm2.yaml  one stage of it (also stage2_personalize_, stage3_multiround_smollm2)
  configs/demo_tiny.yaml               the same recipe on a tiny LLM trained from nothing (no names found)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = cli.prog(script="train.py", console="cig-train")
    ap = cli.parser(prog, DESCRIPTION, EPILOG)
    ap.add_argument("--config", metavar="FILE", required=True,
                    help="a stage config or a recipe, e.g. configs/demo.yaml (see the list above)")
    cli.add_overrides(ap)
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--print-config", action="store_true",
                      help="print the fully resolved config as YAML (a recipe: each stage's) and exit")
    what.add_argument("--dry-run", action="store_true",
                      help="compile the training step ahead of time, print per-device memory and FLOPs, and exit "
                           "without writing a checkpoint")
    args = ap.parse_args(argv)
    if not Path(args.config).is_file():
        return cli.fail(prog, f"config file not found: {args.config}")
    try:
        is_recipe, stages = _stages(args.config, args.overrides)
        if args.print_config:
            print_configs(stages)
            return 0
        if args.dry_run:
            from cig_jax.train.compile import dry_run  # jax: not imported for --help and --print-config

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
