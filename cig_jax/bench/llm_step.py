"""Benchmark: one LLM training step (forward + backward + AdamW) in cig_jax vs Hugging Face + PyTorch.

COMMAND: python -m cig_jax.bench.llm_step [--layers 6 --hidden 512 --seq 512 --batch 8 --vocab 8000 --steps 3]
Expect: 'equal work: first-step loss ...' then 'speed ours / reference R x median (min, max) over N repeats'.

Both sides run the same step on the same batch from the same weights: ours drawn (seed 0), exported through
`convert.hf_llm.ours_to_hf` and loaded into transformers' LlamaForCausalLM. The first step's losses must agree
(relative 1e-4 in fp32, 2e-2 with our --dtype bfloat16) or the command exits 1 (`CIG_BENCH_PERTURB=0.1` perturbs
our final norm: it must exit 1). Then the two sides alternate, one step each per repeat, --steps repeats; the
line gives the median speed ratio with its min and max. PyTorch runs on CPU, or on CUDA when our JAX backend is
a GPU and torch sees one; the line says which. Also prints model-FLOPs utilisation with the formula it uses
(peak FLOP/s from --peak-tflops, or a known accelerator table; CPUs have no reliable peak, so MFU is printed
only when one is known). PyTorch is skipped with --no-torch (e.g. on an accelerator host without torch).
"""
from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cig_jax import cli, sharding
from cig_jax.bench import common
from cig_jax.bench.common import check_close, perturbation, ratio_line, ratio_stats, time_interleaved
from cig_jax.config import MeshConfig, OptimizerConfig
from cig_jax.config_model import LLMConfig
from cig_jax.convert.hf_llm import config_to_hf, ours_to_hf
from cig_jax.models.llm import LLM, num_params
from cig_jax.train.flops import FORMULA, module_flops
from cig_jax.data.lm_smoke import lm_smoke_dataset
from cig_jax.train import trainer
from cig_jax.train import state as train_state
from cig_jax.train.stages import lm_loss

OPTIMIZER = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, grad_clip_norm=0.0, weight_decay=0.0)

def build_ours(cfg: LLMConfig) -> tuple[LLM, dict]:
    """Our model (seed 0) and its weights as a PyTorch state dict (`convert.hf_llm.ours_to_hf`)."""
    model = LLM(cfg, rngs=nnx.Rngs(0))
    params = {p: np.asarray(v[...], np.float32) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    hf = ours_to_hf(params, cfg)
    model.norm.scale[...] = model.norm.scale[...] + perturbation()  # the counterfactual: our side only (0 unless $CIG_BENCH_PERTURB)
    return model, hf


def bench_ours(model: LLM, data: dict):
    """(run() -> loss: one step, first loss) of the trainer's step (AdamW, all params trained)."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    rules = MeshConfig().axis_rules
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = train_state.make_optimizer(OPTIMIZER, 1000)
    state, state_sh = train_state.init_state(params, tx, mesh, rules, rest if jax.tree.leaves(rest) else None)
    b = sharding.host_to_global(data, mesh, rules)
    step = trainer.compile_step(trainer.make_train_step(graphdef, tx, lm_loss), state, b, state_sh,
                                jax.tree.map(lambda x: x.sharding, b), mesh)
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], b)
        return float(m["loss"])

    return run, run()


def bench_torch(cfg: LLMConfig, hf_tensors: dict, data: dict, threads: int):
    """(run() -> loss, first loss, device) of transformers' LlamaForCausalLM from our weights, AdamW."""
    torch = cli.require("torch", "test", "the PyTorch reference of bench.llm_step (or --no-torch)")
    transformers = cli.require("transformers", "test", "the PyTorch reference of bench.llm_step (or --no-torch)")

    torch.set_num_threads(threads)
    dev = torch.device("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")
    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_cfg).float()
    model.load_state_dict({k: torch.tensor(v) for k, v in hf_tensors.items()}, strict=not cfg.tie_word_embeddings)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER.learning_rate, betas=(OPTIMIZER.b1, OPTIMIZER.b2),
                            eps=OPTIMIZER.eps, weight_decay=OPTIMIZER.weight_decay)
    tokens = torch.tensor(data["tokens"]).long().to(dev)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        return loss.item()  # waits for the device

    return run, run(), dev.type


def main(argv=None) -> dict:
    ap = cli.parser(cli.prog(module="cig_jax.bench.llm_step"), __doc__.splitlines()[0])
    common.add_llm_shape(ap, layers=6, hidden=512, heads=8, kv_heads=8, mlp=1376, vocab=8000, seq=512, batch=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (repeats), after one warm-up step")
    ap.add_argument("--dtype", default="float32", help="compute dtype of our step (PyTorch runs fp32)")
    ap.add_argument("--remat", default="none", help="our remat policy (HF runs without gradient checkpointing)")
    ap.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                    help="our layers under lax.scan (--no-scan: unrolled, as configs/model/demo.yaml runs on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: as many as CPU cores)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    ap.add_argument("--no-torch", action="store_true", help="time ours only (no reference, no equality check)")
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
    data = next(iter(lm_smoke_dataset(vocab=cfg.vocab_size, seq_len=args.seq, local_batch=args.batch, seed=0)))
    model, hf_tensors = build_ours(cfg)
    run_ours, loss_ours = bench_ours(model, data)
    del model
    sides = {"ours": run_ours}
    if not args.no_torch:
        run_torch, loss_torch, dev = bench_torch(cfg, hf_tensors, data, args.threads or os.cpu_count())
        check_close(f"first-step loss (ours {args.dtype}, PyTorch fp32 on {dev}, same weights and batch)", loss_ours,
                    loss_torch, rtol=1e-4 if args.dtype == "float32" else 2e-2)
        sides["torch"] = run_torch
    # the first steps above were the warm-ups (compile, allocations)
    times = time_interleaved(sides, args.steps, warmup=0)
    t_ours = statistics.median(times["ours"])
    result = {"ours_tokens_per_s": tokens / t_ours, "ours_step_s": t_ours, "first_loss": loss_ours}
    print(f"cig_jax   : {t_ours * 1e3:9.1f} ms/step  {tokens / t_ours:12,.0f} tokens/s (median of {args.steps})")
    if not args.no_torch:
        t_torch = statistics.median(times["torch"])
        med, lo, hi = ratio_stats(times["ours"], times["torch"])
        result.update(torch_tokens_per_s=tokens / t_torch, torch_step_s=t_torch, ratio=med, ratio_min=lo,
                      ratio_max=hi)
        print(f"PyTorch HF: {t_torch * 1e3:9.1f} ms/step  {tokens / t_torch:12,.0f} tokens/s (median of {args.steps},"
              f" on {dev})")
        print(ratio_line(f"step (PyTorch on {dev}, {args.threads or os.cpu_count()} threads)", times["ours"],
                         times["torch"]))
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
