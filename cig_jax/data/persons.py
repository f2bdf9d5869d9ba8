"""Person slots: one token per named person of an image, right after the person's name, so a later mention of
the name finds that person's look in one hop (an induction-style copy), not by reasoning about left and right.

Owns: which people of an image get a slot (`slotted_people`: named, with a box, left to right), the crop of
each (`person_crop`: the person's box cut out of the image, a one-person `schema.Image` carrying the person's
name, attributes and identity), and the boxes a drawn image's people get when the generator drew them itself
(`drawn_people`: the layout the synthetic generator and the detokenizer's identity regions share, first
named on the left).

Does not own: where the slots go in the token sequence and their roles (`chat_template.py`), what fills a slot
(`cig_jax/models/mllm.py`: the mean of the crop's image tokens in the history; the identity head reads the
slot of the image being drawn).

Layout (`model.mllm.person_slots`), for an image of Maya (left) and Leo (right):

    history image:  <img> [image tokens] </img> Maya<person> Leo<person>      each <person> = that crop's summary
    drawn image:    <img> Maya<person> Leo<person> [image queries] </img>     <person>: the identity to retrieve
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cig_jax.data import schema

PERSON = "<person>"  # the slot token (added to the tokenizer when a template uses person slots)
# Where the generator puts n people, as fractions (x0, y0, x1, y1), first named on the left: the synthetic
# renderer's layouts (data/render.py PAIR and SOLO), which the demo's detokenizer learned to draw.
DRAWN_LAYOUT = {1: ((0.26, 0.14, 0.74, 1.0),), 2: ((0.03, 0.2, 0.48, 1.0), (0.52, 0.2, 0.97, 1.0))}


def slotted_people(image: schema.Image) -> list:
    """The people of `image` that get a slot: named, with a box, left to right (by the box's left edge)."""
    people = [p for p in image.people if p.name and p.box is not None]
    return sorted(people, key=lambda p: float(p.box[0]))


def person_crop(image: schema.Image, person: schema.Person) -> schema.Image:
    """`person`'s box (pixels, clipped to the image, at least 2 x 2) cut out of `image` (which must carry
    pixels): a one-person image whose person keeps the name, attributes and identity, boxed whole."""
    if image.pixels is None:
        raise ValueError(f"person_crop: the image of {person.name!r} carries no pixels")
    h, w = image.pixels.shape[:2]
    x0, y0, x1, y1 = (int(round(float(v))) for v in person.box)
    x0, y0 = min(max(x0, 0), w - 2), min(max(y0, 0), h - 2)
    x1, y1 = min(max(x1, x0 + 2), w), min(max(y1, y0 + 2), h)
    crop = np.ascontiguousarray(image.pixels[y0:y1, x0:x1])
    who = dataclasses.replace(person, box=(0, 0, x1 - x0, y1 - y0))
    return schema.Image(pixels=crop, people=[who])


def drawn_people(names: Sequence[str], size: int) -> list:
    """People of a drawn `size` x `size` image that shows `names` (first on the left), boxed where the
    generator puts them (`DRAWN_LAYOUT`); [] for a number of people it has no layout for."""
    layout = DRAWN_LAYOUT.get(len(names))
    if layout is None:
        return []
    return [schema.Person(n, box=tuple(int(round(v * size)) for v in frac)) for n, frac in zip(names, layout)]


def layout_boxes(n: int) -> np.ndarray:
    """Regions for n identities as fractions (x0, y0, x1, y1): the whole image for one, else n vertical strips."""
    if n <= 1:
        return np.array([[0.0, 0.0, 1.0, 1.0]] * max(n, 1), np.float32)
    return np.array([[k / n, 0.0, (k + 1) / n, 1.0] for k in range(n)], np.float32)
