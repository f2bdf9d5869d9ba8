"""SEED-X checkpoints <-> our `MLLM` parameters (LLaMA, input/output resamplers, Qwen-VL ViT-G).

Owns: the name and layout mapping between the SEED-X PyTorch state dicts and our parameter paths, both ways
(`seedx_to_ours`, `ours_to_seedx`), the expected name -> shape table (`seedx_shapes`, checked before anything
is converted, so one error lists every missing, unexpected and mis-shaped tensor), and `load_seedx`, which
reads the two released files and builds the model without random initialisation.

Does not own: file formats beyond reading a torch `.bin/.pt` or safetensors (`checkpoint_io`), the LLaMA names
themselves (`hf_llm`), the model (`models/mllm.py`).

SEED-X ships two files: the agent (`pretrained/seed_x*/agent/pytorch_model.bin`, names below without
`visual.`) and the Qwen-VL ViT (`pretrained/QwenViT/qwen_vit_G.pt`, the `transformer.visual` state dict of
Qwen-VL-Chat, names without prefix). Here both live in one dict, the ViT under `visual.`; `load_seedx` adds
that prefix (and strips Qwen-VL's `transformer.visual.`).

    SEED-X name                                           ours                                   layout
    llm.model.embed_tokens.weight                         llm.embed_tokens.embedding             [V, D]
    llm.model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  llm.layers.self_attn.*.kernel [i]      W.T
    llm.model.layers.{i}.mlp.{gate,up,down}_proj.weight   llm.layers.mlp.*.kernel [i]            W.T
    llm.model.layers.{i}.{input,post_attention}_layernorm llm.layers.*.scale [i]
    llm.model.norm.weight, llm.lm_head.weight             llm.norm.scale, llm.lm_head.kernel     -, W.T
    {input,output}_resampler.query                        *.query                                [Q, E]
    {input,output}_resampler.pos_embed                    (computed: 2-D sin-cos; checked, not stored)
    {input,output}_resampler.kv_proj.weight               *.kv_proj.kernel                       W.T
    {input,output}_resampler.attn.in_proj_{weight,bias}   *.attn.{q,k,v}.{kernel,bias}           [q; k; v] blocks
    {input,output}_resampler.attn.out_proj.*              *.attn.o.*                             W.T
    {input,output}_resampler.ln_{q,kv}.{weight,bias}      *.ln_{q,kv}.{scale,bias}
    patch_pos_embed                                       patch_pos_embed                        [4, D]
    visual.conv1.weight                                   vit.patch_kernel                       [D,C,p,p] -> [p,p,C,D]
    visual.positional_embedding                           vit.pos_embed                          [256, D]
    visual.ln_pre.*                                       vit.ln_pre.*
    visual.transformer.resblocks.{i}.ln_{1,2}.*           vit.blocks.ln_{1,2}.* [i]
    visual.transformer.resblocks.{i}.attn.in_proj.*       vit.blocks.attn.{q,k,v}.* [i]          per-head packed
    visual.transformer.resblocks.{i}.attn.out_proj.*      vit.blocks.attn.o.* [i]                W.T
    visual.transformer.resblocks.{i}.mlp.c_fc / c_proj    vit.blocks.mlp.fc1 / fc2 [i]           W.T
    visual.attn_pool.*                                    vit.attn_pool.* (as the resamplers)
    visual.ln_post.*, visual.proj                         vit.attn_pool.ln_post.*, .proj.kernel  proj as is (x @ proj)

Qwen-VL's ViT attention packs q/k/v *per head*: `in_proj` rows are [head][q|k|v][head_dim] (the output is
viewed as [..., heads, 3 * head_dim] and split), unlike torch MultiheadAttention's [q|k|v][heads][head_dim]
used by the resamplers' `in_proj_weight`.

PEFT (LoRA) agent checkpoints must be merged into the base weights first (their `lora_A/B` names are reported
as unexpected); load into a config with `llm.lora_rank: 0`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from flax import nnx

from cig_jax.config_model import ModelConfig, ResamplerConfig, ViTConfig
from cig_jax.convert import hf_llm
from cig_jax.convert.checkpoint_io import CheckpointError, fill_state, load_tensors, raise_if_mismatched
from cig_jax.models.mllm import MLLM
from cig_jax.models.resampler import sincos_2d

VIT_PREFIX = "visual."
RESAMPLERS = ("input_resampler", "output_resampler")


# ----------------------------------------------------------------------------------------------------------
# The expected names and shapes
# ----------------------------------------------------------------------------------------------------------
def _kv(rc: ResamplerConfig) -> int:
    return rc.kv_dim if rc.kv_dim is not None else rc.embed_dim


def _resampler_shapes(prefix: str, rc: ResamplerConfig, post_prefix: Optional[str] = None) -> dict:
    e = rc.embed_dim
    s = {f"{prefix}query": (rc.num_queries, e), f"{prefix}pos_embed": (rc.num_queries, e),
         f"{prefix}attn.in_proj_weight": (3 * e, e), f"{prefix}attn.in_proj_bias": (3 * e,),
         f"{prefix}attn.out_proj.weight": (e, e), f"{prefix}attn.out_proj.bias": (e,)}
    for ln in ("ln_q", "ln_kv"):
        s[f"{prefix}{ln}.weight"] = s[f"{prefix}{ln}.bias"] = (e,)
    if _kv(rc) != e:
        s[f"{prefix}kv_proj.weight"] = (e, _kv(rc))
    if rc.out_dim is not None:  # Qwen-VL: ln_post and proj live on the ViT, next to attn_pool
        post = post_prefix if post_prefix is not None else prefix
        s[f"{post}ln_post.weight"] = s[f"{post}ln_post.bias"] = (e,)
        s[f"{post}proj"] = (e, rc.out_dim)
        if rc.proj_bias:
            s[f"{post}proj_bias"] = (rc.out_dim,)
    return s


def _check_vit(v: ViTConfig) -> None:
    if v.pool != "resampler" or v.class_token or v.patch_bias or not v.pre_norm or v.post_norm != "none":
        raise CheckpointError("the SEED-X ViT is the Qwen-VL ViT-G: model.vit needs pool 'resampler', no class token, "
                              "no patch bias, pre_norm true, post_norm 'none' (see cig_jax.models.vit.qwen_vit_g_config)")


def seedx_shapes(cfg: ModelConfig, vit: bool = True) -> dict[str, tuple]:
    """Every tensor a SEED-X checkpoint (agent + `visual.` ViT; vit=False: the agent alone, whatever ViT the
    model has) must hold for `cfg`, with its shape."""
    if vit:
        _check_vit(cfg.vit)
    llm, v = cfg.llm, cfg.vit
    d, hd = llm.hidden_size, llm.resolved_head_dim()
    s = {"llm.model.embed_tokens.weight": (llm.vocab_size, d), "llm.model.norm.weight": (d,)}
    if not llm.tie_word_embeddings:
        s["llm.lm_head.weight"] = (llm.vocab_size, d)
    for i in range(llm.num_layers):
        p = f"llm.model.layers.{i}."
        s[p + "self_attn.q_proj.weight"] = (llm.num_heads * hd, d)
        s[p + "self_attn.k_proj.weight"] = s[p + "self_attn.v_proj.weight"] = (llm.num_kv_heads * hd, d)
        s[p + "self_attn.o_proj.weight"] = (d, llm.num_heads * hd)
        if llm.qkv_bias:
            s[p + "self_attn.q_proj.bias"] = (llm.num_heads * hd,)
            s[p + "self_attn.k_proj.bias"] = s[p + "self_attn.v_proj.bias"] = (llm.num_kv_heads * hd,)
        s[p + "mlp.gate_proj.weight"] = s[p + "mlp.up_proj.weight"] = (llm.intermediate_size, d)
        s[p + "mlp.down_proj.weight"] = (d, llm.intermediate_size)
        s[p + "input_layernorm.weight"] = s[p + "post_attention_layernorm.weight"] = (d,)
    for name in RESAMPLERS:
        s.update(_resampler_shapes(f"{name}.", getattr(cfg, name)))
    if cfg.mllm.add_patch_pos:
        s["patch_pos_embed"] = (4, d)
    if not vit:
        return s
    w, side = v.hidden_size, v.pos_grid_size or v.image_size // v.patch_size
    vp = VIT_PREFIX
    s[vp + "conv1.weight"] = (w, v.num_channels, v.patch_size, v.patch_size)
    s[vp + "positional_embedding"] = (side * side, w)
    s[vp + "ln_pre.weight"] = s[vp + "ln_pre.bias"] = (w,)
    for i in range(v.num_layers):
        p = f"{vp}transformer.resblocks.{i}."
        for ln in ("ln_1", "ln_2"):
            s[f"{p}{ln}.weight"] = s[f"{p}{ln}.bias"] = (w,)
        s[p + "attn.in_proj.weight"], s[p + "attn.in_proj.bias"] = (3 * w, w), (3 * w,)
        s[p + "attn.out_proj.weight"], s[p + "attn.out_proj.bias"] = (w, w), (w,)
        s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"] = (v.intermediate_size, w), (v.intermediate_size,)
        s[p + "mlp.c_proj.weight"], s[p + "mlp.c_proj.bias"] = (w, v.intermediate_size), (w,)
    s.update(_resampler_shapes(vp + "attn_pool.", v.attn_pool, post_prefix=vp))
    return s


def check_tensors(tensors: dict, cfg: ModelConfig, source: str) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    want = seedx_shapes(cfg)
    ignorable = lambda k: k.endswith("rotary_emb.inv_freq")  # noqa: E731
    missing = sorted(k for k in want if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in want and not ignorable(k))
    bad = sorted(f"{k}: checkpoint {tuple(np.shape(tensors[k]))} vs expected {want[k]}" for k in want
                 if k in tensors and tuple(np.shape(tensors[k])) != tuple(want[k]))
    raise_if_mismatched(f"{source}: not a SEED-X checkpoint for this model config", missing, bad, unexpected)


# ----------------------------------------------------------------------------------------------------------
# SEED-X -> ours
# ----------------------------------------------------------------------------------------------------------
def _resampler_in(t: dict, prefix: str, rc: ResamplerConfig, post_prefix: Optional[str] = None,
                  source: str = "") -> dict[tuple, np.ndarray]:
    e = rc.embed_dim
    out = {("query",): t[prefix + "query"]}
    table = sincos_2d(e, int(round(rc.num_queries ** 0.5)))
    if not np.allclose(np.asarray(t[prefix + "pos_embed"], np.float32), table, atol=1e-4):
        raise CheckpointError(f"{source}: {prefix}pos_embed is not the 2-D sin-cos table this resampler computes")
    w, b = t[prefix + "attn.in_proj_weight"], t[prefix + "attn.in_proj_bias"]  # [q; k; v] blocks of [E, E]
    for j, name in enumerate("qkv"):
        out[("attn", name, "kernel")] = w[j * e:(j + 1) * e].T
        out[("attn", name, "bias")] = b[j * e:(j + 1) * e]
    out[("attn", "o", "kernel")] = t[prefix + "attn.out_proj.weight"].T
    out[("attn", "o", "bias")] = t[prefix + "attn.out_proj.bias"]
    for ln in ("ln_q", "ln_kv"):
        out[(ln, "scale")], out[(ln, "bias")] = t[f"{prefix}{ln}.weight"], t[f"{prefix}{ln}.bias"]
    if _kv(rc) != e:
        out[("kv_proj", "kernel")] = t[prefix + "kv_proj.weight"].T
    if rc.out_dim is not None:
        post = post_prefix if post_prefix is not None else prefix
        out[("ln_post", "scale")], out[("ln_post", "bias")] = t[post + "ln_post.weight"], t[post + "ln_post.bias"]
        out[("proj", "kernel")] = t[post + "proj"]
        if rc.proj_bias:
            out[("proj", "bias")] = t[post + "proj_bias"]
    return out


def seedx_to_ours(tensors: dict[str, np.ndarray], cfg: ModelConfig, *, source: str = "<tensors>"
                  ) -> dict[tuple, np.ndarray]:
    """SEED-X tensors (agent + `visual.` ViT) -> {our parameter path: array}. Checks names and shapes first."""
    check_tensors(tensors, cfg, source)
    t = {k: np.asarray(v) for k, v in tensors.items()}
    llm_t = {k[len("llm."):]: v for k, v in t.items() if k.startswith("llm.")}
    out = {("llm",) + p: a for p, a in hf_llm.hf_to_ours(llm_t, cfg.llm, source=source).items()}
    out.update(agent_rest_to_ours(t, cfg, source=source))
    out.update(vit_to_ours(t, cfg, source=source))
    return out


def agent_rest_to_ours(t: dict[str, np.ndarray], cfg: ModelConfig, *, source: str = "<tensors>"
                       ) -> dict[tuple, np.ndarray]:
    """The agent's resamplers and patch position embeddings (all but `llm.`) -> {our MLLM path: array}."""
    out: dict[tuple, np.ndarray] = {}
    for name in RESAMPLERS:
        out.update({(name,) + p: a for p, a in _resampler_in(t, f"{name}.", getattr(cfg, name), source=source).items()})
    if cfg.mllm.add_patch_pos:
        out[("patch_pos_embed",)] = np.asarray(t["patch_pos_embed"])
    return out


