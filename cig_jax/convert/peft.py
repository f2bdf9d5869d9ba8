"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) <-> our LLM's LoRA parameters.

Owns: the adapter config check (LoRA, rank, alpha, target modules must be the run's `model.llm` LoRA settings)
and the tensor mapping both ways. PEFT stores, per layer i and projection,

    base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight   [r, in]   -> lora_a [layers, in, r]
    base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_B.weight   [out, r]  -> lora_b [layers, r, out]

and scales by lora_alpha / r, as `layers.Dense` does.

Does not own: the base weights (`hf_llm`), merging (`models/llm.merge_lora`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cig_jax.config_model import LLMConfig
from cig_jax.convert.checkpoint_io import CheckpointError, raise_if_mismatched, read_json, write_json_atomic
from cig_jax.convert.hf_llm import LAYER_LINEARS

PREFIX = "base_model.model.model.layers."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _targets(cfg: LLMConfig) -> list[tuple[str, str]]:
    return [(g, n) for g, n in LAYER_LINEARS if n in cfg.lora_targets]


def check_adapter_config(ac: dict, cfg: LLMConfig, source: str) -> None:
    """The adapters must be the LoRA this LLM builds (one error listing every difference)."""
    targets = ac.get("target_modules") or []
    targets = sorted([targets] if isinstance(targets, str) else targets)
    want = sorted(n for _, n in _targets(cfg))
    diffs = []
    for key, theirs, ours in (("peft_type", ac.get("peft_type"), "LORA"), ("r", ac.get("r"), cfg.lora_rank),
                              ("lora_alpha", float(ac.get("lora_alpha", 0)), float(cfg.lora_alpha)),
                              ("target_modules", targets, want), ("use_rslora", bool(ac.get("use_rslora")), False),
                              ("use_dora", bool(ac.get("use_dora")), False), ("bias", ac.get("bias", "none"), "none")):
        if theirs != ours:
            diffs.append(f"{key}: adapters {theirs!r} vs model.llm {ours!r}")
    if ac.get("modules_to_save"):
        diffs.append(f"modules_to_save {ac['modules_to_save']}: only LoRA matrices are read")
    if diffs:
        raise CheckpointError(f"{source}: these adapters are not this run's LoRA (model.llm.lora_*): " + "; ".join(diffs))


def peft_to_ours(directory: str | Path, cfg: LLMConfig) -> dict[tuple, np.ndarray]:
    """{our LLM path (layers, group, name, lora_a|lora_b): array} from a PEFT LoRA folder."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    source = str(directory)
    check_adapter_config(read_json(directory / CONFIG), cfg, source)
    if not (directory / WEIGHTS).is_file():
        raise CheckpointError(f"{directory / WEIGHTS}: not found (PEFT adapters are saved as {WEIGHTS})")
    t = load_file(str(directory / WEIGHTS))
    out, used, missing = {}, set(), []
    for group, name in _targets(cfg):
        for ours, theirs, flip in (("lora_a", "lora_A", True), ("lora_b", "lora_B", True)):
            keys = [f"{PREFIX}{i}.{group}.{name}.{theirs}.weight" for i in range(cfg.num_layers)]
            absent = [k for k in keys if k not in t]
            if absent:
                missing += absent
                continue
            used.update(keys)
            out[("layers", group, name, ours)] = np.stack([t[k].T if flip else t[k] for k in keys]).astype(np.float32)
    raise_if_mismatched(f"{source}: PEFT adapters do not fit model.llm", missing, [],
                        sorted(k for k in t if k not in used))
    return out


def save_peft(params: dict[tuple, np.ndarray], cfg: LLMConfig, directory: str | Path, *,
              base_model: str = "") -> None:
    """Writes our LLM's LoRA parameters ({path: array}, paths as in `peft_to_ours`) as a PEFT LoRA folder."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    t = {}
    for group, name in _targets(cfg):
        a, b = params[("layers", group, name, "lora_a")], params[("layers", group, name, "lora_b")]
        for i in range(cfg.num_layers):  # a [layers, in, r] -> [r, in]; b [layers, r, out] -> [out, r]
            t[f"{PREFIX}{i}.{group}.{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a[i], np.float32).T)
            t[f"{PREFIX}{i}.{group}.{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b[i], np.float32).T)
    save_file(t, str(directory / WEIGHTS), metadata={"format": "pt"})
    write_json_atomic({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                       "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                       "target_modules": sorted(n for _, n in _targets(cfg)), "bias": "none",
                       "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": False},
                      directory / CONFIG)
