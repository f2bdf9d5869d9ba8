"""Grain input pipeline: conversation records -> host-local model batches.

Owns: the order of records (seeded shuffle, epochs), the per-process shard (each jax process reads a
disjoint share before any decoding: its contiguous block of each global batch, so the global batch of P
processes is, row for row, the batch of one process), turning one conversation into
arrays through the chat template (tokens, roles, image slots, loss masks, padding to `seq_len`),
image preprocessing for the ViT, the Markov view used by the baseline, skipping bad records with a
count per reason, and batching. Everything is a pure function of (records, seed), so the same seed gives
byte-identical batches, and the grain iterator's state (saved with every checkpoint) resumes exactly.

Does not own: where records come from (`sources.py`, or any Sequence of Conversations),
how a conversation becomes tokens (`chat_template.py`), or global arrays (`cig_jax.sharding`).

Batch (all [batch, ...] numpy): input_ids, role, image_index, loss_mask, round_index, attention_mask
[seq_len] (with `length_buckets`: [the batch's bucket], `buckets.py`); images [max_images, S, S, 3] float32
in [-1, 1]; image_mask [max_images]; record_index []; with `identity_dim`, image_identity [max_images, De] and
image_identity_mask [max_images] (`shown_identities`).

`make_image_dataset` serves the detokenizer stage instead: single images [S, S, 3] in [-1, 1] with the identity
embeddings of the people shown, read from the record (`Person.identity`, never from a renderer): `identity`
[P, De], `identity_mask` [P] (1: slot p holds a person's identity), `identity_boxes` [P, 4] (x0, y0, x1, y1 as
fractions of the image: where that identity applies; the whole image when one person is shown).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Optional, Sequence

import grain
import numpy as np
from PIL import Image as PILImage

from cig_jax.data import schema, sources
from cig_jax.data.chat_template import ChatTemplate, pad_to

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    seq_len: int = 512
    max_images: int = 4
    image_size: int = 32
    batch_size: int = 8  # per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = None  # None: repeat forever
    markov_view: bool = False
    process_index: int = 0
    process_count: int = 1
    worker_count: int = 0  # grain worker processes (0: decode in this process)
    prefetch_buffer: int = 0  # batches buffered ahead (per worker with workers); 0: grain's default
    length_buckets: tuple = ()  # () = pad every example to seq_len; else see `cig_jax.data.buckets`
    bucket_window: int = 8  # global batches sorted by length together (with length_buckets)
    identity_dim: int = 0  # > 0: each example also carries image_identity / image_identity_mask (see below)


class SkipCounter:
    """Counts skipped records by reason (thread-safe; one per pipeline, no global state). With grain worker
    processes each worker counts (and logs) its own skips; the caller's counter sees none of them."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self._logged: set = set()  # records whose skip was logged: later epochs skip them without a word

    def __getstate__(self):  # pickled into grain worker processes
        return {"counts": self.counts, "logged": self._logged}

    def __setstate__(self, state):
        self.__init__()
        self.counts, self._logged = state["counts"], set(state.get("logged", ()))

    def skip(self, reason: str, index: int, detail: str, warn: bool = True) -> None:
        """Counts one skip; `warn` logs it the first time record `index` is skipped (later epochs count it only;
        callers that summarise many skips in one line pass False)."""
        with self._lock:
            self.counts[reason] += 1
            first = index not in self._logged
            self._logged.add(index)
        if warn and first:
            log.warning("skipping record %d (%s): %s (not logged again in later epochs)", index, reason, detail)


def markov_view(conv: schema.Conversation) -> schema.Conversation:
    """Only the last round, with the previous round's output image (if any) given as a user image: what a
    Markov model (each step sees just the last image) is trained on."""
    last = conv.rounds[-1]
    images = list(last.user_images)
    if len(conv.rounds) > 1 and conv.rounds[-2].assistant_image is not None:
        images = [conv.rounds[-2].assistant_image] + images
    marker = schema.IMAGE_PLACEHOLDER
    text = last.user_text
    if marker in text and len(images) > len(last.user_images):
        text = marker + text
    rnd = dataclasses.replace(last, user_images=images, user_text=text)
    return dataclasses.replace(conv, rounds=[rnd])


