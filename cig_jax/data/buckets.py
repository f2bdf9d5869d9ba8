"""Length-bucketed conversation batches: each global batch is padded to the smallest of `data.length_buckets`
that holds its longest row, instead of every row to `data.seq_len`.

Owns: grouping records by token length and choosing each global batch's bucket. The seeded shuffled order of
the records (the same as the unbucketed pipeline's, epochs included) is cut into windows of `bucket_window`
global batches; within a window the records are sorted by their token length (ties in shuffled order) and cut
into global batches, whose order is then shuffled with a generator seeded by (seed, window), so training does
not run short-to-long. Element j of the resulting MapDataset is global batch j % W of window j // W, and each
process encodes only its block of rows of it (rows p * b ... (p + 1) * b, as `pipeline._process_share` gives
them); the bucket is decided from the whole global batch's lengths, so every process pads to the same shape.
Everything is a pure function of (records, seed): the same seed gives byte-identical batches, and the grain
iterator state resumes exactly (it is the element position, as in `pipeline`).

Skips. A window's lengths come from encoding its records once (the chat template memoises segments, so the
second encoding of a kept row is cheap). A record that fails a check needing no image (schema, layout token,
data.max_images, data.seq_len) is left out of its window and counted once, by the process whose share of
window positions (position % processes) holds it. If the kept records do not fill whole global batches, the
last ones in shuffled order (fewer than one global batch) are left out and counted as "bucket window
remainder": every batch keeps its full size, and no record's row depends on another's skip. A record whose
image fails to load (found only when its row is encoded) is replaced by the next row of the same process's
block that encodes (cyclically; counted as "missing image"), so the batch keeps its size and shape.

Does not own: how one record becomes arrays (`pipeline.encode_record`), where records come from, or compiling a
step per bucket (`cig_jax.train.trainer`).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Optional, Sequence

import grain
import numpy as np

from cig_jax.data import pipeline, schema
from cig_jax.data.chat_template import ChatTemplate

log = logging.getLogger(__name__)


class _Uncounted:
    """A skip counter that counts nothing (other processes' share of a window's skips)."""

    def skip(self, reason: str, index: int, detail: str, warn: bool = True) -> None:
        pass


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (ValueError when none is: the caller skips records over seq_len)."""
    for b in buckets:
        if length <= b:
            return int(b)
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


