"""Text decoding on the device: a round's whole text decode is one jitted `lax.while_loop` over the KV cache.

Owns: what assistant text may contain (`banned_ids`), the next-token choice (`choose_next`, per row with its own seed: `choose_rows`) and `decode_text`: from the
logits after the prompt, each iteration chooses every row's token (banned ids masked), stops a row on EOS, `<img>`,
the chat's turn marker (llama2's; a chatml round ends at EOS) or `max_new_tokens`, and feeds the rows still active
(one token each) into the cache, until no row is active. The loop runs over a view of the cache cut to the slots the round can reach (a power-of-two
bucket, `cache.view_len`), so its cost follows the history's length, not the cache's capacity; the host receives
the round's tokens once, at the end, and records what was fed in the cache's host mirror.

Does not own: what the cache should hold (`session.py`), the cache's bookkeeping and its other model calls
(`cache.py`), images (the query block after `<img>` is fed by the next `cache.sync`, in the next program).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cig_jax.data.chat_template import BOI, TEXT, ChatTemplate, mllm_special_tokens
from cig_jax.data.persons import PERSON
from cig_jax.sample.cache import unview, view, view_len
from cig_jax.sample.options import RoundOptions


def choose_next(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
    """logits [batch, vocab] -> tokens [batch]. temperature 0 = greedy; top_p < 1 = nucleus sampling."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(4, 5))
def choose_rows(logits, seeds, step, banned, temperature, top_p):
    """Next token per row [b]: banned ids masked, then greedy / temperature / top-p with the row's own key."""
    logits = jnp.where(banned, -jnp.inf, logits)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 0), step))(seeds)
    return jax.vmap(lambda lg, k: choose_next(lg[None], k, temperature, top_p)[0])(logits, keys)



STOPS = ("max_new_tokens", "eos", "image", "turn_marker")  # the stop reason codes of `decode_text`


def _feed_text(model, kind: str, ids, valid, kv):
    """One text token per row (ids [b, 1], valid [b, 1]) into the cache view -> (logits [b, V], cache)."""
    if kind == "mllm":
        mllm = model.mllm
        role = jnp.full(ids.shape, TEXT, jnp.int32)
        out = mllm(ids, role, jnp.full(ids.shape, -1, jnp.int32), attention_mask=valid, cache=kv,
                   num_query_blocks=0, return_logits=False)
        return mllm.llm.logits(out.hidden_states)[:, 0], out.cache
    out = model(ids, attention_mask=valid, cache=kv, return_logits=False)
    return model.logits(out.hidden_states)[:, 0], out.cache


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6), donate_argnums=(8,))
def decode_loop(graph, kind, n_view, max_new, temperature, top_p, marker, state, kv, logits, seeds, banned, eos,
                 boi):
    """The loop of `decode_text` on device. kv: the whole cache (donated); logits [b, V]; seeds [b].
    Returns (tokens [b, max_new], counts [b], stop codes [b] (index into STOPS), fed [b], logits [b, V], kv)."""
    model = nnx.merge(graph, state)
    b = logits.shape[0]
    m = len(marker)
    marker_arr = jnp.asarray(marker if m else (0,), jnp.int32)
    rows = jnp.arange(b)

    def cond(c):
        step, _, _, _, _, _, active, _ = c
        return (step < max_new) & jnp.any(active)

    def body(c):
        step, part, logits, out, n, fed, active, stop = c
        chosen = choose_rows(logits, seeds, step, banned, temperature, top_p)  # [b]
        is_eos, is_boi = chosen == eos, chosen == boi
        ends = active & (is_eos | is_boi)
        stop = jnp.where(ends, jnp.where(is_eos, 1, 2), stop)
        app = active & ~ends
        out = out.at[rows, jnp.minimum(n, max_new - 1)].set(jnp.where(app, chosen, out[rows, jnp.minimum(n, max_new - 1)]))
        n = n + app
        if m:  # the last m tokens are the turn marker: drop them, stop the row
            idx = n[:, None] - m + jnp.arange(m)[None]
            tail = jnp.take_along_axis(out, jnp.clip(idx, 0, max_new - 1), axis=1)
            hit = app & (n >= m) & jnp.all(tail == marker_arr[None], axis=1)
            n = jnp.where(hit, n - m, n)
            stop = jnp.where(hit, 3, stop)
            app = app & ~hit
        feed = app & (step + 1 < max_new)  # the last token's logits are never read: the next sync feeds it

        def do_feed(args):
            part, logits = args
            new, part = _feed_text(model, kind, chosen[:, None], feed[:, None], part)
            return part, jnp.where(feed[:, None], new, logits)

        part, logits = jax.lax.cond(jnp.any(feed), do_feed, lambda a: a, (part, logits))
        return step + 1, part, logits, out, n, fed + feed, app, stop

    zeros = jnp.zeros((b,), jnp.int32)
    init = (jnp.zeros((), jnp.int32), view(kv, n_view), logits, jnp.zeros((b, max_new), jnp.int32), zeros, zeros,
            jnp.ones((b,), bool), zeros)
    _, part, logits, out, n, fed, _, stop = jax.lax.while_loop(cond, body, init)
    return out, n, stop, fed, logits, unview(kv, part)


