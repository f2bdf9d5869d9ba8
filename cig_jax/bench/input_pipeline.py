"""Benchmark: a stage's input pipeline alone, decoded in this process vs in grain worker processes, one run.

COMMAND: python -m cig_jax.bench.input_pipeline --config configs/stage1_detokenizer.yaml
         python -m cig_jax.bench.input_pipeline --config configs/stage3_multiround.yaml --workers 0,2,4
Builds the stage's task from the config (the trainer's own `stages.build_task`, so the batches are the ones a
training run reads: same records, same decoding, same batch size), then for each worker count reads --warmup
batches untimed (worker start-up, first file reads) and --batches timed ones, and prints examples/s of each and
its ratio to the first count. The data must exist (README command 1 draws it; or `python -m
cig_jax.data.tfds_builder`). On a machine with as many cores as the trainer needs for itself, workers help only
when decoding, not the step, is what the accelerator waits on: the trainer's step time is the other number to
compare with (its log prints examples/s).

Owns: nothing the trainer uses.
"""
from __future__ import annotations

import time

from cig_jax import cli
from cig_jax.config_base import ConfigError
from cig_jax.config_io import load_config
from cig_jax.train.stages import build_task


def read_rate(cfg, workers: int, batches: int, warmup: int) -> dict:
    """examples/s of the task's dataset at `workers` grain worker processes (the first `warmup` batches untimed)."""
    import dataclasses

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, worker_count=workers))
    task = build_task(cfg)
    it = iter(task.make_dataset(0, 1))
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    rows = 0
    for _ in range(batches):
        b = next(it)
        rows += len(next(iter(b.values())))
    dt = time.perf_counter() - t0
    return dict(workers=workers, examples=rows, seconds=dt, examples_per_s=rows / dt)


def main(argv=None) -> list:
    ap = cli.parser(cli.prog(module="cig_jax.bench.input_pipeline"), __doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a stage config (its data section and stage are read)")
    cli.add_overrides(ap)
    ap.add_argument("--workers", default="0,2", help="grain worker counts to compare, comma-separated")
    ap.add_argument("--batches", type=int, default=30, help="timed batches per worker count")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    args = ap.parse_args(argv)

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(cli.fail(ap.prog, str(e)))
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    print(f"input pipeline of stage {cfg.train.stage!r} ({args.config}): batch {cfg.data.global_batch_size}, "
          f"{args.batches} timed batches after {args.warmup} untimed, worker counts {counts}", flush=True)
    out = []
    for w in counts:
        r = read_rate(cfg, w, args.batches, args.warmup)
        out.append(r)
        ratio = r["examples_per_s"] / out[0]["examples_per_s"]
        print(f"workers {w}: {r['examples_per_s']:8.1f} examples/s ({r['examples']} in {r['seconds']:.1f}s), "
              f"{ratio:.2f}x of {counts[0]} workers", flush=True)
    return out


if __name__ == "__main__":
    cli.run_main(main)
