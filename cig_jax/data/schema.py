"""Conversation schema: the one in-memory and on-disk shape of a multi-round, interleaved text+image chat.

Owns: the dataclasses `Person`, `Image`, `Round`, `Conversation`;
validation (`validate`) with errors that name the file, the round and the field; and small queries over
a conversation (`iter_images`, `user_segments`, `pending_rounds`).

Also reading image files into uint8 RGB pixels (`read_image`, `pil_to_rgb`, PNG bytes): images load themselves
(`Image.load`) and `validate` checks them. JSON in/out (`load_conversation`, `save_conversation`,
`conversation_from_dict`, `to_dict`) lives in `schema_io.py`, which imports this module; the JSON Schema of the
file is `cig_jax/data/conversation.schema.json`; the Hugging Face / OpenAI `messages` form is read by
`messages.py`.

Does not own: how a round becomes tokens (`chat_template.py`), batching (`pipeline.py`), where the
conversations come from (`synthetic.py`, `video.py`), or record files (`tfds_builder.py`).

On disk a conversation is one JSON file:

    {"version": 1, "id": "syn-0-0000003", "kind": "name_based", "source": "synthetic",
     "people": [{"name": "Julian", "attributes": {"hair_color": "blonde", ...}}, ...],
     "rounds": [{"user_text": "Draw Julian and Maya in the park. ...", "user_images": [],
                 "assistant_text": "Here are Julian and Maya.",
                 "assistant_image": {"path": "images/syn-0-0000003_r0_a.png",
                                     "people": [{"name": "Julian", "attributes": {...}, "box": [2, 12, 30, 62]}],
                                     "attributes": {"scene": "park"}},
                 "introduces": ["Julian", "Maya"]}, ...],
     "metadata": {...}}

Image paths are relative to the JSON file's folder. A round whose assistant output is still empty
(`assistant_text` and `assistant_image` both null) is *pending*: it is what `sample.py` fills.
User images sit before the user text unless the text places them with `<image>` markers (one per image).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import re
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
from PIL import Image as PILImage

from cig_jax.cli import UserError
from cig_jax.faces import backends

SCHEMA_VERSION = 1
# Kinds in use (`kind` is free text; these are the ones this codebase makes). "chat": a user-written history.
KNOWN_KINDS = ("chat", "name_based", "single_turn", "rollback", "markov_edit", "video", "recall", "recall_describe", "recall_text")
IMAGE_PLACEHOLDER = "<image>"
# PIL modes we read (converted to 8-bit RGB). Anything else (CMYK, 16-bit, float) is refused.
SUPPORTED_MODES = ("RGB", "RGBA", "L", "LA", "P", "1")


class SchemaError(UserError, ValueError):
    """A conversation a user can fix: the message starts with `<file>: <field path>:`."""


# ----------------------------------------------------------------------------------------------------------
# Dataclasses
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PersonIdentity:
    """A face-identity embedding and the backend that made it (a name in `faces.backends.BACKENDS`). The values are
    a tuple of floats (so people compare by value); `vector()` gives them as float32 [D]."""

    backend: str
    embedding: tuple  # D floats

    @classmethod
    def of(cls, backend: str, vector) -> "PersonIdentity":
        return cls(backend, tuple(float(v) for v in np.asarray(vector, np.float32).reshape(-1)))

    def vector(self) -> np.ndarray:
        return np.asarray(self.embedding, np.float32)  # [D]

    def for_width(self, dim: int, where: str = "identity") -> np.ndarray:
        """The embedding as a model of identity width `dim` reads it, float32 [dim]. A synthetic code shorter
        than `dim` is zero-padded (its definition); any other mismatch raises ValueError (records embedded by
        one backend fed to a model trained for another)."""
        v = self.vector()
        if self.backend == "synthetic" and v.size < dim:
            v = np.pad(v, (0, dim - v.size))
        if v.size != dim:
            raise ValueError(f"{where}: a {self.backend} identity embedding of {v.size} values, but the model's "
                             f"identity width (model.dit.identity.embedding_dim) is {dim}; re-embed the records with "
                             "the model's backend or use a model of that width")
        return v


def identity_problem(backend, embedding, where: str) -> Optional[str]:
    """What is wrong with an identity (backend, embedding values), or None: the one check behind JSON reading
    and `validate`."""
    if backend not in backends.BACKENDS:
        return f"{where}.backend: expected one of {', '.join(backends.BACKENDS)}, got {backend!r}"
    emb = list(embedding) if isinstance(embedding, (list, tuple)) else None
    if not emb or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in emb):
        return f"{where}.embedding: expected a non-empty list of finite numbers"
    want = backends.BACKENDS[backend].dim
    if want is not None and len(emb) != want:
        return f"{where}.embedding: a {backend} embedding has {want} values, got {len(emb)}"
    return None


@dataclasses.dataclass
class Person:
    """A named person. In `Conversation.people`: the cast; in `Image.people`: who is in that image, with
    the attributes visible there and an optional `box` [x0, y0, x1, y1] in pixels (x1, y1 exclusive)."""

    name: str
    attributes: dict = dataclasses.field(default_factory=dict)  # {"hair_color": "blonde", ...}
    box: Optional[tuple] = None
    identity: Optional[PersonIdentity] = None  # the person's face-identity embedding (video records, synthetic codes)


@dataclasses.dataclass(eq=False)
class Image:
    """An image: a file `path` (relative to the conversation's folder) and/or in-memory `pixels`
    [H, W, 3] uint8. `people` and `attributes` (e.g. {"scene": "beach"}) are optional ground truth."""

    path: Optional[str] = None
    pixels: Optional[np.ndarray] = None  # [H, W, 3] uint8
    people: list = dataclasses.field(default_factory=list)  # list[Person]
    attributes: dict = dataclasses.field(default_factory=dict)

    def __eq__(self, other):
        if not isinstance(other, Image):
            return NotImplemented
        if (self.path, self.people, self.attributes) != (other.path, other.people, other.attributes):
            return False
        if self.pixels is None or other.pixels is None:
            return self.pixels is None and other.pixels is None
        return self.pixels.shape == other.pixels.shape and bool(np.array_equal(self.pixels, other.pixels))

    def load(self, base_dir: Union[str, Path, None] = None, where: str = "image") -> np.ndarray:
        """The pixels [H, W, 3] uint8: in-memory ones, else read from `path` under `base_dir`."""
        if self.pixels is not None:
            return self.pixels
        if not self.path:
            raise SchemaError(f"{where}: has neither 'path' nor pixels")
        return read_image(resolve_path(self.path, base_dir), where=f"{where}.path", shown=self.path)


@dataclasses.dataclass
class Round:
    """One user turn and the assistant's answer. `introduces` lists names the user introduces here."""

    user_text: str = ""
    user_images: list = dataclasses.field(default_factory=list)  # list[Image]
    assistant_text: Optional[str] = None
    assistant_image: Optional[Image] = None
    introduces: list = dataclasses.field(default_factory=list)  # list[str]
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def pending(self) -> bool:
        return self.assistant_text is None and self.assistant_image is None


@dataclasses.dataclass
class Conversation:
    """A chat history. `kind` names how it was made (see KNOWN_KINDS); `source` where it came from
    ("synthetic", "video:<clip>"...). `base_dir` (not serialized) is the folder image paths are under;
    `file` (not serialized) is the JSON (or record) it was read from, used to prefix error messages."""

    id: str
    rounds: list = dataclasses.field(default_factory=list)  # list[Round]
    people: list = dataclasses.field(default_factory=list)  # list[Person]
    kind: str = "chat"
    source: str = ""
    metadata: dict = dataclasses.field(default_factory=dict)
    base_dir: Optional[str] = dataclasses.field(default=None, compare=False, repr=False)
    file: Optional[str] = dataclasses.field(default=None, compare=False, repr=False)


# ----------------------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------------------
def iter_images(conv: Conversation) -> Iterator[tuple[str, Image]]:
    """(field path, image) for every image, in the canonical order: per round, user images then the
    assistant image. Record files store images in this order."""
    for r, rnd in enumerate(conv.rounds):
        for j, img in enumerate(rnd.user_images):
            yield f"rounds[{r}].user_images[{j}]", img
        if rnd.assistant_image is not None:
            yield f"rounds[{r}].assistant_image", rnd.assistant_image


def user_segments(rnd: Round) -> list:
    """The user turn as an interleaved list of str and Image, in reading order. Without `<image>`
    markers the images come first, then the text."""
    if IMAGE_PLACEHOLDER not in rnd.user_text:
        return list(rnd.user_images) + ([rnd.user_text] if rnd.user_text else [])
    parts = rnd.user_text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(rnd.user_images):
        raise SchemaError(
            f"user_text has {len(parts) - 1} '{IMAGE_PLACEHOLDER}' markers but the round has {len(rnd.user_images)} user_images"
        )
    out: list = []
    for k, text in enumerate(parts):
        if text:
            out.append(text)
        if k < len(rnd.user_images):
            out.append(rnd.user_images[k])
    return out


def pending_rounds(conv: Conversation) -> list[int]:
    """Indices of rounds with user input but no assistant output yet (what sample.py fills)."""
    return [r for r, rnd in enumerate(conv.rounds) if rnd.pending and (rnd.user_text or rnd.user_images)]


def mentioned_names(text: str, names) -> list[str]:
    """Names (from `names`) that occur in `text` as whole words, in the order given."""
    return [n for n in names if n and re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text)]


