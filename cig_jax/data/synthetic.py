"""Synthetic conversations: the embedded default dataset, drawn procedurally with PIL, no downloads.

Owns: drawing people and scenes (`render_person`, `render_scene`; every drawn person carries its
identity code from `world.person_identity` in its `identity` field), the four conversation kinds (`make_conversation`), a stream of them
(`generate`), and a CLI that writes them to disk with a contact sheet.

Does not own: the vocabulary and identity codes (`world.py`), the schema and file format (`schema.py`),
record files (`tfds_builder.py`), tokens.

Everything is a pure function of (seed, index): a record draws from `np.random.default_rng([seed, index])`.
Every image carries ground truth: the attributes of each person in it (with a pixel box) and its scene.

Kinds:
  name_based   3 rounds. Round 1 introduces two named people, describing only some attributes in text, and
               the assistant draws both. Round 2 names one of them in a new scene; round 3 names the other.
               The round-3 person has attributes that the text never gave but the round-1 image shows
               (metadata: `text_attributes`, `image_only_attributes` per name).
  single_turn  a face reference (user image) + a prompt changing the scene and/or the shirt.
  rollback     a drawing, 2-4 edits, then "undo the last change(s)" / "go back to the first version";
               the last image equals an earlier one pixel for pixel (round metadata `restores_round`).
  markov_edit  2-4 edits where every round's user image is the previous result (round metadata `edit`).
  recall       3-8 rounds, 2-3 people with procedural names ('train' or 'heldout' pool), named again in a random
               order at random distances, with edits and content-addressed rollbacks; per-round ground truth
               of who is shown and where each attribute came from (`recall.py`).
Not in a build unless named (`EXTRA_KINDS`): recall_describe (the recall kind where a solo round may instead ask
to describe someone, answered in words only) and recall_text (the recall kind with every image replaced by a
sentence per person shown).

CLI (writes DIR/conversations/<id>.json + DIR/conversations/images/*.png, and DIR/contact_sheet.png):
    python -m cig_jax.data.synthetic --out /tmp/cig_syn --num 1000 [--seed 0 --size 64 --kinds name_based,rollback]
"""
from __future__ import annotations

from cig_jax import cli
import textwrap
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from cig_jax.data import names as name_pools
from cig_jax.data import recall
from cig_jax.data.schema import Conversation, Image, Person, Round
from cig_jax.data.schema_io import save_conversation
from cig_jax.data.world import ATTRIBUTES, NAMES, SCENES, has_identity_attributes, person_identity

KINDS: tuple[str, ...] = ("name_based", "single_turn", "rollback", "markov_edit", "recall")  # a build's default
# Kinds a config names when it wants them (training aids of the recall kind, `recall.py`): 'recall_describe' (some
# solo rounds ask to describe someone instead of drawing them) and 'recall_text' (every answer says in words whom it
# shows and how, no images: text that teaches a from-scratch LLM to find a name and copy what followed it).
EXTRA_KINDS: tuple[str, ...] = tuple(k for k in recall.KIND_OPTIONS if k not in KINDS)
ALL_KINDS: tuple[str, ...] = KINDS + EXTRA_KINDS

_SKIN = {"light": (247, 218, 190), "medium": (224, 178, 136), "tan": (176, 120, 80), "dark": (105, 68, 44)}
_HAIR = {"black": (28, 28, 30), "brown": (112, 70, 36), "blonde": (238, 206, 110), "red": (196, 64, 30),
         "grey": (165, 165, 168), "blue": (46, 92, 224)}
_EYES = {"brown": (92, 52, 22), "blue": (40, 120, 235), "green": (36, 168, 60)}
_CLOTHES = {"red": (214, 40, 40), "green": (52, 164, 72), "blue": (40, 72, 204), "yellow": (244, 206, 40),
            "purple": (142, 60, 176), "white": (246, 246, 246)}
_HAT = (204, 40, 142)
_FRAMES = (18, 18, 18)
_MOUTH = (150, 48, 48)

_SCENE_PHRASE = {"beach": "at the beach", "park": "in the park", "office": "in an office",
                 "night": "outside at night", "snow": "in the snow", "studio": "in a photo studio"}
_MOVE_PHRASE = {"beach": "to the beach", "park": "to the park", "office": "to an office",
                "night": "outside at night", "snow": "into the snow", "studio": "to a photo studio"}

# Layouts as fractions of the image: (x0, y0, x1, y1). Two people side by side fill ~80% of the height.
_PAIR = ((0.03, 0.2, 0.48, 1.0), (0.52, 0.2, 0.97, 1.0))
_SOLO = (0.26, 0.14, 0.74, 1.0)
_PORTRAIT = (0.12, 0.04, 0.88, 1.3)  # head and shoulders, cut by the bottom edge


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
    return render_scene([(Person(name=name, attributes=dict(attributes)), _PORTRAIT)], scene, size)


