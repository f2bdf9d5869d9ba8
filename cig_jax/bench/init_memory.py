"""Peak host memory of importing a Hugging Face LLaMA checkpoint onto a mesh (`init_weights.llm`'s loader).

    python -m cig_jax.bench.init_memory                       # ~1B parameters, 8 simulated CPU devices
    python -m cig_jax.bench.init_memory --checkpoint DIR      # a real local HF LLaMA folder instead

Writes (in a child process, so its memory is not counted) a random ~1B-parameter LLaMA checkpoint in the HF
layout as sharded safetensors, then loads it with `cig_jax.convert.init.load_abstract` onto an fsdp mesh of
N simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax is imported): no
random initialisation, one tensor read at a time and put straight into its shards. Reports the process's
baseline RSS (after imports, mesh and abstract model), its peak RSS (getrusage), the loaded parameters' own
bytes, the largest single tensor (in our layout: a [layers, in, out] stack), the bound
`baseline + params + 2 x largest` (what "no second full copy of the model" allows) and the import time. On
CPU devices the parameters themselves live in host memory, so they are part of the peak. Exit status 1 when
the peak exceeds the bound. It also checks a few loaded values against the files and that the big tensors are
split over the devices.

Owns: nothing the trainer uses.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cig_jax import cli

SIZES = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_layers=16, num_heads=16, num_kv_heads=16)


def write_checkpoint(out: str, sizes: dict, layers_per_shard: int = 2) -> None:
    """A random LLaMA checkpoint (fp32) in the HF layout, `layers_per_shard` decoder layers per safetensors file
    (so the writer never holds more than that)."""
    import numpy as np
    from safetensors.numpy import save_file

    from cig_jax.config_model import LLMConfig
    from cig_jax.convert.hf_llm import config_to_hf

    cfg = LLMConfig(**sizes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    d, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.resolved_head_dim()
    draw = lambda *s: (rng.standard_normal(s, dtype=np.float32) * 0.02)  # noqa: E731
    shards = [{"model.embed_tokens.weight": draw(v, d), "model.norm.weight": 1 + draw(d), "lm_head.weight": draw(v, d)}]
    for i in range(cfg.num_layers):
        if i % layers_per_shard == 0:
            shards.append({})
        p = f"model.layers.{i}."
        shards[-1].update({
            p + "self_attn.q_proj.weight": draw(cfg.num_heads * hd, d), p + "self_attn.k_proj.weight": draw(cfg.num_kv_heads * hd, d),
            p + "self_attn.v_proj.weight": draw(cfg.num_kv_heads * hd, d), p + "self_attn.o_proj.weight": draw(d, cfg.num_heads * hd),
            p + "mlp.gate_proj.weight": draw(f, d), p + "mlp.up_proj.weight": draw(f, d), p + "mlp.down_proj.weight": draw(d, f),
            p + "input_layernorm.weight": 1 + draw(d), p + "post_attention_layernorm.weight": 1 + draw(d)})
    weight_map = {}
    for j, shard in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shards[j] = None
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg)))


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(checkpoint: str) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from cig_jax.config import Config, InitWeightsConfig, MeshConfig
    from cig_jax.config_model import ModelConfig
    from cig_jax.convert.checkpoint_io import lazy_tensors, read_json
    from cig_jax.convert.hf_llm import config_from_hf
    from cig_jax.convert.init import load_abstract
    from cig_jax.models.llm import LLM
    from cig_jax.sharding import make_mesh
    from cig_jax.train.state import sharded_abstract

    llm = config_from_hf(read_json(Path(checkpoint) / "config.json"))
    mesh_cfg = MeshConfig(data=1, fsdp=-1, tensor=1)
    cfg = Config(model=ModelConfig(llm=llm), mesh=mesh_cfg, init_weights=InitWeightsConfig(llm=checkpoint))
    mesh = make_mesh(mesh_cfg)
    abstract = sharded_abstract(nnx.split(nnx.eval_shape(lambda: LLM(llm, rngs=nnx.Rngs(0))))[1], mesh,
                                mesh_cfg.axis_rules)
    sizes = [int(np.prod(v.value.shape)) * np.dtype(v.value.dtype).itemsize for _, v in nnx.to_flat_state(abstract)]
    baseline = rss_now()
    t0 = time.perf_counter()
    state = load_abstract(abstract, "llm", checkpoint, cfg, say=lambda *a, **k: None)
    jax.block_until_ready(jax.tree.leaves(state))
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    # what was loaded is the files' content, split over the devices
    flat = dict(nnx.to_flat_state(state))
    files = lazy_tensors(checkpoint)
    q = flat[("layers", "self_attn", "q_proj", "kernel")].value  # [layers, in, out]
    last = llm.num_layers - 1
    np.testing.assert_array_equal(np.asarray(q[last, :8, :8]),
                                  files[f"model.layers.{last}.self_attn.q_proj.weight"][:8, :8].T)
    emb = flat[("embed_tokens", "embedding")].value
    np.testing.assert_array_equal(np.asarray(emb[-3:]), files["model.embed_tokens.weight"][-3:])
    shard_bytes = max(s.data.nbytes for s in q.addressable_shards)
    return dict(devices=jax.device_count(), params=int(sum(int(np.prod(v.value.shape)) for v in flat.values())),
                params_bytes=sum(sizes), largest_bytes=max(sizes), baseline_bytes=baseline, peak_bytes=peak,
                bound_bytes=baseline + sum(sizes) + 2 * max(sizes), import_s=seconds,
                q_proj_shard_fraction=shard_bytes / q.nbytes)


def main(argv=None) -> dict:
    ap = cli.parser(cli.prog(module="cig_jax.bench.init_memory"), __doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a local HF LLaMA folder (default: write a random ~1B one)")
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    ap.add_argument("--keep", default=None, help="write the random checkpoint here and keep it")
    args = ap.parse_args(argv)
    if "jax" in sys.modules:
        raise SystemExit("run as python -m cig_jax.bench.init_memory: the device count is set before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    tmp = None
    checkpoint = args.checkpoint
    if checkpoint is None:
        tmp = tempfile.TemporaryDirectory(prefix="init_memory_")
        checkpoint = args.keep or str(Path(tmp.name) / "llama")
        t0 = time.perf_counter()
        code = (f"from cig_jax.bench.init_memory import write_checkpoint; write_checkpoint({checkpoint!r}, "
                f"{SIZES!r})")
        subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        print(f"[init_memory] wrote a random LLaMA checkpoint {SIZES} in {time.perf_counter() - t0:.0f}s", flush=True)
    t0 = time.perf_counter()
    r = measure(checkpoint)
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"[init_memory] {r['params'] / 1e9:.2f}B parameters onto {r['devices']} devices in {r['import_s']:.1f}s "
          f"(process total {time.perf_counter() - t0:.0f}s); each q_proj shard holds "
          f"{r['q_proj_shard_fraction']:.3f} of it")
    print(f"[init_memory] peak RSS {gib(r['peak_bytes'])}; bound {gib(r['bound_bytes'])} = baseline "
          f"{gib(r['baseline_bytes'])} + params {gib(r['params_bytes'])} + 2 x largest tensor "
          f"{gib(r['largest_bytes'])}; peak over baseline + params: {gib(r['peak_bytes'] - r['baseline_bytes'] - r['params_bytes'])}")
    ok = r["peak_bytes"] <= r["bound_bytes"]
    print(f"[init_memory] {'OK' if ok else 'OVER THE BOUND'}", flush=True)
    if tmp is not None and not args.keep:
        tmp.cleanup()
    if not ok:
        raise SystemExit(1)
    return r


if __name__ == "__main__":
    cli.run_main(main)
