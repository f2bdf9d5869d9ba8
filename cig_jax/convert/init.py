"""Released weights -> a run: the `init_weights` config section, applied to a model on the mesh.

Owns: where each `init_weights` part lands in the model tree (`PARTS`), checking that every named path exists
(`check_paths`, run before any model is built), and placing each converted tensor directly into its shard
on the mesh (`jax.make_array_from_callback` over one host tensor at a time; the LLM is read from the
safetensors headers first and then tensor by tensor, so no process ever holds a host copy of the whole
model). Per part one CheckpointError lists every missing, unexpected and mis-shaped tensor, naming the part
and the path. The LLM's vocabulary may grow: rows (embedding) / columns (lm_head) past the checkpoint's
vocabulary keep their initialisation (the SEED-X image and box tokens added to a LLaMA-2 tokenizer).

Does not own: the name mappings (`hf_llm`, `hf_vit`, `seedx`, `diffusers`), the model, the train state
(`cig_jax/train/state.py` calls `load_into`), writing a stage-0 checkpoint (`cig_jax/train/stage0.py`).
A leaf of the training corridor: nothing here imports `cig_jax.train`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx

from cig_jax.config import Config
from cig_jax.config_base import ConfigError
from cig_jax.convert import diffusers as dc, gguf as gguf_io, hf_llm, seedx
from cig_jax.convert.checkpoint_io import (CheckpointError, lazy_tensors, load_tensors, raise_if_mismatched, read_json,
                                           resolve_path)
from cig_jax.convert.export import load_extra
from cig_jax.convert.hf_vit import hf_vit_tensors
from cig_jax.convert.peft import peft_to_ours
from cig_jax.models.layers import LoRAParam
from cig_jax.sharding import names_of

# init_weights field -> where it lands in CIGModel
PARTS = {"seedx_agent": ("mllm",), "llm": ("mllm", "llm"), "llm_adapters": ("mllm", "llm"), "vit": ("mllm", "vit"),
         "vae": ("detokenizer", "vae"), "dit": ("detokenizer", "dit")}
_PIPELINE_SUBFOLDER = {"vae": "vae", "dit": "transformer"}


# ----------------------------------------------------------------------------------------------------------
# Paths, checked before any model is built
# ----------------------------------------------------------------------------------------------------------
def part_dir(part: str, path: str | Path) -> Path:
    """The folder a diffusers part is read from: `path` itself, or its vae/ or transformer/ subfolder when
    `path` is a pipeline folder (model_index.json)."""
    path = Path(path)
    if part in _PIPELINE_SUBFOLDER and (path / "model_index.json").is_file():
        return path / _PIPELINE_SUBFOLDER[part]
    return path


def _problem(part: str, path: str) -> Optional[str]:
    where = f"init_weights.{part}: {path}"
    try:
        p = resolve_path(path)
    except CheckpointError as e:
        return f"init_weights.{part}: {e}"
    if part in ("llm", "tokenizer") and gguf_io.is_gguf(p):
        return None if p.is_file() else f"{where}: GGUF file not found"
    if part in ("llm", "vae", "dit"):
        d = part_dir(part, p)
        if not (d / "config.json").is_file():
            what = {"llm": "a Hugging Face LLaMA / Qwen2 folder (config.json + *.safetensors) or a .gguf file",
                    "vae": "a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) "
                           "or a pipeline folder with model_index.json and vae/",
                    "dit": "a diffusers PixArtTransformer2DModel folder or a pipeline folder with model_index.json "
                           "and transformer/"}[part]
            return f"{where}: {'not found' if not p.exists() else 'no config.json in ' + str(d)} (expected {what})"
    elif part == "vit":
        if not (p.is_file() or (p / "config.json").is_file()):
            return (f"{where}: not found (expected a Hugging Face CLIP / SigLIP vision folder with config.json, or "
                    "the SEED-X Qwen-VL ViT file QwenViT/qwen_vit_G.pt)")
    elif part == "seedx_agent":
        if not p.exists():
            return f"{where}: not found (expected the SEED-X agent file, seed_x*/agent/pytorch_model.bin)"
    elif part == "llm_adapters":
        if not (p / "adapter_config.json").is_file():
            return f"{where}: not found or no adapter_config.json in it (expected a PEFT LoRA folder)"
    elif part == "tokenizer":
        if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
            return (f"{where}: not found or no tokenizer.json / tokenizer.model in it (expected a Hugging Face "
                    "tokenizer folder, e.g. LLaMA-2's)")
    return None


def check_paths(cfg: Config, source: str = "<config>") -> None:
    """A ConfigError naming every `init_weights` part whose path does not hold what that part needs."""
    problems = [m for part, path in cfg.init_weights.named().items() if (m := _problem(part, path))]
    if cfg.init_weights.llm and cfg.init_weights.seedx_agent:
        problems.append("init_weights: name either llm or seedx_agent (the agent holds the LLM), not both")
    if cfg.init_weights.llm_layers and not (cfg.init_weights.llm or cfg.init_weights.seedx_agent):
        problems.append("init_weights.llm_layers: no llm (or seedx_agent) to take the layers from")
    if cfg.init_weights.llm_layers and cfg.init_weights.llm_layers != cfg.model.llm.num_layers:
        problems.append(f"init_weights.llm_layers ({cfg.init_weights.llm_layers}) must equal model.llm.num_layers "
                        f"({cfg.model.llm.num_layers})")
    if cfg.init_weights.llm_adapters and not cfg.model.llm.lora_rank:
        problems.append("init_weights.llm_adapters: model.llm.lora_rank is 0 (set the adapters' rank and alpha)")
    if problems:
        raise ConfigError(f"{source}: pretrained weights missing: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------
# Plans: {path inside the part: (shape, read)}, nothing read yet (or one part's arrays for the small parts)
# ----------------------------------------------------------------------------------------------------------
Plan = dict  # {tuple path: (shape, Callable[[], np.ndarray])}


def _eager(values: dict) -> Plan:
    return {p: (tuple(np.shape(a)), (lambda a=a: np.asarray(a))) for p, a in values.items()}


def _llm_plan(path: str, cfg: Config) -> Plan:
    source = f"init_weights.llm {path}"
    local = resolve_path(path)
    if gguf_io.is_gguf(local):
        tensors = gguf_io.GGUFTensors(local)
        _check_llm_config(gguf_io.config_from_gguf(gguf_io.read_metadata(local), tied=tensors.tied, source=source),
                          cfg, source)
    else:
        tensors = lazy_tensors(local)
        _check_llm_config(hf_llm.config_from_hf(read_json(local / "config.json"), source=source), cfg, source)
    return hf_llm.hf_to_ours_lazy(tensors, cfg.model.llm, source=source,
                                  drop_layers_past=bool(cfg.init_weights.llm_layers))


def _check_llm_config(theirs, cfg: Config, source: str) -> None:
    """The architecture fields of the checkpoint's config must be the run's (shapes alone miss RoPE/eps); with
    `init_weights.llm_layers` the checkpoint may have more layers than the model keeps."""
    ours = cfg.model.llm
    fields = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "rope_theta",
              "rms_norm_eps", "qkv_bias", "tie_word_embeddings", "rope_scaling")
    keep = cfg.init_weights.llm_layers
    diffs = [f"{f}: checkpoint {getattr(theirs, f)!r} vs model.llm {getattr(ours, f)!r}" for f in fields
             if getattr(theirs, f) != getattr(ours, f) and not (f == "num_layers" and keep)]
    if keep and theirs.num_layers < keep:
        diffs.append(f"init_weights.llm_layers {keep} but the checkpoint has {theirs.num_layers} layers")
    if theirs.resolved_head_dim() != ours.resolved_head_dim():
        diffs.append(f"head_dim: checkpoint {theirs.resolved_head_dim()} vs model.llm {ours.resolved_head_dim()}")
    if theirs.vocab_size > ours.vocab_size:
        diffs.append(f"vocab_size: checkpoint {theirs.vocab_size} > model.llm {ours.vocab_size}")
    if diffs:
        raise CheckpointError(f"{source}: its config is another LLM than model.llm: " + "; ".join(diffs))


def _agent_plan(path: str, cfg: Config) -> Plan:
    source = f"init_weights.seedx_agent {path}"
    t = seedx.read_state_dict(path)
    want = seedx.seedx_shapes(cfg.model, vit=False)
    ignorable = lambda k: k.endswith("rotary_emb.inv_freq")  # noqa: E731
    raise_if_mismatched(f"{source}: not a SEED-X agent for this model config",
                        sorted(k for k in want if k not in t),
                        sorted(f"{k}: checkpoint {tuple(np.shape(t[k]))} vs expected {tuple(want[k])}" for k in want
                               if k in t and tuple(np.shape(t[k])) != tuple(want[k])),
                        sorted(k for k in t if k not in want and not ignorable(k)))
    llm_t = {k[len("llm."):]: v for k, v in t.items() if k.startswith("llm.")}
    plan = {("llm",) + p: v for p, v in hf_llm.hf_to_ours_lazy(llm_t, cfg.model.llm, source=source).items()}
    plan.update(_eager(seedx.agent_rest_to_ours(t, cfg.model, source=source)))
    return plan


def _vit_plan(path: str, cfg: Config) -> Plan:
    p = Path(path)
    if p.is_file():  # the SEED-X Qwen-VL ViT-G
        t = seedx.vit_names(seedx.read_state_dict(p))
        source = f"init_weights.vit {path}"
        want = {k: s for k, s in seedx.seedx_shapes(cfg.model).items() if k.startswith(seedx.VIT_PREFIX)}
        raise_if_mismatched(f"{source}: not the Qwen-VL ViT of this model config",
                            sorted(k for k in want if k not in t),
                            sorted(f"{k}: checkpoint {tuple(np.shape(t[k]))} vs expected {tuple(want[k])}"
                                   for k in want if k in t and tuple(np.shape(t[k])) != tuple(want[k])),
                            sorted(k for k in t if k not in want))
        return _eager({k[1:]: v for k, v in seedx.vit_to_ours(t, cfg.model, source=source).items()})

    mapped = hf_vit_tensors(load_tensors(p), cfg.model.vit, f"init_weights.vit {path}")
    if cfg.model.vit.pool != "map":  # a SigLIP head this config does not build
        mapped = {k: v for k, v in mapped.items() if k[0] != "head"}
    return _eager(mapped)


def _diffusers_plan(part: str, path: str, model) -> Plan:

    d = part_dir(part, path)
    what = f"init_weights.{part} {d}"
    if part == "vae":
        tensors = dc.modernise_vae_keys(dc.read_tensors(d))
        return _eager(dc.map_params(nnx.state(model.detokenizer.vae, nnx.Param), tensors,
                                    renames=[(".to_out.", ".to_out.0.")], what=what))

    values = dc.map_params(nnx.state(model.detokenizer.dit, nnx.Param), dc.read_tensors(d),
                           renames=dc.RENAMES_PIXART, stacked=["transformer_blocks"], new=dc.DIT_NEW, what=what)
    values.update(load_extra(d))  # a cig_jax export's identity branch, when the folder has one
    return _eager(values)


# ----------------------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------------------
def _keeps(part: str, rel: tuple, var) -> bool:
    """Parameters a part's checkpoint is not expected to hold (they keep their initialisation)."""
    if part == "llm_adapters":
        return not isinstance(var, LoRAParam)  # the adapters only
    if isinstance(var, LoRAParam):
        return True
    if part == "dit" and rel and rel[0] in dc.DIT_NEW:
        return True
    if part == "seedx_agent" and rel and rel[0] in ("vit",):
        return True  # the agent file has no ViT: init_weights.vit names it
    return False


