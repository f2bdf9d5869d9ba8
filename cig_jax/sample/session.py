"""Sampling over a chat history: `ChatSession` keeps the history and a token-level KV cache across rounds.

Owns: what a round does at sampling time (the user turn goes into the cache, images through ViT + input
resampler; the assistant's text is decoded; on `<img>` the image queries are appended and the output
resampler's visual embeddings go to the detokenizer with the identities of the face references (`identities.py`:
this round's photos and the earlier references of the people the text names, each bound to a region); the drawn image is
written back into the cache as an input block, exactly as a user image, together with the next user turn), what
the cache should hold (the chat template's encoding of the history), the cache-overflow policy, and batching many
conversations of one shape over the mesh.

Does not own: keeping cache rows in step with token lists and the jitted model calls on them (`cache.py`), the
token layout (`cig_jax/data/chat_template.py`), the models (`cig_jax/models/`), the diffusion samplers
(`diffusion.py`), the text decoding loop (`decode.py`), the detokenizer call (`draw.py`), whole conversations
(`complete.py`), the round's options and the seed rule (`options.py`), files and the transcript (`sample.py`,
`transcript.py`).

How the cache stays right. Each row of the cache (`cache.RowCache`) mirrors, token for token, the chat
template's encoding of its history (`encode(..., end="round")`: without llama2's final `</s>`, which a round never
feeds back; with chatml's `<|im_end|>\\n`, which the next round reads and which go in with the next feed, like a
drawing's write-back; right after decoding, up to the answer only): before each step
the session encodes the history it wants in the cache and the cache keeps the common prefix and feeds the rest.
So a generated text that tokenizes differently when re-encoded, a turn marker the model emits, a replayed
history that shares its beginning with the cache, and the drawn image's write-back all go through one
mechanism, and a cached round computes what recomputing the whole history computes (tests/test_session.py
checks it to 1e-5).

Batches: rows are conversations with the same number of rounds answered at the same time; each row keeps its
own tokens (right-padded inside a chunk, padding masked out), its own seed (text sampling and diffusion noise per
row, so a row's result does not depend on its neighbours) and its own identity. Batch arrays are placed on the
mesh along the logical `batch` axis (data x fsdp).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cig_jax import sharding
from cig_jax.cli import UserError
from cig_jax.config import Config, MeshConfig
from cig_jax.data import schema
from cig_jax.data.chat_template import IMAGE_QUERY, INPUT_IMAGE, PERSON_SLOT, ChatTemplate
from cig_jax.data.persons import DRAWN_LAYOUT, drawn_people
from cig_jax.faces import backends
from cig_jax.faces.backends import make_identity_embedder
from cig_jax.sample.cache import RowCache
from cig_jax.sample.decode import banned_ids, decode_text
from cig_jax.sample.draw import detokenize, diffusion_bar
from cig_jax.sample.identities import FaceReferences, drawn_names, round_identities, with_predicted
from cig_jax.sample.options import RoundOptions
from cig_jax.train.checkpoint import checkpoint_parts, load_trained

log = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("error", "drop_oldest")


class ContextOverflowError(UserError, ValueError):
    """The history does not fit the session's KV cache under the 'error' overflow policy."""


@dataclasses.dataclass
class RoundResult:
    """What one round produced for one conversation."""

    text: str  # the assistant's text ("" when it only drew or said nothing)
    image: Optional[np.ndarray]  # [H, W, 3] uint8, None when it did not draw
    visual_embeddings: Optional[np.ndarray]  # [Q, D_vit] the detokenizer's condition
    identity_used: bool
    tokens: list  # text ids the decoder chose, stop token excluded
    stop: str = ""  # eos | image | turn_marker | max_new_tokens
    notes: list = dataclasses.field(default_factory=list)  # e.g. why no identity was used
    dropped_rounds: list = dataclasses.field(default_factory=list)  # rounds left out of the cache (overflow policy)