def vit_to_ours(t: dict[str, np.ndarray], cfg: ModelConfig, *, source: str = "<tensors>") -> dict[tuple, np.ndarray]:
    """The Qwen-VL ViT-G tensors (under `visual.`) -> {our MLLM path (`vit`, ...): array}."""
    out: dict[tuple, np.ndarray] = {}
    v, vp = cfg.vit, VIT_PREFIX
    out[("vit", "patch_kernel")] = t[vp + "conv1.weight"].transpose(2, 3, 1, 0)  # [p, p, C, D]
    out[("vit", "pos_embed")] = t[vp + "positional_embedding"]
    out[("vit", "ln_pre", "scale")], out[("vit", "ln_pre", "bias")] = t[vp + "ln_pre.weight"], t[vp + "ln_pre.bias"]
    h, hd, w = v.num_heads, v.hidden_size // v.num_heads, v.hidden_size
    layers: dict[tuple, list] = {}

    def put(path, a):
        layers.setdefault(path, []).append(a)

    for i in range(v.num_layers):
        p = f"{vp}transformer.resblocks.{i}."
        for ln in ("ln_1", "ln_2"):
            put((ln, "scale"), t[f"{p}{ln}.weight"])
            put((ln, "bias"), t[f"{p}{ln}.bias"])
        qkv_w = t[p + "attn.in_proj.weight"].reshape(h, 3, hd, w)  # rows: [head][q|k|v][head_dim]
        qkv_b = t[p + "attn.in_proj.bias"].reshape(h, 3, hd)
        for j, name in enumerate("qkv"):
            put(("attn", name, "kernel"), qkv_w[:, j].reshape(h * hd, w).T)
            put(("attn", name, "bias"), qkv_b[:, j].reshape(h * hd))
        put(("attn", "o", "kernel"), t[p + "attn.out_proj.weight"].T)
        put(("attn", "o", "bias"), t[p + "attn.out_proj.bias"])
        for ours, theirs in (("fc1", "c_fc"), ("fc2", "c_proj")):
            put(("mlp", ours, "kernel"), t[f"{p}mlp.{theirs}.weight"].T)
            put(("mlp", ours, "bias"), t[f"{p}mlp.{theirs}.bias"])
    out.update({("vit", "blocks") + k: np.stack(vs) for k, vs in layers.items()})  # [layers, ...]
    pool = _resampler_in(t, vp + "attn_pool.", v.attn_pool, post_prefix=vp, source=source)
    out.update({("vit", "attn_pool") + p: a for p, a in pool.items()})
    return out


