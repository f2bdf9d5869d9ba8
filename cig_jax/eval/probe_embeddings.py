"""The counterfactual name probe in embedding space: teacher-forced, no diffusion, no classifier.

Owns: `score` (how much of the difference between the two versions' targets the two versions' predicted
visual embeddings carry) and `run` (one forward pass per version over `data.recall.probe_pairs`, reading the
last image-query block). Each pair is the same history, then a last round 'Show X <scene>.' for X = A or B in
the same scene, so the two versions' targets (the pooled ViT features of the ground-truth answers, what the
MLLM regresses onto) differ only in the person.

Why beside the drawn probe (`eval/recall.py`): it reads what the MLLM itself predicts, in seconds, with no
detokenizer or attribute classifier in between, so a name-blind MLLM is told from a weak detokenizer.
    name_share     mean over pairs of <pred_A - pred_B, target_A - target_B> / |target_A - target_B|^2:
                   1 when the prediction moves with the name as the targets do, 0 for a model that ignores the
                   name (it predicts the same for both versions), whatever it predicts
    versions_nearer  fraction of versions whose prediction is nearer (MSE) its own target than the other's
    pairs_nearer   fraction of pairs where both versions are (a name-blind model: at most chance, ~0.25 or less)

Does not own: the pairs (`data/recall.py`), the drawn probe (`eval/recall.py`), the model's forward (`models/mllm.py`).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from cig_jax.data.pipeline import PipelineOptions, SkipCounter, encode_record
from cig_jax.models.mllm import pool_targets
from cig_jax.models.person_retrieval import take_images


def score(pred_a: np.ndarray, pred_b: np.ndarray, target_a: np.ndarray, target_b: np.ndarray) -> dict:
    """pred_* / target_* [pairs, Q, D] (the last image-query block of versions A and B, and their targets)."""
    pred_a, pred_b, target_a, target_b = (np.asarray(x, np.float64) for x in (pred_a, pred_b, target_a, target_b))
    if not (pred_a.shape == pred_b.shape == target_a.shape == target_b.shape) or pred_a.ndim != 3:
        raise ValueError(f"expected four [pairs, Q, D] arrays of one shape, got {pred_a.shape}, {pred_b.shape}, "
                         f"{target_a.shape}, {target_b.shape}")
    n = pred_a.shape[0]
    if n == 0:
        return {"n": 0, "name_share": None, "versions_nearer": None, "pairs_nearer": None}
    mse = lambda x, y: np.mean(np.square(x - y), axis=(1, 2))  # noqa: E731
    a_ok = mse(pred_a, target_a) < mse(pred_a, target_b)
    b_ok = mse(pred_b, target_b) < mse(pred_b, target_a)
    dt = target_a - target_b
    share = np.sum((pred_a - pred_b) * dt, axis=(1, 2)) / np.maximum(np.sum(dt * dt, axis=(1, 2)), 1e-12)
    return {"n": n, "name_share": float(np.mean(share)), "versions_nearer": float((a_ok.sum() + b_ok.sum()) / (2 * n)),
            "pairs_nearer": float(np.mean(a_ok & b_ok))}


def _examples(session, convs: Sequence) -> dict:
    """The conversations as one batch of training examples (`pipeline.encode_record`), padded to the longest."""
    outs = [session.template.encode(c, add_generation_prompt=False) for c in convs]
    opts = PipelineOptions(seq_len=max(len(o) for o in outs), max_images=max(len(o.images) for o in outs),
                           image_size=session.image_size, identity_dim=session.cfg.model.mllm.identity_dim)
    skips = SkipCounter()
    rows = [encode_record(c, i, session.template, opts, skips) for i, c in enumerate(convs)]
    if skips.counts:
        raise ValueError(f"probe conversations could not be encoded: {dict(skips.counts)}")
    keys = ("input_ids", "role", "image_index", "attention_mask", "images")
    keys += ("image_identity", "image_identity_mask") if opts.identity_dim else ()
    return {k: np.stack([r[k] for r in rows]) for k in keys}


def identity_score(pred_a: np.ndarray, pred_b: np.ndarray, ident_a: np.ndarray, ident_b: np.ndarray) -> dict:
    """The identity head's side of the probe: pred_* [pairs, De] (the last block's predicted identity of versions
    A and B), ident_* [pairs, De] (the identities of A and B). A version is right when its prediction is nearer
    (cosine) its own person's identity than the other's; a name-blind head is right in at most half the versions
    and, over pairs, right in both only by luck of noise (~0)."""
    unit = lambda v: np.asarray(v, np.float64) / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    pa, pb, ia, ib = (unit(x) for x in (pred_a, pred_b, ident_a, ident_b))
    a_ok = np.sum(pa * ia, -1) > np.sum(pa * ib, -1)
    b_ok = np.sum(pb * ib, -1) > np.sum(pb * ia, -1)
    n = len(pa)
    return {"identity_versions": float((a_ok.sum() + b_ok.sum()) / (2 * n)) if n else None,
            "identity_pairs": float(np.mean(a_ok & b_ok)) if n else None}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graph, state, batch: dict):
    """-> (visual embeddings, targets) [batch, blocks, Q, D], the target image of each block [batch, blocks], the
    identity head's output [batch, blocks, De] (None without one; person slots: [batch, M, De], one per person
    query) and which person queries exist [batch, M] (None without person slots)."""
    mllm = nnx.merge(graph, state).mllm
    feats = mllm.encode_images(batch["images"])  # [batch, N, K, D_vit]
    known = (batch["image_identity"], batch["image_identity_mask"]) if "image_identity" in batch else None
    out = mllm(batch["input_ids"], batch["role"], batch["image_index"], image_features=feats,
               attention_mask=batch["attention_mask"], return_logits=False, slot_identity=known)
    targets = pool_targets(take_images(feats, out.query_image_index), mllm.cfg.num_image_tokens,
                           mllm.cfg.reg_target_pool)
    return out.visual_embeddings, targets, out.query_image_index, out.identity, out.identity_valid


def _last_blocks(session, convs: Sequence) -> tuple:
    """(predicted visual embeddings, targets) [len(convs), Q, D] of each conversation's last query block, and
    its predicted identity [len(convs), De] (None without an identity head)."""
    pred, target, index, ident, persons = _forward(session.graph, session.state, _examples(session, convs))
    pred, target, index = np.asarray(pred), np.asarray(target), np.asarray(index)
    last = [int(np.flatnonzero(row >= 0)[-1]) for row in index]
    if ident is not None:  # the last block's, or with person slots the last person query's (a solo answer)
        at = last if persons is None else [int(np.flatnonzero(row)[-1]) for row in np.asarray(persons)]
        ident = np.stack([np.asarray(ident)[i, j] for i, j in enumerate(at)])
    return (np.stack([pred[i, j] for i, j in enumerate(last)]), np.stack([target[i, j] for i, j in enumerate(last)]),
            ident)


def _shown_identity(conv, dim: int) -> np.ndarray:
    """The identity of the one person the conversation's last answer image shows, [dim]."""
    people = conv.rounds[-1].assistant_image.people
    return people[0].identity.for_width(dim, "probe answer image")


def run(session, pairs: Sequence, batch_size: int = 16) -> dict:
    """Scores a `ChatSession`'s weights on probe pairs (`data.recall.ProbePair`), `batch_size` pairs a pass (both
    versions of each in the one batch)."""
    if not pairs:
        return score(*(np.zeros((0, 1, 1)),) * 4)
    parts, idents = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        convs = [p.conversations[v] for v in (0, 1) for p in chunk]
        pred, target, ident = _last_blocks(session, convs)
        n = len(chunk)
        parts.append((pred[:n], pred[n:], target[:n], target[n:]))
        if ident is not None:
            truth = np.stack([_shown_identity(c, ident.shape[-1]) for c in convs])
            idents.append((ident[:n], ident[n:], truth[:n], truth[n:]))
    out = score(*(np.concatenate(x) for x in zip(*parts)))
    if idents:
        out.update(identity_score(*(np.concatenate(x) for x in zip(*idents))))
    return out