def decode_text(cache, *, seeds, banned, eos_id: int, boi_id: int, marker: Sequence[int], options: RoundOptions,
                kind: str = "mllm") -> tuple[list, list]:
    """Decodes every row of `cache` (a `cache.RowCache` whose `logits` follow the prompt) on device. seeds [b]
    (on the mesh), banned [V] bool; options: the round's (max_new_tokens, temperature, top_p). Returns (per row the chosen text ids, stop token excluded; per row the stop
    reason, one of STOPS). The fed tokens join the cache and its host mirror; `cache.logits` follow them."""
    max_new, temperature, top_p = options.max_new_tokens, options.temperature, options.top_p
    if max_new <= 0:
        return [[] for _ in range(cache.batch_size)], ["max_new_tokens"] * cache.batch_size
    n_view = view_len(cache.index + max_new, cache.kv.max_len)
    out, n, stop, fed, cache.logits, cache.kv = decode_loop(
        cache.graph, kind, n_view, int(max_new), float(temperature), float(top_p), tuple(int(t) for t in marker),
        cache.state, dataclasses.replace(cache.kv, index=jnp.asarray(cache.index, jnp.int32)), cache.logits, seeds,
        banned, jnp.int32(eos_id), jnp.int32(boi_id))
    out, n, stop, fed = jax.device_get((out, n, stop, fed))  # the host sees the round's tokens once
    cache.record_fed([out[i, :fed[i]].tolist() for i in range(len(fed))])
    return [out[i, :n[i]].tolist() for i in range(len(n))], [STOPS[int(c)] for c in stop]


def banned_ids(template: ChatTemplate, vocab: int) -> np.ndarray:
    """[vocab] bool: what assistant text may not contain: the markup of images (`<img>` aside: it starts a
    drawing) and of the chat (bos, which opens a turn; pad and unk), and the embedding rows the tokenizer never
    produces. Never eos, which ends the round (SmolLM2's pad is its eos)."""
    banned = np.zeros((vocab,), bool)
    tok = template.tokenizer
    special = [t for t in mllm_special_tokens() if t != BOI] + [tok.bos_token, tok.pad_token, tok.unk_token]
    special += [PERSON] if template.person_slots else []
    for i in [tok.convert_tokens_to_ids(t) for t in special if t is not None] + [template.bos_id]:
        if i is not None and 0 <= i < vocab:
            banned[i] = True
    banned[template.eos_id] = False
    banned[len(tok):] = True  # rows of the embedding the tokenizer never produces
    return banned
