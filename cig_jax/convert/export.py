"""A trained model -> released-format folders, for what it holds (the command that reads a run's checkpoint
and calls `write_parts` is `python -m cig_jax.train.export`).

    python -m cig_jax.train.export --checkpoint workdir/demo/stage3 --out exported/

Writes under --out (each loads with its own library, and back into a run through `init_weights`):
  llm/           Hugging Face LLaMA / Qwen2 folder, LoRA merged: config.json, safetensors (+ index when sharded),
                 the run's tokenizer with a Jinja `chat_template` (the run's `model.mllm.chat_format` from
                 `data/chat_formats.py`, text-only turns), generation_config.json, a model card README.md
  llm_base/      (LoRA runs) the same LLM without its adapters ...
  llm_adapters/  ... and the adapters alone as PEFT LoRA (adapter_config.json + adapter_model.safetensors)
  vit/           a Hugging Face CLIP / SigLIP vision folder, or (Qwen-VL style) qwen_vit.safetensors in the
                 Qwen-VL `transformer.visual` names, or (a ViT neither describes, e.g. the demo's) cig_vit.safetensors
                 in our names with its config (`load_vit`)
  seedx_agent/   agent.safetensors in the SEED-X agent names (LLM merged + resamplers + patch positions)
  vae/, dit/     diffusers AutoencoderKL / PixArtTransformer2DModel folders; the DiT's parts diffusers has no
                 class for (identity encoder, identity attention, grid injection) go to dit/cig_extra.safetensors,
                 named by our parameter paths (dotted), documented in dit/README.md

The LLM, the agent file and a Qwen-VL / cig-named ViT need only the base install; the diffusers folders (and a
CLIP / SigLIP ViT, whose shapes come from its PyTorch class) need the 'export' extra (PyTorch CPU + diffusers).
Without it the command stops in one line before writing anything; `--skip vae,dit` exports the rest.

Owns: the export layout above and the inverse layouts of the ViT and diffusers mappings, which are derived from
the forward converters themselves (`invert`: run the forward mapping on tensors holding their own element
indices, then scatter), so import and export cannot drift apart.

Does not own: the name mappings (`hf_llm`, `hf_vit`, `seedx`, `diffusers`, `peft`); reading a checkpoint and
the command line (`cig_jax/train/export.py`: convert/ imports nothing of train/).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Callable

import numpy as np
from flax import nnx

from cig_jax import cli
from cig_jax.convert import diffusers as dc, hf_llm, seedx
from cig_jax.convert.checkpoint_io import save_tensors, write_json_atomic
from cig_jax.convert.diffusers import DIT_NEW
from cig_jax.convert.hf_vit import ACTS, hf_vit_tensors
from cig_jax.convert.peft import save_peft
from cig_jax.convert.seedx import model_params
from cig_jax.data.chat_formats import LLAMA2, chat_format
from cig_jax.data.chat_template import load_tokenizer
from cig_jax.models.llm import merge_lora
from cig_jax.models.resampler import sincos_2d

CHAT_TEMPLATE = LLAMA2.jinja  # the default format's Jinja template (each format's: `chat_formats.FORMATS`)
EXTRA = "cig_extra.safetensors"


def invert(forward: Callable[[dict], dict], theirs_shapes: dict[str, tuple], ours: dict[tuple, np.ndarray]
           ) -> dict[str, np.ndarray]:
    """Their tensors from ours, for a layout-only `forward` (theirs -> ours: transposes, reshapes, stacks,
    splits): each of their tensors is filled with its own element indices, mapped forward, and our values are
    scattered back to those indices. Exact, and always the inverse of the importer actually used."""
    offsets, total = {}, 0
    for k, s in theirs_shapes.items():
        offsets[k] = total
        total += int(np.prod(s))
    probe = {k: (np.arange(int(np.prod(s)), dtype=np.float64) + offsets[k]).reshape(s) for k, s in theirs_shapes.items()}
    index = forward(probe)
    flat = np.zeros(total, np.float32)
    seen = np.zeros(total, bool)
    for path, ids in index.items():
        ids = np.asarray(ids).reshape(-1).astype(np.int64)
        flat[ids] = np.asarray(ours[path], np.float32).reshape(-1)
        seen[ids] = True
    if not seen.all():
        raise ValueError(f"invert: {int((~seen).sum())} elements of the export have no source in the model")
    return {k: flat[offsets[k]:offsets[k] + int(np.prod(s))].reshape(s) for k, s in theirs_shapes.items()}


def _params(module) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v.get_value(), np.float32) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _meta_shapes(build: Callable) -> dict[str, tuple]:
    import torch

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build().state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------------
def export_llm(model, cfg, tokenizer_dir: Path, out: Path, stages: list[dict]) -> list[str]:
    llm = model.mllm.llm
    hf_llm.save_hf_llm(llm, out / "llm")  # LoRA merged
    written = ["llm"]
    if llm.cfg.lora_rank:
        p = _params(llm)
        base_cfg = dataclasses.replace(llm.cfg, lora_rank=0)
        save_tensors(hf_llm.ours_to_hf({k: v for k, v in p.items() if k[-1] not in ("lora_a", "lora_b")}, base_cfg),
                     out / "llm_base")
        write_json_atomic(hf_llm.config_to_hf(base_cfg), out / "llm_base" / "config.json")
        save_peft({k: v for k, v in p.items() if k[-1] in ("lora_a", "lora_b")}, llm.cfg, out / "llm_adapters",
                  base_model="../llm_base")
        written += ["llm_base", "llm_adapters"]
    if tokenizer_dir.is_dir():
        tok = load_tokenizer(tokenizer_dir)
        tok.chat_template = chat_format(cfg.model.mllm.chat_format).jinja
        for d in written[:2]:
            tok.save_pretrained(str(out / d))
        gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
               "max_new_tokens": cfg.sample.max_new_tokens, "do_sample": cfg.sample.temperature > 0}
        if cfg.sample.temperature > 0:
            gen.update(temperature=cfg.sample.temperature, top_p=cfg.sample.top_p)
        write_json_atomic(gen, out / "llm" / "generation_config.json")
    (out / "llm" / "README.md").write_text(model_card(cfg, stages))
    return written


def model_card(cfg, stages: list[dict]) -> str:
    llm = cfg.model.llm
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [cig_jax, seed-x, lora]"
             if llm.lora_rank else "tags: [cig_jax, seed-x]", "---", "",
             "# The LLM of a cig_jax multimodal model (exported)", "",
             f"LLaMA-family decoder: {llm.num_layers} layers x {llm.hidden_size}, {llm.num_heads} heads "
             f"({llm.num_kv_heads} KV), vocabulary {llm.vocab_size} (the SEED-X image / box tokens included). "
             + ("LoRA adapters are merged into these weights; `../llm_adapters` holds them alone (PEFT)."
                if llm.lora_rank else ""), "",
             f"Text-only chat uses the tokenizer's `chat_template` ({chat_format(cfg.model.mllm.chat_format).about}). "
             "Image slots "
             "(`<img>`, `<img_00000>`...) need the ViT and resamplers of the full model.", "",
             "## Training stages (oldest first)", ""]
    for s in stages:
        t, d = s.get("train", {}), s.get("data", {})
        lines.append(f"- stage `{t.get('stage')}`: {t.get('steps')} steps, trainable {t.get('trainable') or 'default'}, "
                     f"data `{d.get('source')}`" + (f" {d.get('dir')}" if d.get("dir") else "")
                     + (f" kinds {d.get('kinds')}" if d.get("kinds") else "") + f", workdir `{t.get('workdir')}`")
    return "\n".join(lines) + "\n"


def vit_config_to_hf(v) -> dict:
    """CLIP / SigLIP config.json for our ViT (raises for a ViT that neither family describes)."""
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[v.hidden_act]
    assert ACTS[act] == v.hidden_act
    common = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                  num_attention_heads=v.num_heads, num_channels=v.num_channels, image_size=v.image_size,
                  patch_size=v.patch_size, hidden_act=act, layer_norm_eps=v.layer_norm_eps)
    if v.class_token and not v.patch_bias and v.pre_norm and v.post_norm == "pooled":
        return dict(common, model_type="clip_vision_model", architectures=["CLIPVisionModel"])
    if not v.class_token and v.patch_bias and not v.pre_norm and v.post_norm == "hidden" and v.pool in ("map", "none"):
        return dict(common, model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
                    vision_use_head=v.pool == "map")
    raise ValueError("this ViT is neither CLIP nor SigLIP")


def vit_layout(v) -> str:
    """How the ViT goes out: 'qwen_vit' (Qwen-VL names), 'hf' (a CLIP / SigLIP folder: needs PyTorch for its
    shapes) or 'cig' (our own names, for a ViT neither Hugging Face family describes)."""
    if v.pool == "resampler":
        return "qwen_vit"
    try:
        vit_config_to_hf(v)
    except ValueError:
        return "cig"
    return "hf"


def parts_of(cfg) -> dict[str, tuple]:
    """{part: (module, extra) that exporting it needs, or ()} for every part the checkpoint's model has."""
    diffusers = ("diffusers", "export")
    parts = {"llm": (), "vit": ("torch", "export") if vit_layout(cfg.model.vit) == "hf" else (), "seedx_agent": ()}
    if cfg.model.use_vae:
        parts["vae"] = diffusers
    parts["dit"] = diffusers
    return parts


