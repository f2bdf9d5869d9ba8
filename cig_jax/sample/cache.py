"""KV-cache rows that mirror token lists: what a `ChatSession` keeps between rounds.

Owns: `RowCache`, a batch of rows of one fixed-size `KVCache`, each row holding a known list of tokens
(id, role, image key). `sync(targets)` makes row i hold `targets[i]`: it keeps the longest common prefix,
retracts the rest (those slots masked out, the row's length set back) and feeds what is missing in chunks of at
most CHUNK tokens, right-padded (`chunk_len`) and never splitting an image block, so the same few shapes
come back round after round. Images are encoded once (ViT + input resampler) and kept by content key. The jitted
model calls are module level and take the model's graph as a static argument, so caches over equal model
structures share compiled code. Batch arrays go on the mesh along the logical `batch` axis (data x fsdp).

Does not own: what the rows should hold (the chat template's encoding of a history: `session.py`), choosing
tokens, the detokenizer, the model (`cig_jax/models/`).

Slots: all rows share one write offset (`KVCache.index`, mirrored on the host); a chunk advances it by its
longest row, so rows of different lengths leave masked holes. The physical cache has CHUNK slots beyond
`max_len`, so a padded chunk written at any offset <= max_len fits.
"""
from __future__ import annotations

import dataclasses
import hashlib
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cig_jax import sharding
from cig_jax.data.chat_template import IMAGE_QUERY, PERSON_QUERY, PERSON_SLOT, TEXT
from cig_jax.data.pipeline import preprocess_image
from cig_jax.models.llm import KVCache
from cig_jax.models.person_retrieval import NAME_TOKENS, PersonMemory

CHUNK = 256  # most tokens fed in one call
MIN_CHUNK = 16  # chunks pad to a power of two >= this
MIN_VIEW = 128  # a model call reads at least this many slots (a power of two)


@partial(jax.jit, static_argnums=(0,))
def _encode_images(graph, state, pixels):
    """pixels [n, S, S, 3] in [-1, 1] -> the input resampler's image tokens [n, Q, D_llm]. `graph`: the model's
    nnx GraphDef (hashable: configs are frozen), so equal model structures share compiled code."""
    mllm = nnx.merge(graph, state).mllm
    return mllm.image_tokens(mllm.encode_images(pixels))


def view_len(upto: int, capacity: int) -> int:
    """The slots a model call reads: the power-of-two bucket holding `upto` filled + new slots (at least
    MIN_VIEW), at most the cache's `capacity`. Attention cost follows the history, not the capacity."""
    return min(capacity, bucket(upto, least=MIN_VIEW))


def view(cache: KVCache, n: int) -> KVCache:
    """The first n slots of a cache (n static): what a call with the history below slot n needs."""
    return dataclasses.replace(cache, k=cache.k[:, :, :n], v=cache.v[:, :, :n], mask=cache.mask[:, :n])


def unview(cache: KVCache, part: KVCache) -> KVCache:
    """`cache` with its first slots replaced by the view `part` (in place under donation)."""
    zero = (0,) * cache.k.ndim
    return KVCache(k=jax.lax.dynamic_update_slice(cache.k, part.k, zero),
                   v=jax.lax.dynamic_update_slice(cache.v, part.v, zero),
                   mask=jax.lax.dynamic_update_slice(cache.mask, part.mask, (0, 0)),
                   lengths=part.lengths, index=part.index)


@partial(jax.jit, static_argnums=(0, 7, 9, 11), donate_argnums=(6,))
def _append(graph, state, ids, role, image_index, valid, cache, num_query_blocks, image_tokens, n_view, memory,
            slots_out, known):
    """Feeds a chunk ([b, T]; `valid` marks real tokens, right-padded; image_tokens [b, n, Q, D_llm] for the chunk's
    `image_index`) into the cache, reading and writing only its first n_view slots. memory: the person slots fed
    before (a PersonMemory, or None without person slots); known: (identity [b, n, De], mask [b, n]) of the chunk's
    images (person slots) or None. Returns (logits of each row's last real token [b, V],
    (visual embeddings [b, Q, D_vit], identity [b, De], or with person slots [b, P, De], or None) of the chunk's
    first query block or None, cache, the chunk's person slots (`MLLMOutput.person_slots`) with `slots_out`)."""
    mllm = nnx.merge(graph, state).mllm
    out = mllm(ids, role, image_index, image_tokens=image_tokens, attention_mask=valid, cache=view(cache, n_view),
               num_query_blocks=num_query_blocks, return_logits=False, person_memory=memory,
               return_person_slots=slots_out, slot_identity=known)
    last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
    hidden = jnp.take_along_axis(out.hidden_states, last[:, None, None], axis=1)  # [b, 1, D_llm]
    vis = None
    if num_query_blocks:
        ident = out.identity  # person slots: [b, M, De], one per person query; else [b, blocks, De]
        vis = (out.visual_embeddings[:, 0],
               None if ident is None else ident if out.identity_image_index is not None else ident[:, 0])
    return mllm.llm.logits(hidden)[:, 0], vis, unview(cache, out.cache), out.person_slots