class Windows:
    """The global batches of each window: `batches(w)` -> [(record indices [G] int64, bucket)], memoised for
    the last few windows, each window's skips counted once (thread-safe: grain reads elements from prefetch threads)."""

    def __init__(self, order: grain.MapDataset, records: Sequence[schema.Conversation], template: ChatTemplate,
                 opts: pipeline.PipelineOptions, skips: pipeline.SkipCounter):
        self.order, self.records, self.template, self.opts, self.skips = order, records, template, opts, skips
        self.global_batch = opts.batch_size * opts.process_count
        self.span = opts.bucket_window * self.global_batch  # positions of the order per window
        self._lock = threading.Lock()
        self._memo: dict = {}
        self._counted: set = set()  # windows whose skips were counted (a window evicted and recomputed: once)
        self._tally: dict = {}  # epoch -> (windows with a remainder, records in them, windows tallied)

    def __getstate__(self):  # pickled into grain worker processes: a fresh lock and memo there
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_lock", "_memo", "_counted", "_tally")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._memo = {}
        self._counted = set()
        self._tally = {}

    def __len__(self) -> int:  # windows
        return -(-len(self.order) // self.span)

    def batches(self, w: int) -> list:
        with self._lock:
            if w not in self._memo:
                if len(self._memo) >= 16:
                    self._memo.pop(next(iter(self._memo)))
                self._memo[w] = self._compute(w, count=w not in self._counted)
                self._counted.add(w)
            return self._memo[w]

    def _epoch_of(self, w: int) -> int:
        return w * self.span // max(len(self.records), 1)

    def _windows_in(self, epoch: int) -> int:
        """How many windows start inside `epoch` (the order may repeat without end: counted, not enumerated)."""
        n = max(len(self.records), 1)
        first = -(-epoch * n // self.span)  # the first window starting at or after the epoch's first position
        return min(-(-(epoch + 1) * n // self.span), len(self)) - first

    def _tally_remainder(self, w: int, left: int) -> None:
        """Adds window w's remainder (records that wait for the next epoch) to its epoch's tally, and logs one line
        per epoch once every window of that epoch is tallied (prefetch threads compute windows out of order)."""
        epoch = self._epoch_of(w)
        windows, records, seen = self._tally.get(epoch, (0, 0, 0))
        self._tally[epoch] = windows, records, seen = (windows + (left > 0), records + left, seen + 1)
        if seen == self._windows_in(epoch) and records:
            log.warning(
                "epoch %d: %d records in %d bucket windows wait for the next epoch (not a whole number of global "
                "batches of %d in their window)", epoch, records, windows, self.global_batch)

    def _compute(self, w: int, count: bool) -> list:
        opts, g = self.opts, self.global_batch
        start = w * self.span
        kept = []  # (length, position in window, record index)
        counters = []
        for k in range(start, min(start + self.span, len(self.order))):
            i = int(self.order[k])
            mine = count and (k - start) % opts.process_count == opts.process_index
            counter = self.skips if mine else _Uncounted()
            counters.append(counter)
            checked = pipeline.checked_encoding(self.records[i], i, self.template, opts, counter)
            if checked is not None:
                kept.append((len(checked[1]), k - start, i))
        n = len(kept) // g
        left = kept[n * g:]  # fewer than one global batch left: out this epoch, so every batch is whole
        for _, pos, i in left:
            counters[pos].skip("bucket window remainder", i, "", warn=False)
        if count and opts.process_index == 0:
            self._tally_remainder(w, len(left))
        rows = sorted(kept[:n * g])  # by length, ties in shuffled order
        out = []
        for j in range(n):
            chunk = rows[j * g:(j + 1) * g]
            out.append((np.asarray([r[2] for r in chunk], np.int64), bucket_for(chunk[-1][0], opts.length_buckets)))
        perm = np.random.default_rng([opts.seed, w]).permutation(n)
        return [out[p] for p in perm]


def local_batch(windows: Windows, j: int, records, template: ChatTemplate, opts: pipeline.PipelineOptions,
                skips: pipeline.SkipCounter):
    """Global batch j's rows of this process, encoded and padded to its bucket, stacked; None for a window
    slot past the window's batches."""
    w, slot = divmod(j, opts.bucket_window)
    batches = windows.batches(w)
    if slot >= len(batches):
        return None
    indices, bucket = batches[slot]
    b = opts.batch_size
    mine = indices[opts.process_index * b:(opts.process_index + 1) * b]
    row_opts = dataclasses.replace(opts, seq_len=bucket)
    rows = [pipeline.encode_record(records[int(i)], int(i), template, row_opts, skips) for i in mine]
    good = [r for r in range(b) if rows[r] is not None]
    if not good:
        raise ValueError(f"global batch {j}: none of this process's {b} rows could be encoded (see the skip "
                         f"warnings above)")
    for r in range(b):  # a row whose image failed: the next row of this block that encoded (cyclically)
        if rows[r] is None:
            rows[r] = rows[min(good, key=lambda k: (k - r) % b)]
    return {k: np.stack([ex[k] for ex in rows]) for k in rows[0]}


def make_dataset(records: Sequence[schema.Conversation], template: ChatTemplate, opts: pipeline.PipelineOptions,
                 skips: Optional[pipeline.SkipCounter] = None) -> grain.IterDataset:
    """Host-local batches for this process: with `opts.length_buckets` each padded to its global batch's bucket
    (`make_bucketed_dataset`), else to seq_len (`pipeline.make_dataset`)."""
    skips = skips if skips is not None else pipeline.SkipCounter()
    if opts.length_buckets:
        return make_bucketed_dataset(records, template, opts, skips)
    return pipeline.make_dataset(records, template, opts, skips)


def make_bucketed_dataset(records: Sequence[schema.Conversation], template: ChatTemplate,
                          opts: pipeline.PipelineOptions, skips: pipeline.SkipCounter) -> grain.IterDataset:
    """This process's batches (the layout of `pipeline.make_dataset`, [batch, bucket] token arrays), each
    padded to its global batch's bucket; see the module docstring."""
    order = grain.MapDataset.range(len(records))
    if opts.shuffle:
        order = order.shuffle(seed=opts.seed)
    order = order.repeat(opts.num_epochs)
    windows = Windows(order, records, template, opts, skips)
    ds = grain.MapDataset.range(len(windows) * opts.bucket_window)
    ds = ds.map(lambda j: local_batch(windows, int(j), records, template, opts, skips))
    ds = pipeline.to_iter(ds, opts, opts.prefetch_buffer or 1)
    return ds.filter(lambda ex: ex is not None)
