"""Ahead-of-time compile of a stage's training step for a device count and mesh that this host need not have.

    python -m cig_jax.bench.aot --config configs/model/seedx_13b.yaml --devices 64 --mesh fsdp=64
    python -m cig_jax.bench.aot --config configs/model/seedx_13b.yaml --devices 64 --mesh fsdp=16,tensor=4
    python -m cig_jax.bench.aot --config configs/stage3_multiround_13b.yaml --devices 256
    python -m cig_jax.bench.aot --config configs/stage3_multiround_13b.yaml --topology v5p:4x8x8 --attention splash

With --topology (pip install -e '.[tpu]'), the step is compiled by libtpu's compiler for that TPU slice
(`jax.experimental.topologies.get_topology_desc`: TPU devices without TPUs, as MaxText's train_compile.py
does), and the per-chip memory is printed against the chip's HBM with the compiled FLOPs per step.

With --devices N the run simulates N CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set
before jax is imported); without it, the real devices are used. The step (the stage's loss -> grads of the
trainable parameters -> AdamW, frozen parts (ViT, DiT, VAE) passed as an argument) is traced against abstract arrays only
(`nnx.eval_shape` + `jax.ShapeDtypeStruct`s carrying the NamedShardings of `cig_jax.sharding.state_shardings`):
no weight is ever allocated. It is lowered and compiled, and the per-device memory XLA reports is printed
(`trainer.print_memory`), with the compile time. Batch: the config's data.seq_len and data.max_images (a model config without a data
section: seq 1024, 2 images), 1 sequence per batch shard (global batch = per-device batch x data x fsdp).

Owns: the command line (device simulation, TPU topology, mesh / sequence / attention overrides, the per-chip
report); the compile itself is `cig_jax.train.compile.compile_train_step`, which `train.py --dry-run` runs too.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from cig_jax import cli


def parse_mesh(spec: str) -> dict:
    """'fsdp=16,tensor=4' -> {'data': 1, 'fsdp': 16, 'tensor': 4} (axes not named are 1)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
            raise SystemExit(f"--mesh: expected axis=size over {sorted(sizes)}, got {part!r}")
        sizes[name.strip()] = int(value)
    return sizes


def main(argv=None) -> dict:
    ap = cli.parser(cli.prog(module="cig_jax.bench.aot"), __doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a stage or model config (a model config compiles the MLLM step)")
    cli.add_overrides(ap)
    ap.add_argument("--devices", type=int, default=0, help="simulate this many CPU devices (0: real devices)")
    ap.add_argument("--mesh", default=None, help="e.g. fsdp=64 or fsdp=16,tensor=4 (unnamed axes are 1); "
                    "default: the config's mesh")
    ap.add_argument("--stage", default=None, help="stage to compile (default: the config's train.stage; a config "
                    "naming none, e.g. a model config, compiles stage 'personalize', the MLLM step)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: data.seq_len, or 1024)")
    ap.add_argument("--images", type=int, default=None, help="images per sequence (default: data.max_images, or 2)")
    ap.add_argument("--per-device-batch", type=int, default=1, help="sequences per batch shard")
    ap.add_argument("--topology", default=None, help="compile for a TPU slice with libtpu's compiler, e.g. "
                    "v5p:4x8x8 or v6e:16x16 (its chips take the config's mesh or --mesh)")
    ap.add_argument("--attention", default=None, help="attention_impl of the LLM, ViT and DiT (e.g. splash)")
    ap.add_argument("--remat", default=None, help="remat_policy of the LLM, ViT and DiT")
    args = ap.parse_args(argv)
    if args.topology and args.devices:
        raise SystemExit("--topology and --devices exclude each other")
    if args.topology:  # compiling only (no chip is opened): other libtpu processes on this host may run too
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if args.devices:
        if "jax" in sys.modules:
            raise SystemExit("--devices must be set before jax is imported (run as python -m cig_jax.bench.aot)")
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
        os.environ["JAX_PLATFORMS"] = "cpu"

    # jax (and all that imports it) only now: the simulated device count above must be set first
    from cig_jax import sharding
    from cig_jax.config_io import load_config, load_yaml_tree
    from cig_jax.train.compile import compile_train_step

    execution = [f"model.{part}.{field}={value}" for field, value in (("attention_impl", args.attention),
                                                                       ("remat_policy", args.remat)) if value
                 for part in ("llm", "vit", "dit")]
    cfg = load_config(args.config, [*execution, *args.overrides])
    tree = load_yaml_tree(args.config)
    stage = args.stage or (cfg.train.stage if "stage" in tree.get("train", {}) else "personalize")
    data = cfg.data
    seq = args.seq or (data.seq_len if "seq_len" in tree.get("data", {}) else 1024)
    images = args.images or (data.max_images if "max_images" in tree.get("data", {}) else 2)
    mesh_sizes = parse_mesh(args.mesh) if args.mesh else {}
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **mesh_sizes),
                              train=dataclasses.replace(cfg.train, stage=stage),
                              data=dataclasses.replace(data, seq_len=seq, max_images=images))
    devices = tpu_devices(args.topology) if args.topology else None
    mesh = sharding.make_mesh(cfg.mesh, devices)
    m, llm = cfg.model, cfg.model.llm
    print(f"[aot] {args.config}: stage {stage!r}; LLM {llm.num_layers} x {llm.hidden_size}, ViT {m.vit.num_layers} x "
          f"{m.vit.hidden_size}, {m.mllm.num_image_tokens} image tokens, DiT {m.dit.num_layers} x {m.dit.inner_dim()}"
          f" (detokenizer loss weight {cfg.train.detokenizer_loss_weight}); mesh {dict(mesh.shape)} over "
          f"{mesh.devices.size} {mesh.devices.flat[0].platform} devices; seq {seq}, {images} images/seq", flush=True)
    report = compile_train_step(cfg, mesh, per_device_batch=args.per_device_batch)
    print(f"[aot] trainable {report['trainable_params'] / 1e6:,.1f}M, frozen {report['frozen_params'] / 1e6:,.1f}M "
          f"parameters; global batch {report['global_batch']}; lowered and compiled in "
          f"{report['compile_s']:.1f}s")
    if args.topology:
        report.update(chip_report(report, devices[0].device_kind, seq))
    return report


