"""Benchmark: one DiT training step (forward + backward + AdamW), ours (jit, warm) vs diffusers PixArt in torch.

COMMAND: python -m cig_jax.bench.dit_step            # small default: hidden 384, 6 blocks, 32x32x4, batch 8
         python -m cig_jax.bench.dit_step --hidden 1152 --heads 16 --layers 28 --steps 10   # PixArt-XL size
Both start from the same weights (the torch model is saved with `save_pretrained` and loaded through
`convert.diffusers.load_pixart`) and the same batch; their first losses must agree (relative 1e-4 in fp32, 2e-2
with our --dtype bfloat16) or the command exits 1 (`CIG_BENCH_PERTURB=0.1` perturbs one of our weights: it must
exit 1). Then the sides alternate, one step each per repeat (--steps repeats); prints steps/s of each (medians)
and the speed ratio ours / torch as median (min, max). torch runs on --torch-device (the line says which, beside
our JAX platform). torch and diffusers come from the [test] extra.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from cig_jax import cli
from cig_jax.bench.common import check_close, perturbation, ratio_line, time_interleaved

# torch runs after us in the same process: don't let XLA grab 75% of the GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from cig_jax.convert.diffusers import load_pixart  # noqa: E402
from cig_jax.train import trainer  # noqa: E402
from cig_jax.train.flops import FORMULA, module_flops  # noqa: E402


def parse(argv=None):
    p = cli.parser(cli.prog(module="cig_jax.bench.dit_step"), __doc__)
    p.add_argument("--steps", type=int, default=5, help="timed steps (repeats) per framework, after one warm-up step")
    p.add_argument("--hidden", type=int, default=384, help="hidden width")
    p.add_argument("--heads", type=int, default=6, help="attention heads")
    p.add_argument("--layers", type=int, default=6, help="transformer layers")
    p.add_argument("--latent", type=int, default=32, help="latent side (H = W)")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    p.add_argument("--patch", type=int, default=2, help="patch size")
    p.add_argument("--batch", type=int, default=8, help="examples per step")
    p.add_argument("--cond-len", type=int, default=64, help="condition tokens per example")
    p.add_argument("--cond-dim", type=int, default=256, help="condition width")
    p.add_argument("--remat", default="none", help="our remat policy (none, nothing_saveable, dots_saveable, ...)")
    p.add_argument("--attention", default=None, help="our attention_impl: xla or cudnn (GPU flash, bf16/fp16)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                   help="our blocks under lax.scan (--no-scan: a Python loop, what configs/model/demo.yaml runs on "
                        "CPU; at 6 blocks XLA:CPU runs it ~20%% faster: no dynamic slices of the stacked weights)")
    p.add_argument("--dtype", default="float32", help="our compute dtype (torch stays fp32)")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="PyTorch threads")
    p.add_argument("--torch-device", default="cpu", help="cpu or cuda (compare like with like on a GPU box)")
    p.add_argument("--skip-torch", action="store_true", help="time ours only (no reference, no equality check)")
    return p.parse_args(argv)


def make_batch(a, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(
        latents=f(a.batch, a.latent, a.latent, a.channels),  # NHWC
        target=f(a.batch, a.latent, a.latent, a.channels),
        timesteps=rng.integers(0, 1000, a.batch).astype(np.float32),
        cond=f(a.batch, a.cond_len, a.cond_dim),
    )


def torch_model(a):
    torch = cli.require("torch", "test", "the diffusers reference of bench.dit_step (or --skip-torch)")
    diffusers = cli.require("diffusers", "test", "the diffusers reference of bench.dit_step (or --skip-torch)")

    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=a.heads, attention_head_dim=a.hidden // a.heads, in_channels=a.channels,
        out_channels=a.channels, num_layers=a.layers, cross_attention_dim=a.hidden, caption_channels=a.cond_dim,
        sample_size=a.latent, patch_size=a.patch, use_additional_conditions=False,
    )


def bench_ours(a, path, batch):
    model = load_pixart(path, scan_layers=a.scan, remat_policy=a.remat, dtype=a.dtype,
                        attention_impl=a.attention)
    graphdef, params = nnx.split(model, nnx.Param)
    path, first = nnx.to_flat_state(params)[0]  # the counterfactual: one weight of ours (0 unless set)
    first[...] = first[...] + perturbation()
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = tx.init(params)

    def step(params, opt_state, b):
        def loss_fn(p):
            pred = nnx.merge(graphdef, p)(b["latents"], b["timesteps"], b["cond"])
            return jnp.mean(jnp.square(pred.astype(jnp.float32) - b["target"]))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    b = {k: jnp.asarray(v) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, b).compile()
    compile_s = time.perf_counter() - t0
    holder = {"p": params, "o": opt_state}

    def run():
        holder["p"], holder["o"], loss = compiled(holder["p"], holder["o"], b)
        return float(loss)  # waits for the device

    loss0 = run()  # the warm-up
    n = sum(x.size for x in jax.tree.leaves(params))

    def flops_loss(m, bb):
        pred = m(bb["latents"], bb["timesteps"], bb["cond"])
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - bb["target"])), {}

    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}
    flops = module_flops(lambda: nnx.merge(graphdef, holder["p"]), nnx.Param, flops_loss, spec)
    return dict(run=run, first_loss=loss0, compile_s=compile_s, params=n, flops=flops)


def bench_torch(a, model, batch):
    import torch

    torch.set_num_threads(a.torch_threads)
    dev = torch.device(a.torch_device)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    b = {k: torch.from_numpy(v).to(dev) for k, v in batch.items()}
    latents = b["latents"].permute(0, 3, 1, 2).contiguous()
    target = b["target"].permute(0, 3, 1, 2).contiguous()

    def step():
        opt.zero_grad(set_to_none=True)
        pred = model(latents, encoder_hidden_states=b["cond"], timestep=b["timesteps"]).sample
        loss = torch.mean((pred - target) ** 2)
        loss.backward()
        opt.step()
        return loss

    def run():
        return step().item()  # waits for the device

    return dict(run=run, first_loss=run())  # the first step is the warm-up


def main(argv=None):
    a = parse(argv)
    batch = make_batch(a)
    ref = torch_model(a)
    print(f"DiT step bench: hidden {a.hidden}, heads {a.heads}, layers {a.layers}, latents {a.batch}x{a.latent}x"
          f"{a.latent}x{a.channels}, patch {a.patch}, cond {a.cond_len}x{a.cond_dim}, steps {a.steps}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}")
    print(f"XLA flags: this benchmark sets none; XLA_FLAGS in effect: {os.environ.get('XLA_FLAGS', '') or '(unset)'}")
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = bench_ours(a, d, batch)
    theirs = None if a.skip_torch else bench_torch(a, ref, batch)
    if theirs is not None:
        check_close(f"first-step loss (ours {a.dtype}, diffusers fp32 on {a.torch_device}, same weights and batch)",
                    ours["first_loss"], theirs["first_loss"], rtol=1e-4 if a.dtype == "float32" else 2e-2)
    sides = {"ours": ours["run"]} if theirs is None else {"ours": ours["run"], "torch": theirs["run"]}
    times = time_interleaved(sides, a.steps, warmup=0)
    ours["steps_per_s"] = 1.0 / statistics.median(times["ours"])
    print(f"ours : {ours['steps_per_s']:.3f} steps/s (median of {a.steps}; compile {ours['compile_s']:.1f}s, first "
          f"loss {ours['first_loss']:.6f}, {ours['params'] / 1e6:.1f}M params, dtype {a.dtype}, remat {a.remat}, "
          f"attention {a.attention or 'default'}, blocks {'scanned' if a.scan else 'unrolled'})")

    fl = ours["flops"]
    achieved = fl.total * ours["steps_per_s"] / 1e12
    peak = trainer.known_peak_tflops()
    print(f"ours : {a.batch * ours['steps_per_s']:.2f} images/s, {achieved:.4g} model TFLOP/s; MFU = images/s x "
          f"FLOPs per image / (devices x peak) = "
          + (f"{achieved / (jax.device_count() * peak) * 100:.1f}% of {peak} TFLOP/s" if peak else "n/a (no known peak)")
          + f"; FLOPs/step {fl.summary()} ({FORMULA})")
    if theirs is None:
        return
    print(f"torch: {1.0 / statistics.median(times['torch']):.3f} steps/s (median of {a.steps}; first loss "
          f"{theirs['first_loss']:.6f}, {a.torch_device}, {a.torch_threads} threads)")
    print(ratio_line(f"DiT step (diffusers on {a.torch_device}, ours on {jax.devices()[0].platform})", times["ours"],
                     times["torch"]))


if __name__ == "__main__":
    cli.run_main(main)