def export_vit(model, cfg, out: Path) -> str:
    v = cfg.model.vit
    ours = _params(model.mllm.vit)
    if vit_layout(v) == "cig":  # no Hugging Face class has this ViT's layout: our names, loadable with safetensors
        from safetensors.numpy import save_file

        (out / "vit").mkdir(parents=True, exist_ok=True)
        save_file({".".join(map(str, k)): np.ascontiguousarray(a) for k, a in ours.items()},
                  str(out / "vit" / "cig_vit.safetensors"),
                  metadata={"format": "cig_jax", "model_vit": json.dumps(dataclasses.asdict(v))})
        write_json_atomic(dataclasses.asdict(v), out / "vit" / "config.json")
        (out / "vit" / "README.md").write_text(
            "# The ViT of a cig_jax model, in cig_jax's own names\n\nNeither CLIP nor SigLIP describes this ViT "
            "(class token, patch bias, pre/post norms and pooling differ from both), so it goes out as "
            "`cig_vit.safetensors`, keyed by cig_jax parameter path (dotted), with `config.json` (= its metadata "
            "`model_vit`) the cig_jax `model.vit` config. Load it with `safetensors.numpy.load_file`, or back into "
            "a run with `cig_jax.convert.export.load_vit`.\n")
        return "vit"
    if v.pool == "resampler":  # Qwen-VL style: its own file, Qwen-VL's names
        ap = v.attn_pool
        table = np.array(sincos_2d(ap.embed_dim, int(round(ap.num_queries ** 0.5))), np.float32)  # computed, not learned
        pos = "attn_pool.pos_embed"
        shapes = {k[len(seedx.VIT_PREFIX):]: s for k, s in seedx.seedx_shapes(cfg.model).items()
                  if k.startswith(seedx.VIT_PREFIX) and k != seedx.VIT_PREFIX + pos}

        def forward(t):
            full = {seedx.VIT_PREFIX + k: a for k, a in {**t, pos: table}.items()}
            return {p[1:]: a for p, a in seedx.vit_to_ours(full, cfg.model).items()}

        tensors = invert(forward, shapes, {p: a for p, a in ours.items()})
        tensors[pos] = table
        save_tensors(tensors, out / "vit", file_prefix="qwen_vit")
        return "vit"
    import transformers

    hf = vit_config_to_hf(v)
    config = (transformers.CLIPVisionConfig if hf["model_type"].startswith("clip") else
              transformers.SiglipVisionConfig)(**{k: x for k, x in hf.items() if k not in ("model_type", "architectures")})
    cls = transformers.CLIPVisionModel if hf["model_type"].startswith("clip") else transformers.SiglipVisionModel
    shapes = _meta_shapes(lambda: cls(config))
    save_tensors(invert(lambda t: hf_vit_tensors(t, v), shapes, ours), out / "vit")
    config.architectures = hf["architectures"]
    config.save_pretrained(str(out / "vit"))
    return "vit"


