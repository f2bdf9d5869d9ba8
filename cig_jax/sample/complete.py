"""Whole conversations through a `ChatSession`: fill the pending rounds of histories, batched by shape: the one
generation protocol (sample.py, the app's history import and the evaluation, which only chooses what history
each generated round sees, all complete conversations here).

Owns: `complete_conversation(s)`, `shape_of` (what conversations sharing a batch agree on), `context_needed` (the
KV-cache slots completing a batch of histories can take: sample.py's up-front check and the evaluation's cache
size) and `check_context`. Does not own: a round itself (`session.py`), the options and the seed rule
(`options.py`), files (`sample.py`).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional, Sequence, Union

from cig_jax.data import schema
from cig_jax.data.chat_template import ChatTemplate
from cig_jax.sample.options import RoundOptions, round_seed
from cig_jax.sample.session import ChatSession, ContextOverflowError, RoundResult, answer_slots


def context_needed(template: ChatTemplate, convs: Sequence[schema.Conversation], max_new_tokens: int,
                   batch_size: Optional[int] = None) -> int:
    """KV-cache slots completing `convs` together (a batch of `batch_size` rows, default len(convs)) can need.
    The rows share one write position, so each round counts its longest row: an answered round its tokens as a
    sampling cache holds them, a pending round its user turn and room for the longest answer (`answer_slots`)."""
    b = len(convs) if batch_size is None else batch_size
    room = answer_slots(max_new_tokens, template.num_image_tokens, b)
    per_round: dict = {}
    for conv in convs:
        pending = set(schema.pending_rounds(conv))
        filled = [dataclasses.replace(r, assistant_text="") if i in pending else r for i, r in enumerate(conv.rounds)]
        prev = 0
        for r in range(len(filled)):
            n = len(template.encode(dataclasses.replace(conv, rounds=filled[:r + 1]), add_generation_prompt=False,
                                    end="round"))
            per_round[r] = max(per_round.get(r, 0), n - prev + (room if r in pending else 0))
            prev = n
    return sum(per_round.values())


def check_context(template: ChatTemplate, conv: schema.Conversation, max_len: int, max_new_tokens: int,
                  batch_size: int = 1) -> None:
    """Raises ContextOverflowError when completing `conv` (in a batch of `batch_size`) could need more than
    `max_len` cache slots (`context_needed`)."""
    need = context_needed(template, [conv], max_new_tokens, batch_size)
    if need > max_len:
        pending = schema.pending_rounds(conv)
        r = pending[0] if pending else len(conv.rounds) - 1
        raise ContextOverflowError(
            f"{schema.conversation_label(conv)}: rounds[{r}]: completing the history needs up to {need} KV-cache slots (with "
            f"{max_new_tokens} new tokens and an image a round) but the context holds {max_len}; raise max_len "
            "(sample.py --max-len), lower max_new_tokens, or use overflow 'drop_oldest'")


def complete_conversation(session: ChatSession, conv: schema.Conversation, *, seed: int = 0,
                          on_round: Optional[Callable[[int, RoundResult], None]] = None,
                          options: Optional[RoundOptions] = None) -> schema.Conversation:
    """Fills the pending rounds of `conv` (validated first) with `session` and returns the completed copy: its
    answered rounds are replayed into the cache, then every pending round is sampled in order, round r with
    seed `round_seed(seed, r)`. The returned conversation keeps `conv`'s fields and image paths; generated images
    carry pixels, and each sampled round's metadata["sample"] says how it was made. options: the round's knobs
    (None: the config's). on_round(r, result) is called after each round."""
    return complete_conversations(session, [conv], seed=seed, on_round=lambda r, res: on_round and on_round(r, res[0]),
                                  options=options)[0]


def complete_conversations(session: ChatSession, convs: Sequence[schema.Conversation], *,
                           seed: Union[int, Sequence[int]] = 0, on_round: Optional[Callable[[int, list], None]] = None,
                           num_images: int = 1, options: Optional[RoundOptions] = None) -> list:
    """`complete_conversation` for several conversations at once (`session.batch_size` = len(convs) x
    num_images rows). They must have the same shape: the same number of rounds and the same pending rounds (see
    `shape_of`). seed: every conversation's base seed, or one per conversation. With num_images N > 1 every round
    draws N candidates per conversation in one batch (candidate k with seed `round_seed(seed, r, k)`); the history goes on with candidate 0, and the others are listed in
    the round's metadata["sample"]["candidates"] ({"seed", "stop", "text", "image": a schema.Image with pixels or
    None}; sample.py writes the images and puts their paths there)."""
    n = int(num_images)
    if n < 1 or len(convs) * n != session.batch_size:
        raise ValueError(f"{len(convs)} conversations x {num_images} candidates for a session of batch_size "
                         f"{session.batch_size}")
    shapes = {shape_of(c) for c in convs}
    if len(shapes) != 1:
        raise ValueError(f"conversations of different shapes cannot share a batch: {sorted(shapes)}")
    bases = [int(seed)] * len(convs) if isinstance(seed, int) else [int(x) for x in seed]
    if len(bases) != len(convs):
        raise ValueError(f"{len(bases)} seeds for {len(convs)} conversations")
    options = session.options() if options is None else options
    for c in convs:
        schema.validate(c)
    pending = schema.pending_rounds(convs[0])
    rows = [c for c in convs for _ in range(n)]  # row j * n + k: candidate k of conversation j
    session.replay_batch(rows)
    out = [copy.deepcopy(c) for c in convs]
    for r in pending:
        texts = [c.rounds[r].user_text for c in rows]
        images = [[session.loaded(im, c, f"{schema.conversation_label(c)}: rounds[{r}].user_images[{j}]")
                   for j, im in enumerate(c.rounds[r].user_images)] for c in rows]
        seeds = [round_seed(base, r, k) for base in bases for k in range(n)]
        results = session.round_batch(texts, images, seeds=seeds, options=options)
        for j, c in enumerate(out):
            res, done = results[j * n], session.rows[j * n].conv.rounds[-1]
            c.rounds[r].assistant_text = res.text
            c.rounds[r].assistant_image = None if res.image is None else schema.Image(
                pixels=res.image, people=copy.deepcopy(done.assistant_image.people))  # who it shows (person slots)
            sample = dict(done.metadata["sample"], stop=res.stop)
            if n > 1:
                sample["candidates"] = [
                    {"seed": seeds[j * n + k], "stop": results[j * n + k].stop, "text": results[j * n + k].text,
                     "image": None if results[j * n + k].image is None else schema.Image(pixels=results[j * n + k].image)}
                    for k in range(1, n)]
            c.rounds[r].metadata = dict(c.rounds[r].metadata, sample=sample)
        if on_round is not None:
            on_round(r, results[::n])
        if n > 1 and r != pending[-1]:  # every candidate row goes on from candidate 0's answer
            session.replay_batch([session.rows[(i // n) * n].conv for i in range(len(rows))])
    return out


def shape_of(conv: schema.Conversation) -> tuple:
    """What conversations sharing a batch must agree on: (number of rounds, the pending rounds)."""
    return (len(conv.rounds), tuple(schema.pending_rounds(conv)))


__all__ = ["complete_conversation", "complete_conversations", "check_context", "context_needed", "shape_of", "RoundResult"]
