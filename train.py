#!/usr/bin/env python
"""Training entry point: `python train.py --config configs/<file>.yaml [--set key.path=value ...]`.

A config is one stage (a `train:` section) or a recipe of stages (`recipe:`, e.g. configs/demo.yaml)."""
import sys

from cig_jax.config import ConfigError, load_config, parse_cli


def main(argv: list[str]) -> int:
    path, overrides, rest = parse_cli(argv)
    if rest:
        print(f"train.py: unexpected arguments {rest}; use --config FILE and --set key=value", file=sys.stderr)
        return 2
    from cig_jax.train import recipe

    try:
        if path and recipe.is_recipe(path):
            recipe.load_recipe(path, overrides)  # every stage config checked before anything runs
        else:
            cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    if path and recipe.is_recipe(path):
        recipe.run_recipe(path, overrides)
        return 0
    from cig_jax.train import trainer

    trainer.run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
