"""Training stages: for each `train.stage`, what trains, what is frozen, which loss and which data.

Owns: `Task`, the stage's contract with the loop in `trainer.py`, and `build_task(cfg)`, the one place a
stage name becomes a model factory, a trainable-parameter filter, a loss and a dataset; the records and the
tokenizer a stage reads.

Stages (the paper's multi-stage instruction fine-tuning; every MLLM-era stage trains parts of one `CIGModel`,
so each checkpoint holds the whole system and `train.init_from` chains them):
    lm           the LLM alone on token data (smoke job and LLM benchmarks)
    detokenizer  stage 1: the DiT (+ identity encoder) reconstructs single images from the pooled ViT features
                 (the targets the MLLM's visual embeddings regress onto) and the shown person's identity
                 embedding; the MLLM is frozen
    personalize  stage 2: the MLLM (resamplers + LLM, or its LoRA adapters) on single-turn personalization:
                 next-token loss on the answer + regression of the image queries onto the target image;
                 ViT and detokenizer frozen
    multiround   stage 3: the same losses on the non-Markov multi-round mixture (name-based, rollback,
                 Markov edits) with single-turn data kept; optionally (`train.detokenizer_loss_weight`) the
                 frozen DiT's loss on the predicted visual embeddings, end to end

Defaults of `train.trainable` per stage are in `DEFAULT_TRAINABLE`; a config may name other parts (see
`cig_jax.models.cig.PARTS`), e.g. the tiny demo trains the ViT in stage 1 because no pretrained ViT exists
offline.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
from flax import nnx

from cig_jax import fs
from cig_jax.config import Config
from cig_jax.config_base import ConfigError
from cig_jax.convert import gguf
from cig_jax.convert.checkpoint_io import resolve_path
from cig_jax.data import buckets, pipeline, sources
from cig_jax.data.chat_template import ChatTemplate, add_mllm_tokens, load_tokenizer
from cig_jax.data.lm_smoke import lm_smoke_dataset
from cig_jax.data.persons import layout_boxes
from cig_jax.data.tiny_tokenizer import build_tiny_tokenizer
from cig_jax.models.cig import CIGModel, trainable_filter
from cig_jax.models.llm import LLM, shifted_token_loss
from cig_jax.models.mllm import mllm_loss, pool_targets
from cig_jax.models.person_retrieval import take_images
from cig_jax.train.flops import task_flops_per_example


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    make_model: Callable[[], nnx.Module]  # builds the model (run under jit with sharded outputs)
    trainable: Any  # nnx filter selecting the parameters that train; everything else is frozen
    loss_fn: Callable[[nnx.Module, dict], tuple[jax.Array, dict]]  # batch carries 'rng' (a key) in the step
    make_dataset: Callable[[int, int], grain.IterDataset]  # (process_index, process_count) -> host batches
    tokens_per_example: int  # padded length (data.seq_len; with data.length_buckets the largest bucket)
    batch_spec: Callable[[int], dict] = None  # global batch -> {key: (shape, dtype)} (ahead-of-time compiles)
    images_per_example: float = 0.0
    # Gradient accumulation: the loss metric each microbatch weighs by (`trainer.make_train_step` weight_by):
    # 'loss_tokens' for a per-token mean (normalised over the whole batch); None: equal weights (the mean of
    # microbatch means, e.g. stages 2-3, whose loss adds a per-token LM term and a per-block regression term)
    accum_weight: Optional[str] = None

    @functools.cached_property
    def flops_per_example(self) -> float:
        """Model FLOPs of one example's forward + backward (for MFU), counted from the traced loss on first use:
        see `cig_jax.train.flops`."""
        return task_flops_per_example(self)


DEFAULT_TRAINABLE = {
    "detokenizer": ["dit"],
    "personalize": ["input_resampler", "llm", "output_resampler", "patch_pos_embed"],
    "multiround": ["input_resampler", "llm", "output_resampler", "patch_pos_embed"],
}
# The paper's mixtures (synthetic kinds; `data.kinds` overrides). Stage 3 keeps single-turn data.
DEFAULT_KINDS = {
    "personalize": ["single_turn"],
    "multiround": ["recall", "recall", "rollback", "markov_edit", "single_turn"],
}


# ----------------------------------------------------------------------------------------------------------
# LM smoke stage
# ----------------------------------------------------------------------------------------------------------
def lm_loss(model: LLM, batch: dict) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy on `batch['tokens']` weighted by `batch['loss_mask']`."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    logits = model(tokens, attention_mask=batch.get("attention_mask")).logits
    loss, count = shifted_token_loss(logits, tokens, mask)
    return loss, {"lm_loss": loss, "loss_tokens": count}


def _lm_task(cfg: Config) -> Task:
    llm, data = cfg.model.llm, cfg.data  # data.source: random_tokens (checked by config.Config.check)

    def make_dataset(process_index: int, process_count: int):
        return lm_smoke_dataset(vocab=llm.vocab_size, seq_len=data.seq_len,
                                local_batch=data.global_batch_size // process_count, seed=data.seed,
                                process_index=process_index, process_count=process_count)

    spec = lambda b: {k: ((b, data.seq_len), jnp.int32) for k in ("tokens", "loss_mask")}  # noqa: E731
    return Task(
        name="lm",
        make_model=lambda: LLM(llm, rngs=nnx.Rngs(cfg.train.seed)),
        trainable=nnx.Param,
        loss_fn=lm_loss,
        accum_weight="loss_tokens",
        make_dataset=make_dataset,
        tokens_per_example=data.seq_len,
        batch_spec=spec,
    )


# ----------------------------------------------------------------------------------------------------------
# Records and tokenizer
# ----------------------------------------------------------------------------------------------------------
def load_stage_records(cfg: Config, default_kinds: Sequence[str] = ()) -> Sequence:
    """The conversations a stage reads (`cig_jax.data.sources.stage_records` of its data config)."""
    return sources.stage_records(cfg.data, default_kinds)


def stage_tokenizer(cfg: Config):
    """`init_weights.tokenizer` or `data.tokenizer` (a Hugging Face tokenizer folder or a GGUF file, the MLLM
    tokens added) or
    the tiny tokenizer built locally; checked against `model.llm.vocab_size`. Saved under `<workdir>/tokenizer`
    by the trainer so sampling finds it."""
    if cfg.init_weights.tokenizer or cfg.data.tokenizer:
        path = resolve_path(cfg.init_weights.tokenizer or cfg.data.tokenizer)
        if gguf.is_gguf(path):
            tok = gguf.tokenizer_from_gguf(path)
            add_mllm_tokens(tok)
        else:
            tok = load_tokenizer(path)
    else:
        tok = build_tiny_tokenizer(Path(fs.local_cache(cfg.train.workdir, "tokenizer_cache")),
                                   chat_format=cfg.model.mllm.chat_format)
    if len(tok) > cfg.model.llm.vocab_size:
        raise ConfigError(f"model.llm.vocab_size ({cfg.model.llm.vocab_size}) is smaller than the tokenizer "
                          f"({len(tok)} tokens incl. the MLLM tokens)")
    return tok


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------
def detokenizer_loss(model: CIGModel, batch: dict, *, diffusion, train_vit: bool) -> tuple[jax.Array, dict]:
    """Stage 1: reconstruct `images` [b, S, S, 3] from pooled ViT features [b, Q, D_vit] and `identity`."""
    mllm = model.mllm
    feats = mllm.encode_images(batch["images"], frozen=not train_vit)  # [b, K, D_vit]
    visual = pool_targets(feats, mllm.num_image_tokens, mllm.cfg.reg_target_pool)  # [b, Q, D_vit]
    targets = batch.get("targets", batch["images"])  # [b, T, T, 3] at the detokenizer's output size
    mask = batch.get("identity_mask")  # [b, P]
    loss = model.detokenizer.loss(batch["rng"], targets, visual, batch.get("identity"), diffusion,
                                  identity_mask=mask, identity_boxes=batch.get("identity_boxes"))
    shown = 0.0 if mask is None else jnp.mean(jnp.any(mask > 0, axis=-1).astype(jnp.float32))
    return loss, {"diffusion_loss": loss, "identity_fraction": shown}


def conversation_loss(model: CIGModel, batch: dict, *, diffusion, detokenizer_weight: float, lora_dropout: bool,
                      train_dit: bool = False) -> tuple[jax.Array, dict]:
    """Stages 2 and 3: the MLLM's next-token + regression loss; with `detokenizer_weight` > 0 also the DiT's
    diffusion loss of each target image given the MLLM's *predicted* visual embeddings.

    With the DiT frozen, that loss trains the MLLM through the DiT (condition dropout off: every image is drawn
    from its embeddings). With the DiT trainable (`train_dit`, e.g. `train.trainable: [dit]`: the detokenizer
    adapts to the embeddings the MLLM predicts, which leave what the text does not say under-specified) the
    diffusion config's condition dropout stays on, so the unconditional branch of guidance keeps training."""
    key = batch["rng"]
    k_drop, k_dit = jax.random.split(key)
    mllm = model.mllm
    inputs = {k: v for k, v in batch.items() if k != "rng"}
    if not detokenizer_weight:
        return mllm_loss(mllm, inputs, dropout_rng=k_drop if lora_dropout else None)
    loss, metrics, out = mllm_loss(mllm, inputs, dropout_rng=k_drop if lora_dropout else None, return_output=True)
    b, blocks = out.query_image_index.shape
    valid = (out.query_image_index >= 0).reshape(-1)
    target = take_images(batch["images"], out.query_image_index).reshape(b * blocks, *batch["images"].shape[2:])
    side = model.detokenizer.output_size()
    if target.shape[1] != side:  # the ViT's input size -> the detokenizer's output size
        target = jax.image.resize(target, (target.shape[0], side, side, target.shape[3]), "bilinear")
    vis = out.visual_embeddings.reshape(b * blocks, *out.visual_embeddings.shape[2:])
    if not train_dit:
        diffusion = dataclasses.replace(diffusion, p_drop_visual=0.0, p_drop_identity=0.0)
    dit_model = model.detokenizer.dit
    ident, on, boxes = (drawn_identities(out, b * blocks, dit_model.cfg.identity.max_identities)
                        if dit_model.id_encoder is not None else (None, None, None))
    dit = model.detokenizer.loss(k_dit, target, vis, ident, diffusion, identity_mask=on, identity_boxes=boxes,
                                 weights=valid.astype(jnp.float32))
    return loss + detokenizer_weight * dit, dict(metrics, detokenizer_loss=dit)


