"""Token data for the language-model smoke job: random walks through a fixed permutation of the vocabulary.

Owns: a grain dataset of host-local batches whose next token is always `perm[token]`, so a model can drive
the loss towards zero quickly (a learning check that needs no files). Example i is a pure function of
(seed, i); the dataset is sharded by process before batching, so hosts read disjoint examples and the
iterator state (saved with checkpoints) resumes exactly.
"""
from __future__ import annotations

import grain
import numpy as np

PERMUTATION_SEED = 1234


def permutation_walk(index: int, *, vocab: int, seq_len: int, seed: int) -> dict:
    perm = np.random.default_rng(PERMUTATION_SEED).permutation(vocab)
    rng = np.random.default_rng([seed, index])
    tokens = np.empty((seq_len,), np.int32)
    tokens[0] = rng.integers(0, vocab)
    for t in range(1, seq_len):
        tokens[t] = perm[tokens[t - 1]]
    ones = np.ones_like(tokens)
    return {"tokens": tokens, "loss_mask": ones, "attention_mask": ones}


def lm_smoke_dataset(*, vocab: int, seq_len: int, local_batch: int, seed: int, process_index: int = 0,
                     process_count: int = 1) -> grain.IterDataset:
    """Endless host-local batches {tokens, loss_mask, attention_mask: [local_batch, seq_len]}."""
    ds = grain.MapDataset.range(1 << 40)[process_index::process_count]
    ds = ds.map(lambda i: permutation_walk(int(i), vocab=vocab, seq_len=seq_len, seed=seed))
    return ds.batch(local_batch, drop_remainder=True).to_iter_dataset()
