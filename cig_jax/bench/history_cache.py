"""Benchmark: a chat round with the session's KV cache vs recomputing the whole history, rounds 1..10, one run.

COMMAND: python -m cig_jax.bench.history_cache          # demo model (configs/model/demo.yaml) with a wider LLM
         python -m cig_jax.bench.history_cache --llm-hidden 128 --llm-layers 4   # the demo's own LLM
Prints a table: for round r of a conversation with a user image (a drawn face reference) and a drawing in every
round, the latency of the round with the cache (`ChatSession.round` on the history so far) and without it
(`reset`, `replay` of the r-1 earlier rounds: every image through the ViT and every token prefilled again, then
the same round), their ratio, and the largest difference between the two rounds' visual embeddings (the same
computation, so ~1e-6; beyond 1e-4 the command exits 1: `CIG_BENCH_PERTURB=0.1` perturbs the recomputing
side's LLM input norms and must exit 1). The round is the LLM prefill + image generation path: the user turn (its
image through ViT + input resampler), --new-tokens text tokens (default 0), the image queries, the DiT (--num-steps), the
write-back of the previous round's drawing (it goes into the cache with the next user turn). Everything runs
once untimed first (every shape compiled; the cache has a fixed size, so shapes do not grow with the history),
then --repeats timed passes, each latency the median over them, and round --rounds' speedup uncached / cached as
median (min, max) over the passes (the machine may be shared). Expect the cached round 10 at well under 1/3 of
the uncached one, and cached latencies about flat over the rounds.
Then the capacity check: the same first round (a short history) in a session whose cache has --small-cache slots
and in one with --big-cache slots (model calls read only the filled part of the cache, in power-of-two buckets),
the median of --repeats each; expect big / small within 1.3x.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from flax import nnx

from cig_jax import cli, sharding
from cig_jax.bench.common import NotEqualWork, perturbation, ratio_stats
from cig_jax.config_io import load_config
from cig_jax.data import synthetic
from cig_jax.data.chat_template import ChatTemplate
from cig_jax.data.tiny_tokenizer import build_tiny_tokenizer
from cig_jax.models.cig import CIGModel
from cig_jax.sample.session import ChatSession, default_mesh

VISUAL_ATOL = 1e-4  # the same computation in a different order: ~1e-6 in fp32

ROOT = Path(__file__).resolve().parents[2]


def parse(argv=None):
    p = cli.parser(cli.prog(module="cig_jax.bench.history_cache"), __doc__)
    p.add_argument("--rounds", type=int, default=10, help="chat rounds")
    p.add_argument("--llm-hidden", type=int, default=512, help="LLM hidden width")
    p.add_argument("--llm-layers", type=int, default=8, help="LLM layers")
    p.add_argument("--llm-heads", type=int, default=8, help="LLM attention heads")
    p.add_argument("--llm-mlp", type=int, default=1408, help="LLM intermediate size")
    p.add_argument("--num-steps", type=int, default=None, help="diffusion steps (default: the config's, 20)")
    p.add_argument("--new-tokens", type=int, default=0, help="text tokens decoded before each drawing")
    p.add_argument("--max-len", type=int, default=1024, help="KV-cache slots")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; each latency is the median over them")
    p.add_argument("--small-cache", type=int, default=512, help="capacity check: the small cache's slots")
    p.add_argument("--big-cache", type=int, default=4096, help="capacity check: the big cache's slots")
    return p.parse_args(argv)


def conversation(rounds: int, size: int, seed: int = 0) -> list:
    """(user text, face reference) per round: a new drawn person each time, drawn somewhere."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(rounds):
        attrs = {k: str(rng.choice(v)) for k, v in synthetic.ATTRIBUTES.items()}
        name = synthetic.NAMES[r % len(synthetic.NAMES)]
        scene = synthetic.SCENES[r % len(synthetic.SCENES)]
        ref = synthetic.render_person(attrs, size=size, name=name)
        out.append((f"This is {name}. Show {name} next to the others, {scene}.", ref))
    return out


