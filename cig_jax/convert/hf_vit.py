"""Hugging Face CLIP / SigLIP vision towers -> `cig_jax.models.vit.VisionTransformer`.

Owns: reading a transformers `CLIPVisionModel` / `SiglipVisionModel` directory (config.json + safetensors,
single or sharded with an index; a full `CLIPModel` / `SiglipModel` checkpoint works too, its text tower is
skipped), building our `ViTConfig` from theirs, and the tensor-name mapping. Errors list every missing,
unexpected or mis-shaped tensor at once.

Does not own: file reading and state filling (`checkpoint_io`), the Qwen-VL ViT of SEED-X (`seedx.py`).
"""
from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Optional

import numpy as np
from flax import nnx

from cig_jax.config_model import ViTConfig
from cig_jax.convert.checkpoint_io import CheckpointError, fill_state, load_tensors, read_json
from cig_jax.models.vit import VisionTransformer

# transformers' defaults: `save_pretrained` may omit values equal to them.
_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, vision_use_head=True),
}
ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_MODEL_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}


def vit_config_from_hf(hf: dict, **overrides) -> tuple[str, ViTConfig]:
    """(family, ViTConfig) from a CLIP/SigLIP config.json mapping (vision or full model config)."""
    model_type = hf.get("model_type", "")
    family = _MODEL_TYPES.get(model_type)
    if family is None:
        raise CheckpointError(f"config.json model_type {model_type!r} is not a CLIP or SigLIP vision model "
                              f"(expected one of {sorted(_MODEL_TYPES)})")
    if model_type in ("clip", "siglip"):
        hf = hf.get("vision_config") or {}
    v = {**_DEFAULTS[family], **hf}
    act = ACTS.get(v["hidden_act"])
    if act is None:
        raise CheckpointError(f"hidden_act {v['hidden_act']!r} is not supported (known: {sorted(ACTS)})")
    common = dict(
        image_size=v["image_size"], patch_size=v["patch_size"], num_channels=v["num_channels"],
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"], hidden_act=act,
        layer_norm_eps=float(v["layer_norm_eps"]), pos_grid_size=None, pos_interpolation="bicubic", attn_pool=None,
    )
    if family == "clip":
        cfg = ViTConfig(**common, class_token=True, patch_bias=False, pre_norm=True, post_norm="pooled", pool="cls")
    else:
        cfg = ViTConfig(**common, class_token=False, patch_bias=True, pre_norm=False, post_norm="hidden",
                        pool="map" if v.get("vision_use_head", True) else "none")
    return family, dataclasses.replace(cfg, **overrides)


def _linear(out: dict, dst: tuple, t: dict, src: str, used: set) -> None:
    """torch Linear `src`.weight [out, in] (+ bias) -> our `dst`.kernel [in, out] (+ bias)."""
    out[dst + ("kernel",)] = t[src + ".weight"].T
    used.add(src + ".weight")
    if src + ".bias" in t:
        out[dst + ("bias",)] = t[src + ".bias"]
        used.add(src + ".bias")


def _norm(out: dict, dst: tuple, t: dict, src: str, used: set) -> None:
    out[dst + ("scale",)] = t[src + ".weight"]
    out[dst + ("bias",)] = t[src + ".bias"]
    used.update({src + ".weight", src + ".bias"})


def _find_prefix(tensors: dict, source: str) -> str:
    for prefix in ("", "vision_model.", "model.vision_model.", "vision_tower."):
        if prefix + "embeddings.patch_embedding.weight" in tensors:
            return prefix
    raise CheckpointError(f"{source}: no '[vision_model.]embeddings.patch_embedding.weight' tensor; "
                          f"is this a CLIP/SigLIP vision checkpoint? First names: {sorted(tensors)[:8]}")