# ----------------------------------------------------------------------------------------------------------
# ours -> SEED-X
# ----------------------------------------------------------------------------------------------------------
def resampler_out(p: dict, prefix: str, rc: ResamplerConfig, post_prefix: Optional[str] = None) -> dict:
    e = rc.embed_dim
    t = {prefix + "query": p[("query",)], prefix + "pos_embed": np.array(sincos_2d(e, int(round(rc.num_queries ** 0.5)))),
         prefix + "attn.in_proj_weight": np.concatenate([p[("attn", n, "kernel")].T for n in "qkv"]),
         prefix + "attn.in_proj_bias": np.concatenate([p[("attn", n, "bias")] for n in "qkv"]),
         prefix + "attn.out_proj.weight": p[("attn", "o", "kernel")].T, prefix + "attn.out_proj.bias": p[("attn", "o", "bias")]}
    for ln in ("ln_q", "ln_kv"):
        t[f"{prefix}{ln}.weight"], t[f"{prefix}{ln}.bias"] = p[(ln, "scale")], p[(ln, "bias")]
    if _kv(rc) != e:
        t[prefix + "kv_proj.weight"] = p[("kv_proj", "kernel")].T
    if rc.out_dim is not None:
        post = post_prefix if post_prefix is not None else prefix
        t[post + "ln_post.weight"], t[post + "ln_post.bias"] = p[("ln_post", "scale")], p[("ln_post", "bias")]
        t[post + "proj"] = p[("proj", "kernel")]
        if rc.proj_bias:
            t[post + "proj_bias"] = p[("proj", "bias")]
    return t


