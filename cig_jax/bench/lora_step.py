"""Benchmark: one LoRA fine-tuning step of SmolLM2-135M's shape, ours vs PyTorch + PEFT, same weights, same batch.

COMMAND: python -m cig_jax.bench.lora_step                  # SmolLM2-135M shape, batch 4 x seq 256, fp32 and bf16
         python -m cig_jax.bench.lora_step --layers 2 --vocab 4096 --seq 64 --batch 2 --repeats 3   # quick check
Expect: an 'equal work' line per dtype (first loss and LoRA gradient norm of the two sides agree) and a line
'speed ours / reference R x median (min, max)'; ours >= 1.0x in fp32 on 2 CPU cores. Exits 1 when the sides
differ beyond the stated tolerance (`CIG_BENCH_PERTURB=0.1` perturbs our final norm: it must exit 1).

The reference is transformers' LlamaForCausalLM wrapped by `peft.get_peft_model` (LoRA rank 16 on q, k, v, o,
gate, up, down; dropout 0), its base weights random (seed 0) and every lora_B drawn nonzero so the adapters count;
ours is `models.llm.LLM` filled from the same tensors through `convert.hf_llm` (base) and `convert.peft` (the
adapters, saved by PEFT and read back). One step = loss, gradients of the LoRA parameters only, AdamW update.
The batch is a prompt + answer: the loss is on the last `--answer` fraction of each row. PyTorch computes the
LM head at every position (as `LlamaForCausalLM(labels=...)` does); ours, by default, only where the loss is
(`llm.selected_token_loss`; `--full-logits` computes them everywhere). bf16: PEFT's default mixed precision
(base weights bf16, adapters fp32); ours computes in bf16 (`model.llm.dtype`), the frozen base stored in bf16,
the adapters fp32. The reference runs on CPU, or on CUDA when our JAX backend is a GPU and torch sees one; the
line says which.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cig_jax import cli, sharding
from cig_jax.bench import common
from cig_jax.bench.common import check_close, perturbation, ratio_line, time_interleaved
from cig_jax.config import MeshConfig, OptimizerConfig
from cig_jax.config_model import LLMConfig
from cig_jax.convert.hf_llm import config_to_hf, hf_to_ours, llm_from_params
from cig_jax.convert.peft import peft_to_ours
from cig_jax.models import layers
from cig_jax.models.llm import num_params, selected_token_loss, shifted_token_loss
from cig_jax.train import trainer
from cig_jax.train import state as train_state

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# first-step loss and LoRA gradient norm: relative tolerances per compute dtype (fp32 sides agree to ~1e-6)
RTOL = {"float32": {"loss": 1e-5, "grad_norm": 1e-4}, "bfloat16": {"loss": 2e-3, "grad_norm": 1e-2}}


def parse(argv=None):
    p = cli.parser(cli.prog(module="cig_jax.bench.lora_step"), __doc__.splitlines()[0], epilog=__doc__)
    common.add_llm_shape(p, layers=30, hidden=576, heads=9, kv_heads=3, mlp=1536, vocab=49152, seq=256,
                         batch=4)  # batch 4 peaks at 7.7 GiB resident, both sides; 8 reached ~12 GiB
    p.add_argument("--head-dim", type=int, default=64, help="width of an attention head")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    p.add_argument("--answer", type=float, default=0.5, help="fraction of each row (its end) that carries the loss")
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, each run on both sides")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per side after one warm-up step")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                   help="our layers under lax.scan (--no-scan: unrolled, faster on XLA:CPU)")
    p.add_argument("--full-logits", action="store_true", help="ours: LM head at every position (as the reference)")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: as many as CPU cores)")
    return p.parse_args(argv)


def smollm2_config(a, dtype: str) -> LLMConfig:
    return LLMConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.mlp, num_layers=a.layers,
                     num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=a.head_dim, rms_norm_eps=1e-5,
                     rope_theta=100000.0, max_position_embeddings=max(a.seq, 8192), tie_word_embeddings=True,
                     lora_rank=a.rank, lora_alpha=a.alpha, lora_targets=TARGETS, remat_policy="none",
                     scan_layers=a.scan, dtype=dtype)


def make_batch(a, seed: int = 0) -> dict:
    """tokens [batch, seq] int32; loss_mask [batch, seq]: 1 on the answer (the last `answer` of each row)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, a.vocab, (a.batch, a.seq)).astype(np.int32)
    mask = np.zeros((a.batch, a.seq), np.int32)
    mask[:, a.seq - max(1, int(round(a.seq * a.answer))):] = 1
    return {"tokens": tokens, "loss_mask": mask}


# ----------------------------------------------------------------------------------------------------------
# The reference: transformers + PEFT, and the same weights converted to ours
# ----------------------------------------------------------------------------------------------------------
def build_reference(a, cfg: LLMConfig):
    """(peft model fp32, {our param path: array}) from one random draw (seed 0), lora_B nonzero."""
    torch = cli.require("torch", "test", "the PyTorch reference of bench.lora_step")
    transformers = cli.require("transformers", "test", "the PyTorch reference of bench.lora_step")
    peft = cli.require("peft", "test", "the PEFT reference of bench.lora_step")

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    base = transformers.LlamaForCausalLM(hf_cfg).float()
    values = hf_to_ours({k: v.detach().numpy().copy() for k, v in base.state_dict().items()}, cfg, source="hf")
    lora = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(TARGETS),
                           lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)  # trained-looking adapters: the LoRA path changes the output
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        values.update(peft_to_ours(d, cfg))
    model.untrained_adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return model, values