def hf_vit_tensors(tensors: dict[str, np.ndarray], cfg: ViTConfig,
                   source: str = "<tensors>") -> dict[tuple, np.ndarray]:
    """Maps CLIP/SigLIP vision tensors onto our state paths. Raises listing tensors with no place in the model."""
    pre = _find_prefix(tensors, source)
    t = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
    # Other towers of a full CLIPModel/SiglipModel (text, projections, logit scale) are not ours to map.
    if pre == "":
        t = {k: v for k, v in t.items() if not k.startswith(("text_model.", "visual_projection", "text_projection",
                                                             "logit_scale", "logit_bias"))}
    out: dict[tuple, np.ndarray] = {}
    used: set = set()
    get = lambda name: (used.add(name), t[name])[1]  # noqa: E731
    try:
        out[("patch_kernel",)] = get("embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)  # [p, p, C, D]
        if "embeddings.patch_embedding.bias" in t:
            out[("patch_bias",)] = get("embeddings.patch_embedding.bias")
        if "embeddings.class_embedding" in t:
            out[("class_token",)] = get("embeddings.class_embedding")
        out[("pos_embed",)] = get("embeddings.position_embedding.weight")
        if "pre_layrnorm.weight" in t:
            _norm(out, ("ln_pre",), t, "pre_layrnorm", used)
        if "post_layernorm.weight" in t:
            _norm(out, ("ln_post",), t, "post_layernorm", used)
        per_layer: dict[tuple, list] = {}
        for i in range(cfg.num_layers):
            layer: dict[tuple, np.ndarray] = {}
            src = f"encoder.layers.{i}"
            if src + ".layer_norm1.weight" not in t:
                raise CheckpointError(f"{source}: config says {cfg.num_layers} layers but '{pre}{src}.*' is missing")
            _norm(layer, ("ln_1",), t, src + ".layer_norm1", used)
            _norm(layer, ("ln_2",), t, src + ".layer_norm2", used)
            for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                _linear(layer, ("attn", ours), t, f"{src}.self_attn.{theirs}", used)
            _linear(layer, ("mlp", "fc1"), t, src + ".mlp.fc1", used)
            _linear(layer, ("mlp", "fc2"), t, src + ".mlp.fc2", used)
            for k, v in layer.items():
                per_layer.setdefault(k, []).append(v)
        for k, vs in per_layer.items():
            out[("blocks",) + k] = np.stack(vs)  # [layers, ...]
        if "head.probe" in t:
            out[("head", "probe")] = get("head.probe").reshape(1, -1)
            w, b = get("head.attention.in_proj_weight"), get("head.attention.in_proj_bias")  # [3D, D], [3D]
            d = w.shape[1]
            for j, name in enumerate(("q", "k", "v")):
                out[("head", "attention", name, "kernel")] = w[j * d:(j + 1) * d].T
                out[("head", "attention", name, "bias")] = b[j * d:(j + 1) * d]
            _linear(out, ("head", "attention", "o"), t, "head.attention.out_proj", used)
            _norm(out, ("head", "layernorm"), t, "head.layernorm", used)
            _linear(out, ("head", "mlp", "fc1"), t, "head.mlp.fc1", used)
            _linear(out, ("head", "mlp", "fc2"), t, "head.mlp.fc2", used)
    except KeyError as e:
        raise CheckpointError(f"{source}: tensor {pre}{e.args[0]} is missing from the checkpoint") from None
    extra = sorted(pre + k for k in set(t) - used)
    if extra:
        raise CheckpointError(f"{source}: tensors in the checkpoint that the model has no place for: {extra}")
    return out


def load_hf_vit(directory: str | Path, *, cfg: Optional[ViTConfig] = None, **cfg_overrides) -> VisionTransformer:
    """A VisionTransformer with the weights of a local CLIP/SigLIP vision checkpoint directory.

    `cfg` replaces the config derived from config.json (it must describe the same shapes); `cfg_overrides`
    change execution fields (dtype, param_dtype, scan_layers, remat_policy, attention_impl, pool...).
    """
    directory = Path(directory)
    family, derived = vit_config_from_hf(read_json(directory / "config.json"), **cfg_overrides)
    cfg = cfg or derived
    source = f"{directory} ({family})"
    mapped = hf_vit_tensors(load_tensors(directory), cfg, source)
    if cfg.pool != "map":  # a SigLIP head the caller chose not to build
        mapped = {k: v for k, v in mapped.items() if k[0] != "head"}
    abstract = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, fill_state(state, mapped, source=source))
