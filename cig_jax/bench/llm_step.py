"""Benchmark: one LLM training step (forward + backward + AdamW) in cig_jax vs Hugging Face + PyTorch.

    python -m cig_jax.bench.llm_step [--layers 6 --hidden 512 --seq 512 --batch 8 --vocab 8000 --steps 3]

Both sides build the same LLaMA config and run the same step on the same machine in the same run; the
script prints tokens/s of each, the ratio ours / PyTorch, and model-FLOPs utilisation with the formula it
uses (peak FLOP/s from --peak-tflops, or a known accelerator table; CPUs have no reliable peak, so MFU is
printed only when one is known). PyTorch is skipped with --no-torch (e.g. on an accelerator host
without torch).
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cig_jax.config import LLMConfig, MeshConfig, OptimizerConfig
from cig_jax import cli, sharding
from cig_jax.models.llm import LLM, num_params
from cig_jax.train.flops import FORMULA, module_flops
from cig_jax.data.lm_smoke import lm_smoke_dataset
from cig_jax.train import trainer
from cig_jax.train.stages import lm_loss

def bench_ours(cfg: LLMConfig, batch: int, seq: int, steps: int) -> float:
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    rules = MeshConfig().axis_rules
    model = sharding.create_sharded(lambda: LLM(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = trainer.make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=0, grad_clip_norm=0.0), 1000)
    state, state_sh = trainer.init_state(params, tx, mesh, rules, rest if jax.tree.leaves(rest) else None)
    data = next(iter(lm_smoke_dataset(vocab=cfg.vocab_size, seq_len=seq, local_batch=batch, seed=0)))
    b = sharding.host_to_global(data, mesh, rules)
    step = trainer.compile_step(trainer.make_train_step(graphdef, tx, lm_loss), state, b, state_sh,
                                jax.tree.map(lambda x: x.sharding, b), mesh)
    state, m = step(state, b)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, b)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps


def bench_torch(cfg: LLMConfig, batch: int, seq: int, steps: int, threads: int) -> float:
    torch = cli.require("torch", "test", "the PyTorch reference of bench.llm_step (or --no-torch)")
    import transformers

    torch.set_num_threads(threads)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(seq, 512), rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    data = next(iter(lm_smoke_dataset(vocab=cfg.vocab_size, seq_len=seq, local_batch=batch, seed=0)))
    tokens = torch.tensor(data["tokens"]).long()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        return loss

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> dict:
    ap = cli.parser(cli.prog(module="cig_jax.bench.llm_step"), __doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--mlp", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="compute dtype of our step (PyTorch runs fp32)")
    ap.add_argument("--remat", default="none", help="our remat policy (HF runs without gradient checkpointing)")
    ap.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                    help="our layers under lax.scan (--no-scan: unrolled, as configs/model/demo.yaml runs on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: as many as CPU cores)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    cfg = LLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                    num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                    max_position_embeddings=max(args.seq, 512), remat_policy=args.remat, dtype=args.dtype,
                    scan_layers=args.scan)
    tokens = args.batch * args.seq
    print(f"LLaMA {args.layers} layers, d={args.hidden}, mlp={args.mlp}, vocab={args.vocab}, "
          f"{num_params(cfg) / 1e6:.1f}M params; batch {args.batch} x seq {args.seq}; "
          f"layers {'scanned' if args.scan else 'unrolled'}; "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"XLA flags: this benchmark sets none; XLA_FLAGS in effect: {os.environ.get('XLA_FLAGS', '') or '(unset)'}")
    t_ours = bench_ours(cfg, args.batch, args.seq, args.steps)
    result = {"ours_tokens_per_s": tokens / t_ours, "ours_step_s": t_ours}
    print(f"cig_jax   : {t_ours * 1e3:9.1f} ms/step  {tokens / t_ours:12,.0f} tokens/s")
    if not args.no_torch:
        t_torch = bench_torch(cfg, args.batch, args.seq, args.steps, args.threads or os.cpu_count())
        result.update(torch_tokens_per_s=tokens / t_torch, torch_step_s=t_torch, ratio=t_torch / t_ours)
        print(f"PyTorch HF: {t_torch * 1e3:9.1f} ms/step  {tokens / t_torch:12,.0f} tokens/s")
        print(f"ratio (ours / PyTorch tokens/s): {t_torch / t_ours:.2f}")
    peak = args.peak_tflops or trainer.known_peak_tflops()
    spec = {k: jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32) for k in ("tokens", "loss_mask")}
    count = module_flops(lambda: LLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, lm_loss, spec)
    flops_tok = count.total / tokens
    result["flops_per_token"] = flops_tok
    achieved = tokens / t_ours * flops_tok / 1e12
    print(f"MFU = tokens/s x model_flops_per_token / (devices x peak); model_flops_per_token = "
          f"{flops_tok / 1e6:.1f} MFLOP (cig_jax.train.flops: {FORMULA}; step: {count.summary()})")
    print(f"achieved model TFLOP/s (all devices): {achieved:.3f}")
    if peak:
        mfu = achieved / (jax.device_count() * peak)
        result["mfu"] = mfu
        print(f"MFU: {mfu * 100:.1f}% of {jax.device_count()} x {peak} TFLOP/s")
    else:
        print("MFU: n/a (no known peak for this device; pass --peak-tflops)")
    return result


if __name__ == "__main__":
    cli.run_main(main)