# HBM per chip (GiB) by device kind, vendor figures.
HBM_GIB = {"TPU v5": 95.0, "TPU v5p": 95.0, "TPU v5 lite": 16.0, "TPU v5e": 16.0, "TPU v6 lite": 32.0,
           "TPU v6e": 32.0, "TPU v4": 32.0, "TPU7x": 192.0}  # 'TPU v5' is how jax names a v5p chip


def tpu_devices(topology: str):
    """The devices of TPU slice `topology` (e.g. 'v5p:4x8x8'), compiled for by libtpu on this host."""
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # noqa: BLE001 (libtpu missing, or a topology it does not know)
        raise SystemExit(f"--topology {topology}: no TPU compiler for it ({type(e).__name__}: {str(e)[:300]}); "
                         "pip install -e '.[tpu]' (libtpu) and name a slice as <chip>:<shape>, e.g. v5p:4x4x4")


def chip_report(report: dict, kind: str, seq: int) -> dict:
    """Per-chip memory against the chip's HBM and compiled FLOPs per step, printed and returned."""
    mem = report["memory"]
    hbm = next((HBM_GIB[k] for k in sorted(HBM_GIB, key=len, reverse=True) if k.lower() in kind.lower()), None)
    cost = report["compiled"].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    total = mem.get("total_bytes", 0) / 2**30
    try:  # splash attention compiles to these
        kernels = report["compiled"].as_text().count("tpu_custom_call")
    except Exception as e:  # noqa: BLE001 (libtpu cannot always print a large program's HLO: async-op RET_CHECK)
        kernels = f"n/a (the compiled HLO could not be printed: {str(e)[:80]})"
    fits = "" if hbm is None else f" of {hbm:.0f} GiB HBM ({total / hbm * 100:.0f}%{'' if total < hbm else ', DOES NOT FIT'})"
    print(f"[aot] {kind}: per chip arguments {mem.get('argument_size_in_bytes', 0) / 2**30:.2f} GiB, temps "
          f"{mem.get('temp_size_in_bytes', 0) / 2**30:.2f} GiB, total {total:.2f} GiB{fits}; compiled FLOPs per step "
          f"per chip {flops:.3e}; tokens per step {report['global_batch'] * seq:,}; Pallas (Mosaic) kernels in the "
          f"program: {kernels}", flush=True)
    return dict(device_kind=kind, hbm_gib=hbm, total_gib=total, flops_per_chip=flops, pallas_kernels=kernels,
                tokens_per_step=report["global_batch"] * seq)


if __name__ == "__main__":
    cli.run_main(main)