def _grow_axis(shape: tuple, want: tuple, names: tuple) -> Optional[int]:
    """The vocab axis along which a checkpoint tensor is shorter than the model's (None: not a growth)."""
    if len(shape) != len(want):
        return None
    diff = [i for i, (a, b) in enumerate(zip(shape, want)) if a != b]
    if len(diff) == 1 and shape[diff[0]] < want[diff[0]] and names and names[diff[0]] == "vocab":
        return diff[0]
    return None


def grow_rows(host: np.ndarray, size: int, axis: int, seed: int = 0) -> np.ndarray:
    """`host` grown to `size` entries along `axis` (the vocabulary): the new entries are drawn from the existing
    ones' per-dimension mean and standard deviation, so a new token's embedding (and, when tied, its output
    row) starts where the released model's tokens live rather than at an arbitrary scale."""
    moved = np.moveaxis(host, axis, 0)  # [n, ...]
    mean, std = moved.mean(0), moved.std(0)
    new = mean + std * np.random.default_rng(seed).standard_normal((size - moved.shape[0],) + moved.shape[1:])
    return np.moveaxis(np.concatenate([moved, new.astype(host.dtype)], 0), 0, axis)


def place(targets: dict, plan: Plan, *, part: str, source: str, put: Callable[[tuple, jax.Array], None],
          say: Callable = print) -> int:
    """Checks `plan` against `targets` ({path: nnx Variable whose value carries `.sharding`: real or abstract})
    and then places each tensor into its shards, one at a time, handing it to `put(path, array)`. Returns the
    number of values placed. A tensor shorter than the model's along the vocabulary grows (`grow_rows`)."""
    missing = sorted(".".join(map(str, p)) for p, v in targets.items() if p not in plan and not _keeps(part, p, v))
    unexpected = sorted(".".join(map(str, p)) for p in plan if p not in targets)
    mismatched, grow = [], {}
    for p, (shape, _) in plan.items():
        if p in targets:
            want = tuple(targets[p].value.shape)
            if tuple(shape) != want:
                axis = _grow_axis(tuple(shape), want, tuple(names_of(targets[p]) or ()))
                if axis is None:
                    mismatched.append(f"{'.'.join(map(str, p))}: checkpoint {tuple(shape)} vs model {want}")
                else:
                    grow[p] = axis
    raise_if_mismatched(f"{source}: part '{part}' does not fit the model config", missing, mismatched, unexpected)
    for p, axis in grow.items():
        say(f"[init] {part}: {'.'.join(map(str, p))} grows from {plan[p][0][axis]} to "
            f"{targets[p].value.shape[axis]} along the vocabulary (new entries drawn from the rows' statistics)")
    for p, (shape, read) in plan.items():
        var = targets[p]
        sds = var.value
        host = read()  # the one host copy of this tensor
        dtype = np.dtype(sds.dtype)
        if p in grow:
            host = grow_rows(host, sds.shape[grow[p]], grow[p])
        arr = jax.make_array_from_callback(tuple(sds.shape), sds.sharding,
                                           lambda idx, h=host: np.asarray(h[idx], dtype=dtype))
        del host
        put(p, arr)
        del arr
    return len(plan)


