"""The whole system: the SEED-X MLLM and the personalization detokenizer in one module tree.

Owns: `CIGModel` (`mllm`: ViT -> input resampler -> LLM -> output resampler; `detokenizer`: DiT with its
identity encoder, and a VAE unless `model.use_vae` is false), the check that the two fit (the DiT reads
the MLLM's visual embeddings), the names of the parts that a stage may train (`PARTS`) and the nnx filter
built from such names (`trainable_filter`).

Every stage trains a subset of this one tree, so every checkpoint holds the whole system and the last
stage's checkpoint is all that sampling needs.

Does not own: the parts themselves (`mllm.py`, `detokenizer.py`), which parts a stage trains by default
(`cig_jax/train/stages.py`).
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from cig_jax.config_base import ConfigError
from cig_jax.config_model import ModelConfig
from cig_jax.models.detokenizer import Detokenizer
from cig_jax.models.layers import LoRAParam
from cig_jax.models.mllm import MLLM


def _under(*prefix):
    return lambda path, value: tuple(str(p) for p in path[:len(prefix)]) == prefix


def _llm_adapter(path, value):
    keys = [str(p) for p in path]
    return keys[:2] == ["mllm", "llm"] and (isinstance(value, LoRAParam) or any("norm" in k for k in keys))


# Names a config may list in `train.trainable`, each a predicate on (path, variable).
PARTS = {
    "vit": _under("mllm", "vit"),
    "input_resampler": _under("mllm", "input_resampler"),
    "llm": _under("mllm", "llm"),
    "llm_adapters": _llm_adapter,  # SEED-X LoRA recipe: the adapters and the norms of the LLM
    "llm_embed": _under("mllm", "llm", "embed_tokens"),  # the token embedding: the new image-query / slot rows
    "output_resampler": _under("mllm", "output_resampler"),
    "patch_pos_embed": _under("mllm", "patch_pos_embed"),
    "identity_head": _under("mllm", "identity_head"),  # model.mllm.identity_dim > 0
    "person_retrieval": lambda path, value: any(_under("mllm", n)(path, value) for n in
                                                ("person_query", "person_key", "person_to_queries", "person_none")),  # person_slots
    "dit": _under("detokenizer", "dit"),  # includes the identity encoder
    "id_encoder": _under("detokenizer", "dit", "id_encoder"),
    "vae": _under("detokenizer", "vae"),
}


def added_by_later_stage(path, value) -> bool:
    """Parameters a stage may add to its previous stage's model (they start from their initialisation): LoRA
    adapters (`model.llm.lora_rank`) and the person-slot retrieval head (`model.mllm.person_slots`)."""
    return isinstance(value, LoRAParam) or PARTS["person_retrieval"](path, value)


def trainable_filter(parts: Sequence[str]):
    """An nnx filter selecting the `nnx.Param`s of the named parts (see `PARTS`)."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"train.trainable: unknown part(s) {unknown} (known: {sorted(PARTS)})")
    if not parts:
        raise ConfigError("train.trainable: empty (name at least one part)")
    preds = [PARTS[p] for p in parts]

    def pred(path, value):
        if not isinstance(value, nnx.Param):
            return False
        if "llm" not in parts and "llm_adapters" in parts and isinstance(value, LoRAParam):
            return _llm_adapter(path, value)
        return any(p(path, value) for p in preds)

    return pred


class CIGModel(nnx.Module):
    """`mllm` (MLLM) + `detokenizer` (Detokenizer)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.mllm = MLLM(cfg, rngs=rngs)
        self.detokenizer = Detokenizer(cfg.dit, cfg.vae if cfg.use_vae else None, rngs=rngs)

    def image_size(self) -> int:
        """Side of the images the system reads and writes (the ViT's input size)."""
        return self.mllm.vit.cfg.image_size
