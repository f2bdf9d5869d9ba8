"""Hugging Face LLaMA / Qwen2 checkpoints <-> our `LLM`.

Owns: the config translation (config.json <-> `LLMConfig`) and the tensor-name mapping of the LLaMA
family in both directions. HF stores Linear weights as [out, in]; ours are [in, out] and stacked on a
leading layers axis.

    model.embed_tokens.weight                     -> embed_tokens.embedding            [vocab, hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.*   -> layers.self_attn.{q,k,v,o}_proj.* [layers, in, out]
    model.layers.{i}.mlp.{gate,up,down}_proj.*    -> layers.mlp.*
    model.layers.{i}.{input,post_attention}_layernorm.weight -> layers.*.scale
    model.norm.weight -> norm.scale ;  lm_head.weight -> lm_head.kernel (absent when tied)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from flax import nnx

from cig_jax.config_model import LLMConfig, RopeScalingConfig
from cig_jax.convert.checkpoint_io import (CheckpointError, fill_state, load_tensors, raise_if_mismatched, read_json,
                                           save_tensors, write_json_atomic)
from cig_jax.models.llm import LLM, merge_lora

SUPPORTED = ("llama", "qwen2", "mistral")
LAYER_LINEARS = [
    ("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
    ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"),
]
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def config_from_hf(hf: dict, *, source: str = "config.json", **overrides) -> LLMConfig:
    """Our LLMConfig from a Hugging Face config dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a LLaMA-family decoder ({SUPPORTED})")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScalingConfig(
            type="llama3", factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type == "linear":
        scaling = RopeScalingConfig(type="linear", factor=float(rope["factor"]))
    elif rope_type not in ("default", None):
        raise CheckpointError(f"{source}: RoPE type {rope_type!r} is not supported (default, linear, llama3)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (silu)")
    qkv_bias = bool(hf.get("attention_bias", model_type == "qwen2"))
    kw = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
        rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 4096),
        qkv_bias=qkv_bias, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    kw.update(overrides)
    return LLMConfig(**kw)


def config_to_hf(cfg: LLMConfig) -> dict:
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": rs.type, "rope_theta": cfg.rope_theta, "factor": rs.factor}
        if rs.type == "llama3":
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position_embeddings)
    hf = {
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim(), "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope, "torch_dtype": "float32",
    }
    if model_type == "llama":
        hf["attention_bias"] = False
        hf["mlp_bias"] = False
        if cfg.rope_scaling is not None:
            hf["rope_scaling"] = rope
    return hf


def hf_to_ours_lazy(tensors, cfg: LLMConfig, *, source: str,
                    drop_layers_past: bool = False) -> dict[tuple, tuple[tuple, Callable[[], np.ndarray]]]:
    """HF tensors -> {our state path: (shape, read)}: nothing is read until `read()` is called, so a loader can
    place one tensor at a time (`tensors`: a dict of arrays, a `checkpoint_io.LazyTensors` or a
    `gguf.GGUFTensors`). The names and the per-layer shapes are checked first: one CheckpointError lists every
    missing and unexpected tensor. `drop_layers_past`: the checkpoint's layers from `cfg.num_layers` on are
    left out (a model keeping its first layers) instead of being unexpected."""
    used: set[str] = set()
    missing: list[str] = []
    shape_of = getattr(tensors, "shape", lambda k: tuple(np.shape(tensors[k])))
    out: dict[tuple, tuple] = {}

    def want(name):
        used.add(name)
        if name not in tensors:
            missing.append(name)
            return False
        return True

    def single(path, name, transpose=False):
        if want(name):
            shape = tuple(shape_of(name))
            out[path] = (shape[::-1] if transpose else shape,
                         (lambda: tensors[name].T) if transpose else (lambda: tensors[name]))

    def stacked(path, names, transpose=False):
        present = [n for n in names if want(n)]
        if len(present) != len(names):
            return
        shapes = {tuple(shape_of(n)) for n in names}
        if len(shapes) > 1:
            raise CheckpointError(f"{source}: layers disagree in shape for {names[0]}...: {sorted(shapes)}")
        shape = shapes.pop()

        def read():
            first = tensors[names[0]]
            first = first.T if transpose else first
            buf = np.empty((len(names),) + first.shape, first.dtype)  # [layers, ...]: the one stacked copy
            buf[0] = first
            for i, n in enumerate(names[1:], 1):
                buf[i] = tensors[n].T if transpose else tensors[n]
            return buf

        out[path] = ((len(names),) + (shape[::-1] if transpose else shape), read)

    single(("embed_tokens", "embedding"), "model.embed_tokens.weight")
    single(("norm", "scale"), "model.norm.weight")
    if not cfg.tie_word_embeddings:
        single(("lm_head", "kernel"), "lm_head.weight", transpose=True)
    elif "lm_head.weight" in tensors:  # some tied checkpoints still store it; it must equal the embedding
        used.add("lm_head.weight")
    L = cfg.num_layers
    for group, name in LAYER_LINEARS:
        stacked(("layers", group, name, "kernel"), [f"model.layers.{i}.{group}.{name}.weight" for i in range(L)],
                transpose=True)
        if cfg.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            stacked(("layers", group, name, "bias"), [f"model.layers.{i}.{group}.{name}.bias" for i in range(L)])
    for norm in _LAYER_NORMS:
        stacked(("layers", norm, "scale"), [f"model.layers.{i}.{norm}.weight" for i in range(L)])
    dropped = lambda k: (drop_layers_past and k.startswith("model.layers.")  # noqa: E731
                         and int(k.split(".")[2]) >= cfg.num_layers)
    extra = sorted(k for k in set(tensors.keys()) - used if not k.endswith("rotary_emb.inv_freq") and not dropped(k))
    raise_if_mismatched(f"{source}: not a checkpoint of this LLM config", missing, [],
                        [f"{k} (no place in the model)" for k in extra])
    return out


