"""Each CPU benchmark runs once at a tiny size and passes its own equality check (same weights, same batch, first
loss or output equal to its reference); a perturbed side makes a benchmark exit non-zero.

Each runs as its own process, as a user runs it (`python -m cig_jax.bench.X`), without the 8 simulated devices
this suite's conftest sets.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.long  # ~2-3 min in all: `python -m pytest -m long` (.ci/run), not the default suite

ROOT = Path(__file__).resolve().parents[1]
TINY_LLM = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--mlp", "128", "--vocab", "256"]
TINY = {
    "lora_step": TINY_LLM + ["--head-dim", "16", "--seq", "32", "--batch", "2", "--repeats", "3"],
    "llm_step": TINY_LLM + ["--seq", "32", "--batch", "2", "--steps", "3"],
    "dit_step": ["--hidden", "64", "--heads", "2", "--layers", "2", "--latent", "8", "--batch", "2", "--cond-len", "8",
                 "--cond-dim", "32", "--steps", "3"],
    "decode": ["--models", "demo", "--batches", "1,2", "--prompt", "8", "--new-tokens", "6", "--repeats", "3"],
    "history_cache": ["--rounds", "2", "--llm-hidden", "64", "--llm-layers", "2", "--llm-heads", "4", "--llm-mlp",
                      "128", "--num-steps", "1", "--max-len", "512", "--small-cache", "256", "--big-cache", "512"],
}


def _bench(name: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CIG_BENCH_PERTURB")}
    return subprocess.run([sys.executable, "-m", f"cig_jax.bench.{name}", *TINY[name]], cwd=ROOT,
                          env=dict(base, **env), capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("name", sorted(TINY))
def test_benchmark_passes_its_own_equality_check_at_tiny_size(name):
    r = _bench(name)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "equal work:" in r.stdout, out[-3000:]
    assert "median" in r.stdout, out[-3000:]


@pytest.mark.parametrize("name", ["lora_step", "decode"])
def test_benchmark_exits_non_zero_when_one_side_is_perturbed(name):
    r = _bench(name, CIG_BENCH_PERTURB="0.1")
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    assert "NOT EQUAL WORK" in r.stderr, r.stderr[-3000:]