def vae_config_to_diffusers(c) -> dict:
    n = len(c.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.out_channels,
            "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
            "latent_channels": c.latent_channels, "norm_num_groups": c.norm_num_groups, "act_fn": c.act_fn,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "mid_block_add_attention": c.mid_block_add_attention, "use_quant_conv": c.use_quant_conv,
            "use_post_quant_conv": c.use_post_quant_conv, "scaling_factor": c.scaling_factor,
            "shift_factor": c.shift_factor}


def dit_config_to_diffusers(c) -> dict:
    return {"_class_name": "PixArtTransformer2DModel", "num_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "attention_head_dim": c.head_dim, "in_channels": c.in_channels,
            "out_channels": c.out_channels or c.in_channels, "patch_size": c.patch_size, "sample_size": c.sample_size,
            "interpolation_scale": c.interpolation_scale, "caption_channels": c.caption_channels,
            "cross_attention_dim": c.cross_attention_dim or c.inner_dim(), "attention_bias": c.attention_bias,
            "norm_eps": c.norm_eps, "norm_elementwise_affine": c.norm_elementwise_affine, "norm_type": "ada_norm_single",
            "activation_fn": "gelu-approximate", "use_additional_conditions": c.use_additional_conditions}


def _save_diffusers(cls_name: str, config: dict, forward, ours: dict, directory: Path) -> None:
    import diffusers

    cls = getattr(diffusers, cls_name)
    shapes = _meta_shapes(lambda: cls(**{k: v for k, v in config.items() if not k.startswith("_")}))
    save_tensors(invert(forward, shapes, ours), directory, file_prefix="diffusion_pytorch_model")
    write_json_atomic(config, directory / "config.json")


