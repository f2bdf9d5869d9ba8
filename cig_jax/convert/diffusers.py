"""diffusers checkpoints -> our NNX modules: AutoencoderKL (`load_vae`) and PixArtTransformer2DModel (`load_pixart`).

Owns: reading a diffusers model directory (config.json + diffusion_pytorch_model[.*].safetensors, single or
sharded, as written by `save_pretrained`), turning its config.json into our config dataclass, and mapping
tensors onto our parameters (torch Linear [out, in] -> kernel [in, out]; Conv2d [O, I, kh, kw] -> kernel
[kh, kw, I, O]; norm weight -> scale; per-block tensors stacked on our leading 'layers' axis). A mismatch
raises `ConversionError` listing every missing, unexpected and shape-mismatched tensor.

Does not own: the models (`models/vae.py`, `models/dit.py`), nor placing parameters on a mesh. Our new
parameters (the DiT identity branch) are left at their initialisation.

Our attribute names mirror diffusers', so the mapping is a few renames (`RENAMES_*`) plus leaf rules.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cig_jax.cli import UserError
from cig_jax.config_model import DiTConfig, VAEConfig
from cig_jax.models.dit import DiT
from cig_jax.models.vae import AutoencoderKL


class ConversionError(UserError, ValueError):
    """A checkpoint does not fit the model: the message lists what is missing, unexpected or mis-shaped."""


# ----------------------------------------------------------------------------------------------------------
# Reading a diffusers directory
# ----------------------------------------------------------------------------------------------------------
WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_config(path: str | Path) -> dict:
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise FileNotFoundError(
            f"{f} not found. Point to a diffusers model directory (e.g. the 'vae/' or 'transformer/' folder of a "
            f"pipeline downloaded with `huggingface-cli download <repo> --local-dir <dir>`), holding config.json "
            f"and {WEIGHTS}."
        )
    return json.loads(f.read_text())


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a diffusers model directory as fp32 numpy arrays (bf16/fp16 files are upcast)."""
    from safetensors import safe_open

    path = Path(path)
    index = path / (WEIGHTS + ".index.json")
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    else:
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no {WEIGHTS} (or sharded/variant safetensors) in {path}. Download the model's safetensors into that "
            f"directory; .bin checkpoints must be converted to safetensors first."
        )
    out = {}
    for f in files:
        with safe_open(str(f), framework="flax") as sf:  # 'flax' reads bf16 too
            for k in sf.keys():
                out[k] = np.asarray(sf.get_tensor(k).astype(jnp.float32))
    return out


