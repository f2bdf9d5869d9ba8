"""Benchmark: text decoding tokens/s, our on-device round decode vs Hugging Face `generate()` on the same weights.

COMMAND: python -m cig_jax.bench.decode                 # demo LLM + a 6x512 LLaMA, batch 1 and 8, CPU
         python -m cig_jax.bench.decode --new-tokens 128 --prompt 64 --repeats 5
Both sides decode greedily from the same random prompt for the same number of tokens (no stop token) with the
same weights (ours exported as a Hugging Face checkpoint and loaded by transformers, fp32): ours is a prefill
plus `decode.decode_loop` (the loop `ChatSession.round` runs: one jitted `lax.while_loop` over a KV cache view
cut to the filled part), theirs `model.generate(..., do_sample=False, use_cache=True)` on CPU (the header says
where ours runs). The generated tokens must be equal or the command exits 1 (`CIG_BENCH_PERTURB=0.1` perturbs
our first layers' norm: it must exit 1). Prints one row per (model, batch): tokens/s of each (new tokens x batch
/ wall time, prefill included, median of --repeats, the sides alternating after a warm-up) and the speed ratio
ours / HF as median (min, max). Expect ratio >= 1.0 on CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from cig_jax import cli
from cig_jax.bench.common import NotEqualWork, perturbation, ratio_stats, time_interleaved
from cig_jax.config_io import load_config
from cig_jax.config_model import LLMConfig
from cig_jax.convert.hf_llm import save_hf_llm
from cig_jax.models.llm import KVCache, LLM
from cig_jax.sample.cache import unview, view, view_len
from cig_jax.sample.decode import decode_loop

ROOT = Path(__file__).resolve().parents[2]


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m cig_jax.bench.decode", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per side, after a warm-up")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: as many as CPU cores)")
    p.add_argument("--models", default="demo,6x512", help="demo (configs/model/demo.yaml's LLM) and/or 6x512")
    return p.parse_args(argv)


def _configs(names):
    out = {}
    for name in names:
        if name == "demo":
            out["demo LLM"] = load_config(ROOT / "configs" / "model" / "demo.yaml").model.llm
        elif name == "6x512":
            out["LLaMA 6x512"] = LLMConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_layers=6,
                                           num_heads=8, num_kv_heads=8, max_position_embeddings=2048)
        else:
            raise SystemExit(f"--models: unknown model {name!r} (demo, 6x512)")
    return out


def _ours(model, prompt: np.ndarray, new: int):
    """run() -> tokens [b, new]: prefill + the on-device decode loop."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graph, state = nnx.split(model)  # the GraphDef is hashable (frozen configs): a jit static argument
    b, p = prompt.shape
    capacity = p + new + 16
    n_prefill = view_len(p, capacity)
    n_view = view_len(p + new, capacity)
    banned = jnp.zeros((model.cfg.vocab_size,), bool)
    seeds = jnp.zeros((b,), jnp.int32)

    @partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
    def prefill(graph, state, ids, kv):
        llm = nnx.merge(graph, state)
        out = llm(ids, cache=view(kv, n_prefill), return_logits=False)
        return llm.logits(out.hidden_states[:, -1:])[:, 0], unview(kv, out.cache)

    ids = jnp.asarray(prompt, jnp.int32)

    def run():
        kv = KVCache.init(model.cfg, b, capacity)
        logits, kv = prefill(graph, state, ids, kv)
        out, *_ = decode_loop(graph, "llm", n_view, new, 0.0, 1.0, (), state, kv, logits, seeds, banned,
                               jnp.int32(-1), jnp.int32(-1))
        return np.asarray(jax.device_get(out))

    return run


def _hf(directory, prompt: np.ndarray, new: int, threads: int):
    """run() -> tokens [b, new]: transformers' greedy `generate()` (CPU, fp32)."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor(prompt, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 use_cache=True, eos_token_id=None, pad_token_id=0)
        return out[:, ids.shape[1]:].numpy()

    return run


def main(argv=None) -> list:
    a = parse(argv)
    import jax
    from flax import nnx

    threads = a.threads or os.cpu_count()
    batches = [int(x) for x in a.batches.split(",")]
    print(f"[setup] greedy, prompt {a.prompt} tokens, {a.new_tokens} new tokens, {a.repeats} repeats (sides "
          f"alternating) after a warm-up; ours on {jax.devices()[0].platform}, HF on cpu, PyTorch {threads} threads")
    print(f"{'model':>12} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6} {'(min, max)':>12}")
    rows = []
    for name, cfg in _configs(a.models.split(",")).items():
        model = LLM(cfg, rngs=nnx.Rngs(0))
        with tempfile.TemporaryDirectory() as d:
            save_hf_llm(model, d)
            scale = model.layers.input_layernorm.scale  # the counterfactual: ours only (0 unless set)
            scale[...] = scale[...] + perturbation()
            for b in batches:
                prompt = np.random.default_rng(b).integers(3, cfg.vocab_size, (b, a.prompt))
                sides = {"ours": _ours(model, prompt, a.new_tokens), "hf": _hf(d, prompt, a.new_tokens, threads)}
                ours, theirs = sides["ours"](), sides["hf"]()  # the warm-ups (compile) and the outputs
                if not np.array_equal(ours, theirs):
                    raise NotEqualWork(f"{name} batch {b}: greedy tokens differ from HF generate() at "
                                       f"{int((ours != theirs).sum())} of {ours.size} positions (first row ours "
                                       f"{ours[0, :8].tolist()}..., HF {theirs[0, :8].tolist()}...)")
                times = time_interleaved(sides, a.repeats, warmup=0)
                n = b * a.new_tokens
                med, lo, hi = ratio_stats(times["ours"], times["hf"])
                t_ours, t_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
                rows.append(dict(model=name, batch=b, ours=n / t_ours, hf=n / t_hf, ratio=med, ratio_min=lo,
                                 ratio_max=hi))
                print(f"{name:>12} {b:>5} {n / t_ours:>11.0f} {n / t_hf:>10.0f} {med:>6.2f} ({lo:.2f}, {hi:.2f})",
                      flush=True)
    worst = min(r["ratio"] for r in rows)
    print(f"equal work: greedy tokens equal to HF generate() in all {len(rows)} runs ({a.new_tokens} new tokens)")
    print(f"[result] ours / HF tokens/s: median ratio {worst:.2f}x at worst ({'ok' if worst >= 1.0 else 'NOT'} >= "
          f"1.0)")
    return rows


if __name__ == "__main__":
    cli.run_main(main)