@dataclasses.dataclass
class _Row:
    conv: schema.Conversation  # the history; every image carries its pixels
    dropped: set = dataclasses.field(default_factory=set)  # rounds left out of the cache
    identities: FaceReferences = dataclasses.field(default_factory=FaceReferences)  # named face references


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] in [-1, 1] -> uint8 (what is saved, and what later rounds see)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def default_mesh() -> "jax.sharding.Mesh":
    """One device: a session's default (a batch of conversations may use a bigger mesh)."""
    return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _as_image(x, where: str) -> schema.Image:
    """A user image given as uint8 [H, W, 3] or a schema.Image -> a schema.Image carrying its pixels."""
    if isinstance(x, schema.Image):
        if x.pixels is not None:
            schema.check_pixels(x.pixels, f"{where}.pixels")
            return x
        return dataclasses.replace(x, pixels=x.load(None, where=where))
    if isinstance(x, np.ndarray):
        schema.check_pixels(x, where)
        return schema.Image(pixels=x)
    raise schema.SchemaError(f"{where}: expected a uint8 [H, W, 3] array or a schema.Image, got {type(x).__name__}")


# ----------------------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------------------
class ChatSession:
    """History + KV cache of one conversation (or `batch_size` conversations of one shape).

    model: a `CIGModel`; template: its `ChatTemplate`; cfg: the run's `Config` (`cfg.sample` and `cfg.diffusion`
    give the defaults of `round`). max_len: KV-cache slots for the history. overflow: 'error' (default: raise
    `ContextOverflowError`) or 'drop_oldest' (leave the oldest text-only rounds out of the cache, logged and
    reported in `RoundResult.dropped_rounds` and the round's metadata). mesh: where batch rows and parameters
    live (default: one device). identity_embedder: face embedder for user photos whose people carry no
    recorded identity (None: built on first need with `make_identity_embedder('auto')`; False: never). progress: show a
    tqdm bar over diffusion steps.
    """

    def __init__(self, model, template: ChatTemplate, cfg: Config, *, max_len: int = 2048, overflow: str = "error",
                 mesh=None, identity_embedder=None, batch_size: int = 1, progress: bool = False):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.template, self.cfg, self.max_len, self.overflow = template, cfg, max_len, overflow
        self.batch_size, self.progress = batch_size, progress
        self.mesh = mesh if mesh is not None else default_mesh()
        graphdef, state = nnx.split(model)
        self.graph = graphdef  # hashable (frozen configs): a jit static argument
        self.state = sharding.place_state(state, self.mesh, cfg.mesh.axis_rules)
        self.image_size = model.image_size()
        self.q = model.mllm.num_image_tokens
        self._identity_dim = cfg.model.dit.identity.embedding_dim
        self._has_identity = cfg.model.dit.identity_injection != "none"
        self._embedder = identity_embedder
        self._banned = jnp.asarray(banned_ids(template, cfg.model.llm.vocab_size))
        self.reset()

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, directory, *, config: Optional[Config] = None, step: Optional[int] = None,
                        mesh=None, **kw) -> "ChatSession":
        """A session over a training workdir (`DIR/checkpoints/<step>/`, `DIR/tokenizer/`). `config` overrides the
        config saved in the checkpoint (the model must match it: `CheckpointMismatchError` otherwise). A missing
        directory, checkpoint or tokenizer is a FileNotFoundError."""
        cfg, template = checkpoint_parts(directory, config)
        mesh = mesh if mesh is not None else default_mesh()
        model = load_trained(cfg, step=step, mesh=mesh, workdir=directory)
        return cls(model, template, cfg, mesh=mesh, **kw)

    def with_batch_size(self, batch_size: int) -> "ChatSession":
        """A new, empty session over the same weights (shared, not copied) for `batch_size` conversations."""
        new = copy.copy(self)
        new.batch_size = batch_size
        new.reset()
        return new

    def reset(self) -> None:
        """Forgets the history, the encoded images and the cache (the compiled functions stay)."""
        self.rows = [_Row(schema.Conversation(id="chat")) for _ in range(self.batch_size)]
        self.cache = RowCache(self.graph, self.state, self.cfg.model, batch_size=self.batch_size,
                              max_len=self.max_len, pad_id=self.template.pad_id, mesh=self.mesh,
                              rules=self.cfg.mesh.axis_rules)
        self._keys: dict = {}  # id(schema.Image) -> (image, key), for images of the history

    # -- public API --------------------------------------------------------------------------------------
    @property
    def history(self) -> schema.Conversation:
        """The conversation so far (a copy; images carry pixels). Only for batch_size 1: see `histories`."""
        if self.batch_size != 1:
            raise ValueError(f"this session holds {self.batch_size} conversations: use .histories")
        return self.histories[0]

    @property
    def histories(self) -> list:
        return [copy.deepcopy(r.conv) for r in self.rows]

    def replay(self, conv: schema.Conversation) -> None:
        """Makes `conv`'s answered rounds the history and feeds them into the cache, without generating
        (cache entries shared with the current history are kept). Pending rounds are not included."""
        self.replay_batch([conv])

    def replay_batch(self, convs: Sequence[schema.Conversation]) -> None:
        if len(convs) != self.batch_size:
            raise ValueError(f"replay_batch: {len(convs)} conversations for a session of batch_size {self.batch_size}")
        for row, conv in zip(self.rows, convs):
            answered = [r for r in conv.rounds if not r.pending]
            rounds = []
            for r, rnd in enumerate(answered):
                where = f"{schema.conversation_label(conv)}: rounds[{r}]"
                rounds.append(dataclasses.replace(
                    rnd, metadata=copy.deepcopy(rnd.metadata),
                    user_images=[self.loaded(im, conv, f"{where}.user_images[{j}]")
                                 for j, im in enumerate(rnd.user_images)],
                    assistant_image=None if rnd.assistant_image is None else self.loaded(
                        rnd.assistant_image, conv, f"{where}.assistant_image")))
            row.conv = dataclasses.replace(conv, rounds=rounds, metadata=copy.deepcopy(conv.metadata),
                                           people=copy.deepcopy(conv.people))
            row.dropped = set()
            row.identities = FaceReferences()
            for r, rnd in enumerate(rounds):
                self._register_identities(row, rnd, r)
        targets, _ = self._fit(reserve=0, prompt=False, what="history")
        self.cache.sync(targets)
        self._prune_images()

    def options(self, **given) -> RoundOptions:
        """`RoundOptions.resolve(self.cfg, **given)`: the knobs given, the config's values for the rest."""
        return RoundOptions.resolve(self.cfg, **given)

    def round(self, text: str, images=(), *, seed: int = 0, options: Optional[RoundOptions] = None) -> RoundResult:
        """One user turn -> the assistant's answer (text, and an image when the model opens `<img>` or when
        `options.force_image`). options: None = the config's (`self.options()`). The answer joins the
        history; the drawn image is written back into the cache as an input block, exactly as a user image, with
        the next feed (the next round's user turn: one model call for both, and not on the way to the image), so
        later rounds see it."""
        if self.batch_size != 1:
            raise ValueError(f"this session holds {self.batch_size} conversations: use .round_batch")
        return self.round_batch([text], [images], seeds=[seed], options=options)[0]

    def round_batch(self, texts: Sequence[str], images: Optional[Sequence] = None, *, seeds: Sequence[int] = (),
                    options: Optional[RoundOptions] = None) -> list:
        """`round` for every conversation of the batch at once: texts [b], images [b] lists, seeds [b]."""
        b = self.batch_size
        images = list(images) if images is not None else [()] * b
        seeds = list(seeds) if seeds else [0] * b
        if not (len(texts) == len(images) == len(seeds) == b):
            raise ValueError(f"round_batch: need {b} texts, image lists and seeds, got {len(texts)}, {len(images)}, "
                             f"{len(seeds)}")
        options = self.options() if options is None else options
        before = [len(row.conv.rounds) for row in self.rows]
        try:
            return self._round_batch(texts, images, seeds, options)
        except BaseException:  # the history stays as it was; the next sync repairs the cache
            for row, n in zip(self.rows, before):
                del row.conv.rounds[n:]
            raise

    def _round_batch(self, texts, images, seeds, options: RoundOptions) -> list:
        b, d = self.batch_size, self.cfg.diffusion
        results = [RoundResult("", None, None, False, []) for _ in range(b)]
        max_new, n_steps = options.max_new_tokens, options.num_steps

        # --- the user turn -------------------------------------------------------------------------------
        r_index = len(self.rows[0].conv.rounds)
        for i, row in enumerate(self.rows):
            where = f"{schema.conversation_label(row.conv)}: rounds[{r_index}]"
            rnd = schema.Round(user_text=_user_text(texts[i]),
                               user_images=[_as_image(im, f"{where}.user_images[{j}]")
                                            for j, im in enumerate(images[i])],
                               metadata={"sample": dict(options.as_metadata(), seed=int(seeds[i]))})
            if not rnd.user_text and not rnd.user_images:
                raise schema.SchemaError(f"{where}: user turn is empty (needs text or images)")
            schema.user_segments(rnd)  # checks <image> markers against the images
            row.conv.rounds.append(rnd)
        targets, dropped = self._fit(reserve=answer_slots(max_new, self.q, b), prompt=True, what="round")
        if max_new > 0:  # the prompt's logits start the decode; with no text to decode, the prompt goes in with
            self.cache.sync(targets)  # the answer's query block below: one model call
        for i, row in enumerate(self.rows):
            results[i].dropped_rounds = sorted(row.dropped)
            if dropped[i]:
                results[i].notes.append(f"context full: rounds {sorted(dropped[i])} left out of the cache")
            if row.dropped:  # what this round's context lacked
                row.conv.rounds[-1].metadata["sample"]["dropped_rounds"] = sorted(row.dropped)

        # --- text ----------------------------------------------------------------------------------------
        seeds_arr = self.cache.put(np.asarray(seeds, np.int32), ("batch",))
        tokens, stops = decode_text(self.cache, seeds=seeds_arr, banned=self._banned, eos_id=self.template.eos_id,
                                    boi_id=self.template.boi_id, marker=self.template.turn_marker, options=options)
        for res, toks, stop in zip(results, tokens, stops):
            res.tokens, res.stop = toks, stop

        # --- image queries -------------------------------------------------------------------------------
        draw = [options.force_image or res.stop == "image" for res in results]
        names = [[] for _ in self.rows]  # with person slots: who each drawing shows, left to right
        for i, row in enumerate(self.rows):
            rnd = row.conv.rounds[-1]
            rnd.assistant_text = results[i].text = self.template.tokenizer.decode(results[i].tokens)
            if self.template.person_slots:
                names[i] = drawn_names(rnd, [q.name for q in row.conv.people], max(DRAWN_LAYOUT))
            rnd.assistant_image = _pending(names[i]) if draw[i] else None
        # what the model wrote (a chatml round's end goes in with the next feed, with the next user turn)
        drawn = self.cache.sync([self._target(row, upto="queries" if draw[i] else "answer")
                                 for i, row in enumerate(self.rows)], want_visual=any(draw))
        visual, predicted = drawn if drawn is not None else (None, None)

        # --- the image -----------------------------------------------------------------------------------
        if any(draw):
            identity, on, boxes = self._identities(results, draw, predicted, names)
            with diffusion_bar(self.progress, n_steps, d.sampler):
                pixels = detokenize(self.graph, self.state, seeds_arr, visual, identity,
                                    self.cache.put(on, ("batch", None)), self.cache.put(boxes, ("batch", None, None)),
                                    jnp.float32(options.visual_scale), jnp.float32(options.identity_scale), d,
                                    n_steps, self.progress)
            pixels = to_uint8(jax.device_get(pixels))
            vis_np = np.asarray(jax.device_get(visual))
            used = np.asarray(jax.device_get(identity)) if identity is not None else None
            for i, row in enumerate(self.rows):
                if draw[i]:
                    results[i].image, results[i].visual_embeddings = pixels[i], vis_np[i]
                    people = drawn_people(names[i], pixels.shape[1])
                    for k, person in enumerate(people):  # drawn with this identity: what a later slot carries
                        if used is not None and k < len(on[i]) and on[i][k]:
                            person.identity = self._drawn_identity(used[i, k])
                    row.conv.rounds[-1].assistant_image = schema.Image(pixels=pixels[i], people=people)
        # The drawn image is now in the history; its write-back input block (and any re-tokenized text) goes
        # into the cache with the next feed, in the same model call as the next user turn (`flush` does it now).
        for i, row in enumerate(self.rows):
            self._register_identities(row, row.conv.rounds[-1], len(row.conv.rounds) - 1)
        self._prune_images()
        return results

    def flush(self) -> None:
        """Feeds whatever of the history is not in the cache yet (the last drawn image's write-back block)."""
        self.cache.sync([self._target(row) for row in self.rows])

    # -- cache bookkeeping -------------------------------------------------------------------------------
    def loaded(self, image: schema.Image, conv: schema.Conversation, where: str) -> schema.Image:
        """`image` carrying its pixels (read from its path under the conversation's folder if needed)."""
        if image.pixels is not None:
            return image
        return dataclasses.replace(image, pixels=image.load(conv.base_dir, where=where))

    def _key(self, image) -> str:
        hit = self._keys.get(id(image))
        if hit is not None and hit[0] is image:
            return hit[1]
        known = None  # a person slot's crop: the identity of the person it shows, where the history has it
        if self.template.person_slots and len(image.people) == 1 and image.people[0].identity is not None:
            known = image.people[0].identity.for_width(self.cfg.model.mllm.identity_dim, "a person's identity")
        key = self.cache.add_image(image.pixels, known)
        self._keys[id(image)] = (image, key)
        return key

    def _target(self, row: _Row, *, prompt: bool = False, upto: str = "round") -> list:
        """The tokens the row's cache should hold: the template's encoding of the history (rounds in
        `row.dropped` left out) as a sampling cache holds it (`end="round"`: llama2 without the final </s>);
        `prompt`: the last round is pending (encode up to the generation prompt); `upto` 'answer': only up to
        the last round's answer (before its round end), 'queries': up to the end of its query block."""
        rounds = [r for k, r in enumerate(row.conv.rounds) if k not in row.dropped]
        conv = dataclasses.replace(row.conv, rounds=rounds)
        enc = self.template.encode(conv, add_generation_prompt=prompt, end="answer" if upto == "answer" else "round")
        n = len(enc)
        if upto == "queries":
            n = int(np.flatnonzero(enc.role == IMAGE_QUERY)[-1]) + 1
        keys = [None if _is_pending(im) else self._key(im) for im in enc.images]
        ids, role, ii = enc.input_ids[:n].tolist(), enc.role[:n].tolist(), enc.image_index[:n].tolist()
        return [(t, r, keys[k] if r in (INPUT_IMAGE, PERSON_SLOT) and k >= 0 else None)
                for t, r, k in zip(ids, role, ii)]

    def _fit(self, *, reserve: int, prompt: bool, what: str) -> tuple[list, list]:
        """Applies the overflow policy before the history (`prompt`: up to the generation prompt) goes into the
        cache, with `reserve` slots for the answer. Returns (per row the cache target that fits, per row the
        rounds dropped now (drop_oldest)); raises ContextOverflowError under 'error'."""
        dropped_now = [set() for _ in self.rows]
        while True:
            targets = [self._target(row, prompt=prompt) for row in self.rows]
            need = self.cache.slots_needed(targets) + reserve
            if need <= self.max_len:
                return targets, dropped_now
            if self.overflow == "error":
                row = self.rows[0]
                r = len(row.conv.rounds) - 1
                raise ContextOverflowError(
                    f"{schema.conversation_label(row.conv)}: rounds[{r}]: the {what} needs {need} KV-cache slots (incl. {reserve} for the "
                    f"answer) but the context holds {self.max_len}; raise max_len (sample.py --max-len) or use "
                    "overflow 'drop_oldest'")
            progress = False
            for i, row in enumerate(self.rows):
                last = len(row.conv.rounds) - 1
                for k, rnd in enumerate(row.conv.rounds[:last]):
                    if k not in row.dropped and not rnd.user_images and rnd.assistant_image is None:
                        row.dropped.add(k)
                        dropped_now[i].add(k)
                        progress = True
                        log.warning("%s: context full (%d > %d slots): rounds[%d] (text only) left out of the cache",
                                    schema.conversation_label(row.conv), need, self.max_len, k)
                        break
            if not progress:
                row = self.rows[0]
                raise ContextOverflowError(
                    f"{schema.conversation_label(row.conv)}: rounds[{len(row.conv.rounds) - 1}]: the {what} needs {need} KV-cache slots "
                    f"but the context holds {self.max_len}, and no text-only round is left to drop; raise max_len")
            self.cache.clear()  # rebuilt from scratch: no holes left by the dropped rounds

    def _prune_images(self) -> None:
        """Drops encoded images no row's history uses any more (the person crops the cache holds count as used:
        they are encoded once, not again every round)."""
        used = {self._key(im) for row in self.rows for _, im in schema.iter_images(row.conv)
                if not _is_pending(im)}
        used |= {t[2] for tokens in self.cache.tokens for t in tokens if t[2] is not None}
        self.cache.keep_images(used)
        self._keys = {k: v for k, v in self._keys.items() if v[1] in used}

    # -- identity ------------------------------------------------------------------------------------------
    def _get_embedder(self):
        """The face embedder for photos without a recorded identity (built on first need), or None."""
        if self._embedder is False:
            return None
        if self._embedder is None:
            try:
                self._embedder = make_identity_embedder("auto")
            except Exception as e:  # noqa: BLE001 - no weights / no backend: only recorded identities
                log.warning("no face identity embedder (%s): photos without a recorded identity get none", e)
                self._embedder = False
                return None
        return self._embedder

    def _drawn_identity(self, vector: np.ndarray) -> schema.PersonIdentity:
        """The identity a person was drawn with, as its backend writes it (a synthetic code: its own width)."""
        backend = self.cfg.model.dit.identity.backend or "synthetic"  # no backend named: the synthetic codes
        width = backends.BACKENDS[backend].dim
        return schema.PersonIdentity.of(backend, vector[:width] if width else vector)

    def _register_identities(self, row: _Row, rnd: schema.Round, r: int) -> None:
        """Remembers the identity of named one-person user images (face references) for later rounds."""
        if self._has_identity:
            row.identities.register(rnd, r, self._identity_dim, self._get_embedder,
                                    f"{schema.conversation_label(row.conv)}: rounds[{r}]")

    def _identities(self, results: list, draw: list, predicted=None, names=None):
        """Identities [b, P, De], which slots are used [b, P] and their regions [b, P, 4], with a note (and the
        list of identities used) per drawing row: see `identities.round_identities`; a row with none takes the
        identity head's prediction (predicted [b, De], or [b, M, De] for the drawn people `names[i]` with person
        slots: `identities.with_predicted`)."""
        predicted = None if predicted is None else np.asarray(jax.device_get(predicted))
        b, p = self.batch_size, self.cfg.model.dit.identity.max_identities
        out = np.zeros((b, p, self._identity_dim), np.float32)
        on = np.zeros((b, p), bool)
        boxes = np.zeros((b, p, 4), np.float32)
        for i, row in enumerate(self.rows):
            if not draw[i]:
                continue
            r = len(row.conv.rounds) - 1
            record = {"identity": "no identity: the detokenizer has no identity branch", "identities": []}
            if self._has_identity:
                out[i], m, boxes[i], record = round_identities(row.conv.rounds[-1], row.identities, self._identity_dim,
                                                               p, self._get_embedder,
                                                               f"{schema.conversation_label(row.conv)}: rounds[{r}]")
                if predicted is not None:
                    out[i], m, boxes[i], record = with_predicted(
                        out[i], m, boxes[i], record, predicted[i], row.conv.rounds[-1], [q.name for q in row.conv.people],
                        drawn=names[i] if self.template.person_slots else None)
                on[i] = m > 0
            results[i].identity_used = bool(on[i].any())
            results[i].notes.append(record["identity"])
            row.conv.rounds[-1].metadata["sample"].update(record)
        if not self._has_identity:
            return None, on, boxes
        return self.cache.put(out, ("batch", None, None)), on, boxes  # arrays even if unused: one compiled sampler



def _user_text(text) -> str:
    if text is None:
        return ""
    if not isinstance(text, str):
        raise schema.SchemaError(f"user text must be a string, got {type(text).__name__}")
    return text


def _pending(names: list) -> schema.Image:
    """Stands for the image being drawn while its query block is encoded (no pixels, no path), showing
    `names` (the person queries of a template with person slots)."""
    return schema.Image(people=[schema.Person(n) for n in names])


def _is_pending(image: schema.Image) -> bool:
    return image.pixels is None and image.path is None


# ----------------------------------------------------------------------------------------------------------
# The answer's room in the cache
# ----------------------------------------------------------------------------------------------------------
def answer_slots(max_new_tokens: int, num_image_tokens: int, batch_size: int = 1) -> int:
    """KV-cache slots a round keeps free for its answer: the text, <img> + queries + </img> and their write-back.
    In a batch the rows share one write position: an answer re-encoded after decoding is written past the
    longest row's decoded text, so the text is reserved twice."""
    return (2 if batch_size > 1 else 1) * max_new_tokens + 2 * num_image_tokens + 4


__all__ = ["ChatSession", "RoundResult", "ContextOverflowError", "answer_slots", "to_uint8",
           "default_mesh", "OVERFLOW_POLICIES"]
