"""What the step benchmarks share: timing over repeats after a warm-up, the ratio as median (min, max), the
equality gate, and the counterfactual switch.

Owns: `time_interleaved` (the two sides alternate, one timed unit each per repeat, so a burst of load on a
shared machine hits both), `ratio_line` (per-repeat ratios ours / reference as median (min, max)),
`check_close` (prints the equality a benchmark passed, or exits non-zero naming what differed) and
`perturbation` (the `CIG_BENCH_PERTURB` environment variable: a benchmark adds it to one weight on our side
only, so `CIG_BENCH_PERTURB=0.1 python -m cig_jax.bench.X` must exit non-zero; that is how a benchmark shows
its check can fail).

Does not own: any model or reference (each benchmark builds both of its sides from the same weights).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

PERTURB_ENV = "CIG_BENCH_PERTURB"


class NotEqualWork(SystemExit):
    """Raised (exit status 1) when the two sides of a benchmark did not compute the same thing."""

    status = 1  # what `cli.run_main` exits with: a failed check, not a user's mistake (2)

    def __init__(self, message: str):
        super().__init__(f"NOT EQUAL WORK: {message}")


def perturbation() -> float:
    """The counterfactual: the value of $CIG_BENCH_PERTURB (0.0 when unset)."""
    return float(os.environ.get(PERTURB_ENV, "0") or 0.0)


def time_interleaved(sides: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 1) -> dict[str, list]:
    """{name: [seconds per repeat]}: each side's `fn()` (which must block until its work is done) is run
    `warmup` times untimed, then the sides alternate, one timed call each per repeat."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_stats(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """Speed ratio ours / reference (their seconds over ours, repeat by repeat): (median, min, max)."""
    r = [t / o for o, t in zip(ours, theirs)]
    return statistics.median(r), min(r), max(r)


def ratio_line(label: str, ours: list[float], theirs: list[float], unit_ms: bool = True) -> str:
    """'label: ours 812 ms, reference 1093 ms (medians); ours / reference 1.35x median (1.30, 1.41) over 3'."""
    med, lo, hi = ratio_stats(ours, theirs)
    scale = 1e3 if unit_ms else 1.0
    return (f"{label}: ours {statistics.median(ours) * scale:.1f} ms, reference {statistics.median(theirs) * scale:.1f}"
            f" ms (medians); speed ours / reference {med:.2f}x median ({lo:.2f}, {hi:.2f}) over {len(ours)} repeats")


def check_close(what: str, ours: float, theirs: float, *, rtol: float, atol: float = 0.0) -> str:
    """Passes (returns the line it printed) when |ours - theirs| <= atol + rtol * |theirs|; else NotEqualWork."""
    diff = abs(ours - theirs)
    tol = atol + rtol * abs(theirs)
    line = f"{what}: ours {ours:.8g} vs reference {theirs:.8g}, |diff| {diff:.3g} (tolerance {tol:.3g})"
    if not diff <= tol:  # NaN fails too
        raise NotEqualWork(line)
    print("equal work: " + line)
    return line


def add_llm_shape(p, *, layers: int, hidden: int, heads: int, kv_heads: int, mlp: int, vocab: int, seq: int,
                  batch: int) -> None:
    """The LLaMA-shape and batch flags the LLM benchmarks share (each with its own defaults)."""
    for flag, default, what in (("--layers", layers, "decoder layers"), ("--hidden", hidden, "hidden width"),
                                ("--heads", heads, "attention heads"), ("--kv-heads", kv_heads, "key / value heads"),
                                ("--mlp", mlp, "MLP width"), ("--vocab", vocab, "vocabulary size"),
                                ("--seq", seq, "tokens per row"), ("--batch", batch, "rows per step")):
        p.add_argument(flag, type=int, default=default, help=what)