# ----------------------------------------------------------------------------------------------------------
# The generic mapping
# ----------------------------------------------------------------------------------------------------------
def _to_torch_layout(leaf: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Our leaf name -> (torch leaf name, torch array -> our array)."""
    if leaf == "kernel":
        def kernel(t):
            if t.ndim == 2:
                return t.T
            if t.ndim == 4:
                return t.transpose(2, 3, 1, 0)
            return t
        return "weight", kernel
    if leaf == "scale":
        return "weight", lambda t: t
    return leaf, lambda t: t


def load_params(model: nnx.Module, tensors: dict[str, np.ndarray], *, renames: Iterable[tuple[str, str]] = (),
                stacked: Iterable[str] = (), new: Iterable[str] = (), what: str = "checkpoint") -> None:
    """Sets every parameter of `model` from torch-named `tensors`, in place.

    renames: (ours, theirs) substring replacements on the dotted path. stacked: top-level attributes whose
    parameters carry a leading layer axis, read from `<name>.<i>.<rest>`. new: top-level attributes that the
    checkpoint does not have (left at init).
    """
    values = map_params(nnx.state(model, nnx.Param), tensors, renames=renames, stacked=stacked, new=new, what=what)
    flat = [(p, v.replace(jnp.asarray(values[p], dtype=v[...].dtype)) if p in values else v)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    nnx.update(model, nnx.from_flat_state(flat))


def map_params(params: nnx.State, tensors: dict[str, np.ndarray], *, renames: Iterable[tuple[str, str]] = (),
               stacked: Iterable[str] = (), new: Iterable[str] = (), what: str = "checkpoint") -> dict[tuple, np.ndarray]:
    """{our parameter path: array} for every parameter of `params` (a real or abstract nnx.State) not under a
    `new` attribute, from torch-named `tensors` (see `load_params`); one ConversionError lists every problem."""
    renames, stacked, new = list(renames), set(stacked), set(new)
    flat = list(nnx.to_flat_state(params))
    used, missing, mismatched, updated = set(), [], [], {}
    for path, var in flat:
        ours = ".".join(str(p) for p in path)
        if path[0] in new:
            continue
        leaf, convert = _to_torch_layout(str(path[-1]))
        dotted = "." + ".".join([str(p) for p in path[:-1]] + [leaf])
        for a, b in renames:
            dotted = dotted.replace(a, b)
        dotted = dotted[1:]
        shape = tuple(var.value.shape)
        if path[0] in stacked:
            head, rest = dotted.split(".", 1)
            keys = [f"{head}.{i}.{rest}" for i in range(shape[0])]
        else:
            keys = [dotted]
        absent = [k for k in keys if k not in tensors]
        if absent:
            missing.extend(f"{k} (for {ours})" for k in absent)
            continue
        arrays = [convert(tensors[k]) for k in keys]
        value = np.stack(arrays) if path[0] in stacked else arrays[0]
        used.update(keys)
        if tuple(value.shape) != shape:
            mismatched.append(f"{keys[0] if len(keys) == 1 else keys[0] + ' ...'}: checkpoint {value.shape} "
                              f"(after transpose) vs ours {shape} at {ours}")
            continue
        updated[path] = value
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected or mismatched:
        def block(title, items):
            if not items:
                return ""
            shown = "\n    ".join(items[:25]) + (f"\n    ... and {len(items) - 25} more" if len(items) > 25 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}"
        raise ConversionError(
            f"{what} does not match the model config:"
            + block("missing in checkpoint", missing)
            + block("unexpected in checkpoint", unexpected)
            + block("shape mismatch", mismatched)
        )
    return updated


def _check(cond: bool, msg: str):
    if not cond:
        raise ConversionError(msg)


# ----------------------------------------------------------------------------------------------------------
# AutoencoderKL
# ----------------------------------------------------------------------------------------------------------
def vae_config_from_diffusers(d: dict, **overrides) -> VAEConfig:
    """diffusers AutoencoderKL config.json -> VAEConfig (overrides: e.g. dtype='bfloat16')."""
    _check(all(t == "DownEncoderBlock2D" for t in d.get("down_block_types", ["DownEncoderBlock2D"])),
           f"unsupported down_block_types {d.get('down_block_types')}")
    _check(all(t == "UpDecoderBlock2D" for t in d.get("up_block_types", ["UpDecoderBlock2D"])),
           f"unsupported up_block_types {d.get('up_block_types')}")
    _check(d.get("latents_mean") is None, "latents_mean/latents_std normalisation is not supported")
    kw = dict(
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
        block_out_channels=list(d.get("block_out_channels", [64])), layers_per_block=d.get("layers_per_block", 1),
        latent_channels=d.get("latent_channels", 4), norm_num_groups=d.get("norm_num_groups", 32),
        act_fn=d.get("act_fn", "silu"), mid_block_add_attention=d.get("mid_block_add_attention", True),
        use_quant_conv=d.get("use_quant_conv", True), use_post_quant_conv=d.get("use_post_quant_conv", True),
        scaling_factor=float(d.get("scaling_factor", 0.18215)), shift_factor=d.get("shift_factor"),
    )
    kw.update(overrides)
    return VAEConfig(**kw)


_OLD_VAE_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def modernise_vae_keys(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old diffusers VAE files name the mid-block attention query/key/value/proj_attn (sometimes as 1x1 convs)."""
    out = {}
    for k, v in tensors.items():
        for a, b in _OLD_VAE_ATTN.items():
            if ".mid_block.attentions." in k and a in k:
                k = k.replace(a, b)
                if v.ndim == 4:
                    v = v[:, :, 0, 0]
        out[k] = v
    return out


def load_vae(path: str | Path, *, seed: int = 0, **overrides):
    """A diffusers AutoencoderKL directory -> `models.vae.AutoencoderKL` with its weights."""
    cfg = vae_config_from_diffusers(read_config(path), **overrides)
    model = AutoencoderKL(cfg, rngs=nnx.Rngs(seed))
    tensors = modernise_vae_keys(read_tensors(path))
    load_params(model, tensors, renames=[(".to_out.", ".to_out.0.")], what=f"VAE checkpoint {path}")
    return model


# ----------------------------------------------------------------------------------------------------------
# PixArtTransformer2DModel
# ----------------------------------------------------------------------------------------------------------
RENAMES_PIXART = [
    (".adaln_single.timestep_embedder.", ".adaln_single.emb.timestep_embedder."),
    (".adaln_single.resolution_embedder.", ".adaln_single.emb.resolution_embedder."),
    (".adaln_single.aspect_ratio_embedder.", ".adaln_single.emb.aspect_ratio_embedder."),
    (".pos_embed.", ".pos_embed.proj."),
    (".to_out.", ".to_out.0."),
    (".ff.proj_in.", ".ff.net.0.proj."),
    (".ff.proj_out.", ".ff.net.2."),
]


def dit_config_from_diffusers(d: dict, **overrides) -> DiTConfig:
    """diffusers PixArtTransformer2DModel config.json -> DiTConfig (overrides: identity branch, dtype, scan...)."""
    _check(d.get("norm_type", "ada_norm_single") == "ada_norm_single", f"norm_type {d.get('norm_type')!r} unsupported")
    _check(d.get("activation_fn", "gelu-approximate") == "gelu-approximate",
           f"activation_fn {d.get('activation_fn')!r} unsupported (PixArt uses gelu-approximate)")
    _check(d.get("attention_type", "default") == "default", f"attention_type {d.get('attention_type')!r} unsupported")
    sample_size = d.get("sample_size", 128)
    extra = d.get("use_additional_conditions")
    kw = dict(
        num_layers=d.get("num_layers", 28), num_heads=d.get("num_attention_heads", 16),
        head_dim=d.get("attention_head_dim", 72), in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 8), patch_size=d.get("patch_size", 2), sample_size=sample_size,
        interpolation_scale=d.get("interpolation_scale"), caption_channels=d.get("caption_channels"),
        cross_attention_dim=d.get("cross_attention_dim", 1152), attention_bias=d.get("attention_bias", True),
        norm_eps=d.get("norm_eps", 1e-6), norm_elementwise_affine=d.get("norm_elementwise_affine", False),
        use_additional_conditions=(sample_size == 128) if extra is None else bool(extra),
    )
    kw.update(overrides)
    return DiTConfig(**kw)


def load_pixart(path: str | Path, *, seed: int = 0, **overrides):
    """A diffusers PixArtTransformer2DModel directory -> `models.dit.DiT` with its weights (identity branch at
    init). `overrides` set DiTConfig fields, e.g. identity_injection='parallel', dtype='bfloat16'."""
    cfg = dit_config_from_diffusers(read_config(path), **overrides)
    model = DiT(cfg, rngs=nnx.Rngs(seed))
    load_params(model, read_tensors(path), renames=RENAMES_PIXART, stacked=["transformer_blocks"],
                new=list(DIT_NEW), what=f"PixArt checkpoint {path}")
    return model


# DiT branches PixArt has no weights for: they keep their initialisation
DIT_NEW = ("id_encoder", "id_attn", "visual_grid_proj", "identity_grid_proj")