def main(argv=None) -> None:
    a = parse(argv)
    import jax

    h = a.llm_hidden
    cfg = load_config(ROOT / "configs" / "model" / "demo.yaml", [
        f"model.llm.hidden_size={h}", f"model.llm.num_layers={a.llm_layers}", f"model.llm.num_heads={a.llm_heads}",
        f"model.llm.num_kv_heads={a.llm_heads}", f"model.llm.intermediate_size={a.llm_mlp}",
        f"model.input_resampler.embed_dim={h}", f"model.output_resampler.kv_dim={h}"])
    mesh = default_mesh()
    model = sharding.create_sharded(lambda: CIGModel(cfg.model, rngs=nnx.Rngs(0)), mesh, cfg.mesh.axis_rules)
    llm_params = sum(x.size for x in jax.tree.leaves(nnx.state(model.mllm.llm, nnx.Param)))
    tokenizer = build_tiny_tokenizer(Path(tempfile.gettempdir()) / "cig_jax_tokenizer",
                                     chat_format=cfg.model.mllm.chat_format)
    template = ChatTemplate(tokenizer, cfg.model.mllm.num_image_tokens, cfg.model.mllm.chat_format,
                        cfg.model.mllm.person_slots)
    session = ChatSession(model, template, cfg, max_len=a.max_len, mesh=mesh, identity_embedder=False)
    del model
    turns = conversation(a.rounds, cfg.model.vit.image_size)
    opts = session.options(max_new_tokens=a.new_tokens, force_image=True, num_steps=a.num_steps)
    steps = a.num_steps or cfg.diffusion.num_steps
    print(f"[model] LLM {llm_params / 1e6:.1f}M params ({a.llm_layers} layers x {h}), ViT + DiT of "
          f"configs/model/demo.yaml, {cfg.model.mllm.num_image_tokens} image tokens, {steps} diffusion steps, "
          f"KV cache {a.max_len} slots, {jax.devices()[0].platform}")

    fresh = session.with_batch_size(1)  # the same weights; recomputes each round's history from scratch
    if perturbation():  # the counterfactual: the recomputing side's LLM layer norms only
        fresh.state = perturbed(fresh.state, ("mllm", "llm", "layers", "input_layernorm", "scale"), perturbation())
        fresh.reset()

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    def run():
        """One pass over the conversation; round r is timed with the cache, then right after (the same load on
        the machine) without it. Returns per round: history tokens, (wall, cpu) cached, (wall, cpu) uncached,
        max |visual embeddings difference|."""
        session.reset()
        rows = []
        for r, (text, ref) in enumerate(turns):
            history, length = session.history, len(session.cache.tokens[0])
            res, wall_c, cpu_c = timed(lambda: session.round(text, [ref], seed=r, options=opts))

            def recompute():
                fresh.reset()
                fresh.replay(history)
                return fresh.round(text, [ref], seed=r, options=opts)

            again, wall_u, cpu_u = timed(recompute)
            rows.append((length, (wall_c, cpu_c), (wall_u, cpu_u),
                         float(np.abs(res.visual_embeddings - again.visual_embeddings).max())))
        return rows

    t0 = time.perf_counter()
    run()  # warm-up: compiles every shape the timed passes use
    print(f"[warm-up] {time.perf_counter() - t0:.1f}s; {a.repeats} timed passes")
    passes = [run() for _ in range(a.repeats)]
    med = lambda r, k, j: statistics.median(p[r][k][j] for p in passes)  # noqa: E731
    lengths = [passes[0][r][0] for r in range(a.rounds)]
    cached = [med(r, 1, 0) for r in range(a.rounds)]
    uncached = [med(r, 2, 0) for r in range(a.rounds)]
    cached_cpu = [med(r, 1, 1) for r in range(a.rounds)]
    uncached_cpu = [med(r, 2, 1) for r in range(a.rounds)]
    diffs = [max(p[r][3] for p in passes) for r in range(a.rounds)]

    print(f"{'round':>5} {'history tokens':>14} {'cached ms':>10} {'uncached ms':>12} {'ratio':>6} "
          f"{'cached cpu ms':>14} {'uncached cpu ms':>16} {'cpu ratio':>9} {'max |d visual|':>15}")
    for r in range(a.rounds):
        print(f"{r + 1:>5} {lengths[r]:>14} {cached[r] * 1e3:>10.1f} {uncached[r] * 1e3:>12.1f} "
              f"{cached[r] / uncached[r]:>6.2f} {cached_cpu[r] * 1e3:>14.1f} {uncached_cpu[r] * 1e3:>16.1f} "
              f"{cached_cpu[r] / uncached_cpu[r]:>9.2f} {diffs[r]:>15.1e}")
    last = a.rounds - 1
    ratio, cpu_ratio = cached[last] / uncached[last], cached_cpu[last] / uncached_cpu[last]
    print(f"[result] round {a.rounds}: cached {cached[last] * 1e3:.0f} ms = {ratio:.2f} x uncached "
          f"{uncached[last] * 1e3:.0f} ms ({'ok' if ratio <= 1 / 3 else 'NOT'} <= 1/3; cpu time {cpu_ratio:.2f} x); "
          f"cached rounds {min(cached) * 1e3:.0f}..{max(cached) * 1e3:.0f} ms (round {a.rounds} / round 1: "
          f"{cached[last] / cached[0]:.2f}); uncached round {a.rounds} / round 1: {uncached[last] / uncached[0]:.2f}")
    last_speedup = ratio_stats([p[last][1][0] for p in passes], [p[last][2][0] for p in passes])
    print(f"[result] round {a.rounds} uncached / cached wall time: {last_speedup[0]:.2f}x median "
          f"({last_speedup[1]:.2f}, {last_speedup[2]:.2f}) over {a.repeats} passes")
    worst = max(diffs)
    line = (f"cached vs recomputed rounds, max |visual embeddings difference| over {a.rounds} rounds x {a.repeats} "
            f"passes: {worst:.2e} (tolerance {VISUAL_ATOL:g})")
    if not worst <= VISUAL_ATOL:
        raise NotEqualWork(line)
    print("equal work: " + line)
    capacity_check(session, turns[0], opts, a)