def drawn_identities(out, n: int, most: int) -> tuple:
    """What sampling draws each target image with, from an MLLM output with person slots: the identities its
    person queries retrieved (no gradient), those found (non-zero) switched on, laid out as sampling lays them
    out (`data.persons.layout_boxes`: two people in the left / right halves, one over the whole image)
    -> (identity [n, P, De], mask [n, P], boxes [n, P, 4]); (None, None, None) without person slots."""
    if out.identity_image_index is None or out.identity is None:
        return None, None, None
    ident = jax.lax.stop_gradient(out.identity.astype(jnp.float32)).reshape(n, -1, out.identity.shape[-1])[:, :most]
    on = (jnp.sum(ident * ident, axis=-1) > 1e-12) & out.identity_valid.reshape(n, -1)[:, :most]  # [n, P]
    pair = jnp.sum(out.identity_valid.reshape(n, -1), axis=-1) > 1  # the image shows two people
    p = ident.shape[1]
    whole = jnp.broadcast_to(jnp.asarray(layout_boxes(1)), (p, 4))
    boxes = jnp.where(pair[:, None, None], jnp.asarray(layout_boxes(p))[None], whole[None])
    return ident, on.astype(jnp.float32), boxes


# ----------------------------------------------------------------------------------------------------------
# MLLM-era stages
# ----------------------------------------------------------------------------------------------------------
def _system_task(cfg: Config) -> Task:
    stage, data, model_cfg = cfg.train.stage, cfg.data, cfg.model
    parts = list(cfg.train.trainable) or DEFAULT_TRAINABLE[stage]
    if stage != "detokenizer" and model_cfg.llm.lora_rank and "llm" in parts and not cfg.train.trainable:
        parts = [p if p != "llm" else "llm_adapters" for p in parts]  # SEED-X LoRA recipe
    trainable = trainable_filter(parts)
    abstract = nnx.eval_shape(lambda: CIGModel(model_cfg, rngs=nnx.Rngs(0)))
    size = model_cfg.vit.image_size
    out_size = abstract.detokenizer.output_size()
    n_img = data.max_images
    de = model_cfg.dit.identity.embedding_dim
    n_id = model_cfg.dit.identity.max_identities

    def make_model():
        return CIGModel(model_cfg, rngs=nnx.Rngs(cfg.train.seed))

    if stage == "detokenizer":
        train_vit = "vit" in parts

        def make_dataset(process_index, process_count):
            records = load_stage_records(cfg)
            return pipeline.make_image_dataset(records, pipeline_options(cfg, process_index, process_count), de,
                                               target_size=out_size, max_identities=n_id)

        def spec(b):
            out = {"images": ((b, size, size, 3), jnp.float32), "identity": ((b, n_id, de), jnp.float32),
                   "identity_mask": ((b, n_id), jnp.float32), "identity_boxes": ((b, n_id, 4), jnp.float32)}
            if out_size != size:
                out["targets"] = ((b, out_size, out_size, 3), jnp.float32)
            return out

        return Task(stage, make_model, trainable,
                    lambda m, b: detokenizer_loss(m, b, diffusion=cfg.diffusion, train_vit=train_vit),
                    make_dataset, 0, spec, images_per_example=1.0)

    def make_dataset(process_index, process_count):
        return conversation_dataset(cfg, load_stage_records(cfg, DEFAULT_KINDS[stage]), process_index, process_count)

    def spec(b):
        out = {k: ((b, data.seq_len), jnp.int32) for k in CONVERSATION_KEYS[:-1]}
        out["images"] = ((b, n_img, size, size, 3), jnp.float32)
        if model_cfg.mllm.identity_dim:
            out["image_identity"] = ((b, n_img, model_cfg.mllm.identity_dim), jnp.float32)
            out["image_identity_mask"] = ((b, n_img), jnp.float32)
        return out

    weight = cfg.train.detokenizer_loss_weight
    return Task(stage, make_model, trainable,
                lambda m, b: conversation_loss(m, b, diffusion=cfg.diffusion, detokenizer_weight=weight,
                                               lora_dropout=model_cfg.llm.lora_dropout > 0, train_dit="dit" in parts),
                make_dataset, data.seq_len, spec, images_per_example=float(n_img))