def export_detokenizer(model, cfg, out: Path, *, vae: bool = True, dit: bool = True) -> list[str]:
    written = []
    if cfg.model.use_vae and vae:
        vae = model.detokenizer.vae
        abstract = nnx.state(vae, nnx.Param)
        _save_diffusers("AutoencoderKL", vae_config_to_diffusers(cfg.model.vae),
                        lambda t: dc.map_params(abstract, dc.modernise_vae_keys(t), renames=[(".to_out.", ".to_out.0.")]),
                        _params(vae), out / "vae")
        written.append("vae")
    if not dit:
        return written
    dit = model.detokenizer.dit
    ours = _params(dit)
    abstract = nnx.state(dit, nnx.Param)
    base = {p: a for p, a in ours.items() if p[0] not in DIT_NEW}
    _save_diffusers("PixArtTransformer2DModel", dit_config_to_diffusers(cfg.model.dit),
                    lambda t: dc.map_params(abstract, t, renames=dc.RENAMES_PIXART, stacked=["transformer_blocks"],
                                            new=DIT_NEW), base, out / "dit")
    extra = {".".join(map(str, p)): a for p, a in model_params(dit).items() if p[0] in DIT_NEW}
    if extra:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in extra.items()},
                  str(out / "dit" / EXTRA), metadata={"format": "cig_jax", "model_dit": json.dumps(
                      dataclasses.asdict(cfg.model.dit))})
    (out / "dit" / "README.md").write_text(
        "# PixArt-layout DiT of a cig_jax detokenizer\n\n`config.json` + `diffusion_pytorch_model.safetensors` load "
        "with `diffusers.PixArtTransformer2DModel.from_pretrained` (the identity branch off).\n"
        f"`{EXTRA}` holds what diffusers has no class for, named by cig_jax parameter path: `id_encoder.*` (the "
        "identity encoder: face embedding -> identity tokens), `id_attn.*` (parallel identity cross-attention), "
        "`visual_grid_proj.*` (grid injection), `identity_grid_proj.*` (identity grid injection); its metadata `model_dit` is the cig_jax DiT config "
        f"(identity_injection: {cfg.model.dit.identity_injection!r}). `init_weights.dit` reads this folder back; "
        "the extra file is read by `cig_jax.convert.export.load_extra`.\n")
    written.append("dit")
    return written