@partial(jax.jit, donate_argnums=(0,))
def _retract(cache, keep_slot, keep_len, rows):
    """Masks out row r's slots from keep_slot[r] on and sets its length to keep_len[r] (rows [b] bool)."""
    slot = jnp.arange(cache.mask.shape[1])
    mask = cache.mask & (slot[None, :] < jnp.where(rows, keep_slot, cache.mask.shape[1])[:, None])
    return dataclasses.replace(cache, mask=mask, lengths=jnp.where(rows, keep_len, cache.lengths))


def bucket(n: int, least: int = MIN_CHUNK) -> int:
    """The padded size of n: a power of two, at least `least`."""
    return max(least, 1 << max(n - 1, 0).bit_length())


def chunk_len(n: int) -> int:
    """The padded length of a chunk of n tokens: a power of two or 3/4 of one (16, 24, 32, 48, 64, 96, ...), at
    least MIN_CHUNK, so padding costs at most a third of the chunk (a round's user turn with the last drawing's
    write-back, ~65 tokens on the demo, runs as 96, not 128) while the shapes stay few."""
    p = bucket(n)
    return 3 * p // 4 if p > MIN_CHUNK and 3 * p // 4 >= n else p


def pieces(tokens: list, limit: int = CHUNK) -> list:
    """Splits tokens into runs of at most `limit`, never inside an image block, nor within NAME_TOKENS tokens
    before a person slot or query (a slot's key reads its name's tokens in the same call)."""
    out, start = [], 0
    person = lambda k: any(tokens[j][1] in (PERSON_SLOT, PERSON_QUERY)  # noqa: E731
                           for j in range(k, min(k + NAME_TOKENS, len(tokens))))
    while start < len(tokens):
        end = min(start + limit, len(tokens))
        while end < len(tokens) and end > start and (
                (tokens[end][1] != TEXT and tokens[end - 1][1] == tokens[end][1]) or person(end)):
            end -= 1
        if end == start:
            raise ValueError(f"an image block is longer than the chunk limit {limit}")
        out.append(tokens[start:end])
        start = end
    return out