def perturbed(state, path: tuple, delta: float):
    """A copy of an nnx.State with `delta` added to the parameter at `path` (the others shared)."""
    flat = [(p, v.replace(v[...] + delta) if p == path else v) for p, v in nnx.to_flat_state(state)]
    if not any(p == path for p, _ in flat):
        raise KeyError(path)
    return nnx.from_flat_state(flat)


def capacity_check(session, turn, opts, a) -> float:
    """A short-history round (the first) in a --small-cache and a --big-cache session; prints and returns the
    latency ratio big / small (median of --repeats, after a warm-up each)."""
    text, ref = turn
    best = {}
    for slots in (a.small_cache, a.big_cache):
        s = session.with_batch_size(1)
        s.max_len = slots
        s.reset()  # a cache of `slots` slots over the same weights
        times = []
        for k in range(a.repeats + 1):  # the first compiles
            s.reset()
            t0 = time.perf_counter()
            s.round(text, [ref], seed=0, options=opts)
            times.append(time.perf_counter() - t0)
        best[slots] = statistics.median(times[1:])
    ratio = best[a.big_cache] / best[a.small_cache]
    print(f"[capacity] round 1 (short history): {best[a.small_cache] * 1e3:.0f} ms with {a.small_cache} slots, "
          f"{best[a.big_cache] * 1e3:.0f} ms with {a.big_cache} slots: {ratio:.2f}x "
          f"({'ok' if ratio <= 1.3 else 'NOT'} <= 1.3)")
    return ratio


if __name__ == "__main__":
    cli.run_main(main)