def load_vit(directory: str | Path) -> tuple[dict, dict[tuple, np.ndarray]]:
    """(the `model.vit` config as a dict, {our ViT path: array}) of a `vit/cig_vit.safetensors` export."""
    from safetensors import safe_open

    f = str(Path(directory) / "cig_vit.safetensors")
    with safe_open(f, framework="numpy") as st:
        config = json.loads(st.metadata()["model_vit"])
        return config, {tuple(int(x) if x.isdigit() else x for x in k.split(".")): st.get_tensor(k) for k in st.keys()}


def load_extra(directory: str | Path) -> dict[tuple, np.ndarray]:
    """{our DiT path: array} of a `dit/cig_extra.safetensors` (empty when absent)."""
    from safetensors.numpy import load_file

    f = Path(directory) / EXTRA
    if not f.is_file():
        return {}
    return {tuple(int(x) if x.isdigit() else x for x in k.split(".")): v for k, v in load_file(str(f)).items()}


def export_agent(model, cfg, out: Path) -> str:
    llm = model.mllm.llm
    llm = merge_lora(llm) if llm.cfg.lora_rank else llm
    t = {"llm." + k: a for k, a in hf_llm.ours_to_hf(_params(llm), llm.cfg).items()}
    ours = _params(model.mllm)
    for name in seedx.RESAMPLERS:
        sub = {p[1:]: a for p, a in ours.items() if p[0] == name}
        t.update(seedx.resampler_out(sub, f"{name}.", getattr(cfg.model, name)))
    if cfg.model.mllm.add_patch_pos:
        t["patch_pos_embed"] = ours[("patch_pos_embed",)]
    save_tensors({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in t.items()}, out / "seedx_agent",
                 file_prefix="agent")
    return "seedx_agent"


# ----------------------------------------------------------------------------------------------------------
# A loaded model -> the folders
# ----------------------------------------------------------------------------------------------------------
def missing_extras(cfg, skip: tuple = ()) -> None:
    """Raises `MissingExtra` (one line, before anything is written) when a part of `cfg`'s model not in `skip`
    needs a module that is not installed."""
    parts = {k: need for k, need in parts_of(cfg).items() if k not in skip}
    missing = sorted({need for need in parts.values() if need and importlib.util.find_spec(need[0]) is None})
    if missing:
        names = ", ".join(k for k, need in parts.items() if need in missing)
        modules = ", ".join(m for m, _ in missing)
        raise cli.MissingExtra(f"exporting {names} needs the 'export' extra: pip install -e '.[export]' (module "
                               f"{modules} is missing); --skip {names.replace(', ', ',')} exports the other parts")


def write_parts(model, cfg, tokenizer_dir: str | Path, out: str | Path, stages: list[dict],
                skip: tuple = ()) -> list[str]:
    """Writes every exportable part of `model` (a loaded `CIGModel` of config `cfg`) into `out`, but those in
    `skip`; `stages`: the saved configs of the run and the runs it started from, oldest first (the LLM's model
    card). Returns the folders written."""
    missing_extras(cfg, skip)
    parts = {k for k in parts_of(cfg) if k not in skip}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = export_llm(model, cfg, Path(tokenizer_dir), out, stages) if "llm" in parts else []
    if "vit" in parts:
        written.append(export_vit(model, cfg, out))
    if "seedx_agent" in parts:
        written.append(export_agent(model, cfg, out))
    if "dit" in parts or "vae" in parts:
        written += export_detokenizer(model, cfg, out, vae="vae" in parts, dit="dit" in parts)
    return written


PARTS = ("llm", "vit", "seedx_agent", "vae", "dit")