def hf_to_ours(tensors: dict[str, np.ndarray], cfg: LLMConfig, *, source: str) -> dict[tuple, np.ndarray]:
    """HF tensor dict -> {our state path: array}. Raises on tensors with no place in the model."""
    return {path: read() for path, (_, read) in hf_to_ours_lazy(tensors, cfg, source=source).items()}


def ours_to_hf(params: dict[tuple, np.ndarray], cfg: LLMConfig) -> dict[str, np.ndarray]:
    """{our state path: array} -> HF tensor dict (the inverse of `hf_to_ours`)."""
    t: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": params[("embed_tokens", "embedding")],
        "model.norm.weight": params[("norm", "scale")],
    }
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = params[("lm_head", "kernel")].T
    for i in range(cfg.num_layers):
        for group, name in LAYER_LINEARS:
            t[f"model.layers.{i}.{group}.{name}.weight"] = params[("layers", group, name, "kernel")][i].T
            if cfg.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
                t[f"model.layers.{i}.{group}.{name}.bias"] = params[("layers", group, name, "bias")][i]
        for norm in _LAYER_NORMS:
            t[f"model.layers.{i}.{norm}.weight"] = params[("layers", norm, "scale")][i]
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in t.items()}


def load_hf_llm(directory: str | Path, **config_overrides) -> LLM:
    """Builds our LLM from a local HF LLaMA/Qwen2 directory (config.json + safetensors, sharded or not).

    `config_overrides` set execution fields (dtype, remat_policy, scan_layers, attention_impl...).
    No random initialisation happens: the model is built abstractly and filled from the checkpoint.
    """
    directory = Path(directory)
    cfg = config_from_hf(read_json(directory / "config.json"), source=str(directory / "config.json"),
                         **config_overrides)
    values = hf_to_ours(load_tensors(directory), cfg, source=str(directory))
    return llm_from_params(cfg, values, source=str(directory))


def llm_from_params(cfg: LLMConfig, values: dict[tuple, np.ndarray], *, source: str) -> LLM:
    abstract = nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, fill_state(state, values, source=source))


def save_hf_llm(model: LLM, directory: str | Path, *, max_shard_bytes: int = 4 << 30) -> None:
    """Exports our LLM as a Hugging Face checkpoint directory (config.json + safetensors); LoRA adapters
    are merged into the base weights first."""
    if model.cfg.lora_rank:
        model = merge_lora(model)
    params = {p: np.asarray(v.value, np.float32) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(ours_to_hf(params, model.cfg), directory, max_shard_bytes=max_shard_bytes)
    write_json_atomic(config_to_hf(model.cfg), directory / "config.json")
