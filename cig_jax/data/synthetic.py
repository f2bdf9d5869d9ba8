"""Synthetic conversations: the embedded default dataset, drawn procedurally with PIL, no downloads.

Owns: the four conversation kinds (`make_conversation`, which hands the recall kinds to `recall.py`), a stream
of them (`generate`), and a CLI that writes them to disk with a contact sheet.

Does not own: drawing people and scenes (`render.py`), the vocabulary, its sentences and identity codes
(`world.py`), the schema and file format (`schema.py`), record files (`tfds_builder.py`), tokens.

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
from cig_jax.data.render import PAIR, SOLO, jitter, render_person, render_scene
from cig_jax.data.world import (ATTRIBUTES, NAMES, SCENE_PHRASE, SCENES, TEXT_WEIGHTS, describe, distinct_pair, edit_text,
                                sample_attributes)

KINDS: tuple[str, ...] = ("name_based", "single_turn", "rollback", "markov_edit", "recall")  # a build's default
# Kinds a config names when it wants them (training aids of the recall kind, `recall.py`): 'recall_describe' (some
# solo rounds ask to describe someone instead of drawing them) and 'recall_text' (every answer says in words whom it
# shows and how, no images: text that teaches a from-scratch LLM to find a name and copy what followed it).
EXTRA_KINDS: tuple[str, ...] = tuple(k for k in recall.KIND_OPTIONS if k not in KINDS)
ALL_KINDS: tuple[str, ...] = KINDS + EXTRA_KINDS

# ----------------------------------------------------------------------------------------------------------
# Conversations
# ----------------------------------------------------------------------------------------------------------
def _pick(rng, values, exclude=()) -> str:
    options = [v for v in values if v not in exclude]
    return str(options[rng.integers(len(options))])


def _name_based(rng, size, base):
    (a1, a2), names = distinct_pair(rng), [str(n) for n in rng.choice(NAMES, 2, replace=False)]
    scenes = [str(s) for s in rng.choice(SCENES, 3, replace=False)]
    keys = list(ATTRIBUTES)
    p = np.array([TEXT_WEIGHTS[k] for k in keys]) / sum(TEXT_WEIGHTS.values())
    text_attrs = {}
    for n in names:
        chosen = set(rng.choice(keys, int(rng.integers(2, 4)), replace=False, p=p))
        text_attrs[n] = [k for k in keys if k in chosen]
    A, B = (Person(names[0], a1), Person(names[1], a2))
    img1 = render_scene([(A, jitter(rng, PAIR[0])), (B, jitter(rng, PAIR[1]))], scenes[0], size)
    img2 = render_scene([(A, jitter(rng, SOLO))], scenes[1], size)
    img3 = render_scene([(B, jitter(rng, SOLO))], scenes[2], size)
    t1 = (f"Draw {A.name} and {B.name} together {SCENE_PHRASE[scenes[0]]}. "
          f"{describe(A.name, a1, text_attrs[A.name])} {describe(B.name, a2, text_attrs[B.name])}")
    rounds = [
        Round(t1, [], f"Here are {A.name} and {B.name} {SCENE_PHRASE[scenes[0]]}.", img1, introduces=[A.name, B.name]),
        Round(f"Show {A.name} {SCENE_PHRASE[scenes[1]]}.", [], f"Here is {A.name} {SCENE_PHRASE[scenes[1]]}.", img2),
        Round(f"Now show {B.name} {SCENE_PHRASE[scenes[2]]}.", [], f"Here is {B.name} {SCENE_PHRASE[scenes[2]]}.", img3),
    ]
    meta = dict(base, text_attributes=text_attrs,
                image_only_attributes={n: [k for k in keys if k not in text_attrs[n]] for n in names})
    return rounds, [A, B], meta


def _single_turn(rng, size, base):
    a, name = sample_attributes(rng), str(rng.choice(NAMES))
    ref = render_person(a, size, "studio", name)
    change = ("scene", "clothing", "both")[int(rng.integers(3))]
    scene = _pick(rng, SCENES, exclude=("studio",))
    target = dict(a)
    parts = []
    if change in ("scene", "both"):
        parts.append(SCENE_PHRASE[scene])
    else:
        scene = "studio"
    if change in ("clothing", "both"):
        target["clothing_color"] = _pick(rng, ATTRIBUTES["clothing_color"], exclude=(a["clothing_color"],))
        parts.append(f"wearing a {target['clothing_color']} shirt")
    out = render_scene([(Person(name, target), jitter(rng, SOLO))], scene, size)
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
    a, name = sample_attributes(rng), str(rng.choice(NAMES))
    frac, cache = jitter(rng, SOLO), {}
    states = [dict(a, scene=_pick(rng, SCENES))]
    shown = {k: a[k] for k in ("hair_color", "clothing_color")}
    rounds = [Round(f"Draw {name} {SCENE_PHRASE[states[0]['scene']]}. {describe(name, shown, list(shown))}", [],
                    f"Here is {name}.", _state_image(states[0], name, frac, size, cache), introduces=[name])]
    for _ in range(int(rng.integers(2, 5))):
        attr, old, new, nxt = _random_edit(rng, states[-1], states)
        states.append(nxt)
        rounds.append(Round(edit_text(name, attr, old, new), [], "Done.", _state_image(nxt, name, frac, size, cache),
                            metadata={"edit": {"attribute": attr, "from": old, "to": new}}))
    n = len(states) - 1
    options = [("Undo the last change.", n - 1), ("Undo the last two changes.", n - 2), ("Go back to the first version.", 0)]
    text, back = options[int(rng.integers(len(options)))]
    rounds.append(Round(text, [], "Here is the earlier version.", _state_image(states[back], name, frac, size, cache),
                        metadata={"restores_round": back}))
    return rounds, [Person(name, a)], base


def _markov_edit(rng, size, base):
    a, name = sample_attributes(rng), str(rng.choice(NAMES))
    frac, cache = jitter(rng, SOLO), {}
    states = [dict(a, scene=_pick(rng, SCENES))]
    rounds = []
    for r in range(int(rng.integers(2, 5))):
        attr, old, new, nxt = _random_edit(rng, states[-1], states)
        states.append(nxt)
        rounds.append(Round(edit_text("the person", attr, old, new),
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
