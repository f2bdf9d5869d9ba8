"""Person slots' retrieval: each person query of a drawn image finds, among the history's person slots, the one
that shows the person it names, in one attention step over the LLM's final states and the name's tokens.

Owns: what a slot offers (`slot_values`: its crop's summary, the identity of the person it shows and whether it
has one), the retrieval (`retrieve`: the person queries of each drawn image, at most PEOPLE_PER_BLOCK, attend to
'no one' and to the earlier slots), the slots a sampling cache keeps between calls (`PersonMemory`,
`slot_memory`), the retrieval loss (`retrieval_loss`), and two array helpers the MLLM shares (`take_images`,
`unit_vectors`).

Does not own: the slot layout (`cig_jax/data/persons.py`, `chat_template.py`), the parameters (the MLLM's
`person_query`, `person_key`, `person_none`, `person_to_queries`: `models/mllm.py`), what the detokenizer does
with the identity found (`cig_jax/sample/`).

Shapes: len = the call's tokens; M = num_blocks x PEOPLE_PER_BLOCK person queries; S = memory slots; Dp =
`model.mllm.person_key_dim`; De = the identity width.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from cig_jax.data.chat_template import IMAGE_QUERY, PERSON_QUERY, PERSON_SLOT  # role values


def take_images(values: jax.Array, index: jax.Array) -> jax.Array:
    """values [batch, N, ...] at index [batch, M] (clipped to [0, N)) -> [batch, M, ...], as a one-hot einsum
    (exact: one term per output), so it partitions along the batch."""
    onehot = jax.nn.one_hot(jnp.clip(index, 0, values.shape[1] - 1), values.shape[1], dtype=values.dtype)
    flat = values.reshape(*values.shape[:2], -1)
    out = jnp.einsum("bmn,bnf->bmf", onehot, flat, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(*index.shape, *values.shape[2:])


def unit_vectors(v: jax.Array) -> jax.Array:
    """v / |v| along the last axis (v / 1e-12 where |v| < 1e-12), with a finite gradient at v = 0 (a zero
    prediction: a missing block's identity is exactly the head's zero bias)."""
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-24))


PEOPLE_PER_BLOCK = 2  # person queries read per drawn image (the generator draws one or two people)
SLOTS_PER_CALL = 16  # person slots a call hands back for a sampling cache's memory (`person_slots` output)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PersonMemory:
    """Person slots of earlier calls (a sampling cache's history), what a person query retrieves from besides
    the slots of its own call: keys [batch, S, Dp] (the retrieval head's), values [batch, S, D_llm + De + 1]
    (`MLLM.slot_values`: the slots' contents, identities and whether they have one), valid [batch, S] bool."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array


def slot_values(x: jax.Array, role: jax.Array, image_index: jax.Array, slot_identity: Optional[tuple],
                identity_dim: int) -> jax.Array:
    """What a person query retrieves at each position [batch, len, D_llm + De + 1]: the input embedding
    (a slot's: its crop's summary), the identity of the person the slot's crop shows and 1 where it has one
    (slot_identity: (identity [batch, N, De], mask [batch, N]) per image, e.g. the batch's image_identity; a
    face recogniser's embedding of the crop, or the identity a drawn person was drawn with), else zeros."""
    de = identity_dim
    slot = (role == PERSON_SLOT) & (image_index >= 0)
    if slot_identity is None:
        ident, has = jnp.zeros((*role.shape, de), jnp.float32), jnp.zeros(role.shape, jnp.float32)
    else:
        at = jnp.where(slot, image_index, -1)
        has = take_images(slot_identity[1].astype(jnp.float32), at) * slot
        ident = unit_vectors(take_images(slot_identity[0].astype(jnp.float32), at)) * has[..., None]
    return jnp.concatenate([x.astype(jnp.float32), ident, has[..., None]], axis=-1)

NAME_TOKENS = 2  # the tokens before a slot or query whose input embeddings join its key / query (its name)


def key_features(x: jax.Array, hidden: jax.Array) -> jax.Array:
    """What a slot's key and a person query's query are made of, at every position [batch, len, (1 +
    NAME_TOKENS) x D_llm]: the LLM's final state there and the input embeddings of the NAME_TOKENS tokens
    before it (the name written beside the slot: " Maya<person>")."""
    x = x.astype(jnp.float32)
    before = [jnp.pad(x, ((0, 0), (k, 0), (0, 0)))[:, :x.shape[1]] for k in range(1, NAME_TOKENS + 1)]
    return jnp.concatenate([hidden.astype(jnp.float32), *before], axis=-1)


def name_match_init(d: int, dp: int, token_rms: float, margin: float = 6.0, seed: int = 0):
    """An initializer for the query and key projections [(1 + NAME_TOKENS) x d, dp] that makes them equal and
    blind to the final state: each name token's embedding goes through its own fixed random projection (rows
    N(0, 1/d), scaled), so at the start a query's score for a slot is about `margin` higher where the slot's name
    tokens are the query's (identical tokens give identical projections) than where they are unrelated ones
    (near-orthogonal embeddings of RMS `token_rms`). Deterministic: both calls return the same matrix."""
    per_token = token_rms ** 2 * d * dp / d  # E|P e|^2 for a token embedding e of RMS token_rms
    scale = (margin * math.sqrt(dp) / (NAME_TOKENS * per_token)) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        del key  # the same matrix for the query and the key
        rng = jax.random.PRNGKey(seed)
        names = jax.random.normal(rng, (NAME_TOKENS * d, dp), jnp.float32) * (scale / math.sqrt(d))
        return jnp.concatenate([jnp.zeros((d, dp), jnp.float32), names], axis=0).astype(dtype)
    return init


def slot_memory(person_key, values: jax.Array, features: jax.Array, role: jax.Array, image_index: jax.Array):
    """The first SLOTS_PER_CALL person slots of each row as a PersonMemory, and their positions [batch, S]
    (-1 = none): what a sampling cache keeps for later calls."""
    t = jnp.arange(role.shape[1], dtype=jnp.int32)
    slots = (role == PERSON_SLOT) & (image_index >= 0)
    rank = jnp.cumsum(slots, axis=1) - 1
    select = (rank[:, None, :] == jnp.arange(SLOTS_PER_CALL)[None, :, None]) & slots[:, None, :]  # [b, S, len]
    sel = select.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    keys = person_key(jnp.einsum("bst,btd->bsd", sel, features, precision=hi))
    values = jnp.einsum("bst,btd->bsd", sel, values, precision=hi)
    valid = jnp.any(select, axis=-1)
    return PersonMemory(keys, values, valid), jnp.where(valid, jnp.sum(jnp.where(select, t, 0), -1), -1)

def retrieve(person_query, person_key, none_key: jax.Array, values: jax.Array, features: jax.Array, role: jax.Array,
             image_index: jax.Array, num_blocks: int, num_queries: int, memory: Optional[PersonMemory] = None):
    """The person queries of the first `num_blocks` drawn images, at most PEOPLE_PER_BLOCK each, and what
    they retrieve from the history's person slots. values [batch, len, D_llm + De + 1] (`slot_values`),
    features [batch, len, F] (`key_features`). Returns (retrieved [batch, blocks, P, D_llm + De + 1], the crop each query is scored against [batch, blocks, P] (-1: none), which queries exist
    [batch, blocks, P] bool, the attention over 'no one', the memory's slots and then the positions [batch,
    blocks * P, 1 + S + len], and which of those it may attend to ('no one' and earlier slots), the same
    shape). memory: earlier calls' slots (a sampling cache), all before this call's tokens."""
    p, t = PEOPLE_PER_BLOCK, jnp.arange(role.shape[1], dtype=jnp.int32)
    is_q = role == PERSON_QUERY
    block = jnp.cumsum(role == IMAGE_QUERY, axis=1) // num_queries  # the drawn image a query opens
    count = jnp.cumsum(is_q, axis=1)
    last = jax.lax.cummax(jnp.where(role == IMAGE_QUERY, t, -1), axis=1)  # the previous query block's end
    before = jnp.where(last >= 0, jnp.take_along_axis(count, jnp.maximum(last, 0), axis=1), 0)
    rank = block * p + count - before - 1  # [batch, len]: block * P + the query's place in its block
    select = (rank[:, None, :] == jnp.arange(num_blocks * p)[None, :, None]) & is_q[:, None, :]  # [b, M, len]
    where = jnp.sum(jnp.where(select, t, 0), axis=-1)  # [b, M] the query's position
    states = jnp.einsum("bmt,btd->bmd", select.astype(features.dtype), features, precision=jax.lax.Precision.HIGHEST)
    keys = person_key(features)  # [b, len, Dp]
    scores = jnp.einsum("bmk,btk->bmt", person_query(states.astype(jnp.float32)), keys) / math.sqrt(keys.shape[-1])
    slots = (role == PERSON_SLOT) & (image_index >= 0)
    allowed = slots[:, None, :] & (t[None, None, :] < where[:, :, None])  # [b, M, len]: earlier slots
    if memory is not None:
        mem = jnp.einsum("bmk,bsk->bms", person_query(states.astype(jnp.float32)),
                         memory.keys.astype(jnp.float32)) / math.sqrt(keys.shape[-1])
        scores = jnp.concatenate([mem, scores], axis=-1)
        allowed = jnp.concatenate([jnp.broadcast_to(memory.valid[:, None, :], mem.shape), allowed], axis=-1)
        values = jnp.concatenate([memory.values.astype(jnp.float32), values], axis=1)
    # column 0: 'no one' (always allowed, retrieves zeros)
    none = jnp.einsum("bmk,k->bm", person_query(states.astype(jnp.float32)),
                      none_key.astype(jnp.float32)) / math.sqrt(keys.shape[-1])
    scores = jnp.concatenate([none[..., None], scores], axis=-1)
    allowed = jnp.concatenate([jnp.ones_like(allowed[..., :1]), allowed], axis=-1)
    values = jnp.concatenate([jnp.zeros_like(values[:, :1]), values], axis=1)
    attn = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)
    retrieved = jnp.einsum("bmt,btd->bmd", attn, values, precision=jax.lax.Precision.HIGHEST)
    valid = jnp.any(select, axis=-1)
    crop = jnp.sum(jnp.where(select, image_index[:, None, :], 0), axis=-1)
    crop = jnp.where(valid & (crop >= 0), crop, -1).astype(jnp.int32)
    b = role.shape[0]
    return (retrieved.reshape(b, num_blocks, p, -1), crop.reshape(b, num_blocks, p),
            valid.reshape(b, num_blocks, p), attn, allowed)


def retrieval_loss(attn: jax.Array, allowed: jax.Array, crops: jax.Array, role: jax.Array, image_index: jax.Array,
                   identity: jax.Array, mask: jax.Array):
    """Person slots: each person query should retrieve a slot of the person it draws, as they look there, or
    'no one' where no earlier slot shows that look (a person not drawn before, or changed since).
    attn / allowed [batch, M, 1 + len] (the retrieval over 'no one' and the positions; what it may attend to), crops
    [batch, M] (the query's crop, -1: none), role /
    image_index [batch, len], identity [batch, N, De] / mask [batch, N] (the one person each crop shows) ->
    (mean over scored queries of -log(attention on the earlier slots whose crop shows the same identity, or on
    'no one' where there is none), the number of queries scored: those whose crop has an identity, the fraction
    of them whose most attended column is right)."""
    unit = unit_vectors(identity.astype(jnp.float32))
    want = take_images(unit, crops)  # [batch, M, De]
    slot_ident = take_images(unit, jnp.where(role == PERSON_SLOT, image_index, -1))  # [batch, len, De]
    slot_ok = (role == PERSON_SLOT) & (image_index >= 0) & (take_images(mask, image_index) > 0)
    same = (jnp.einsum("bmd,btd->bmt", want, slot_ident) > 0.999) & slot_ok[:, None, :] & allowed[..., 1:]
    same = jnp.concatenate([~jnp.any(same, axis=-1, keepdims=True), same], axis=-1)  # [batch, M, 1 + len]
    hit = jnp.sum(attn * same, axis=-1)
    w = (crops >= 0) & (take_images(mask, crops) > 0)
    n = jnp.sum(w)
    top = jnp.take_along_axis(same, jnp.argmax(jnp.where(allowed, attn, -1.0), axis=-1)[..., None], axis=-1)[..., 0]
    return (jnp.sum(-jnp.log(jnp.maximum(hit, 1e-6)) * w) / jnp.maximum(n, 1.0), n,
            jnp.sum(top * w) / jnp.maximum(n, 1.0))
