"""`python -m cig_jax.bench.nonmarkov`: the old name of `python -m cig_jax.eval.nonmarkov` (history vs Markov model
on held-out recall conversations: an experiment that trains and scores two models, so it lives in `cig_jax/eval/`).

Owns nothing: the same command under its former name.
"""
from cig_jax import cli
from cig_jax.eval.nonmarkov import main

if __name__ == "__main__":
    cli.run_main(main)