def ours_to_seedx(params: dict[tuple, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{our parameter path: array} -> SEED-X tensor dict (the inverse of `seedx_to_ours`)."""
    _check_vit(cfg.vit)

    def sub(prefix):
        n = len(prefix)
        return {k[n:]: np.asarray(a) for k, a in params.items() if k[:n] == prefix}

    t = {"llm." + k: a for k, a in hf_llm.ours_to_hf(sub(("llm",)), cfg.llm).items()}
    for name in RESAMPLERS:
        t.update(resampler_out(sub((name,)), f"{name}.", getattr(cfg, name)))
    if cfg.mllm.add_patch_pos:
        t["patch_pos_embed"] = np.asarray(params[("patch_pos_embed",)])
    v, vp, vit = cfg.vit, VIT_PREFIX, sub(("vit",))
    t[vp + "conv1.weight"] = vit[("patch_kernel",)].transpose(3, 2, 0, 1)
    t[vp + "positional_embedding"] = vit[("pos_embed",)]
    t[vp + "ln_pre.weight"], t[vp + "ln_pre.bias"] = vit[("ln_pre", "scale")], vit[("ln_pre", "bias")]
    h, hd, w = v.num_heads, v.hidden_size // v.num_heads, v.hidden_size
    for i in range(v.num_layers):
        p, b = f"{vp}transformer.resblocks.{i}.", lambda *k: vit[("blocks",) + k][i]  # noqa: E731
        for ln in ("ln_1", "ln_2"):
            t[f"{p}{ln}.weight"], t[f"{p}{ln}.bias"] = b(ln, "scale"), b(ln, "bias")
        kernels = np.stack([b("attn", n, "kernel").T.reshape(h, hd, w) for n in "qkv"], axis=1)  # [h, 3, hd, w]
        biases = np.stack([b("attn", n, "bias").reshape(h, hd) for n in "qkv"], axis=1)
        t[p + "attn.in_proj.weight"], t[p + "attn.in_proj.bias"] = kernels.reshape(3 * w, w), biases.reshape(3 * w)
        t[p + "attn.out_proj.weight"], t[p + "attn.out_proj.bias"] = b("attn", "o", "kernel").T, b("attn", "o", "bias")
        for ours, theirs in (("fc1", "c_fc"), ("fc2", "c_proj")):
            t[f"{p}mlp.{theirs}.weight"], t[f"{p}mlp.{theirs}.bias"] = b("mlp", ours, "kernel").T, b("mlp", ours, "bias")
    t.update(resampler_out(sub(("vit", "attn_pool")), vp + "attn_pool.", v.attn_pool, post_prefix=vp))
    return {k: np.ascontiguousarray(np.asarray(a, np.float32)) for k, a in t.items()}


def model_params(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """Our model's parameters as {path: numpy array} (the input of `ours_to_seedx`)."""
    return {p: np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A torch `.bin`/`.pt`/`.pth` state dict (read with torch, weights only) or a safetensors file/directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found. SEED-X weights: download AILab-CVC/SEED-X-17B "
                              "(seed_x*/agent/pytorch_model.bin) and the Qwen-VL ViT (QwenViT/qwen_vit_G.pt) "
                              "and pass their local paths")
    if path.is_dir() or path.suffix == ".safetensors":
        if path.is_dir():
            return load_tensors(path)
        from safetensors.numpy import load_file
        return load_file(str(path))
    import torch

    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}


def vit_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ViT's own state dict (no prefix, `transformer.visual.` or `visual.`) under `visual.`."""
    out = {}
    for k, v in tensors.items():
        for prefix in ("transformer.visual.", "visual.", ""):
            if k.startswith(prefix):
                out[VIT_PREFIX + k[len(prefix):]] = v
                break
    return out


def mllm_from_seedx(tensors: dict[str, np.ndarray], cfg: ModelConfig, *, source: str = "<tensors>"):
    """Our MLLM filled from SEED-X tensors (agent + `visual.` ViT); built abstractly, no random init."""
    if cfg.llm.lora_rank:
        raise CheckpointError(f"{source}: load SEED-X weights with model.llm.lora_rank: 0, then add adapters")
    values = seedx_to_ours(tensors, cfg, source=source)
    abstract = nnx.eval_shape(lambda: MLLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, fill_state(state, values, source=source))


def load_seedx(agent_path: str | Path, vit_path: str | Path, cfg: ModelConfig):
    """Builds our MLLM from the SEED-X agent file and the Qwen-VL ViT file (local paths)."""
    tensors = dict(read_state_dict(agent_path))
    tensors.update(vit_names(read_state_dict(vit_path)))
    return mllm_from_seedx(tensors, cfg, source=f"{agent_path} + {vit_path}")
