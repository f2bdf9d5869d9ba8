#!/usr/bin/env python
"""Training entry point: `python train.py --config configs/<file>.yaml [--set key.path=value ...]`.

A config is one stage (a `train:` section) or a recipe of stages (`recipe:`, e.g. configs/demo.yaml).
`python train.py --help` lists the options (`--print-config`, `--dry-run`); the command line itself lives in
`cig_jax/train/cli.py` (also installed as `cig-train`)."""
from cig_jax.cli import run_main
from cig_jax.train.cli import main

if __name__ == "__main__":
    run_main(main)
