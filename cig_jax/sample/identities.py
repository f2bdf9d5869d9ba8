"""Which identities a round draws with: face references -> identity embeddings, each bound to a region.

Owns: reading the identity of the people in a user image (the record's `Person.identity`, else the face embedder
on the photo), remembering named face references for later rounds (`FaceReferences`), and choosing, for a round
that draws, up to P identities with the region each applies to (`round_identities`): this round's references
first, then the people the text names whose face was given earlier, in the order the text names them. One
identity applies to the whole image (the single-identity path); n >= 2 are laid out left to right in equal
vertical strips, the layout of the training pairs (left person named first). The choice and why go into the
round's metadata (`metadata["sample"]["identity"]`, `["identities"]`).

Does not own: face detection and embedding (`cig_jax/faces/identity.py`), how identities enter the DiT
(`models/dit.py`), the session (`session.py`). No JAX here.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import numpy as np

from cig_jax.cli import UserError
from cig_jax.data import schema
from cig_jax.data.persons import layout_boxes
from cig_jax.faces import backends
from cig_jax.faces import identity as F

log = logging.getLogger(__name__)


class IdentityDimensionError(UserError, ValueError):
    """A face embedding whose width is not the checkpoint's identity width (never dropped silently)."""


@dataclasses.dataclass
class Reference:
    name: Optional[str]  # who it is (None: an unnamed face in this round's photo)
    embedding: np.ndarray  # [De] float32
    how: str  # where it came from, for the note


def _embedder_faces(image: schema.Image, get_embedder: Callable, dim: int) -> tuple[list, str]:
    embedder = get_embedder()
    if embedder is None:
        return [], "no face embedder"
    faces = embedder.detect(image.pixels)
    if not faces:
        return [], "no face found in the reference image"
    emb = np.asarray(faces[0].embedding, np.float32)
    if emb.shape != (dim,):
        raise IdentityDimensionError(
            f"the {getattr(embedder, 'name', 'face')} embedder gives {emb.size}-d embeddings but the checkpoint's "
            f"identity branch takes {dim} (model.dit.identity.embedding_dim); use the backend it was trained with")
    return [emb], f"face found by {getattr(embedder, 'name', 'the embedder')}"


def image_references(image: schema.Image, dim: int, get_embedder: Callable, where: str = "image") -> tuple[list, str]:
    """The identities shown in one user image -> ([Reference], why-none note). People whose record carries an
    identity give theirs (left to right by box); a photo without any is embedded by the face embedder (its most
    confident face, bound to the image's one named person if it has one)."""
    try:
        known = [(p, p.identity.for_width(dim, f"{where}.people[{i}].identity"))
                 for i, p in enumerate(image.people) if p.identity is not None]
    except ValueError as e:
        raise IdentityDimensionError(str(e)) from None
    if known:
        known.sort(key=lambda pv: pv[0].box[0] if pv[0].box is not None else 0)
        return [Reference(p.name or None, v, f"{p.name or 'the person'} ({p.identity.backend} identity of the record)")
                for p, v in known], ""
    if image.pixels is None:
        return [], "the reference image has no pixels"
    embs, how = _embedder_faces(image, get_embedder, dim)
    name = image.people[0].name if len(image.people) == 1 and image.people[0].name else None
    return [Reference(name, e, f"{name + ': ' if name else ''}{how}") for e in embs], how


class FaceReferences:
    """Named face references of one conversation: name -> (embedding [De], the round it was given in)."""

    def __init__(self):
        self.by_name: dict = {}

    def register(self, rnd: schema.Round, r: int, dim: int, get_embedder: Callable, where: str = "round") -> None:
        """Remembers the identity of every named one-person user image of round r."""
        for j, im in enumerate(rnd.user_images):
            if len(im.people) == 1 and im.people[0].name:
                refs, _ = image_references(im, dim, get_embedder, f"{where}.user_images[{j}]")
                if refs:
                    self.by_name[im.people[0].name] = (refs[0].embedding, r)


