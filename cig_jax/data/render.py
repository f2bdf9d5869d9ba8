"""Drawing the synthetic world: people and scenes as pixels, with ground truth.

Owns: the colours of each attribute value, the layouts (`PAIR`, `SOLO`, `PORTRAIT`, fractions of the image, and
`jitter` of them), `render_scene` and `render_person` (every drawn person carries its identity code from
`world.person_identity` in its `identity` field).

Does not own: the vocabulary, the sentences and identity codes (`world.py`), conversations (`synthetic.py`,
`recall.py`), the schema (`schema.py`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from cig_jax.data.schema import Image, Person
from cig_jax.data.world import ATTRIBUTES, SCENES, has_identity_attributes, person_identity

_SKIN = {"light": (247, 218, 190), "medium": (224, 178, 136), "tan": (176, 120, 80), "dark": (105, 68, 44)}
_HAIR = {"black": (28, 28, 30), "brown": (112, 70, 36), "blonde": (238, 206, 110), "red": (196, 64, 30),
         "grey": (165, 165, 168), "blue": (46, 92, 224)}
_EYES = {"brown": (92, 52, 22), "blue": (40, 120, 235), "green": (36, 168, 60)}
_CLOTHES = {"red": (214, 40, 40), "green": (52, 164, 72), "blue": (40, 72, 204), "yellow": (244, 206, 40),
            "purple": (142, 60, 176), "white": (246, 246, 246)}
_HAT = (204, 40, 142)
_FRAMES = (18, 18, 18)
_MOUTH = (150, 48, 48)

# Layouts as fractions of the image: (x0, y0, x1, y1). Two people side by side fill ~80% of the height.
PAIR = ((0.03, 0.2, 0.48, 1.0), (0.52, 0.2, 0.97, 1.0))
SOLO = (0.26, 0.14, 0.74, 1.0)
PORTRAIT = (0.12, 0.04, 0.88, 1.3)  # head and shoulders, cut by the bottom edge


def jitter(rng, frac, amount=0.03) -> tuple:
    dx = float(rng.uniform(-amount, amount))
    return (frac[0] + dx, frac[1], frac[2] + dx, frac[3])


# ----------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------
def _dark(c, f=0.55):
    return tuple(int(v * f) for v in c)


def _draw_backdrop(d: ImageDraw.ImageDraw, scene: str, s: int, w: int) -> None:
    def rect(x0, y0, x1, y1, c):
        d.rectangle([x0 * s, y0 * s, x1 * s, y1 * s], fill=c)

    def disc(cx, cy, r, c):
        d.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=c)

    if scene == "beach":
        rect(0, 0, 1, 0.55, (140, 208, 250)); rect(0, 0.55, 1, 0.66, (30, 118, 200)); rect(0, 0.66, 1, 1, (238, 214, 160))
        disc(0.86, 0.13, 0.08, (255, 224, 60))
    elif scene == "park":
        rect(0, 0, 1, 0.52, (156, 204, 255)); rect(0, 0.52, 1, 1, (92, 172, 80))
        rect(0.46, 0.22, 0.54, 0.55, (110, 72, 40)); disc(0.5, 0.2, 0.15, (40, 120, 48))
    elif scene == "office":
        rect(0, 0, 1, 1, (226, 216, 192)); rect(0, 0.76, 1, 1, (150, 128, 108))
        d.rectangle([0.3 * s, 0.05 * s, 0.7 * s, 0.32 * s], fill=(172, 212, 240), outline=(90, 90, 90), width=w)
        rect(0.49, 0.05, 0.51, 0.32, (90, 90, 90))
    elif scene == "night":
        rect(0, 0, 1, 1, (18, 24, 62)); rect(0, 0.8, 1, 1, (40, 44, 52)); disc(0.84, 0.14, 0.08, (240, 238, 200))
        for x, y in ((0.1, 0.08), (0.3, 0.16), (0.55, 0.06), (0.68, 0.2), (0.2, 0.3), (0.45, 0.27)):
            disc(x, y, 0.012, (255, 255, 230))
    elif scene == "snow":
        rect(0, 0, 1, 0.55, (196, 212, 234)); rect(0, 0.55, 1, 1, (250, 250, 255))
        d.polygon([(0.5 * s, 0.08 * s), (0.36 * s, 0.5 * s), (0.64 * s, 0.5 * s)], fill=(24, 90, 52))
    elif scene == "studio":
        rect(0, 0, 1, 1, (196, 198, 204)); rect(0, 0.85, 1, 1, (172, 174, 180))
    else:
        raise ValueError(f"unknown scene {scene!r}; known scenes: {', '.join(SCENES)}")


def _draw_person(d: ImageDraw.ImageDraw, a: dict, box, w: int) -> None:
    """Draws a head-and-shoulders figure filling `box` (canvas pixels) with attributes `a`."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    hh = 0.46 * bh  # head height
    hw = hh * {"round": 0.96, "oval": 0.72, "square": 0.9}[a["face_shape"]]
    hw = min(hw, 0.92 * bw)
    ht = y0 + 0.14 * bh  # head top
    hb = ht + hh
    head = [cx - hw / 2, ht, cx + hw / 2, hb]
    skin, hair, cloth = _SKIN[a["skin_tone"]], _HAIR[a["hair_color"]], _CLOTHES[a["clothing_color"]]
    style = a["hair_style"]

    # 1. hair behind the head
    if style == "long":
        d.rounded_rectangle([cx - hw * 0.62, ht + hh * 0.15, cx + hw * 0.62, hb + hh * 0.35], radius=hw * 0.25,
                            fill=hair, outline=_dark(hair), width=w)
    elif style == "ponytail":
        px = cx + hw * 0.55
        d.ellipse([px - hw * 0.2, ht + hh * 0.1, px + hw * 0.32, ht + hh * 0.85], fill=hair, outline=_dark(hair), width=w)
    # 2. torso and neck
    d.rounded_rectangle([x0, hb + 0.05 * bh, x1, y1 + 0.2 * bh], radius=0.22 * bw, fill=cloth, outline=_dark(cloth), width=w)
    d.rectangle([cx - hw * 0.18, hb - hh * 0.1, cx + hw * 0.18, hb + 0.08 * bh], fill=skin)
    d.polygon([(cx - hw * 0.2, hb + 0.05 * bh), (cx + hw * 0.2, hb + 0.05 * bh), (cx, hb + 0.15 * bh)], fill=skin)
    # 3. face
    if a["face_shape"] == "square":
        d.rounded_rectangle(head, radius=hw * 0.14, fill=skin, outline=_dark(skin), width=w)
    else:
        d.ellipse(head, fill=skin, outline=_dark(skin), width=w)
    # 4. hair on top of the head (a cap with a fringe), or side tufts when bald
    if style == "bald":
        for sx in (-1, 1):
            ex = cx + sx * hw * 0.47
            d.ellipse([ex - hw * 0.1, ht + hh * 0.3, ex + hw * 0.1, ht + hh * 0.58], fill=hair, outline=_dark(hair), width=w)
    else:
        pad = hw * 0.06
        cap = [cx - hw / 2 - pad, ht - pad, cx + hw / 2 + pad, ht + hh * 0.62]
        if a["face_shape"] == "square":
            d.rounded_rectangle([cap[0], cap[1], cap[2], ht + hh * 0.3], radius=hw * 0.14, fill=hair, outline=_dark(hair), width=w)
        else:
            d.chord(cap, 180, 360, fill=hair, outline=_dark(hair), width=w)
    # 5. eyes and mouth
    ey = ht + hh * 0.5
    er, ir = hw * 0.13, hw * 0.085
    for sx in (-1, 1):
        ex = cx + sx * hw * 0.22
        d.ellipse([ex - er, ey - er * 0.85, ex + er, ey + er * 0.85], fill=(255, 255, 255))
        d.ellipse([ex - ir, ey - ir, ex + ir, ey + ir], fill=_EYES[a["eye_color"]])
    d.line([cx - hw * 0.14, ht + hh * 0.78, cx + hw * 0.14, ht + hh * 0.78], fill=_MOUTH, width=max(w, int(hh * 0.05)))
    # 6. accessory
    if a["accessory"] == "glasses":
        fw = max(w, int(hw * 0.05))
        for sx in (-1, 1):
            ex = cx + sx * hw * 0.22
            d.ellipse([ex - er * 1.35, ey - er * 1.25, ex + er * 1.35, ey + er * 1.25], outline=_FRAMES, width=fw)
        d.line([cx - hw * 0.22 + er * 1.35, ey, cx + hw * 0.22 - er * 1.35, ey], fill=_FRAMES, width=fw)
    elif a["accessory"] == "hat":
        brim_y = ht + hh * 0.1
        d.rounded_rectangle([cx - hw * 0.68, brim_y - hh * 0.08, cx + hw * 0.68, brim_y + hh * 0.04], radius=hh * 0.04,
                            fill=_HAT, outline=_dark(_HAT), width=w)
        d.rectangle([cx - hw * 0.42, brim_y - hh * 0.36, cx + hw * 0.42, brim_y - hh * 0.06], fill=_HAT, outline=_dark(_HAT), width=w)


