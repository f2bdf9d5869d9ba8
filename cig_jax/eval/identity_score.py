"""Identity scores: cosine of face-identity embeddings between reference and generated people, and the
drawn-person equivalent through identity codes.

Owns: picking a face in a (boxed) image and embedding it (`face_embedding`, cached per image by
`EmbeddingCache`), `identity_similarity` (aligned image lists), `round_identity_similarity` (per round of
generated conversations), `drawn_identity_similarity` (identity codes of the attributes a classifier read),
with each backend's note on how to read the numbers (from `faces.backends`).

Does not own: face detection and embedding (`cig_jax/faces/identity.py`), aligning generated rounds
(`rounds.py`), the report (`metrics.py`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from cig_jax.data import world
from cig_jax.data.schema import Conversation
from cig_jax.eval.rounds import aligned, appearances, pixels_of
from cig_jax.faces import backends



def _pick_face(faces, box):
    """The largest face, or with `box` the largest face whose centre lies inside it (None if none)."""
    if box is not None:
        x0, y0, x1, y1 = box
        faces = [f for f in faces if x0 <= (f.box[0] + f.box[2]) / 2 <= x1 and y0 <= (f.box[1] + f.box[3]) / 2 <= y1]
    if not faces:
        return None
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


def face_embedding(embedder, image, box=None) -> Optional[np.ndarray]:
    """The identity embedding [D] of the face in `image` (inside `box` when given), None if none is found."""
    px = pixels_of(image)
    if px is None:
        return None
    face = _pick_face(embedder.detect(px), box)
    return None if face is None else np.asarray(face.embedding, np.float32)


class EmbeddingCache:
    def __init__(self, embedder):
        self.embedder, self.cache = embedder, {}

    def __call__(self, image, box=None):
        if image is None:
            return None
        key = (id(image), None if box is None else tuple(round(float(v), 2) for v in box))
        if key not in self.cache:
            self.cache[key] = (image, face_embedding(self.embedder, image, box))  # keep image alive: stable id
        return self.cache[key][1]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def _similarity_summary(values: list, ref_fail: int, gen_fail: int, backend: str) -> dict:
    ok = [v for v in values if v is not None]
    return {"mean": float(np.mean(ok)) if ok else None, "n": len(ok), "pairs": len(values),
            "detect_failures": ref_fail + gen_fail, "reference_failures": ref_fail, "generated_failures": gen_fail,
            "backend": backend, "note": backends.note(backend), "values": values}


def identity_similarity(references: Sequence, generated: Sequence, embedder=None,
                        ref_boxes: Optional[Sequence] = None, gen_boxes: Optional[Sequence] = None,
                        _embed=None) -> dict:
    """Cosine between the identity embeddings of each reference face and its generated face.

    `references`, `generated`: aligned lists of RGB uint8 images (or schema Images; a None generated image
    counts as a generated-side failure); `ref_boxes` / `gen_boxes`: optional per-image person boxes that pick
    the face (else the largest face). `embedder` defaults to `make_identity_embedder('auto')` (insightface
    when a pack is on disk, else dlib). -> {"mean" (None when n is 0), "n" (pairs scored), "pairs",
    "detect_failures" (faces not found, both sides), "reference_failures", "generated_failures", "backend",
    "note", "values" (per pair, None where a face was not found)}."""
    if len(references) != len(generated):
        raise ValueError(f"got {len(references)} references but {len(generated)} generated images")
    if embedder is None:
        embedder = backends.make_identity_embedder("auto")
    embed = _embed or EmbeddingCache(embedder)
    ref_boxes = ref_boxes if ref_boxes is not None else [None] * len(references)
    gen_boxes = gen_boxes if gen_boxes is not None else [None] * len(generated)
    values, ref_fail, gen_fail = [], 0, 0
    for ref, gen, rb, gb in zip(references, generated, ref_boxes, gen_boxes):
        e_ref, e_gen = embed(ref, rb), embed(gen, gb)
        ref_fail += e_ref is None
        gen_fail += e_gen is None
        values.append(cosine(e_ref, e_gen) if e_ref is not None and e_gen is not None else None)
    return _similarity_summary(values, ref_fail, gen_fail, embedder.name)


def round_identity_similarity(truth: Sequence[Conversation], generated, embedder) -> dict:
    """Identity similarity of every person in every generated round to the same person in the ground-truth
    image of that round, overall and per round ({"overall": {...}, "rounds": [{"round": r, ...}]})."""
    embed = EmbeddingCache(embedder)
    rows = [(r, tpx, tbox, g, gbox) for conv, gen in aligned(truth, generated)
            for r, p, g, gbox, tpx, tbox in appearances(conv, gen)]
    overall = identity_similarity([x[1] for x in rows], [x[3] for x in rows], embedder,
                                  [x[2] for x in rows], [x[4] for x in rows], _embed=embed)
    rounds = []
    for r in sorted({x[0] for x in rows}):
        sel = [x for x in rows if x[0] == r]
        res = identity_similarity([x[1] for x in sel], [x[3] for x in sel], embedder,
                                  [x[2] for x in sel], [x[4] for x in sel], _embed=embed)
        res.pop("values")
        rounds.append(dict(round=r, **res))
    return {"overall": overall, "rounds": rounds}


def drawn_identity_similarity(items: Sequence[dict]) -> dict:
    """Identity of drawn people, where face embedders see no faces: the cosine between the identity code
    (`world.identity_code`) of the attributes the classifier read and that of the ground truth, per
    (round, person) item of `round_attribute_accuracy(..., return_items=True)`. The codes are one-hot blocks
    of `world.IDENTITY_ATTRIBUTES`, so the cosine is the fraction of those attributes drawn right (a
    random person scores about 0.27). -> {"mean", "n", "rounds": [{"round", "mean", "n"}], "note"}."""
    values: dict = {}
    for it in items:
        a = world.identity_code(it["predicted"])
        b = world.identity_code(it["truth"])
        values.setdefault(it["round"], []).append(float(np.dot(a, b)))
    every = [v for vs in values.values() for v in vs]
    return {"mean": float(np.mean(every)) if every else None, "n": len(every),
            "rounds": [{"round": r, "mean": float(np.mean(values[r])), "n": len(values[r])} for r in sorted(values)],
            "note": "cosine of identity codes read by the attribute classifier; = fraction of "
                    f"{', '.join(world.IDENTITY_ATTRIBUTES)} drawn right"}
