"""The synthetic world's vocabulary and the identity codes of its drawn people.

Owns: the attribute vocabulary (`ATTRIBUTES`, `SCENES`, `NAMES`), drawing a person's attributes
(`sample_attributes`, `distinct_pair`), the sentences that say them (`describe`, `edit_text`, `SCENE_PHRASE`,
`TEXT_WEIGHTS`), which attributes make a drawn person recognisable (`IDENTITY_ATTRIBUTES`), and their identity code (`identity_code`, `person_identity`,
`identity_embedding`): what the synthetic generator writes into each drawn person's `identity` field, and
what attribute-based metrics compare.

Does not own: drawing (`render.py`), conversations (`synthetic.py`, `recall.py`), the schema (`schema.py`), real
face embeddings (`faces/identity.py`).
Product modules (templates, pipeline, sampling, metrics) read the vocabulary here, never the renderer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cig_jax.data.schema import PersonIdentity

ATTRIBUTES: dict[str, list[str]] = {
    "face_shape": ["round", "oval", "square"],
    "skin_tone": ["light", "medium", "tan", "dark"],
    "hair_color": ["black", "brown", "blonde", "red", "grey", "blue"],
    "hair_style": ["short", "long", "bald", "ponytail"],
    "eye_color": ["brown", "blue", "green"],
    "clothing_color": ["red", "green", "blue", "yellow", "purple", "white"],
    "accessory": ["none", "glasses", "hat"],
}
SCENES: list[str] = ["beach", "park", "office", "night", "snow", "studio"]
NAMES: list[str] = [
    "Julian", "Maya", "Leo", "Nora", "Omar", "Ines", "Felix", "Hana", "Theo", "Lena",
    "Ravi", "Clara", "Diego", "Sofia", "Kenji", "Amara", "Lukas", "Zoe", "Mateo", "Ava",
    "Noah", "Freya", "Ivan", "Mila", "Kofi", "Elena", "Arjun", "Yara", "Oscar", "Priya",
    "Hugo", "Nadia", "Emil", "Chloe", "Sami", "Ruth", "Tomas", "Iris", "Jonah", "Leila",
]
# What makes a drawn person recognisable (clothing, accessories and scene change between rounds).
IDENTITY_ATTRIBUTES: tuple[str, ...] = ("face_shape", "skin_tone", "hair_color", "hair_style", "eye_color")
IDENTITY_CODE_DIM = sum(len(ATTRIBUTES[k]) for k in IDENTITY_ATTRIBUTES)  # 3 + 4 + 6 + 4 + 3 = 20


def has_identity_attributes(attributes: dict) -> bool:
    return all(attributes.get(k) in ATTRIBUTES[k] for k in IDENTITY_ATTRIBUTES)


def identity_code(attributes: dict) -> np.ndarray:
    """The identity of a drawn person, standing in for a face recogniser's embedding (face detectors and
    ArcFace do not work on these cartoons): the one-hot codes of IDENTITY_ATTRIBUTES, unit norm; two people
    share a code exactly when they look alike. float32 [IDENTITY_CODE_DIM]."""
    codes = []
    for k in IDENTITY_ATTRIBUTES:
        if attributes.get(k) not in ATTRIBUTES[k]:
            raise ValueError(f"identity_code: attribute {k!r} must be one of {ATTRIBUTES[k]}, got {attributes.get(k)!r}")
        codes.append(np.eye(len(ATTRIBUTES[k]), dtype=np.float32)[ATTRIBUTES[k].index(attributes[k])])
    code = np.concatenate(codes)
    return code / np.linalg.norm(code)


def person_identity(attributes: dict) -> PersonIdentity:
    """The `identity` field the generator writes for a drawn person (backend 'synthetic')."""
    return PersonIdentity.of("synthetic", identity_code(attributes))


def identity_embedding(attributes: dict, dim: int = 128) -> np.ndarray:
    """`identity_code` zero-padded to `dim` (how a model of identity width `dim` reads it). float32 [dim]."""
    code = identity_code(attributes)
    if dim < code.size:
        raise ValueError(f"identity_embedding: dim {dim} < {code.size} one-hot values")
    return np.pad(code, (0, dim - code.size))


SCENE_PHRASE = {"beach": "at the beach", "park": "in the park", "office": "in an office",
                 "night": "outside at night", "snow": "in the snow", "studio": "in a photo studio"}
MOVE_PHRASE = {"beach": "to the beach", "park": "to the park", "office": "to an office",
                "night": "outside at night", "snow": "into the snow", "studio": "to a photo studio"}
# attributes named in round-1 text are drawn from this weighting (hair colour and clothing most often)
TEXT_WEIGHTS = {"face_shape": 0.5, "skin_tone": 0.5, "hair_color": 3.0, "hair_style": 1.0, "eye_color": 0.5,
                 "clothing_color": 3.0, "accessory": 1.0}


def sample_attributes(rng: np.random.Generator) -> dict:
    return {k: str(v[rng.integers(len(v))]) for k, v in ATTRIBUTES.items()}


def distinct_pair(rng: np.random.Generator) -> tuple[dict, dict]:
    a = sample_attributes(rng)
    while True:  # differ in at least 3 attributes so the two people are easy to tell apart
        b = sample_attributes(rng)
        if sum(a[k] != b[k] for k in ATTRIBUTES) >= 3:
            return a, b


# ----------------------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------------------
_HAS = {"face_shape": "a {} face", "skin_tone": "{} skin", "hair_color": "{} hair", "eye_color": "{} eyes"}
_STYLE = {"short": "short hair", "long": "long hair", "bald": "a bald head", "ponytail": "a ponytail"}


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(name: str, a: dict, keys: Sequence[str]) -> str:
    """One sentence giving attributes `keys` of a person, e.g. 'Maya has blue hair and wears a red shirt.'"""
    has, wears = [], []
    for k in keys:
        v = a[k]
        if k in _HAS:
            phrase = _HAS[k].format(v)
            has.append("an" + phrase[1:] if phrase.startswith("a ") and v[0] in "aeiou" else phrase)
        elif k == "hair_style":
            has.append(_STYLE[v])
        elif k == "clothing_color":
            wears.append(f"a {v} shirt")
        elif k == "accessory":
            wears.append({"none": "no hat or glasses", "glasses": "glasses", "hat": "a hat"}[v])
    out = []
    if has:
        out.append(f"has {_join(has)}")
    if wears:
        out.append(f"wears {_join(wears)}")
    return f"{name} {' and '.join(out)}."


def edit_text(subject: str, attr: str, old: str, new: str) -> str:
    poss = f"{subject}'s"
    if attr == "clothing_color":
        return f"Change {poss} shirt to {new}."
    if attr == "hair_color":
        return f"Make {poss} hair {new}."
    if attr == "scene":
        return f"Move {subject} {MOVE_PHRASE[new]}."
    if attr == "accessory":
        if new == "none":
            return f"Take off {poss} {'hat' if old == 'hat' else 'glasses'}."
        item = "a hat" if new == "hat" else "glasses"
        if old == "none":
            return f"Give {subject} {item}."
        return f"Replace {poss} {'hat' if old == 'hat' else 'glasses'} with {item}."
    raise ValueError(attr)
