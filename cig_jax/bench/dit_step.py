"""Benchmark: one DiT training step (forward + backward + AdamW), ours (jit, warm) vs diffusers PixArt in torch.

COMMAND: python -m cig_jax.bench.dit_step            # small default: hidden 384, 6 blocks, 32x32x4, batch 8
         python -m cig_jax.bench.dit_step --hidden 1152 --heads 16 --layers 28 --steps 10   # PixArt-XL size
Prints steps/s of each and the ratio ours/torch. Both start from the same weights (the torch model is saved
with `save_pretrained` and loaded through `convert.diffusers.load_pixart`), so their first losses agree.
torch and diffusers come from the [test] extra.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from cig_jax import cli

# torch runs after us in the same process: don't let XLA grab 75% of the GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402


def parse(argv=None):
    p = cli.parser(cli.prog(module="cig_jax.bench.dit_step"), __doc__)
    p.add_argument("--steps", type=int, default=5, help="timed steps per framework (after one warm-up step)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--latent", type=int, default=32, help="latent side (H = W)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cond-len", type=int, default=64)
    p.add_argument("--cond-dim", type=int, default=256)
    p.add_argument("--remat", default="none", help="our remat policy (none, nothing_saveable, dots_saveable, ...)")
    p.add_argument("--attention", default=None, help="our attention_impl: xla or cudnn (GPU flash, bf16/fp16)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                   help="our blocks under lax.scan (--no-scan: a Python loop, what configs/model/demo.yaml runs on "
                        "CPU; at 6 blocks XLA:CPU runs it ~20%% faster: no dynamic slices of the stacked weights)")
    p.add_argument("--dtype", default="float32", help="our compute dtype (torch stays fp32)")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--torch-device", default="cpu", help="cpu or cuda (compare like with like on a GPU box)")
    p.add_argument("--skip-torch", action="store_true")
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
    from cig_jax.convert.diffusers import load_pixart

    model = load_pixart(path, scan_layers=a.scan, remat_policy=a.remat, dtype=a.dtype,
                        attention_impl=a.attention)
    graphdef, params = nnx.split(model, nnx.Param)
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
    params, opt_state, loss0 = compiled(params, opt_state, b)  # warm-up
    loss0 = float(loss0)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        params, opt_state, loss = compiled(params, opt_state, b)
    loss.block_until_ready()
    dt = time.perf_counter() - t0
    n = sum(x.size for x in jax.tree.leaves(params))
    from cig_jax.train.flops import module_flops

    def flops_loss(m, bb):
        pred = m(bb["latents"], bb["timesteps"], bb["cond"])
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - bb["target"])), {}

    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}
    flops = module_flops(lambda: nnx.merge(graphdef, params), nnx.Param, flops_loss, spec)
    jax.tree.map(lambda x: x.delete(), (params, opt_state))  # free device memory for the torch run
    return dict(steps_per_s=a.steps / dt, first_loss=loss0, compile_s=compile_s, params=n, flops=flops)


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

    loss0 = step().item()  # warm-up
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    loss.item()  # waits for the device
    dt = time.perf_counter() - t0
    return dict(steps_per_s=a.steps / dt, first_loss=loss0)


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
    print(f"ours : {ours['steps_per_s']:.3f} steps/s  (compile {ours['compile_s']:.1f}s, first loss "
          f"{ours['first_loss']:.6f}, {ours['params'] / 1e6:.1f}M params, dtype {a.dtype}, remat {a.remat}, attention {a.attention or 'default'}, "
          f"blocks {'scanned' if a.scan else 'unrolled'})")
    from cig_jax.train import trainer
    from cig_jax.train.flops import FORMULA

    fl = ours["flops"]
    achieved = fl.total * ours["steps_per_s"] / 1e12
    peak = trainer.known_peak_tflops()
    print(f"ours : {a.batch * ours['steps_per_s']:.2f} images/s, {achieved:.4g} model TFLOP/s; MFU = images/s x "
          f"FLOPs per image / (devices x peak) = "
          + (f"{achieved / (jax.device_count() * peak) * 100:.1f}% of {peak} TFLOP/s" if peak else "n/a (no known peak)")
          + f"; FLOPs/step {fl.summary()} ({FORMULA})")
    if a.skip_torch:
        return
    theirs = bench_torch(a, ref, batch)
    print(f"torch: {theirs['steps_per_s']:.3f} steps/s  (first loss {theirs['first_loss']:.6f}, "
          f"{a.torch_device}, {a.torch_threads} threads)")
    print(f"ratio ours/torch: {ours['steps_per_s'] / theirs['steps_per_s']:.2f}x")


if __name__ == "__main__":
    cli.run_main(main)
