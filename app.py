#!/usr/bin/env python
"""Web app entry point: `python app.py --checkpoint workdir/demo/stage3`, then open http://127.0.0.1:7860.

A Gradio chat with a trained checkpoint (`pip install -e '.[app]'`); `--help` lists the options. The command
line itself lives in `cig_jax/app/cli.py`, the page in `cig_jax/app/ui.py`."""
from cig_jax.app.cli import main
from cig_jax.cli import run_main

if __name__ == "__main__":
    run_main(main)