CONVERSATION_KEYS = ("input_ids", "role", "image_index", "loss_mask", "attention_mask", "images")
IDENTITY_KEYS = ("image_identity", "image_identity_mask")  # with model.mllm.identity_dim > 0


def pipeline_options(cfg: Config, process_index: int, process_count: int):
    """The data config as `pipeline.PipelineOptions` for this process's share of the global batch."""
    d = cfg.data
    return pipeline.PipelineOptions(seq_len=d.seq_len, max_images=d.max_images, image_size=cfg.model.vit.image_size,
                                    batch_size=d.global_batch_size // process_count, seed=d.seed,
                                    markov_view=d.markov_view, process_index=process_index,
                                    process_count=process_count, worker_count=d.worker_count,
                                    prefetch_buffer=d.prefetch_buffer, length_buckets=d.effective_buckets(),
                                    bucket_window=d.bucket_window, identity_dim=cfg.model.mllm.identity_dim)


def conversation_dataset(cfg: Config, records: Sequence, process_index: int, process_count: int):
    """MLLM stages' batches of `records` (CONVERSATION_KEYS), this process's share ([batch, seq_len] tokens, or
    [batch, bucket] per batch with data.length_buckets)."""
    ds = buckets.make_dataset(records, _template(cfg), pipeline_options(cfg, process_index, process_count))
    keys = CONVERSATION_KEYS + (IDENTITY_KEYS if cfg.model.mllm.identity_dim else ())
    return ds.map(lambda ex: {k: ex[k] for k in keys})


def _template(cfg: Config):
    return ChatTemplate(stage_tokenizer(cfg), cfg.model.mllm.num_image_tokens, cfg.model.mllm.chat_format,
                        cfg.model.mllm.person_slots)


STAGES = {"lm": _lm_task, "detokenizer": _system_task, "personalize": _system_task, "multiround": _system_task}


def build_task(cfg: Config) -> Task:
    """The stage's task; `cfg` as `load_config` checked it (stage known, data source and parts fit)."""
    return STAGES[cfg.train.stage](cfg)
