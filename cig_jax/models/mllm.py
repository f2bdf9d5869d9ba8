"""The SEED-X MLLM: frozen ViT -> input resampler -> LLaMA (with image-query tokens) -> output resampler.

Owns: `MLLM` (the four parts wired together), filling a token sequence's input-image slots with image tokens
(`embed_sequence`), gathering the final hidden states at image-query slots into visual embeddings, generating
an image's visual embeddings on a KV cache (`generate_image`), the training loss (`mllm_loss`: next-token
cross-entropy on the loss mask + regression of visual embeddings onto pooled ViT features).

Person slots (`model.mllm.person_slots`, layout in `cig_jax/data/persons.py`): a history slot's embedding is
the summary of its person's crop; each person query of a drawn image attends once (the retrieval head:
`person_query` / `person_key` over the LLM's final states, plus a learned 'no one') to the earlier slots and takes
the found slot's summary (added to the drawn image's query states) and identity (what the detokenizer draws
with; none when it finds no one). A sampling cache keeps the slots it fed as a `PersonMemory`. `retrieval_loss`
trains the head onto the slots that show the person as the answer draws them.

Does not own: the token layout and masks (`cig_jax/data/chat_template.py`: role 0 text, 1 input-image slot,
2 image-query slot, `image_index` = which image of the example fills / is the target of a slot), the parts
themselves (`llm.py`, `vit.py`, `resampler.py`), checkpoint names (`cig_jax/convert/seedx.py`), decoding loops
(`cig_jax/sample/`).

Shapes: images [batch, num_images, H, W, C] (normalised, channels last); ViT features [batch, num_images,
K, D_vit] (K = 256, D_vit = 4096 for ViT-G); image tokens [batch, num_images, Q, D_llm] (Q = num_image_tokens);
visual_embeddings [batch, num_blocks, Q, D_vit], one row per image-query block in sequence order.

The ViT is frozen: its output passes through `stop_gradient`, so its parameters get exactly zero gradient
(and MLLM stages keep them out of the optimizer, `cig_jax.models.cig.PARTS`). The image queries are the token embeddings of the slot tokens
`<img_00000>`..; an image block must not be split across KV-cache chunks (slot numbers restart at each block).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from cig_jax.config_model import MLLMConfig, ModelConfig, vit_feature_shape
from cig_jax.data.chat_template import IMAGE_QUERY, INPUT_IMAGE, PERSON_SLOT, TEXT  # role values
from cig_jax.sharding import constrain
from cig_jax.models import layers
from cig_jax.models.llm import LLM, KVCache, selected_token_loss, shifted_token_loss
from cig_jax.models.person_retrieval import (NAME_TOKENS, PersonMemory, key_features, name_match_init, retrieval_loss,
                                             retrieve, slot_memory, slot_values, take_images, unit_vectors)
from cig_jax.models.resampler import Resampler
from cig_jax.models.vit import VisionTransformer


def _batch_names(x: jax.Array) -> tuple:
    return ("batch",) + (None,) * (x.ndim - 1)


# ----------------------------------------------------------------------------------------------------------
# Config checks and small pieces
# ----------------------------------------------------------------------------------------------------------
def pool_targets(features: jax.Array, num_out: int, mode: str = "sequence") -> jax.Array:
    """ViT features [..., K, D] -> regression targets [..., num_out, D] (average pooling).

    'sequence': means of K/num_out consecutive tokens (SEED-X `vit_down`, avg_pool1d over the token order);
    'grid': means of square windows of the sqrt(K) x sqrt(K) grid (16x16 -> 8x8)."""
    *lead, k, d = features.shape
    f = features.astype(jnp.float32)
    if mode == "sequence":
        return f.reshape(*lead, num_out, k // num_out, d).mean(axis=-2)
    side, out_side = math.isqrt(k), math.isqrt(num_out)
    w = side // out_side
    f = f.reshape(*lead, out_side, w, out_side, w, d).mean(axis=(-4, -2))
    return f.reshape(*lead, num_out, d)


def slot_positions(role: jax.Array) -> jax.Array:
    """Index of each position inside its image block ([batch, len] int32; 0 at a block's first slot).
    A block is a run of equal non-zero roles (blocks are separated by `</img>`/`<img>` text tokens)."""
    t = jnp.arange(role.shape[1], dtype=jnp.int32)
    prev = jnp.pad(role, ((0, 0), (1, 0)))[:, :-1]
    start = (role != TEXT) & (prev != role)
    return t - jax.lax.cummax(jnp.where(start, t, 0), axis=1)


def query_block_selection(role: jax.Array, image_index: jax.Array, num_blocks: int, num_queries: int):
    """Which positions form the first `num_blocks` image-query blocks of each row.

    Returns (select [batch, num_blocks * Q, len] bool, one-hot: slot j of the row's query slots in order;
    target image [batch, num_blocks] int32, -1 where the row has fewer complete blocks). A one-hot (used
    with einsum) rather than a gather: it partitions along the batch like any batched matmul."""
    is_query = role == IMAGE_QUERY  # [batch, len]
    rank = jnp.cumsum(is_query, axis=1) - 1  # j for the j-th query slot of the row
    slots = jnp.arange(num_blocks * num_queries, dtype=rank.dtype)
    select = (rank[:, None, :] == slots[None, :, None]) & is_query[:, None, :]  # [batch, M * Q, len]
    first = select[:, ::num_queries]  # [batch, M, len]: the first slot of each block
    count = jnp.sum(is_query, axis=1)
    valid = (jnp.arange(1, num_blocks + 1) * num_queries)[None, :] <= count[:, None]  # [batch, M] complete blocks
    target = jnp.sum(jnp.where(first, image_index[:, None, :], 0), axis=-1)
    return select, jnp.where(valid, target, -1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLLMOutput:
    logits: Optional[jax.Array]  # [batch, len, vocab] fp32 (None when not asked for)
    hidden_states: jax.Array  # [batch, len, D_llm] after the final norm
    visual_embeddings: Optional[jax.Array]  # [batch, num_blocks, Q, D_vit] (None without query blocks)
    query_image_index: Optional[jax.Array]  # [batch, num_blocks] image each block generates; -1 = no block
    cache: Optional[KVCache]
    identity: Optional[jax.Array] = None  # [batch, num_blocks, De] the identity head's output (None without one);
    # with person slots [batch, M, De], one per person query (M = PEOPLE_PER_BLOCK x num_blocks)
    identity_image_index: Optional[jax.Array] = None  # [batch, M] (person slots) the crop each person query's
    # identity is scored against; -1 = none (no such query, or a query without a crop)
    identity_valid: Optional[jax.Array] = None  # [batch, M] bool (person slots): the row has that person query
    person_attention: Optional[tuple] = None  # (person slots) each person query's retrieval over 'no one' and
    # this call's positions [batch, M, 1 + len] (the memory's part left out) and where it may attend, bool
    person_slots: Optional[tuple] = None  # with `return_person_slots`: (PersonMemory of this call's first
    # SLOTS_PER_CALL person slots, their positions [batch, SLOTS_PER_CALL] in the call, -1 = none)


class MLLM(nnx.Module):
    """SEED-X: `vit` (frozen), `input_resampler`, `llm`, `output_resampler` (+ `patch_pos_embed`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg: MLLMConfig = cfg.mllm  # frozen: part of the graph's static attributes
        self.vit = VisionTransformer(cfg.vit, rngs=rngs)
        self.input_resampler = Resampler(cfg.input_resampler, rngs=rngs)
        self.llm = LLM(cfg.llm, rngs=rngs)
        self.output_resampler = Resampler(cfg.output_resampler, rngs=rngs)
        d = cfg.llm.hidden_size
        # SEED-X any-resolution position of a (sub-)image: [x, y, 1-x, 1-y] / 2 @ patch_pos_embed.
        de = cfg.mllm.identity_dim  # the identity head: mean query-block state [D_llm] -> identity [De]
        self.identity_head = (layers.Dense(d, de, ("embed", None), rngs=rngs, use_bias=True,
                                           param_dtype=layers.dtype_of(cfg.llm.param_dtype),
                                           kernel_init=nnx.initializers.normal(d ** -0.5)) if de else None)
        # Person slots' retrieval head: each person query of a drawn image attends (one head) to 'no one' and the
        # history's person slots and takes the slot's identity (what the detokenizer draws with) and content (the
        # crop's summary, which joins the drawn image's query states through person_to_queries, zero at the start).
        ps, dp = cfg.mllm.person_slots, cfg.mllm.person_key_dim
        dense = lambda i, o, names, init: layers.Dense(i, o, names, rngs=rngs, use_bias=False,  # noqa: E731
                                                      param_dtype=layers.dtype_of(cfg.llm.param_dtype), kernel_init=init)
        # Query and key start equal, reading only the name's tokens (`name_match_init`): a query first finds the
        # slots written beside the same name; training adds what the final states say.
        dk = (1 + NAME_TOKENS) * d  # the final state and the name's input embeddings (`key_features`)
        init = name_match_init(d, dp, cfg.mllm.image_token_rms or 0.134)
        self.person_query = dense(dk, dp, (None, None), init) if ps else None
        self.person_key = dense(dk, dp, (None, None), init) if ps else None
        self.person_to_queries = dense(d, d, ("embed", None), nnx.initializers.zeros) if ps else None
        # the key of 'no one': what a person query retrieves (nothing) when no earlier slot shows its person
        self.person_none = (layers.param(rngs, nnx.initializers.normal(dp ** -0.5), (dp,), (None,),
                                         layers.dtype_of(cfg.llm.param_dtype)) if ps else None)
        self.patch_pos_embed = (layers.param(rngs, nnx.initializers.normal(d ** -0.5), (4, d), (None, "embed"),
                                             layers.dtype_of(cfg.llm.param_dtype))
                                if cfg.mllm.add_patch_pos else None)

    @property
    def num_image_tokens(self) -> int:
        return self.cfg.num_image_tokens

    # -- images --------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: jax.Array, frozen: bool = True) -> jax.Array:
        """[..., H, W, C] -> ViT features [..., K, D_vit]. Frozen (stop_gradient) unless `frozen=False`: only a
        detokenizer stage that trains a ViT without pretrained weights (the tiny demo) asks for gradients."""
        lead = pixel_values.shape[:-3]
        flat = constrain(pixel_values.reshape(-1, *pixel_values.shape[-3:]), ("batch", None, None, None))
        vit = self.vit
        if vit.cfg.pool == "resampler" and vit.cfg.post_norm == "none":
            # VisionTransformer.image_features, step by step, pinning the image batch at the block stack's
            # input (the scan carry) so XLA shards the ViT by images, not by its FSDP-sharded width.
            x = constrain(vit.embed(flat), ("batch", None, None))  # [images, patches, D]
            x = vit._run_blocks(vit.ln_pre(x) if vit.ln_pre is not None else x)
            feats = vit.attn_pool(constrain(x, ("batch", None, None)))
        else:
            feats = vit.image_features(flat)
        feats = constrain(feats, ("batch", None, None))  # [images, K, D_vit]
        feats = feats.reshape(*lead, *feats.shape[1:])
        return jax.lax.stop_gradient(feats) if frozen else feats

    def image_tokens(self, features: jax.Array, positions: Optional[jax.Array] = None) -> jax.Array:
        """ViT features [..., K, D_vit] -> LLM input tokens [..., Q, D_llm] (input resampler + patch position).
        positions [..., 2]: (x, y) centre of a sub-image in [0, 1]; default (0.5, 0.5), a whole image."""
        lead = features.shape[:-2]
        tokens = self.input_resampler(features.reshape(-1, *features.shape[-2:]))
        tokens = tokens.reshape(*lead, *tokens.shape[1:])  # [..., Q, D_llm]
        if self.cfg.image_token_rms > 0:  # the LLM's embedding scale (MLLMConfig.image_token_rms)
            t32 = tokens.astype(jnp.float32)
            t32 = t32 * jax.lax.rsqrt(jnp.mean(jnp.square(t32), axis=-1, keepdims=True) + 1e-12)
            tokens = (t32 * self.cfg.image_token_rms).astype(tokens.dtype)
        if self.patch_pos_embed is not None:
            pos = jnp.full((*lead, 2), 0.5, jnp.float32) if positions is None else positions.astype(jnp.float32)
            rel = jnp.concatenate([pos, 1.0 - pos], axis=-1) / 2.0 @ self.patch_pos_embed[...].astype(jnp.float32)
            tokens = tokens + rel[..., None, :].astype(tokens.dtype)  # [..., 1, D_llm] over the Q tokens
        return tokens

    def embed_sequence(self, input_ids: jax.Array, role: jax.Array, image_index: jax.Array, *,
                       images: Optional[jax.Array] = None, image_features: Optional[jax.Array] = None,
                       image_tokens: Optional[jax.Array] = None, image_positions: Optional[jax.Array] = None
                       ) -> jax.Array:
        """Token embeddings [batch, len, D_llm] with input-image slots (role 1) replaced by the image tokens of
        image `image_index` (slot i of a block takes token i). Query slots (role 2) keep their token embeddings:
        they are the learnable image queries. Give one of images [batch, N, H, W, C], image_features
        [batch, N, K, D_vit] or image_tokens [batch, N, Q, D_llm]; with none, slots keep token embeddings."""
        x = self.llm.embed(input_ids)  # [batch, len, D_llm]
        if image_tokens is None:
            if image_features is None:
                if images is None:
                    return x
                image_features = self.encode_images(images)
            image_tokens = self.image_tokens(image_features, image_positions)
        b, n, q, d = image_tokens.shape
        flat = image_tokens.reshape(b, n * q, d).astype(x.dtype)
        idx = jnp.clip(image_index, 0, n - 1) * q + jnp.clip(slot_positions(role), 0, q - 1)  # [batch, len]
        onehot = jax.nn.one_hot(jnp.where(role == INPUT_IMAGE, idx, -1), n * q, dtype=x.dtype)  # -1: all zero
        filled = jnp.einsum("btk,bkd->btd", onehot, flat, precision=jax.lax.Precision.HIGHEST)  # [batch, len, D_llm]
        x = jnp.where((role == INPUT_IMAGE)[..., None], filled, x)
        if not self.cfg.person_slots:
            return x
        # person slots: the mean of the crop's image tokens, at the image tokens' own scale (RMS)
        t = image_tokens.astype(jnp.float32)
        summary = jnp.mean(t, axis=2)  # [batch, N, D_llm]
        rms = jnp.sqrt(jnp.mean(jnp.square(t), axis=(2, 3)))[..., None]  # [batch, N, 1]
        summary = summary * jax.lax.rsqrt(jnp.mean(jnp.square(summary), axis=-1, keepdims=True) + 1e-12) * rms
        slot = (role == PERSON_SLOT) & (image_index >= 0)
        onehot = jax.nn.one_hot(jnp.where(slot, image_index, -1), n, dtype=x.dtype)
        filled = jnp.einsum("btn,bnd->btd", onehot, summary.astype(x.dtype), precision=jax.lax.Precision.HIGHEST)
        return jnp.where(slot[..., None], filled, x)

    def predict_identity(self, states: jax.Array) -> Optional[jax.Array]:
        """Query-block final hidden states [..., Q, D_llm] -> identity [..., De] (None without an identity head)."""
        if self.identity_head is None:
            return None
        return self.identity_head(jnp.mean(states.astype(jnp.float32), axis=-2))

    def visual_embeddings(self, hidden: jax.Array, role: jax.Array, image_index: jax.Array, num_blocks: int,
                          retrieved: Optional[jax.Array] = None):
        """Final hidden states [batch, len, D_llm] at the first `num_blocks` query blocks -> output resampler.
        retrieved [batch, num_blocks, P, D_llm] (person slots): the blocks' retrieved people, added (through
        `person_to_queries`, their mean) to every query state of the block. Returns (visual_embeddings
        [batch, num_blocks, Q, D_vit], target image [batch, num_blocks], -1 = none, identity [batch, num_blocks,
        De] or None (with person slots the identity comes from the retrieval instead))."""
        q = self.num_image_tokens
        select, target = query_block_selection(role, image_index, num_blocks, q)
        b = hidden.shape[0]
        states = jnp.einsum("bkt,btd->bkd", select.astype(hidden.dtype), hidden,
                            precision=jax.lax.Precision.HIGHEST)  # [batch, num_blocks * Q, D_llm]
        states = states.reshape(b * num_blocks, q, -1)
        if retrieved is not None:
            extra = self.person_to_queries(jnp.mean(retrieved.astype(jnp.float32), axis=2))  # [batch, blocks, D_llm]
            states = states + extra.reshape(b * num_blocks, 1, -1).astype(states.dtype)
        emb = self.output_resampler(states)  # [batch * num_blocks, Q, D_vit]
        ident = None if self.cfg.person_slots else self.predict_identity(states)
        ident = None if ident is None else ident.reshape(b, num_blocks, -1)
        return emb.reshape(b, num_blocks, q, -1), target, ident

    # -- forward -------------------------------------------------------------------------------------------
    def __call__(self, input_ids: jax.Array, role: jax.Array, image_index: jax.Array, *,
                 images: Optional[jax.Array] = None, image_features: Optional[jax.Array] = None,
                 image_tokens: Optional[jax.Array] = None, image_positions: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 num_query_blocks: Optional[int] = None, return_logits: bool = True,
                 dropout_rng: Optional[jax.Array] = None, person_memory: Optional[PersonMemory] = None,
                 return_person_slots: bool = False, slot_identity: Optional[tuple] = None) -> MLLMOutput:
        """input_ids / role / image_index / attention_mask [batch, len] (a chunk when `cache` is given; its
        image_index refers to the images passed with it). num_query_blocks: how many query blocks to gather
        (static; default: the number of images passed, an upper bound; 0 = none). person_memory: the person
        slots of earlier calls (sampling); return_person_slots: hand this call's slots back (`person_slots`);
        slot_identity: (identity [batch, N, De], mask [batch, N]) of the images passed (`slot_values`)."""
        x = self.embed_sequence(input_ids, role, image_index, images=images, image_features=image_features,
                                image_tokens=image_tokens, image_positions=image_positions)
        x = constrain(x, ("batch", "activation_length", "activation_embed"))  # [batch, len, D_llm]
        out = self.llm(inputs_embeds=x, attention_mask=attention_mask, cache=cache, return_logits=return_logits,
                       dropout_rng=dropout_rng)
        if num_query_blocks is None:
            given = next((a for a in (images, image_features, image_tokens) if a is not None), None)
            num_query_blocks = 0 if given is None else given.shape[1]
        vis = target = ident = crops = valid = retrieved = attn = None
        if self.cfg.person_slots and (num_query_blocks or return_person_slots):  # what slots offer, keyed by
            values = slot_values(x, role, image_index, slot_identity, self.cfg.identity_dim)
            features = key_features(x, out.hidden_states)
        if num_query_blocks:
            if self.cfg.person_slots:
                retrieved, crops, valid, attn, allowed = retrieve(
                    self.person_query, self.person_key, self.person_none[...], values, features, role, image_index,
                    num_query_blocks, self.num_image_tokens, person_memory)
                n = role.shape[1]  # 'no one' and this call's positions
                attn = tuple(jnp.concatenate([a[..., :1], a[..., a.shape[-1] - n:]], axis=-1) for a in (attn, allowed))
                d = x.shape[-1]
                retrieved, found, has = retrieved[..., :d], retrieved[..., d:-1], retrieved[..., -1:]
            vis, target, ident = self.visual_embeddings(out.hidden_states, role, image_index, num_query_blocks,
                                                        retrieved)
            if retrieved is not None:  # [batch, blocks * P, De]: one per person query
                # the attended slots' identities (their weighted mean); zero (none) where most attention is on
                # 'no one' or on slots of no known identity
                b = role.shape[0]
                ident = jnp.where(has > 0.5, found / jnp.maximum(has, 1e-6), 0.0)
                ident = ident.reshape(b, -1, ident.shape[-1])
                crops, valid = crops.reshape(b, -1), valid.reshape(b, -1)
        slots = None
        if return_person_slots:
            slots = slot_memory(self.person_key, values, features, role, image_index)
        return MLLMOutput(out.logits, out.hidden_states, vis, target, out.cache, ident, crops, valid, attn, slots)

    def generate_image(self, cache: KVCache, query_ids: jax.Array) -> tuple[jax.Array, KVCache]:
        """Appends one query block (the Q image-query tokens `query_ids` [Q], e.g. `ChatTemplate.query_ids`)
        to every row of the cache in one step; returns (visual_embeddings [batch, Q, D_vit], cache).
        The caller has fed `<img>` already and feeds `</img>` + the image's input block afterwards."""
        b = cache.lengths.shape[0]
        ids = jnp.broadcast_to(jnp.asarray(query_ids, jnp.int32), (b, query_ids.shape[-1]))
        out = self.llm(inputs_embeds=self.llm.embed(ids), cache=cache, return_logits=False)
        return self.output_resampler(out.hidden_states), out.cache


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------
def regression_loss(pred: jax.Array, target: jax.Array, valid: jax.Array, kind: str = "mse") -> jax.Array:
    """pred/target [batch, blocks, Q, D], valid [batch, blocks]. 'mse': mean squared error over the elements of
    valid blocks (torch F.mse_loss); 'mse_position': the same with each slot's squared error divided by the
    variance of that slot's targets over the batch's valid blocks (no gradient), so slots whose targets vary
    little (small image regions) weigh as much as those that vary a lot; 'cosine': mean over valid tokens of
    1 - cos(pred, target)."""
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    w = valid.astype(jnp.float32)[..., None]  # [batch, blocks, 1]
    tokens = jnp.sum(w) * pred.shape[2]
    if kind in ("mse", "mse_position"):
        per_token = jnp.mean(jnp.square(pred - target), axis=-1)  # [batch, blocks, Q]
        if kind == "mse_position":  # each slot's error over its targets' variance across the batch's blocks
            n = jnp.maximum(jnp.sum(w), 1.0)  # valid blocks
            mean = jnp.sum(target * w[..., None], axis=(0, 1)) / n  # [Q, D]
            var = jnp.sum(jnp.mean(jnp.square(target - mean), axis=-1) * w, axis=(0, 1)) / n  # [Q]
            per_token = per_token / jax.lax.stop_gradient(jnp.maximum(var, 1e-6))
    else:
        per_token = 1.0 - jnp.sum(unit_vectors(pred) * unit_vectors(target), axis=-1)
    return jnp.sum(per_token * w) / jnp.maximum(tokens, 1.0)


def identity_loss(pred: jax.Array, identity: jax.Array, mask: jax.Array, target_image: jax.Array):
    """pred [batch, blocks, De] (the identity head's), identity [batch, N, De] / mask [batch, N] (the one person
    image n shows), target_image [batch, blocks] (-1: no block) -> (mean 1 - cos over the blocks whose target
    shows one person with an identity, that number of blocks)."""
    target = take_images(identity, target_image)  # [batch, blocks, De]
    w = take_images(mask, target_image) * (target_image >= 0)  # [batch, blocks]
    cos = jnp.sum(unit_vectors(pred.astype(jnp.float32)) * unit_vectors(target.astype(jnp.float32)), axis=-1)
    n = jnp.sum(w)
    return jnp.sum((1.0 - cos) * w) / jnp.maximum(n, 1.0), n


def mllm_loss(model: MLLM, batch: dict, *, dropout_rng: Optional[jax.Array] = None, return_output: bool = False):
    """lm_weight x next-token CE on `loss_mask` + reg_weight x regression of visual embeddings onto the target
    images' pooled ViT features (stop_gradient).

    batch: input_ids, role, image_index, loss_mask, attention_mask [batch, len]; images [batch, N, H, W, C]
    (or image_features [batch, N, K, D_vit]); optional labels [batch, len] (default input_ids: token t is the
    target of position t - 1). dropout_rng: LoRA dropout. Returns (loss, metrics) as `Task.loss_fn` expects,
    and the MLLMOutput as a third value with `return_output`."""
    cfg = model.cfg
    if "image_features" in batch:
        feats = jax.lax.stop_gradient(batch["image_features"])
    else:
        feats = model.encode_images(batch["images"])  # [batch, N, K, D_vit], no gradient
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    select = cfg.lm_head_fraction > 0 and not return_output
    known = (batch["image_identity"], batch["image_identity_mask"]) if "image_identity" in batch else None
    out = model(ids, batch["role"], batch["image_index"], image_features=feats, attention_mask=mask,
                dropout_rng=dropout_rng, return_logits=not select, slot_identity=known)
    labels = batch.get("labels", ids)
    weights = batch["loss_mask"] if mask is None else batch["loss_mask"] * mask
    extra = {}
    if select:  # the LM head at the loss positions only: [k, vocab] instead of [batch, len, vocab]
        k = max(1, math.ceil(cfg.lm_head_fraction * ids.shape[0] * ids.shape[1]))
        lm, count = selected_token_loss(model.llm, out.hidden_states, labels, weights, k)
        extra["lm_tokens_dropped"] = jnp.maximum(jnp.sum(weights[:, 1:] > 0) - k, 0)
    else:
        lm, count = shifted_token_loss(out.logits, labels, weights)

    valid = out.query_image_index >= 0  # [batch, blocks]
    chosen = take_images(feats, out.query_image_index)  # [batch, blocks, K, D_vit]
    targets = jax.lax.stop_gradient(pool_targets(chosen, cfg.num_image_tokens, cfg.reg_target_pool))
    reg = regression_loss(out.visual_embeddings, targets, valid, cfg.reg_loss)
    loss = cfg.lm_weight * lm + cfg.reg_weight * reg
    if out.identity is not None and "image_identity" in batch:
        scored = out.query_image_index if out.identity_image_index is None else out.identity_image_index
        ident_loss, extra["identity_blocks"] = identity_loss(out.identity, batch["image_identity"],
                                                             batch["image_identity_mask"], scored)
        extra["identity_loss"] = ident_loss
        if not cfg.person_slots:  # with person slots the identity is what the retrieval found (its own loss)
            loss = loss + cfg.identity_weight * ident_loss
        if out.person_attention is not None and cfg.retrieval_weight:
            ret, extra["retrieval_queries"], extra["retrieval_top1"] = retrieval_loss(*out.person_attention, out.identity_image_index,
                                                             batch["role"], batch["image_index"],
                                                             batch["image_identity"], batch["image_identity_mask"])
            extra["retrieval_loss"] = ret
            loss = loss + cfg.retrieval_weight * ret
    metrics = {"lm_loss": lm, "reg_loss": reg, "loss_tokens": count, "query_blocks": jnp.sum(valid), **extra}
    return (loss, metrics, out) if return_output else (loss, metrics)


def num_params(cfg: ModelConfig) -> dict:
    """Parameter counts per part, from shapes only (no allocation)."""
    model = nnx.eval_shape(lambda: MLLM(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for name in ("vit", "input_resampler", "llm", "output_resampler"):
        out[name] = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(getattr(model, name), nnx.Param)))
    out["patch_pos_embed"] = 0 if model.patch_pos_embed is None else math.prod(model.patch_pos_embed.shape)
    return out