def torch_step_fn(a, model, batch: dict, dtype: str):
    """(step() -> loss, first (loss, LoRA grad norm), device) of PEFT + AdamW on the LoRA parameters. `model` is
    changed in place (its adapters are restored from the untrained copy `build_reference` kept; for bf16 its
    base weights are cast): one copy of the 135M weights in memory, not one per dtype."""
    import torch

    torch.set_num_threads(a.threads or os.cpu_count())
    dev = torch.device("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(model.untrained_adapters[name])  # each dtype starts from the same adapters
            elif dtype == "bfloat16":  # PEFT's mixed precision: base weights bf16, adapters fp32
                p.data = p.data.to(torch.bfloat16)
    model.to(dev).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    tokens = torch.from_numpy(batch["tokens"]).long().to(dev)
    labels = tokens.masked_fill(torch.from_numpy(batch["loss_mask"]).to(dev) == 0, -100)

    def step(grad_norm=False):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in trainable)).item() if grad_norm else None
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss.item(), norm

    first = step(grad_norm=True)
    return step, first, dev.type


# ----------------------------------------------------------------------------------------------------------
# Ours: the trainer's step (frozen base as a jit argument, gradients of the LoRA parameters only)
# ----------------------------------------------------------------------------------------------------------
def ours_step_fn(a, cfg: LLMConfig, values: dict, batch: dict):
    values = dict(values)
    values[("norm", "scale")] = values[("norm", "scale")] + perturbation()  # the counterfactual (0 unless set)
    model = llm_from_params(cfg, values, source="bench.lora_step")
    graphdef, lora, frozen = nnx.split(model, layers.LoRAParam, ...)
    if cfg.dtype == "bfloat16":  # the frozen base stored in the compute dtype (PEFT's bf16 base)
        frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
    selected = int((batch["loss_mask"][:, 1:] > 0).sum())  # positions the loss reads (static for jit)

    def loss_fn(m, b):
        if a.full_logits:
            loss, count = shifted_token_loss(m(b["tokens"]).logits, b["tokens"], b["loss_mask"])
        else:
            hidden = m(b["tokens"], return_logits=False).hidden_states
            loss, count = selected_token_loss(m, hidden, b["tokens"], b["loss_mask"], selected)
        return loss, {"loss_tokens": count}

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    rules = MeshConfig().axis_rules
    tx = train_state.make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=0, grad_clip_norm=0.0,
                                                weight_decay=0.0), 1000)
    state, state_sh = train_state.init_state(lora, tx, mesh, rules, frozen)
    b = sharding.host_to_global(batch, mesh, rules)
    step = trainer.compile_step(trainer.make_train_step(graphdef, tx, loss_fn), state, b, state_sh,
                                jax.tree.map(lambda x: x.sharding, b), mesh, verbose=False)
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], b)
        return float(m["loss"]), float(m["grad_norm"])

    return run, run()


def main(argv=None) -> dict:
    a = parse(argv)
    batch = make_batch(a)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    cfg32 = smollm2_config(a, "float32")
    ref, values = build_reference(a, cfg32)
    lora_n = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    print(f"LoRA step bench: LLaMA {a.layers} layers, d={a.hidden}, heads {a.heads}/{a.kv_heads} x {a.head_dim}, "
          f"mlp {a.mlp}, vocab {a.vocab} (tied), {num_params(cfg32) / 1e6:.1f}M base params; LoRA rank {a.rank} "
          f"alpha {a.alpha:g} on {','.join(TARGETS)} ({lora_n / 1e6:.2f}M trainable); batch {a.batch} x seq {a.seq}, "
          f"loss on the last {a.answer:.0%} of each row; ours: layers {'scanned' if a.scan else 'unrolled'}, "
          f"logits {'everywhere' if a.full_logits else 'only where the loss is'}; jax {jax.__version__} on "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}; XLA_FLAGS {os.environ.get('XLA_FLAGS') or '(unset)'}")
    result = {}
    for dtype in dtypes:
        cfg = smollm2_config(a, dtype)
        run_ours, (loss_o, norm_o) = ours_step_fn(a, cfg, values, batch)
        run_ref, (loss_r, norm_r), dev = torch_step_fn(a, ref, batch, dtype)
        tol = RTOL[dtype]
        check_close(f"{dtype} first loss", loss_o, loss_r, rtol=tol["loss"])
        check_close(f"{dtype} LoRA gradient norm", norm_o, norm_r, rtol=tol["grad_norm"])
        sys.stdout.flush()
        # the first step above was each side's warm-up (compile, allocations)
        times = time_interleaved({"ours": run_ours, "ref": run_ref}, a.repeats, warmup=0)
        print(ratio_line(f"{dtype} step (PyTorch + PEFT on {dev}, {a.threads or os.cpu_count()} threads)",
                         times["ours"], times["ref"]), flush=True)
        result[dtype] = times
        del run_ours, run_ref  # free this dtype's states and buffers before the next one
        gc.collect()
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    return result


if __name__ == "__main__":
    cli.run_main(main)