def _plan(part: str, path: str, cfg: Config, model) -> Plan:
    if part == "llm":
        return _llm_plan(path, cfg)
    if part == "seedx_agent":
        return _agent_plan(path, cfg)
    if part == "vit":
        return _vit_plan(path, cfg)
    if part == "llm_adapters":
        return _eager(peft_to_ours(path, cfg.model.llm))
    return _diffusers_plan(part, path, model)


def load_into(model: nnx.Module, cfg: Config, mesh=None, rules=None, *, say: Callable = print) -> list[str]:
    """Overwrites `model`'s (a CIGModel already on the mesh) parameters with the parts named in
    `cfg.init_weights`, part by part, tensor by tensor. Returns the parts loaded."""
    check_paths(cfg)
    loaded = []
    for part in PARTS:
        path = getattr(cfg.init_weights, part)
        if not path:
            continue
        if part in ("vae",) and not cfg.model.use_vae:
            raise ConfigError(f"init_weights.vae {path}: model.use_vae is false (pixel space): there is no VAE")
        prefix = PARTS[part]
        sub = model
        for name in prefix:
            sub = getattr(sub, name)
        targets = dict(nnx.to_flat_state(nnx.state(sub, nnx.Param)))
        plan = _plan(part, str(resolve_path(path)), cfg, model)

        def put(p, arr, sub=sub, targets=targets):
            nnx.update(sub, nnx.from_flat_state([(p, targets.pop(p).replace(arr))]))  # the old value is freed

        n = place(targets, plan, part=part, source=f"init_weights.{part} {path}", say=say, put=put)
        del plan, targets
        say(f"[init] {part}: {n} tensors from {path}")
        loaded.append(part)
    return loaded


def load_abstract(abstract: nnx.State, part: str, path: str, cfg: Config, *, say: Callable = print) -> nnx.State:
    """`abstract` (the nnx.State of ShapeDtypeStructs with shardings of the part's module, e.g. the LLM) filled
    from `path` with no random initialisation at all: what `bench.init_memory` measures."""
    if part not in ("llm", "vit", "llm_adapters"):
        raise ValueError(f"load_abstract: part {part!r} (llm or vit)")
    targets = dict(nnx.to_flat_state(abstract))
    out = {}
    place(targets, _plan(part, str(resolve_path(path)), cfg, None), part=part, source=f"init_weights.{part} {path}",
          say=say, put=lambda p, arr: out.__setitem__(p, targets[p].replace(arr)))
    rest = [(p, v) for p, v in targets.items() if p not in out]
    return nnx.from_flat_state(list(out.items()) + rest)