def _in_text_order(text: str, names: list) -> list:
    named = schema.mentioned_names(text, names)
    return sorted(named, key=lambda n: text.find(n))


def round_identities(rnd: schema.Round, refs: FaceReferences, dim: int, max_identities: int,
                     get_embedder: Callable, where: str = "round") -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The identities a drawing round uses -> (identity [P, De], identity_mask [P], identity_boxes [P, 4],
    record {"identity": note, "identities": [{"name", "source", "box"}]})."""
    chosen: list = []
    why = "no face reference"
    for j, im in enumerate(rnd.user_images):
        found, note = image_references(im, dim, get_embedder, f"{where}.user_images[{j}]")
        chosen += [dataclasses.replace(c, how=f"{c.how}, this round") for c in found]
        why = note or why
    have = {c.name for c in chosen if c.name}
    for name in _in_text_order(rnd.user_text, list(refs.by_name)):
        if name not in have:
            emb, r = refs.by_name[name]
            chosen.append(Reference(name, emb, f"{name} (face reference of rounds[{r}])"))
    if chosen and len(chosen) > 1:  # left to right in the order the text names them (unnamed ones last)
        order = _in_text_order(rnd.user_text, [c.name for c in chosen if c.name])
        chosen.sort(key=lambda c: order.index(c.name) if c.name in order else len(order))
    if len(chosen) > max_identities:
        log.warning("%s: %d face references but the model binds at most %d identities per image; using the first %d",
                    where, len(chosen), max_identities, max_identities)
        chosen = chosen[:max_identities]
    ident = np.zeros((max_identities, dim), np.float32)
    mask = np.zeros((max_identities,), np.float32)
    boxes = np.zeros((max_identities, 4), np.float32)
    if not chosen:
        return ident, mask, boxes, {"identity": f"no identity: {why}", "identities": []}
    lay = layout_boxes(len(chosen))
    for k, c in enumerate(chosen):
        ident[k], mask[k], boxes[k] = c.embedding, 1.0, lay[k]
    used = [{"name": c.name, "source": c.how, "box": [round(float(v), 4) for v in lay[k]]} for k, c in enumerate(chosen)]
    return ident, mask, boxes, {"identity": "identity: " + "; ".join(c.how for c in chosen), "identities": used}


def drawn_names(rnd: schema.Round, cast: list, most: int) -> list:
    """Who a drawing round shows, first on the left (person slots): the cast names the user text names, in
    the order it names them, else those the answer names; at most `most`."""
    return (_in_text_order(rnd.user_text, cast) or _in_text_order(rnd.assistant_text or "", cast))[:most]


def with_predicted(ident: np.ndarray, mask: np.ndarray, boxes: np.ndarray, record: dict, predicted: np.ndarray,
                   rnd: schema.Round, cast: list, drawn: Optional[list] = None) -> tuple:
    """The round's identities completed with what the MLLM predicted (made unit norm).

    Without person slots, predicted [De] is the query block's, used over the whole image for a round with no face
    reference that names at most one person of the cast (a pair has no one identity). With person slots,
    predicted [M, De] holds one per drawn person (`drawn`, the names of the query block's person queries, left to
    right; zero for one the MLLM found nothing of): each drawn person takes their face reference of this round or
    an earlier one where `round_identities` chose one, else the prediction, in the strips of `layout_boxes`
    (len(drawn)), so a photographed person and one only described are each drawn in their own place. A
    reference of someone not drawn (or unnamed) keeps the references as they were. Else unchanged."""
    if drawn is None:
        if mask.any():
            return ident, mask, boxes, record
        named = schema.mentioned_names(f"{rnd.user_text} {rnd.assistant_text or ''}", cast)
        if len(named) > 1:
            return ident, mask, boxes, dict(record, identity=record["identity"] + f"; {len(named)} people named, so "
                                            "not the identity head's prediction")
        drawn, predicted = named[:1] or [None], predicted[None]
    drawn = drawn[:min(len(predicted), len(ident))]
    chosen = {u["name"]: (k, u) for k, u in enumerate(record["identities"])}
    if not drawn or any(name not in drawn for name in chosen):
        return ident, mask, boxes, record
    found = [k for k in range(len(drawn)) if drawn[k] not in chosen and np.linalg.norm(predicted[k]) > 1e-6]
    if not found and not chosen:
        return ident, mask, boxes, record
    out = np.zeros_like(ident), np.zeros_like(mask), np.zeros_like(boxes)
    lay, used = layout_boxes(len(drawn)), []
    for k, name in enumerate(drawn):
        if name in chosen:
            j, u = chosen[name]
            vec, how = ident[j], u["source"]
        elif k in found:
            vec, how = predicted[k] / max(float(np.linalg.norm(predicted[k])), 1e-12), "predicted"
        else:
            continue
        out[0][k], out[1][k], out[2][k] = vec, 1.0, lay[k]
        used.append({"name": name, "source": how, "box": [round(float(v), 4) for v in lay[k]]})
    if found:
        who = ", ".join(drawn[k] or "the person" for k in found)
        note = f"{who} as the MLLM predicted (no face reference)"
        note = note if not chosen else record["identity"].removeprefix("identity: ") + "; " + note
        record = {"identity": f"identity: {note}", "identities": used}
    else:
        record = dict(record, identities=used)
    return (*out, record)


# ----------------------------------------------------------------------------------------------------------
# The face backend for a checkpoint (sample.py --identity-backend / --face-model-root)
# ----------------------------------------------------------------------------------------------------------
def embedder_for_checkpoint(backend: str, identity_dim: int, model_root=None, pack: str = "buffalo_l"):
    """The face embedder for photos whose record carries no identity, checked against the checkpoint's identity
    width before anything is sampled -> an IdentityEmbedder, or False for none. backend: 'none'; 'insightface'
    (the pack at <model_root>/models/<pack>/, misplacements explained); 'dlib' (128-d, face-recognition-models);
    'auto' (insightface when the pack is there, else dlib; with neither installed: none, with a warning).
    Raises IdentityDimensionError when the backend's width is not `identity_dim`, and
    `faces.identity.IdentityModelNotFoundError` (a FileNotFoundError) for missing or misplaced weights."""
    if backend not in backends.choices(none=True):
        raise ValueError(f"identity backend must be one of {', '.join(backends.choices(none=True))}, got {backend!r}")
    if backend == "none":
        return False
    if backend == "auto" and not F.insightface_pack_present(model_root, pack) and not (
            model_root is not None and F.pack_layout_mistake(model_root, pack)):
        try:
            embedder = backends.make_identity_embedder("dlib")
        except (ImportError, F.IdentityModelNotFoundError) as e:
            log.warning("no face backend (no insightface pack, dlib unavailable: %s): photos without a recorded "
                        "identity are drawn without one; pip install -e '.[face]' brings dlib (or give "
                        "--identity-backend none to say so)", e)
            return False
    else:
        try:
            embedder = backends.make_identity_embedder(backend, model_root, pack)
        except ImportError as e:
            raise F.IdentityModelNotFoundError(f"--identity-backend {backend}: {e}; pip install -e '.[face]'") from None
    if embedder.embedding_dim != identity_dim:
        fits = [b for b in backends.embedders() if backends.BACKENDS[b].dim == identity_dim]
        raise IdentityDimensionError(
            f"--identity-backend {backend}: {embedder.name} gives {embedder.embedding_dim}-d identity embeddings but "
            f"the checkpoint's identity branch takes {identity_dim}-d (model.dit.identity.embedding_dim); use "
            + (f"--identity-backend {fits[0]}" if fits else "the backend it was trained with") + " or none")
    return embedder
