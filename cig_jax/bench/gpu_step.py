"""Benchmark: step time, throughput and MFU of the stage-2 MLLM step and a PixArt-XL-size DiT step, with variants.

COMMAND (one GPU; scripts/gpu_bench.sh runs it):
    python -m cig_jax.bench.gpu_step --suite stage2 --suite dit
    python -m cig_jax.bench.gpu_step --tiny --suite stage2 --suite dit      # the same code at toy sizes (CPU)

stage2: `configs/stage2_personalize_1b.yaml` (a 1.1B LLM, a ViT-B/16 frozen encoder, bf16, cuDNN attention),
one real batch of synthetic single-turn data, the trainer's own step (`trainer.make_train_step`, shardings,
donation). Variants, in order of expected gain, each measured on its own: bf16 logits of the 32k-vocab head,
a smaller batch without remat, AdamW's first moment in bf16 (its fp32 update traffic), and all of them.
dit: PixArt-XL (28 x 1152, 16 heads, patch 2) on 1024 px latents (128 x 128 x 4 = 4096 tokens), 120 condition
tokens of width 4096 (T5's), bf16 with cuDNN attention, the mean-square loss of a flow prediction, AdamW.

MFU = examples/s x model FLOPs per example / (devices x peak), model FLOPs from `cig_jax.train.flops` (what
the step runs: 6N per token for trained weights, 4N frozen with the gradient crossing, 2N frozen forward-only,
attention as computed); peak from `trainer.known_peak_tflops` or --peak-tflops. Each variant runs under a
try: one that fails (e.g. out of memory) prints its error and the suite goes on, and the command exits 1 at the
end naming every failed variant (`CIG_BENCH_FAIL=NAME` makes the variants whose name contains NAME fail on
purpose: the check that a failure is not swallowed); --budget-s skips variants that would start after the budget.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cig_jax import cli, sharding
from cig_jax.config_io import load_config
from cig_jax.config_model import DiTConfig
from cig_jax.models.dit import DiT
from cig_jax.train import state as train_state, trainer
from cig_jax.train.flops import module_flops, task_flops
from cig_jax.train.stages import build_task

STAGE2_VARIANTS = [  # (name, config overrides, optimizer first-moment dtype)
    ("baseline", [], None),
    ("bf16 logits", ["model.llm.logits_dtype=bfloat16"], None),
    ("batch 32, remat none", ["data.global_batch_size=32", "model.llm.remat_policy=none"], None),
    ("AdamW mu bf16", [], "bfloat16"),
    ("all of the above", ["model.llm.logits_dtype=bfloat16", "data.global_batch_size=32",
                          "model.llm.remat_policy=none"], "bfloat16"),
]
DIT_VARIANTS = [  # (name, DiTConfig fields, batch)
    ("baseline (remat none)", {}, 8),
    ("remat dots_saveable, batch 16", {"remat_policy": "dots_saveable"}, 16),
]
TINY_STAGE2 = ["data.global_batch_size=4", "data.seq_len=128", "model.llm.attention_impl=null"]


def _time(step, state, batch, steps: int):
    state, m = step(state, batch)  # warm-up (compiled already)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps, state, m


def _report(name: str, dt: float, examples: int, tokens: int, flops, peak, unit: str) -> dict:
    per_example = flops.total / examples
    achieved = examples * per_example / dt / 1e12
    out = dict(variant=name, step_s=dt, examples_per_s=examples / dt, tflops=achieved,
               flops_per_example=per_example)
    rate = f"{tokens / dt:,.0f} tokens/s" if tokens else f"{examples / dt:,.2f} {unit}/s"
    mfu = ""
    if peak:
        out["mfu"] = achieved / (jax.device_count() * peak)
        mfu = f"  MFU {out['mfu'] * 100:.1f}% = {examples / dt:.2f} ex/s x {per_example:.4g} FLOP / " \
              f"({jax.device_count()} x {peak:g} TFLOP/s)"
    print(f"[{name}] step {dt * 1e3:.1f} ms  {rate}  {achieved:.4g} model TFLOP/s{mfu}", flush=True)
    print(f"[{name}]   FLOPs/step {flops.summary()}", flush=True)
    return out


def make_tx(lr: float, mu_dtype):
    return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.0, mu_dtype=mu_dtype)


# ----------------------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------------------
def run_stage2(name: str, overrides: list, mu_dtype, args, peak, host_batches: dict) -> dict:
    sets = ["data.source=synthetic", "data.num_records=64", f"train.workdir={args.workdir}"] + overrides + (
        TINY_STAGE2 if args.tiny else [])
    cfg = load_config(args.stage2_config if not args.tiny else "configs/stage2_personalize.yaml", sets)
    task = build_task(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.axis_rules
    gb = cfg.data.global_batch_size
    if gb not in host_batches:  # one real batch per batch size (the data pipeline is not measured)
        host_batches[gb] = next(iter(task.make_dataset(0, 1)))
    model = sharding.create_sharded(task.make_model, mesh, rules)
    graphdef, params, frozen = nnx.split(model, task.trainable, ...)
    tx = make_tx(1e-5, mu_dtype and jnp.dtype(mu_dtype))
    state, state_sh = train_state.init_state(params, tx, mesh, rules, frozen if jax.tree.leaves(frozen) else None)
    batch = sharding.host_to_global(host_batches[gb], mesh, rules)
    step = trainer.make_train_step(graphdef, tx, task.loss_fn, cfg.train.grad_accum_steps, cfg.train.seed,
                                   weight_by=task.accum_weight)
    t0 = time.perf_counter()
    with sharding.activation_sharding(mesh, rules):
        step = trainer.compile_step(step, state, batch, state_sh, jax.tree.map(lambda x: x.sharding, batch), mesh,
                                    verbose=False)
    print(f"[{name}] compiled in {time.perf_counter() - t0:.1f}s (remat {cfg.model.llm.remat_policy}, logits "
          f"{cfg.model.llm.logits_dtype}, mu {mu_dtype or 'float32'}, batch {gb} x {cfg.data.seq_len})", flush=True)
    dt, state, m = _time(step, state, batch, args.steps)
    out = _report(name, dt, gb, gb * task.tokens_per_example, task_flops(task, gb), peak, "examples")
    out["loss"] = float(m["loss"])
    del state, model
    return out


# ----------------------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------------------
def dit_config(args, **fields):
    if args.tiny:
        size = dict(num_layers=2, num_heads=4, head_dim=16, sample_size=16, caption_channels=32)
        cond = (8, 32)
    else:  # PixArt-XL/2 at 1024 px: latents 128 x 128 x 4, T5 conditions 120 x 4096
        size = dict(num_layers=28, num_heads=16, head_dim=72, sample_size=128, caption_channels=4096)
        cond = (120, 4096)
    attn = None if args.tiny else "cudnn"
    cfg = DiTConfig(in_channels=4, patch_size=2, dtype="float32" if args.tiny else "bfloat16",
                    attention_impl=attn, scan_layers=True, **size)
    return dataclasses.replace(cfg, **fields), cond


def dit_loss(model, batch):
    pred = model(batch["latents"], batch["timesteps"], batch["cond"])
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - batch["target"])), {}


def run_dit(name: str, fields: dict, batch_size: int, args, peak) -> dict:
    cfg, (nc, dc) = dit_config(args, **fields)
    b = 2 if args.tiny else batch_size
    side = cfg.sample_size
    rng = np.random.default_rng(0)
    host = dict(latents=rng.standard_normal((b, side, side, 4), np.float32),
                target=rng.standard_normal((b, side, side, 4), np.float32),
                timesteps=rng.uniform(0, 1000, b).astype(np.float32),
                cond=rng.standard_normal((b, nc, dc), np.float32))
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    make = lambda: DiT(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    model = make()
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_tx(1e-5, None)

    def step(state, batch):
        params, opt = state

        def loss(p):
            return dit_loss(nnx.merge(graphdef, p), batch)[0]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), {"loss": value}

    state = (params, tx.init(params))
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile()
    print(f"[{name}] compiled in {time.perf_counter() - t0:.1f}s (DiT {cfg.num_layers} x {cfg.inner_dim()}, "
          f"{(side // cfg.patch_size) ** 2} tokens, batch {b}, {cfg.dtype}, attention {cfg.attention_impl}, "
          f"remat {cfg.remat_policy})", flush=True)
    dt, state, m = _time(compiled, state, batch, args.steps)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    out = _report(name, dt, b, 0, module_flops(make, nnx.Param, dit_loss, spec), peak, "images")
    out["loss"] = float(m["loss"])
    del state, model
    return out


def main(argv=None) -> list:
    ap = cli.parser(cli.prog(module="cig_jax.bench.gpu_step"), __doc__.split("\n\n")[0])
    ap.add_argument("--suite", action="append", choices=["stage2", "dit"], help="repeatable (default: both)")
    ap.add_argument("--only", default=None, help="run only the variants whose name contains this text")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, CPU-friendly: checks the code path")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--stage2-config", default="configs/stage2_personalize_1b.yaml", help="the stage-2 config the LLM variants build")
    ap.add_argument("--json", default=None, help="also write the results here (a JSON list)")
    ap.add_argument("--workdir", default="/tmp/cig_gpu_bench", help="where the tiny tokenizer is cached")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device dense bf16 peak")
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip variants starting after this many seconds")
    args = ap.parse_args(argv)
    suites = args.suite or ["stage2", "dit"]
    peak = args.peak_tflops or trainer.known_peak_tflops()
    print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; peak "
          f"{peak or 'unknown'} TFLOP/s; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    start, results, host_batches, failed = time.perf_counter(), [], {}, []
    fail_on_purpose = os.environ.get("CIG_BENCH_FAIL", "")
    jobs = []
    if "stage2" in suites:
        jobs += [(f"stage2 {n}", lambda n=n, o=o, mu=mu: run_stage2(f"stage2 {n}", o, mu, args, peak, host_batches))
                 for n, o, mu in STAGE2_VARIANTS]
    if "dit" in suites:
        jobs += [(f"dit {n}", lambda n=n, f=f, b=b: run_dit(f"dit {n}", f, b, args, peak)) for n, f, b in DIT_VARIANTS]
    for name, job in jobs:
        if args.only and args.only not in name:
            continue
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            print(f"[{name}] skipped: past the {args.budget_s:.0f}s budget", flush=True)
            continue
        try:
            if fail_on_purpose and fail_on_purpose in name:
                raise RuntimeError(f"failed on purpose (CIG_BENCH_FAIL={fail_on_purpose!r})")
            results.append(job())
        except Exception as e:  # noqa: BLE001 -- report and go on (an OOM variant must not end the suite)
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            traceback.print_exc(limit=2)
            failed.append(name)
        jax.clear_caches()
    print("\nsummary (variant, step ms, examples/s, model TFLOP/s, MFU):")
    for r in results:
        mfu = f"{r['mfu'] * 100:.1f}%" if "mfu" in r else "n/a"
        print(f"  {r['variant']:40s} {r['step_s'] * 1e3:9.1f} {r['examples_per_s']:9.2f} {r['tflops']:8.1f}  {mfu}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if failed:
        raise SystemExit(f"{len(failed)} variant(s) failed: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    cli.run_main(main)