def _check_attributes(a: dict) -> None:
    for k, vals in ATTRIBUTES.items():
        if a.get(k) not in vals:
            raise ValueError(f"attribute {k!r} must be one of {vals}, got {a.get(k)!r}")


# ----------------------------------------------------------------------------------------------------------
# Text
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


def _edit_text(subject: str, attr: str, old: str, new: str) -> str:
    poss = f"{subject}'s"
    if attr == "clothing_color":
        return f"Change {poss} shirt to {new}."
    if attr == "hair_color":
        return f"Make {poss} hair {new}."
    if attr == "scene":
        return f"Move {subject} {_MOVE_PHRASE[new]}."
    if attr == "accessory":
        if new == "none":
            return f"Take off {poss} {'hat' if old == 'hat' else 'glasses'}."
        item = "a hat" if new == "hat" else "glasses"
        if old == "none":
            return f"Give {subject} {item}."
        return f"Replace {poss} {'hat' if old == 'hat' else 'glasses'} with {item}."
    raise ValueError(attr)


# ----------------------------------------------------------------------------------------------------------
# Conversations
# ----------------------------------------------------------------------------------------------------------
def _sample_attributes(rng: np.random.Generator) -> dict:
    return {k: str(v[rng.integers(len(v))]) for k, v in ATTRIBUTES.items()}


def _distinct_pair(rng: np.random.Generator) -> tuple[dict, dict]:
    a = _sample_attributes(rng)
    while True:  # differ in at least 3 attributes so the two people are easy to tell apart
        b = _sample_attributes(rng)
        if sum(a[k] != b[k] for k in ATTRIBUTES) >= 3:
            return a, b


def _pick(rng, values, exclude=()) -> str:
    options = [v for v in values if v not in exclude]
    return str(options[rng.integers(len(options))])


def _jitter(rng, frac, amount=0.03) -> tuple:
    dx = float(rng.uniform(-amount, amount))
    return (frac[0] + dx, frac[1], frac[2] + dx, frac[3])


# attributes named in round-1 text are drawn from this weighting (hair colour and clothing most often)
_TEXT_WEIGHTS = {"face_shape": 0.5, "skin_tone": 0.5, "hair_color": 3.0, "hair_style": 1.0, "eye_color": 0.5,
                 "clothing_color": 3.0, "accessory": 1.0}


def _name_based(rng, size, base):
    (a1, a2), names = _distinct_pair(rng), [str(n) for n in rng.choice(NAMES, 2, replace=False)]
    scenes = [str(s) for s in rng.choice(SCENES, 3, replace=False)]
    keys = list(ATTRIBUTES)
    p = np.array([_TEXT_WEIGHTS[k] for k in keys]) / sum(_TEXT_WEIGHTS.values())
    text_attrs = {}
    for n in names:
        chosen = set(rng.choice(keys, int(rng.integers(2, 4)), replace=False, p=p))
        text_attrs[n] = [k for k in keys if k in chosen]
    A, B = (Person(names[0], a1), Person(names[1], a2))
    img1 = render_scene([(A, _jitter(rng, _PAIR[0])), (B, _jitter(rng, _PAIR[1]))], scenes[0], size)
    img2 = render_scene([(A, _jitter(rng, _SOLO))], scenes[1], size)
    img3 = render_scene([(B, _jitter(rng, _SOLO))], scenes[2], size)
    t1 = (f"Draw {A.name} and {B.name} together {_SCENE_PHRASE[scenes[0]]}. "
          f"{describe(A.name, a1, text_attrs[A.name])} {describe(B.name, a2, text_attrs[B.name])}")
    rounds = [
        Round(t1, [], f"Here are {A.name} and {B.name} {_SCENE_PHRASE[scenes[0]]}.", img1, introduces=[A.name, B.name]),
        Round(f"Show {A.name} {_SCENE_PHRASE[scenes[1]]}.", [], f"Here is {A.name} {_SCENE_PHRASE[scenes[1]]}.", img2),
        Round(f"Now show {B.name} {_SCENE_PHRASE[scenes[2]]}.", [], f"Here is {B.name} {_SCENE_PHRASE[scenes[2]]}.", img3),
    ]
    meta = dict(base, text_attributes=text_attrs,
                image_only_attributes={n: [k for k in keys if k not in text_attrs[n]] for n in names})
    return rounds, [A, B], meta