def preprocess_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3] in [-1, 1] (bilinear resize)."""
    if pixels.shape[:2] != (size, size):
        pixels = np.asarray(PILImage.fromarray(pixels).resize((size, size), PILImage.BILINEAR))
    return pixels.astype(np.float32) / 127.5 - 1.0


def checked_encoding(conv: schema.Conversation, index: int, template: ChatTemplate, opts: PipelineOptions,
                     skips: SkipCounter):
    """(the conversation as encoded, its `template.encode` output), or None (counted in `skips`) when the record
    fails a check that needs no image: schema, layout tokens in text, data.max_images, data.seq_len."""
    try:
        schema.validate(conv, check_images=False)
    except schema.SchemaError as e:
        reason = "unknown name" if "introduc" in str(e) or "name" in str(e) else "invalid record"
        skips.skip(reason, index, str(e))
        return None
    if opts.markov_view:
        conv = markov_view(conv)
    if template.person_slots:  # person slots crop the images: they need their pixels now
        try:
            conv = schema.with_pixels(conv)
        except (schema.SchemaError, OSError, ValueError) as e:
            skips.skip("missing image", index, str(e))
            return None
    try:
        out = template.encode(conv, add_generation_prompt=False)
    except schema.SchemaError as e:  # a text holding the chat layout's token strings (<img>, </s>...)
        skips.skip("layout token in text", index, str(e))
        return None
    if len(out.images) > opts.max_images:
        skips.skip("too many images", index, f"{len(out.images)} > data.max_images {opts.max_images}")
        return None
    if len(out) > opts.seq_len:
        skips.skip("too long", index, f"{len(out)} tokens > data.seq_len {opts.seq_len}")
        return None
    return conv, out


def encode_record(conv: schema.Conversation, index: int, template: ChatTemplate, opts: PipelineOptions,
                  skips: SkipCounter) -> Optional[dict]:
    """One conversation -> one example dict, or None (counted in `skips`) when the record is bad."""
    checked = checked_encoding(conv, index, template, opts, skips)
    if checked is None:
        return None
    conv, out = checked
    images = np.zeros((opts.max_images, opts.image_size, opts.image_size, 3), np.float32)
    image_mask = np.zeros((opts.max_images,), np.int32)
    for k, img in enumerate(out.images):
        try:
            pixels = img.load(conv.base_dir, where=f"image {k}")
        except (schema.SchemaError, OSError, ValueError) as e:
            skips.skip("missing image", index, str(e))
            return None
        images[k] = preprocess_image(pixels, opts.image_size)
        image_mask[k] = 1
    example = pad_to(out, opts.seq_len, template.pad_id)
    example.update(images=images, image_mask=image_mask, record_index=np.int64(index))
    if opts.identity_dim:
        example.update(zip(("image_identity", "image_identity_mask"),
                           shown_identities(out.images, opts.identity_dim, opts.max_images, f"record {index}")))
    return example


def shown_identities(images: Sequence[schema.Image], dim: int, max_images: int, where: str):
    """The identity of the one person each image shows, what the MLLM's identity head learns to predict:
    (image_identity [max_images, dim] float32, image_identity_mask [max_images] float32, 1 where image k shows
    exactly one person whose record carries an identity)."""
    ident = np.zeros((max_images, dim), np.float32)
    mask = np.zeros((max_images,), np.float32)
    for k, img in enumerate(images[:max_images]):
        people = img.people or []
        if len(people) == 1 and people[0].identity is not None:
            ident[k] = people[0].identity.for_width(dim, f"{where}: image {k}.people[0].identity")
            mask[k] = 1.0
    return ident, mask


def make_dataset(records: Sequence[schema.Conversation], template: ChatTemplate, opts: PipelineOptions,
                 skips: Optional[SkipCounter] = None) -> grain.IterDataset:
    """Host-local batches for this process (see the module docstring for the batch layout), each padded to
    seq_len. `cig_jax.data.buckets.make_dataset` is the one callers use: it comes here without
    `opts.length_buckets`, and pads each batch to its bucket with them."""
    assert not opts.length_buckets, "length buckets: cig_jax.data.buckets.make_dataset"
    skips = skips if skips is not None else SkipCounter()
    ds = grain.MapDataset.range(len(records))
    if opts.shuffle:
        ds = ds.shuffle(seed=opts.seed)
    ds = ds.repeat(opts.num_epochs)
    ds = _process_share(ds, opts)
    ds = ds.map(lambda i: encode_record(records[int(i)], int(i), template, opts, skips))
    return _batched(ds, opts)


def _process_share(ds: grain.MapDataset, opts: PipelineOptions) -> grain.MapDataset:
    """This process's elements: of each run of global-batch-size elements, the block of batch_size rows at
    process_index * batch_size. With one process, `ds` unchanged. (Rows land in the global array in
    process order, so 2 processes x 4 rows hold the same rows in the same places as 1 process x 8: per-row
    randomness such as diffusion noise then matches too.)"""
    p, n, b = opts.process_index, opts.process_count, opts.batch_size
    if n == 1:
        return ds
    return grain.MapDataset.range(len(ds) // n).map(lambda j: ds[(j // b) * b * n + p * b + j % b])


def _batched(ds: grain.MapDataset, opts: PipelineOptions) -> grain.IterDataset:
    """Batches of `opts.batch_size` from `ds` (examples, None for a skipped record), decoded in
    `opts.worker_count` worker processes when > 0 (grain's mp_prefetch hands examples back round-robin in the
    source order; skipped ones are dropped after it, here, so the batches are those of the in-process pipeline,
    and the iterator state checkpoints the same way)."""
    ds = to_iter(ds, opts, opts.prefetch_buffer * opts.batch_size or 1)
    return ds.filter(lambda ex: ex is not None).batch(opts.batch_size, drop_remainder=True)


def to_iter(ds: grain.MapDataset, opts: PipelineOptions, per_worker_buffer: int) -> grain.IterDataset:
    """`ds` (elements or None) as an iterator dataset, decoded in `opts.worker_count` worker processes when > 0
    (grain's mp_prefetch hands elements back round-robin in the source order). Nones are kept: the caller
    drops them after the workers, so the elements and the iterator state are those of the in-process run."""
    read = grain.ReadOptions(prefetch_buffer_size=opts.prefetch_buffer) if opts.prefetch_buffer else None
    ds = ds.to_iter_dataset(read, allow_nones=True)
    if opts.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; this program has no absl main
            flags.FLAGS.mark_as_parsed()
        mp = grain.MultiprocessingOptions(num_workers=opts.worker_count, per_worker_buffer_size=per_worker_buffer)
        ds = ds.mp_prefetch(mp)
    return ds


# ----------------------------------------------------------------------------------------------------------
# Single images (detokenizer stage)
# ----------------------------------------------------------------------------------------------------------
def image_identities(image: schema.Image, dim: int, max_identities: int, size: Optional[tuple] = None,
                     where: str = "image") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The identities of an image's people, each bound to its region: (identity [P, dim], identity_mask [P],
    identity_boxes [P, 4] as fractions of the image). One person shown: its identity applies to the whole image
    (the single-identity path). Several: each person with an identity and a box, in the record's order, up to P;
    a person without a box cannot be bound and is left out. size: (H, W) of the image, for the boxes."""
    ident = np.zeros((max_identities, dim), np.float32)
    mask = np.zeros((max_identities,), np.float32)
    boxes = np.zeros((max_identities, 4), np.float32)
    people = image.people
    slot = 0
    for i, p in enumerate(people):
        if p.identity is None or slot >= max_identities:
            continue
        v = p.identity.for_width(dim, f"{where}.people[{i}].identity")
        if len(people) == 1:
            box = (0.0, 0.0, 1.0, 1.0)
        elif p.box is not None and size is not None:
            h, w = size
            box = (p.box[0] / w, p.box[1] / h, p.box[2] / w, p.box[3] / h)
        else:
            continue
        ident[slot], mask[slot], boxes[slot] = v, 1.0, box
        slot += 1
    return ident, mask, boxes


def image_example(image: schema.Image, conv: schema.Conversation, size: int, identity_dim: int,
                  target_size: Optional[int] = None, max_identities: int = 2) -> dict:
    """One image for the detokenizer stage: `images` at the ViT's size, `targets` at the detokenizer's output
    size when that differs, and the identities of its people (`image_identities`)."""
    where = f"conversation {conv.id!r} image"
    pixels = image.load(conv.base_dir, where=where)
    ident, mask, boxes = image_identities(image, identity_dim, max_identities, pixels.shape[:2], where)
    out = {"images": preprocess_image(pixels, size), "identity": ident, "identity_mask": mask,
           "identity_boxes": boxes}
    if target_size and target_size != size:
        out["targets"] = preprocess_image(pixels, target_size)
    return out


def make_image_dataset(records: Sequence[schema.Conversation], opts: PipelineOptions, identity_dim: int = 128,
                       skips: Optional[SkipCounter] = None, target_size: Optional[int] = None,
                       max_identities: int = 2) -> grain.IterDataset:
    """Every image of every record (user and assistant images), shuffled by `opts.seed`, sharded per process,
    batched: images [batch, S, S, 3], identity [batch, P, identity_dim], identity_mask [batch, P],
    identity_boxes [batch, P, 4] (P = max_identities; and targets [batch, T, T, 3] when target_size T differs
    from S)."""
    skips = skips if skips is not None else SkipCounter()
    pairs = np.asarray([(i, k) for i in range(len(records)) for k in range(sources.num_images(records, i))],
                       np.int64).reshape(-1, 2)  # image counts from the source's index: no record decoded
    if len(pairs) == 0:
        raise ValueError("make_image_dataset: the records hold no images")

    def load(j):
        i, k = (int(v) for v in pairs[int(j)])
        conv = records[i]
        image = list(schema.iter_images(conv))[k][1]
        try:
            return image_example(image, conv, opts.image_size, identity_dim, target_size, max_identities)
        except (schema.SchemaError, OSError, ValueError) as e:
            skips.skip("missing image", i, str(e))
            return None

    ds = grain.MapDataset.range(len(pairs))
    if opts.shuffle:
        ds = ds.shuffle(seed=opts.seed)
    ds = ds.repeat(opts.num_epochs)
    ds = _process_share(ds, opts)
    return _batched(ds.map(load), opts)
