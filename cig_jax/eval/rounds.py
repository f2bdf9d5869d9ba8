"""Generated images aligned with ground-truth conversations: what every round metric reads.

Owns: reading one generated item (a Conversation, a list of per-round images, or {round: image}) as per-round
pixels (`generated_images`, `aligned`), scaling ground-truth person boxes to a generated image (`scale_box`),
the people of every ground-truth round with their boxes (`appearances`) and the round that introduces each name
(`intro_rounds`).

Does not own: any score (`metrics.py`, `identity_score.py`, `clip_score.py`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from cig_jax.data.schema import Conversation, Image


def pixels_of(image, base_dir=None) -> Optional[np.ndarray]:
    if image is None:
        return None
    if isinstance(image, Image):
        return image.load(base_dir) if (image.pixels is not None or image.path) else None
    px = np.asarray(image)
    if px.dtype != np.uint8 or px.ndim != 3 or px.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {px.dtype} {px.shape}")
    return px


def generated_images(truth: Conversation, generated) -> list:
    """Per-round generated pixels (None where a round has none) for one conversation."""
    n = len(truth.rounds)
    if generated is None:  # ground truth against itself: the metrics' upper bound
        generated = truth
    if isinstance(generated, Conversation):
        if len(generated.rounds) != n:
            raise ValueError(f"conversation {truth.id!r}: truth has {n} rounds, generated has {len(generated.rounds)}")
        return [pixels_of(r.assistant_image, generated.base_dir) for r in generated.rounds]
    if isinstance(generated, dict):
        return [pixels_of(generated.get(r)) for r in range(n)]
    generated = list(generated)
    if len(generated) != n:
        raise ValueError(f"conversation {truth.id!r}: truth has {n} rounds, got {len(generated)} generated images")
    return [pixels_of(g) for g in generated]


def aligned(truth: Sequence[Conversation], generated) -> list:
    truth = list(truth)
    if generated is None:
        generated = [None] * len(truth)
    generated = list(generated)
    if len(generated) != len(truth):
        raise ValueError(f"got {len(truth)} ground-truth conversations but {len(generated)} generated ones")
    return [(t, generated_images(t, g)) for t, g in zip(truth, generated)]


def scale_box(box, from_hw, to_hw) -> tuple:
    """A pixel box [x0, y0, x1, y1] in an image of size `from_hw` mapped to one of size `to_hw`."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    x0, y0, x1, y1 = box
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def appearances(truth: Conversation, gen: list):
    """(round, truth person, generated pixels, box in generated pixels or None, truth pixels, truth box or None)
    for every person with full ground-truth attributes in every round's assistant image."""
    for r, rnd in enumerate(truth.rounds):
        img = rnd.assistant_image
        if img is None or not img.people:
            continue
        truth_px = pixels_of(img, truth.base_dir)  # read once per round: face embeddings are cached by array
        solo = len(img.people) == 1
        g = gen[r]
        for p in img.people:
            if not solo and p.box is None:
                continue
            gbox = None if (solo or g is None) else scale_box(p.box, truth_px.shape[:2], g.shape[:2])
            yield r, p, g, gbox, truth_px, (None if solo else p.box)


def intro_rounds(truth: Conversation) -> dict:
    """{name: round that introduces it}: the round listing it in `introduces`, else its first image."""
    out: dict = {}
    for r, rnd in enumerate(truth.rounds):
        for n in rnd.introduces:
            out.setdefault(n, r)
    for r, rnd in enumerate(truth.rounds):
        if rnd.assistant_image is not None:
            for p in rnd.assistant_image.people:
                out.setdefault(p.name, r)
    return out