def _single_turn(rng, size, base):
    a, name = _sample_attributes(rng), str(rng.choice(NAMES))
    ref = render_person(a, size, "studio", name)
    change = ("scene", "clothing", "both")[int(rng.integers(3))]
    scene = _pick(rng, SCENES, exclude=("studio",))
    target = dict(a)
    parts = []
    if change in ("scene", "both"):
        parts.append(_SCENE_PHRASE[scene])
    else:
        scene = "studio"
    if change in ("clothing", "both"):
        target["clothing_color"] = _pick(rng, ATTRIBUTES["clothing_color"], exclude=(a["clothing_color"],))
        parts.append(f"wearing a {target['clothing_color']} shirt")
    out = render_scene([(Person(name, target), _jitter(rng, _SOLO))], scene, size)
    text = f"This is {name}. Show {name} {' '.join(parts)}."
    rounds = [Round(text, [ref], f"Here is {name} {' '.join(parts)}.", out, introduces=[name],
                    metadata={"changed": {"scene": ["scene"], "clothing": ["clothing_color"], "both": ["scene", "clothing_color"]}[change]})]
    return rounds, [Person(name, a)], base


_EDITABLE = ("clothing_color", "accessory", "scene", "hair_color")


def _random_edit(rng, state: dict, seen: list) -> tuple[str, str, str, dict]:
    """(attribute, old, new, new_state) changing one thing, never back to a state already shown."""
    while True:
        attr = _EDITABLE[int(rng.integers(len(_EDITABLE)))]
        values = SCENES if attr == "scene" else ATTRIBUTES[attr]
        new = _pick(rng, values, exclude=(state[attr],))
        nxt = dict(state, **{attr: new})
        if nxt not in seen:
            return attr, state[attr], new, nxt


def _state_image(state: dict, name: str, frac, size: int, cache: dict) -> Image:
    key = tuple(sorted(state.items()))
    if key not in cache:
        attrs = {k: v for k, v in state.items() if k != "scene"}
        cache[key] = render_scene([(Person(name, attrs), frac)], state["scene"], size)
    im = cache[key]
    return Image(pixels=im.pixels.copy(), people=[Person(p.name, dict(p.attributes), p.box, p.identity) for p in im.people],
                 attributes=dict(im.attributes))


def _rollback(rng, size, base):
    a, name = _sample_attributes(rng), str(rng.choice(NAMES))
    frac, cache = _jitter(rng, _SOLO), {}
    states = [dict(a, scene=_pick(rng, SCENES))]
    shown = {k: a[k] for k in ("hair_color", "clothing_color")}
    rounds = [Round(f"Draw {name} {_SCENE_PHRASE[states[0]['scene']]}. {describe(name, shown, list(shown))}", [],
                    f"Here is {name}.", _state_image(states[0], name, frac, size, cache), introduces=[name])]
    for _ in range(int(rng.integers(2, 5))):
        attr, old, new, nxt = _random_edit(rng, states[-1], states)
        states.append(nxt)
        rounds.append(Round(_edit_text(name, attr, old, new), [], "Done.", _state_image(nxt, name, frac, size, cache),
                            metadata={"edit": {"attribute": attr, "from": old, "to": new}}))
    n = len(states) - 1
    options = [("Undo the last change.", n - 1), ("Undo the last two changes.", n - 2), ("Go back to the first version.", 0)]
    text, back = options[int(rng.integers(len(options)))]
    rounds.append(Round(text, [], "Here is the earlier version.", _state_image(states[back], name, frac, size, cache),
                        metadata={"restores_round": back}))
    return rounds, [Person(name, a)], base


def _markov_edit(rng, size, base):
    a, name = _sample_attributes(rng), str(rng.choice(NAMES))
    frac, cache = _jitter(rng, _SOLO), {}
    states = [dict(a, scene=_pick(rng, SCENES))]
    rounds = []
    for r in range(int(rng.integers(2, 5))):
        attr, old, new, nxt = _random_edit(rng, states[-1], states)
        states.append(nxt)
        rounds.append(Round(_edit_text("the person", attr, old, new),
                            [_state_image(states[-2], name, frac, size, cache)], "Done.",
                            _state_image(nxt, name, frac, size, cache),
                            metadata={"edit": {"attribute": attr, "from": old, "to": new}}))
    return rounds, [Person(name, a)], base


# The kinds drawn here; the recall kinds (`ALL_KINDS` beyond these) are made by `recall.make_recall`.
_MAKERS = {"name_based": _name_based, "single_turn": _single_turn, "rollback": _rollback, "markov_edit": _markov_edit}


