"""The one registry of face-identity backends: name -> embedding width, loader, pip extra, how to read its scores.

Owns: `BACKENDS` (every backend a `Person.identity` may name, with its width), the names a command line offers
(`choices`), and `make_identity_embedder`, which builds an embedder by name ('auto' included). Every consumer
(the schema's dimension check, `model.dit.identity.backend`'s check, sample.py / eval / the video tool's
--identity flags, the identity metrics' notes, the video tool's thresholds) looks a backend up here at call time,
so a backend added to `BACKENDS` (a test adds a fake one with `monkeypatch.setitem`) is everywhere at once.
Does not own: the embedders themselves (`faces/identity.py`), what a checkpoint accepts (`sample/identities.py`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Callable, Optional

from cig_jax.faces import identity


@dataclasses.dataclass(frozen=True)
class Backend:
    """One identity backend. dim: embedding width (None: any length, e.g. the synthetic attribute codes).
    load: builds its IdentityEmbedder from (model_root, pack, **options); None for a backend that only records
    carry (no photo can be embedded with it). module / extra: the module it needs and the pip extra that brings it.
    note: how to read its cosine similarities. same_person / track_link: the video tool's cosine thresholds (one
    person across a clip's samples / one track across frames)."""

    dim: Optional[int]
    load: Optional[Callable[..., identity.IdentityEmbedder]] = None
    module: Optional[str] = None
    extra: Optional[str] = None
    note: str = ""
    same_person: Optional[float] = None
    track_link: Optional[float] = None


# A constant: nothing in cig_jax writes to it (tests extend it with monkeypatch.setitem). The first two with a
# loader are what 'auto' chooses between (`identity.auto_backend`).
BACKENDS: dict[str, Backend] = {
    # ArcFace from a local model pack (buffalo_l w600k_r50, antelopev2 glintr100).
    "insightface": Backend(512, identity.load_insightface, "insightface", "face",
                           "ArcFace cosine: different people near 0-0.3, the same person ~0.4-0.8; "
                           "not comparable with dlib numbers", same_person=0.35, track_link=0.20),
    # dlib's ResNet, weights from the face-recognition-models package.
    "dlib": Backend(128, identity.load_dlib, "dlib", "face",
                    "dlib 128-d cosine: different people often score 0.8-0.9, the same person above ~0.93; "
                    "not comparable with ArcFace (insightface) numbers", same_person=0.92, track_link=0.85),
    # The drawn people's attribute code (`cig_jax.data.world.identity_code`), zero-padded to the model's width.
    "synthetic": Backend(None),
}


def embedders() -> tuple[str, ...]:
    """The backends that embed photos (have a loader), in registry order."""
    return tuple(name for name, b in BACKENDS.items() if b.load is not None)


def choices(*, auto: bool = True, none: bool = False) -> tuple[str, ...]:
    """The values of an --identity / --identity-backend flag: 'auto', the embedders, and 'none' if asked."""
    return ("auto",) * auto + embedders() + ("none",) * none


def installed(name: str) -> bool:
    """Whether the module backend `name` needs can be imported (no import happens)."""
    module = BACKENDS[name].module
    return module is None or importlib.util.find_spec(module) is not None


def note(name: Optional[str]) -> str:
    """How to read backend `name`'s cosine similarities ('' for an unknown name)."""
    backend = BACKENDS.get(name)
    return backend.note if backend is not None else ""


def make_identity_embedder(backend: str = "auto", model_root: str | Path | None = None, pack: str = "buffalo_l",
                           **options) -> identity.IdentityEmbedder:
    """Build an identity embedder by name; never downloads anything. backend: one of `embedders()`, or 'auto'
    (insightface when its pack is at `<model_root>/models/<pack>/`, else dlib; a misplaced pack is an error, not
    a fallback). options: the loader's keywords (detector, upsample, recognition_model, ctx_id, ...)."""
    if backend == "auto":
        backend = identity.auto_backend(model_root, pack)
    if backend not in embedders():
        raise ValueError(f"backend must be one of {', '.join(choices())}, got {backend!r}")
    return BACKENDS[backend].load(model_root, pack, **options)