def _supersample(size: int) -> int:
    return max(1, min(4, round(256 / size)))


def _pixel_box(frac, size: int) -> tuple:
    x0, y0, x1, y1 = (min(max(int(round(v * size)), 0), size) for v in frac)
    return (x0, y0, x1, y1)


def render_scene(people_with_positions: Sequence, scene: str, size: int = 64) -> Image:
    """Draws people on a scene backdrop. `people_with_positions`: [(Person or attribute dict, (x0, y0, x1, y1)
    as fractions of the image)]. Returns a schema Image: pixels [size, size, 3] uint8, people with pixel boxes
    (clipped to the image), attributes {"scene": scene}."""
    ss = _supersample(size)
    s = size * ss
    canvas = PILImage.new("RGB", (s, s))
    d = ImageDraw.Draw(canvas)
    w = max(1, round(s / 90))
    _draw_backdrop(d, scene, s, w)
    people = []
    for who, frac in people_with_positions:
        person = who if isinstance(who, Person) else Person(name="", attributes=dict(who))
        _check_attributes(person.attributes)
        _draw_person(d, person.attributes, [v * s for v in frac], w)
        identity = person_identity(person.attributes) if has_identity_attributes(person.attributes) else None
        people.append(Person(name=person.name, attributes=dict(person.attributes), box=_pixel_box(frac, size),
                             identity=identity))
    if ss > 1:
        canvas = canvas.resize((size, size), PILImage.BOX)
    return Image(pixels=np.asarray(canvas, dtype=np.uint8).copy(), people=people, attributes={"scene": scene})


def render_person(attributes: dict, size: int = 64, scene: str = "studio", name: str = "") -> Image:
    """A head-and-shoulders portrait (a face reference) of one person."""
    return render_scene([(Person(name=name, attributes=dict(attributes)), PORTRAIT)], scene, size)


def _check_attributes(a: dict) -> None:
    for k, vals in ATTRIBUTES.items():
        if a.get(k) not in vals:
            raise ValueError(f"attribute {k!r} must be one of {vals}, got {a.get(k)!r}")