def make_conversation(kind: str, seed: int, index: int, size: int = 64, names: str = "train") -> Conversation:
    """Conversation `index` of kind `kind` for `seed`, with in-memory pixels; a pure function of its inputs.
    `names`: the name pool of the recall kind ('train' or 'heldout'; the other kinds use `world.NAMES`)."""
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; known kinds: {', '.join(ALL_KINDS)}")
    if names not in name_pools.POOLS:
        raise ValueError(f"unknown name pool {names!r}; known pools: {', '.join(name_pools.POOLS)}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels to stay legible, got {size}")
    rng = np.random.default_rng([seed, index])
    base = {"seed": int(seed), "index": int(index), "size": int(size)}
    if kind in recall.KIND_OPTIONS:
        rounds, people, meta = recall.make_recall(rng, size, base, names, **recall.KIND_OPTIONS[kind])
    else:
        rounds, people, meta = _MAKERS[kind](rng, size, base)
    return Conversation(id=f"syn-{seed}-{index:07d}", rounds=rounds, people=people, kind=kind, source="synthetic",
                        metadata=meta)


def kind_of(index: int, kinds: Sequence[str] = KINDS) -> str:
    """Record `index` has kind kinds[index % len(kinds)] (repeat a kind to weight it)."""
    return kinds[index % len(kinds)]


def generate(num: int, seed: int = 0, kinds: Sequence[str] = KINDS, size: int = 64, start: int = 0,
             names: str = "train") -> Iterator[Conversation]:
    """Conversations start .. start+num-1 for `seed`; record i has kind `kind_of(i, kinds)`; `names`: the
    recall kind's name pool."""
    kinds = tuple(kinds)
    for k in kinds:
        if k not in ALL_KINDS:
            raise ValueError(f"unknown synthetic kind {k!r}; known kinds: {', '.join(ALL_KINDS)}")
    for i in range(start, start + num):
        yield make_conversation(kind_of(i, kinds), seed, i, size, names)


# ----------------------------------------------------------------------------------------------------------
# Contact sheet and CLI
# ----------------------------------------------------------------------------------------------------------
def contact_sheet(convs: Sequence[Conversation], cell: int = 128, text_lines: int = 4) -> PILImage.Image:
    """One row per conversation: per round its user images then its assistant image, each cell captioned
    with the round number and, under assistant cells, the start of the user text."""
    font = ImageFont.load_default()
    cap = 12 * (text_lines + 1) + 4
    cols = max(sum(len(r.user_images) + (r.assistant_image is not None) for r in c.rounds) for c in convs)
    sheet = PILImage.new("RGB", (cols * (cell + 6) + 6, len(convs) * (cell + cap + 8) + 6), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for row, conv in enumerate(convs):
        y = 6 + row * (cell + cap + 8)
        col = 0
        for r, rnd in enumerate(conv.rounds):
            cells = [(img, f"r{r + 1} user", None) for img in rnd.user_images]
            if rnd.assistant_image is not None:
                cells.append((rnd.assistant_image, f"r{r + 1} {conv.kind}" if r == 0 else f"r{r + 1} out", rnd.user_text))
            for img, label, text in cells:
                x = 6 + col * (cell + 6)
                tile = PILImage.fromarray(img.pixels).resize((cell, cell), PILImage.NEAREST)
                sheet.paste(tile, (x, y))
                d.text((x, y + cell + 1), label, fill=(0, 0, 160), font=font)
                if text:
                    lines = textwrap.wrap(text, width=max(8, cell // 6))[:text_lines]
                    for k, line in enumerate(lines):
                        d.text((x, y + cell + 13 + 12 * k), line, fill=(40, 40, 40), font=font)
                col += 1
    return sheet


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = cli.parser(cli.prog(module="cig_jax.data.synthetic"), "Write synthetic conversations (JSON + PNG) and a contact sheet.")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num", type=int, default=1000, help="conversations to draw")
    ap.add_argument("--seed", type=int, default=0, help="the draw's seed (the same seed, the same conversations)")
    ap.add_argument("--size", type=int, default=64, help="side of the square images, in pixels")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(ALL_KINDS)}")
    ap.add_argument("--sheet", type=int, default=8, help="conversations shown on contact_sheet.png")
    args = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    out = Path(args.out)
    conv_dir = out / "conversations"
    t0 = time.time()
    shown = []
    for conv in generate(args.num, args.seed, kinds, args.size):
        if len(shown) < args.sheet:
            shown.append(conv)
        save_conversation(conv, conv_dir / f"{conv.id}.json", image_dir="images")
    if shown:
        contact_sheet(shown).save(out / "contact_sheet.png")
    print(f"wrote {args.num} conversations to {conv_dir} and {out / 'contact_sheet.png'} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    cli.run_main(main)
