#!/usr/bin/env python
"""Sampling entry point: `python sample.py --checkpoint DIR --chat HISTORY.json --out OUT` (see `--help`).

The command line itself lives in `cig_jax/sample/cli.py` (also installed as `cig-sample`)."""
from cig_jax.cli import run_main
from cig_jax.sample.cli import main

if __name__ == "__main__":
    run_main(main)