def common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def image_key(pixels: np.ndarray) -> str:
    """Content key of an image (uint8 [H, W, 3]): equal pixels, equal key."""
    h = hashlib.sha1(str(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


class RowCache:
    """`batch_size` rows of a KV cache of `max_len` usable slots over one model (graph + state on `mesh`)."""

    def __init__(self, graph, state, cfg, *, batch_size: int, max_len: int, pad_id: int, mesh, rules):
        self.graph, self.state, self.cfg = graph, state, cfg  # cfg: the model config
        self.batch_size, self.max_len, self.pad_id = batch_size, max_len, pad_id
        self.mesh, self.rules = mesh, rules
        self.image_size = cfg.vit.image_size
        self.q, self.d_llm = cfg.mllm.num_image_tokens, cfg.llm.hidden_size
        self.image_tokens: dict = {}  # image key -> [Q, D_llm] device array
        self.identities: dict = {}  # image key -> the identity [De] of the one person it shows, where known
        self.pixels: dict = {}  # image key -> uint8 pixels, until encoded and while in use
        self._no_images: dict = {}  # shape -> zero image-token block on the devices (text-only chunks)
        self.clear()

    def clear(self) -> None:
        """Empties every row (encoded images are kept)."""
        b = self.batch_size
        cache = KVCache.init(self.cfg.llm, b, self.max_len + CHUNK)
        names = KVCache(k=("layers", "batch", None, "kv_heads", None), v=("layers", "batch", None, "kv_heads", None),
                        mask=("batch", None), lengths=("batch",), index=())
        self.kv = jax.tree.map(lambda x, n: self.put(x, n), cache, names, is_leaf=lambda n: isinstance(n, tuple))
        self.index = 0  # next slot to write (host mirror of the shared write offset)
        self.logits = self.put(jnp.zeros((b, self.cfg.llm.vocab_size), jnp.float32), ("batch", None))
        self.tokens = [[] for _ in range(b)]  # per row: (id, role, image key or None) per filled slot, in order
        # per row, with person slots: {token position in the row: (retrieval key [Dp], content [D_llm])}
        self.people = [{} for _ in range(b)]
        self.slots = [[] for _ in range(b)]  # per row: the cache slot of each token

    def put(self, x, names):
        """An array on the mesh, split along its logical `names` (e.g. ("batch", None))."""
        x = x if isinstance(x, jax.Array) else np.asarray(x)
        return jax.device_put(x, sharding.logical_sharding(names, self.mesh, self.rules, x.shape))

    # -- images ----------------------------------------------------------------------------------------------
    def add_image(self, pixels: np.ndarray, identity: Optional[np.ndarray] = None) -> str:
        """Registers an image (uint8 [H, W, 3]) for feeding, with the identity [De] of the one person it shows
        where known (a person slot's crop: what a person query retrieves); returns its key."""
        key = image_key(pixels)
        if identity is not None:
            self.identities[key] = np.asarray(identity, np.float32)
        if key not in self.image_tokens:
            self.pixels.setdefault(key, pixels)
        return key

    def keep_images(self, used: set) -> None:
        """Forgets encoded images whose keys are not in `used`."""
        for d in (self.image_tokens, self.pixels, self.identities):
            for key in [k for k in d if k not in used]:
                del d[key]

    def _encode_missing(self, keys: set) -> None:
        missing = sorted(k for k in keys if k not in self.image_tokens)
        if not missing:
            return
        pixels = np.zeros((bucket(len(missing), least=1), self.image_size, self.image_size, 3), np.float32)
        for j, key in enumerate(missing):
            pixels[j] = preprocess_image(self.pixels[key], self.image_size)
        tokens = _encode_images(self.graph, self.state, self.put(pixels, ("batch", None, None, None)))
        for j, key in enumerate(missing):
            self.image_tokens[key] = tokens[j]
            del self.pixels[key]

    # -- tokens ----------------------------------------------------------------------------------------------
    def slots_needed(self, targets: list) -> int:
        """The write offset after `sync(targets)` (without padding)."""
        kept, new = [], []
        for tokens, slots, target in zip(self.tokens, self.slots, targets):
            c = common_prefix(tokens, target)
            kept.append(slots[c - 1] + 1 if c else 0)
            new.append(pieces(target[c:]))
        depth = max(len(p) for p in new)
        return max(kept) + sum(max((len(p[k]) for p in new if k < len(p)), default=0) for k in range(depth))

    def sync(self, targets: list, want_visual: bool = False) -> Optional[tuple]:
        """Makes row i hold targets[i] (lists of (id, role, image key)): keeps the common prefix, retracts the
        rest, feeds what is missing. Afterwards `logits` [b, V] are each row's next-token logits. Returns the visual
        embeddings [b, Q, D_vit] of each row's last query block fed now and the identity head's output for it [b, De]
        (None without a head), with want_visual; else None."""
        keep = [common_prefix(tokens, t) for tokens, t in zip(self.tokens, targets)]
        rows = np.asarray([k < len(tokens) for k, tokens in zip(keep, self.tokens)])
        if rows.any():
            keep_slot = np.asarray([s[k] if k < len(s) else 0 for k, s in zip(keep, self.slots)], np.int32)
            self.kv = _retract(self.kv, self.put(keep_slot, ("batch",)),
                               self.put(np.asarray(keep, np.int32), ("batch",)), self.put(rows, ("batch",)))
            for k, tokens, slots, people in zip(keep, self.tokens, self.slots, self.people):
                del tokens[k:], slots[k:]
                for pos in [p for p in people if p >= k]:
                    del people[pos]
            self.index = max([s[-1] + 1 for s in self.slots if s], default=0)
        new = [t[k:] for k, t in zip(keep, targets)]
        self._encode_missing({t[2] for toks in new for t in toks if t[2] is not None})
        split = [pieces(toks) for toks in new]
        drawn = None  # (visual, identity) of the query blocks fed so far, row by row
        for k in range(max(len(p) for p in split)):
            chunk = [p[k] if k < len(p) else [] for p in split]
            out = self._append(chunk, want_visual)
            if out is not None:
                has = self.put(np.asarray([any(t[1] == IMAGE_QUERY for t in c) for c in chunk]), ("batch",))
                drawn = out if drawn is None else jax.tree.map(
                    lambda new, old: jnp.where(has.reshape(-1, *(1,) * (new.ndim - 1)), new, old), out, drawn)
        return drawn

    def _memory(self) -> PersonMemory:
        """The person slots in the rows now, as a PersonMemory padded to a power of two (at least 16) slots."""
        b, n = self.batch_size, bucket(max((len(p) for p in self.people), default=0), least=16)
        dk, dv = self.cfg.mllm.person_key_dim, self.d_llm + self.cfg.mllm.identity_dim + 1
        keys, values = np.zeros((b, n, dk), np.float32), np.zeros((b, n, dv), np.float32)
        valid = np.zeros((b, n), bool)
        for i, people in enumerate(self.people):
            for j, pos in enumerate(sorted(people)):
                keys[i, j], values[i, j] = people[pos]
                valid[i, j] = True
        return PersonMemory(self.put(keys, ("batch", None, None)), self.put(values, ("batch", None, None)),
                            self.put(valid, ("batch", None)))

    def record_fed(self, fed: list) -> None:
        """Host mirror of a device decode loop that fed text tokens fed[i] into row i, one a step from `index`
        (all rows together: the shared offset advances by the longest)."""
        for i, toks in enumerate(fed):
            self.tokens[i] += [(int(t), TEXT, None) for t in toks]
            self.slots[i] += range(self.index, self.index + len(toks))
        self.index += max((len(t) for t in fed), default=0)

    def _append(self, chunk: list, want_visual: bool, length: Optional[int] = None):
        b = self.batch_size
        t_len = length or chunk_len(max(len(c) for c in chunk))
        ids = np.full((b, t_len), self.pad_id, np.int32)
        role = np.zeros((b, t_len), np.int32)
        index = np.full((b, t_len), -1, np.int32)
        valid = np.zeros((b, t_len), bool)
        local = [list(dict.fromkeys(t[2] for t in c if t[2] is not None)) for c in chunk]  # the chunk's images
        for i, c in enumerate(chunk):
            for j, (tid, r, key) in enumerate(c):
                ids[i, j], role[i, j], valid[i, j] = tid, r, True
                index[i, j] = local[i].index(key) if key is not None else -1
        shape = (b, bucket(max(len(x) for x in local), least=1), self.q, self.d_llm)
        if any(local):
            images = jnp.zeros(shape, jnp.float32)
            for i, keys in enumerate(local):
                if keys:
                    images = images.at[i, :len(keys)].set(jnp.stack([self.image_tokens[key] for key in keys]))
            images = self.put(images, ("batch", None, None, None))
        else:  # text only (every decoding step): one zero block per shape, placed once
            if shape not in self._no_images:
                self._no_images[shape] = self.put(np.zeros(shape, np.float32), ("batch", None, None, None))
            images = self._no_images[shape]
        queries = bool(want_visual and (role == IMAGE_QUERY).any())
        persons = self.cfg.mllm.person_slots
        known = None
        if persons:  # the identity of each of the chunk's images that shows one known person
            ident = np.zeros((*shape[:2], self.cfg.mllm.identity_dim), np.float32)
            has = np.zeros(shape[:2], np.float32)
            for i, keys in enumerate(local):
                for j, key in enumerate(keys):
                    if key in self.identities:
                        ident[i, j], has[i, j] = self.identities[key], 1.0
            known = (self.put(ident, ("batch", None, None)), self.put(has, ("batch", None)))
        slots_out = bool(persons and (role == PERSON_SLOT).any())
        logits, vis, self.kv, fed_slots = _append(
            self.graph, self.state, self.put(ids, ("batch", None)), self.put(role, ("batch", None)),
            self.put(index, ("batch", None)), self.put(valid, ("batch", None)),
            dataclasses.replace(self.kv, index=jnp.asarray(self.index, jnp.int32)), 1 if queries else 0,
            images, view_len(self.index + t_len, self.kv.max_len), self._memory() if persons and queries else None,
            slots_out, known)
        self.logits = jnp.where(self.put(valid.any(axis=1), ("batch",))[:, None], logits, self.logits)
        if slots_out:
            mem, at = jax.device_get(fed_slots)
            for i in range(b):
                for s in np.flatnonzero(at[i] >= 0):
                    self.people[i][len(self.tokens[i]) + int(at[i, s])] = (mem.keys[i, s], mem.values[i, s])
        for i, c in enumerate(chunk):
            self.tokens[i] += c
            self.slots[i] += range(self.index, self.index + len(c))
        self.index += max(len(c) for c in chunk)
        return vis