def with_pixels(conv: Conversation) -> Conversation:
    """A copy whose every image carries its pixels (files read and converted to RGB)."""
    out = copy.deepcopy(conv)
    for where, img in iter_images(out):
        img.pixels = img.load(out.base_dir, where=f"{conversation_label(out)}: {where}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Images on disk
# ----------------------------------------------------------------------------------------------------------
def resolve_path(path: str, base_dir: Union[str, Path, None]) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def read_image(path: Union[str, Path], where: str = "image", shown: Optional[str] = None) -> np.ndarray:
    """Reads an image file as [H, W, 3] uint8 RGB. RGBA/LA/palette are composited over white; L is
    replicated to RGB. Other modes (CMYK, 16-bit, float) raise SchemaError."""
    shown = shown or str(path)
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{where}: file not found: {shown}")
    try:
        with PILImage.open(path) as im:
            im.load()
            return pil_to_rgb(im, where=where, shown=shown)
    except SchemaError:
        raise
    except Exception as e:  # PIL raises several types for bad data
        raise SchemaError(f"{where}: cannot decode image {shown}: {e}") from None


def pil_to_rgb(im: PILImage.Image, where: str = "image", shown: str = "image") -> np.ndarray:
    if im.mode not in SUPPORTED_MODES:
        raise SchemaError(
            f"{where}: unsupported image mode {im.mode!r} in {shown} (supported: {', '.join(SUPPORTED_MODES)}); "
            "convert it to 8-bit RGB, e.g. PIL's Image.convert('RGB')"
        )
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = PILImage.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def encode_png(pixels: np.ndarray, text: Optional[dict] = None) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes (deterministic for the same pixels and text). `text`: {key: str} written as
    the PNG's tEXt chunks (e.g. how the image was generated)."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text:
        info = PngInfo()
        for k, v in text.items():
            info.add_text(str(k), str(v))
    buf = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(buf, format="PNG", compress_level=1,
                                                                                pnginfo=info)
    return buf.getvalue()


def decode_png(data: bytes, where: str = "image") -> np.ndarray:
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.load()
            return pil_to_rgb(im, where=where, shown="encoded image")
    except SchemaError:
        raise
    except Exception as e:
        raise SchemaError(f"{where}: cannot decode image bytes: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Semantic validation
# ----------------------------------------------------------------------------------------------------------
def conversation_label(conv: Conversation) -> str:
    return conv.file or (f"conversation {conv.id!r}" if conv.id else "<conversation>")


def check_pixels(px, where: str) -> None:
    if not isinstance(px, np.ndarray):
        raise SchemaError(f"{where}: expected a numpy array, got {type(px).__name__}")
    if px.dtype != np.uint8:
        raise SchemaError(f"{where}: expected dtype uint8, got {px.dtype} (scale to 0..255 and cast)")
    if px.ndim != 3 or px.shape[-1] != 3 or px.shape[0] == 0 or px.shape[1] == 0:
        raise SchemaError(f"{where}: expected shape [H, W, 3], got {list(px.shape)}")


def validate(conv: Conversation, check_images: bool = True) -> None:
    """Raises SchemaError on the first problem: empty rounds, bad pixels, a missing or undecodable or
    unsupported image file (when `check_images`), a box outside its image, `<image>` markers that do not
    match the user images, a pending round before an answered one, and, for kinds 'name_based' and 'recall', a
    name used before the round that introduces it."""
    label = conversation_label(conv)

    def fail(msg):
        raise SchemaError(f"{label}: {msg}")

    if not conv.rounds:
        fail("rounds: a conversation needs at least one round")
    names = [p.name for p in conv.people]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        fail(f"people: name {dup!r} appears twice")

    for r, rnd in enumerate(conv.rounds):
        n_marks = rnd.user_text.count(IMAGE_PLACEHOLDER)
        if n_marks and n_marks != len(rnd.user_images):
            fail(f"rounds[{r}].user_text: {n_marks} '{IMAGE_PLACEHOLDER}' markers but {len(rnd.user_images)} user_images")
        if not rnd.user_text and not rnd.user_images:
            fail(f"rounds[{r}]: user turn is empty (needs user_text or user_images)")
        if r + 1 < len(conv.rounds) and rnd.pending and not conv.rounds[r + 1].pending:
            fail(f"rounds[{r}]: has no assistant output but a later round does (only trailing rounds may be pending)")

    for where, im in iter_images(conv):
        size = None
        if im.pixels is not None:
            check_pixels(im.pixels, f"{label}: {where}.pixels")
            size = im.pixels.shape[:2]
        elif not im.path:
            fail(f"{where}: has neither 'path' nor pixels")
        elif check_images:
            size = im.load(conv.base_dir, where=f"{label}: {where}").shape[:2]
        for i, p in enumerate(im.people):
            if p.box is None:
                continue
            x0, y0, x1, y1 = p.box
            if not (x0 < x1 and y0 < y1 and x0 >= 0 and y0 >= 0):
                fail(f"{where}.people[{i}].box: expected x0 < x1 and y0 < y1, non-negative, got {list(p.box)}")
            if size is not None and (x1 > size[1] or y1 > size[0]):
                fail(f"{where}.people[{i}].box: {list(p.box)} lies outside the {size[1]}x{size[0]} image")

    people = [(f"people[{i}]", p) for i, p in enumerate(conv.people)]
    people += [(f"{where}.people[{i}]", p) for where, im in iter_images(conv) for i, p in enumerate(im.people)]
    for where, p in people:
        if p.identity is not None:
            problem = identity_problem(p.identity.backend, p.identity.embedding, f"{where}.identity")
            if problem:
                fail(problem)

    if conv.kind in ("name_based", "recall", "recall_describe", "recall_text"):
        _validate_names(conv, fail)


def _validate_names(conv: Conversation, fail) -> None:
    """Each name must be introduced (listed in some round's `introduces`, or, when no round lists any,
    first mentioned in a user text) no later than the first round that uses it."""
    cast = [p.name for p in conv.people]
    explicit = any(rnd.introduces for rnd in conv.rounds)
    introduced_at: dict = {}
    for r, rnd in enumerate(conv.rounds):
        for i, n in enumerate(rnd.introduces):
            if cast and n not in cast:
                fail(f"rounds[{r}].introduces[{i}]: {n!r} is not in people ({', '.join(cast)})")
            if n in introduced_at:
                fail(f"rounds[{r}].introduces[{i}]: {n!r} was already introduced in rounds[{introduced_at[n]}]")
            if not mentioned_names(rnd.user_text, [n]) and not any(p.name == n for im in rnd.user_images for p in im.people):
                fail(f"rounds[{r}].introduces[{i}]: {n!r} does not appear in rounds[{r}].user_text")
            introduced_at[n] = r
    known = list(dict.fromkeys(cast + list(introduced_at) + [p.name for _, im in iter_images(conv) for p in im.people]))
    for r, rnd in enumerate(conv.rounds):
        for n in mentioned_names(rnd.user_text, known):
            if not explicit:
                introduced_at.setdefault(n, r)
            at = introduced_at.get(n)
            if at is None or at > r:
                later = f" (introduced only in rounds[{at}])" if at is not None else ""
                fail(f"rounds[{r}].user_text: name {n!r} is used before it is introduced{later}")
        if rnd.assistant_image is not None:
            for i, p in enumerate(rnd.assistant_image.people):
                at = introduced_at.get(p.name)
                if at is None or at > r:
                    fail(f"rounds[{r}].assistant_image.people[{i}].name: {p.name!r} appears before it is introduced")
