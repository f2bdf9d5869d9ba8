"""The synthetic world's vocabulary and the identity codes of its drawn people.

Owns: the attribute vocabulary (`ATTRIBUTES`, `SCENES`, `NAMES`), which attributes make a drawn person
recognisable (`IDENTITY_ATTRIBUTES`), and their identity code (`identity_code`, `person_identity`,
`identity_embedding`): what the synthetic generator writes into each drawn person's `identity` field, and
what attribute-based metrics compare.

Does not own: drawing (`synthetic.py`), the schema (`schema.py`), real face embeddings (`faces/identity.py`).
Product modules (templates, pipeline, sampling, metrics) read the vocabulary here, never the renderer.
"""
from __future__ import annotations

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
