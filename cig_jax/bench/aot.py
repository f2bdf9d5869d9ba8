"""Ahead-of-time compile of the MLLM training step for a device count and mesh that this host need not have.

    python -m cig_jax.bench.aot --config configs/model/seedx_13b.yaml --devices 64 --mesh fsdp=64
    python -m cig_jax.bench.aot --config configs/model/seedx_13b.yaml --devices 64 --mesh fsdp=16,tensor=4

With --devices N the run simulates N CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set
before jax is imported); without it, the real devices are used. The step (MLLM loss -> grads of the trainable
parameters -> AdamW, frozen ViT passed as a separate argument) is traced against abstract arrays only
(`nnx.eval_shape` + `jax.ShapeDtypeStruct`s carrying the NamedShardings of `cig_jax.sharding.state_shardings`):
no weight is ever allocated. It is lowered and compiled, and the per-device memory XLA reports is printed
(`trainer.print_memory`), with the compile time. Default batch: seq 1024 tokens and 2 images per sequence,
1 sequence per batch shard (global batch = per-device batch x data x fsdp).

Owns: nothing the trainer uses; it reuses the trainer's optimizer, step and memory print.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_mesh(spec: str) -> dict:
    """'fsdp=16,tensor=4' -> {'data': 1, 'fsdp': 16, 'tensor': 4} (axes not named are 1)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
            raise SystemExit(f"--mesh: expected axis=size over {sorted(sizes)}, got {part!r}")
        sizes[name.strip()] = int(value)
    return sizes


def abstract_batch(cfg, mesh, rules, *, global_batch: int, seq: int, images: int):
    """ShapeDtypeStructs (with batch shardings) of an MLLM training batch."""
    import jax
    import jax.numpy as jnp

    from cig_jax import sharding

    v = cfg.model.vit
    shapes = {k: ((global_batch, seq), jnp.int32) for k in ("input_ids", "role", "image_index", "loss_mask",
                                                              "attention_mask")}
    shapes["images"] = ((global_batch, images, v.image_size, v.image_size, v.num_channels), jnp.float32)
    out = {}
    for k, (shape, dtype) in shapes.items():
        names = ("batch",) + (None,) * (len(shape) - 1)
        out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.logical_sharding(names, mesh, rules, shape))
    return out


def compile_train_step(cfg, mesh, *, seq: int = 1024, images: int = 2, per_device_batch: int = 1,
                       verbose: bool = True) -> dict:
    """Lowers and compiles the MLLM training step for `cfg` on `mesh` from abstract arrays. Returns a report:
    memory stats (bytes), compile seconds, parameter counts, global batch."""
    import jax
    import optax
    from flax import nnx

    from cig_jax import sharding
    from cig_jax.models.mllm import MLLM, TRAINABLE, mllm_loss
    from cig_jax.sharding import activation_sharding
    from cig_jax.train import trainer

    rules = cfg.mesh.axis_rules
    abstract = nnx.eval_shape(lambda: MLLM(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = nnx.split(abstract, TRAINABLE, ...)

    def with_shardings(state):
        shard = sharding.state_shardings(state, mesh, rules)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shard)

    params, frozen = with_shardings(params), with_shardings(frozen)
    count = lambda s: sum(x.size for x in jax.tree.leaves(s))  # noqa: E731
    tx = trainer.make_optimizer(cfg.optimizer, 1000)
    # Optimizer moments take their parameter's sharding; counters are replicated. (Not the compiled
    # output shardings of `tx.init`: XLA leaves zeros that depend on no input replicated.)
    opt = jax.eval_shape(tx.init, params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt, param_shardings,
                                          transform_non_params=lambda _: sharding.replicated(mesh))
    shardings = trainer.TrainState(param_shardings, opt_shardings, sharding.replicated(mesh))
    opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt, opt_shardings)
    state = trainer.TrainState(params, opt, jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=shardings.step))
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = abstract_batch(cfg, mesh, rules, global_batch=per_device_batch * batch_shards, seq=seq, images=images)

    def step(state, frozen, batch):  # the frozen ViT is an argument, not a constant baked into the program
        with activation_sharding(mesh, rules):
            return trainer.make_train_step(graphdef, frozen, tx, mllm_loss)(state, batch)

    jitted = jax.jit(step, in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, frozen),
                                         jax.tree.map(lambda x: x.sharding, batch)),
                     out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = jitted.lower(state, frozen, batch)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower
    stats = trainer.print_memory(compiled) if verbose else {}
    return dict(compiled=compiled, memory=stats, lower_s=t_lower, compile_s=t_compile, trainable_params=count(params),
                frozen_params=count(frozen), global_batch=per_device_batch * batch_shards, mesh=dict(mesh.shape))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], help="dotted override, e.g. model.llm.num_layers=2")
    ap.add_argument("--devices", type=int, default=0, help="simulate this many CPU devices (0: real devices)")
    ap.add_argument("--mesh", default="fsdp=-1", help="e.g. fsdp=64 or fsdp=16,tensor=4 (unnamed axes are 1)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--images", type=int, default=2, help="images per sequence")
    ap.add_argument("--per-device-batch", type=int, default=1, help="sequences per batch shard")
    args = ap.parse_args(argv)
    if args.devices:
        if "jax" in sys.modules:
            raise SystemExit("--devices must be set before jax is imported (run as python -m cig_jax.bench.aot)")
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
        os.environ["JAX_PLATFORMS"] = "cpu"

    import dataclasses

    import jax

    from cig_jax import sharding
    from cig_jax.config import load_config

    cfg = load_config(args.config, args.set)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **parse_mesh(args.mesh)))
    mesh = sharding.make_mesh(cfg.mesh)
    m, llm = cfg.model, cfg.model.llm
    print(f"[aot] {args.config}: LLM {llm.num_layers} x {llm.hidden_size}, ViT {m.vit.num_layers} x "
          f"{m.vit.hidden_size}, {m.mllm.num_image_tokens} image tokens; mesh {dict(mesh.shape)} over "
          f"{jax.device_count()} {jax.devices()[0].platform} devices; seq {args.seq}, {args.images} images/seq",
          flush=True)
    report = compile_train_step(cfg, mesh, seq=args.seq, images=args.images, per_device_batch=args.per_device_batch)
    print(f"[aot] trainable {report['trainable_params'] / 1e6:,.1f}M, frozen {report['frozen_params'] / 1e6:,.1f}M "
          f"parameters; global batch {report['global_batch']}; lowered in {report['lower_s']:.1f}s, compiled in "
          f"{report['compile_s']:.1f}s")
    return report


if __name__ == "__main__":
    main()
