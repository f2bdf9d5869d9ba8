"""The 'recall' conversation kind: multi-round chats where only binding a name to its earlier images works.

Owns: planning a recall conversation (`plan_conversation`: who is shown in each round, with which attributes,
and the ground truth of where each attribute came from), without pixels, and rendering a plan (`make_recall`,
called by `synthetic.make_conversation('recall', ...)`), and the counterfactual name probe's conversations
(`probe_pairs`: a recall conversation cut short, then a last round naming A or B; scored by
`cig_jax.eval.recall`).

Does not own: drawing (`render.render_scene`), names (`names.py`), the vocabulary (`world.py`), scoring
(`cig_jax/eval/recall.py`).

A conversation has 3 to 8 rounds and 2 or 3 people with names from a large procedural pool (`names.py`;
'train' or 'heldout'). Round 1 introduces two people drawn together (the first named on the left), telling
only 2-3 of each one's attributes in text; a third person, when there is one, is introduced alone later.
Every other round is one of
    recall    "Show Maya in the snow."      one person, a new scene, as last shown (edits kept)
    pair      "Draw Maya and Leo together at the beach."   two people, the first named on the left
    edit      "Give Maya a hat."            one person in their last scene, one attribute changed from now on
    rollback  "Undo Maya's hat." / "Go back to the picture of Maya at the beach."   one person restored to
              an earlier round's look (content-addressed: the change or the scene, not 'the last change'; an
              undo names the change, never the value it restores: "Put back what you took off Maya.")
and, in the training aid 'recall_describe' (`describe_p`), also
    describe  "Describe Maya." / "What does Maya look like now?"   text only: the answer states every attribute
              of Maya's current look (she is not shown, so stays due)
The other training aid, 'recall_text' (`make_recall(..., text_only=True)`), keeps the plan and replaces each image
by the answer's sentences of every person shown ("Here is Maya in the snow. Maya has ... and wears ...."): text
where the only way to predict a later answer is to find the name earlier and copy what followed it.
Which of the round-1 pair is named first afterwards is a fair coin (`metadata.naming_order`: 'first' or
'second'), so the round in which a person returns says nothing about who it is. People return at random
distances (rounds since last shown), 1 to `MAX_DISTANCE`; every person is named again at least once.

Ground truth, per round (`Round.metadata`, kept by JSON and record round trips):
    action          one of ACTIONS ('introduce' for round 1 and a later introduction)
    shown           names in the assistant image, left to right
    distance        {name: rounds since that person was last shown, null where introduced}
    sources         {name: {attribute: {"round": r, "via": "text" | "image"}}}: the round whose user text
                    said the attribute's current value ('text'; an edit's "Take off Maya's hat." says 'hat'
                    for a later rollback to it), or whose image first showed it ('image')
    restores_round  (rollback) the round whose look of the person the answer restores;
    described       (describe) the name whose look the answer states;
    rollback        (rollback) {"name", "by": "undo" | "scene", "previous_round"}
    edit            (edit) {"name", "attribute", "from", "to"}
Per conversation (`Conversation.metadata`): naming_order, first_named, num_people, num_rounds, names (pool).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Sequence

import numpy as np

from cig_jax.data import names as name_pool
from cig_jax.data.schema import Conversation, Person, Round
from cig_jax.data.render import PAIR, SOLO, jitter, render_scene
from cig_jax.data.world import (ATTRIBUTES, SCENE_PHRASE, SCENES, TEXT_WEIGHTS, describe, distinct_pair, edit_text,
                                sample_attributes)

ACTIONS = ("introduce", "recall", "pair", "edit", "rollback", "describe")
MIN_ROUNDS, MAX_ROUNDS = 3, 8
MAX_DISTANCE = 6
EDIT_ATTRIBUTES = ("clothing_color", "accessory", "hair_color")
_PAIR_P = 0.4  # a round shows two people
_EDIT_P = 0.3  # a solo round is an edit
_ROLLBACK_P = 0.7  # a solo round right after the same person's solo round is a rollback, where one is possible
_AFTER_EDIT_P = 0.5  # the round after an edit shows the edited person again
_RECALL_TEXT = ("Show {x} {p}.", "Now show {x} {p}.", "Draw {x} {p}.", "Now draw {x} {p}.")
_DESCRIBE_TEXT = ("Describe {x}.", "What does {x} look like now?", "How does {x} look?", "Remind me what {x} looks like.")
DESCRIBE_P = 0.35  # the recall_describe kind: a solo round is a text-only 'describe' round
# The kinds this module makes, with their `make_recall` options.
KIND_OPTIONS = {"recall": {}, "recall_describe": {"describe_p": DESCRIBE_P}, "recall_text": {"text_only": True}}


def _phrases():
    return SCENE_PHRASE


def _undo_text(name: str, attr: str, old: str, new: str) -> str:
    """Names the change undone (its new value), never the value restored: where that came from is in `sources`."""
    if attr == "accessory":
        if new == "none":
            return f"Put back what you took off {name}."
        return f"Undo {name}'s {'hat' if new == 'hat' else 'glasses'}."
    return f"Undo {name}'s {new} {'shirt' if attr == 'clothing_color' else 'hair'}."


class _Planner:
    """Builds the rounds of one plan; each round is a dict (see `plan_conversation`)."""

    def __init__(self, rng: np.random.Generator, pool: str, describe_p: float = 0.0):
        self.rng, self.describe_p = rng, describe_p
        self.num_rounds = int(rng.integers(MIN_ROUNDS, MAX_ROUNDS + 1))
        n = 3 if self.num_rounds >= 5 and rng.random() < 0.5 else 2
        a, b = distinct_pair(rng)
        looks = [a, b]
        while len(looks) < n:
            c = sample_attributes(rng)
            if all(sum(c[k] != o[k] for k in ATTRIBUTES) >= 3 for o in looks):
                looks.append(c)
        self.names = name_pool.draw_names(rng, n, pool)
        self.initial = dict(zip(self.names, looks))  # (a third person may be dropped by `build`)
        self.state = {x: dict(v) for x, v in self.initial.items()}
        self.sources: dict = {x: {} for x in self.names}
        self.last_shown: dict = {}
        self.due: dict = {}
        self.recalled = {x: False for x in self.names}
        self.history: dict = {x: [] for x in self.names}  # [(round, scene, state, sources)]
        self.last_edit: dict = {}  # name -> (round, attr, old, new, state before, sources before, round before)
        self.said_old: dict = {x: {} for x in self.names}  # name -> {(attr, value): edit round whose text named it}
        keys = list(ATTRIBUTES)
        self.text_p = np.array([TEXT_WEIGHTS[k] for k in keys]) / sum(TEXT_WEIGHTS[k] for k in keys)
        self.rounds: list = []

    # -- helpers ---------------------------------------------------------------------------------------------
    def _gap(self) -> int:
        return int(self.rng.integers(1, MAX_DISTANCE + 1))

    def _scene(self, exclude=()) -> str:
        options = [s for s in SCENES if s not in exclude]
        return str(options[self.rng.integers(len(options))])

    def _text_keys(self) -> list:
        keys = list(ATTRIBUTES)
        chosen = set(self.rng.choice(keys, int(self.rng.integers(2, 4)), replace=False, p=self.text_p))
        return [k for k in keys if k in chosen]

    def _show(self, r: int, who: list, scene: str, action: str, text: str, answer: str, **extra) -> None:
        distance = {x: (r - self.last_shown[x]) if x in self.last_shown else None for x in who}
        for x in who:
            if x in self.last_shown:
                self.recalled[x] = True
            self.last_shown[x] = r
            self.due[x] = r + self._gap()
            self.history[x].append((r, scene, dict(self.state[x]), copy.deepcopy(self.sources[x])))
        self.rounds.append(dict(action=action, shown=list(who), scene=scene, text=text, answer=answer,
                                looks={x: dict(self.state[x]) for x in who}, distance=distance,
                                sources={x: copy.deepcopy(self.sources[x]) for x in who}, **extra))

    def _introduce(self, r: int, who: list) -> None:
        p = _phrases()
        scene = self._scene()
        said = []
        for x in who:
            keys = self._text_keys()
            self.sources[x] = {k: {"round": r, "via": "text" if k in keys else "image"} for k in ATTRIBUTES}
            said.append(describe(x, self.state[x], keys))
        if len(who) == 2:
            text = f"Draw {who[0]} and {who[1]} together {p[scene]}. {' '.join(said)}"
            answer = f"Here are {who[0]} and {who[1]} {p[scene]}."
        else:
            text = f"Now draw {who[0]} {p[scene]}. {said[0]}"
            answer = f"Here is {who[0]} {p[scene]}."
        self._show(r, who, scene, "introduce", text, answer, introduces=list(who))

    def _recall(self, r: int, x: str) -> None:
        p = _phrases()
        scene = self._scene(exclude=(self.history[x][-1][1],))
        text = _RECALL_TEXT[int(self.rng.integers(len(_RECALL_TEXT)))].format(x=x, p=p[scene])
        self._show(r, [x], scene, "recall", text, f"Here is {x} {p[scene]}.")

    def _describe(self, r: int, x: str) -> None:
        """A text-only round: the answer says every attribute of x's current look (x is not shown, so stays due)."""
        text = _DESCRIBE_TEXT[int(self.rng.integers(len(_DESCRIBE_TEXT)))].format(x=x)
        self.rounds.append(dict(action="describe", shown=[], scene=None, text=text,
                                answer=describe(x, self.state[x], list(ATTRIBUTES)), looks={x: dict(self.state[x])},
                                distance={x: r - self.last_shown[x]}, sources={x: copy.deepcopy(self.sources[x])},
                                described=x))

    def _pair(self, r: int, x: str, y: str) -> None:
        p = _phrases()
        if self.rng.random() < 0.5:
            x, y = y, x
        scene = self._scene()
        self._show(r, [x, y], scene, "pair", f"Draw {x} and {y} together {p[scene]}.",
                   f"Here are {x} and {y} {p[scene]}.")

    def _edit(self, r: int, x: str) -> None:
        attr = EDIT_ATTRIBUTES[int(self.rng.integers(len(EDIT_ATTRIBUTES)))]
        old = self.state[x][attr]
        new = str(self.rng.choice([v for v in ATTRIBUTES[attr] if v != old]))
        self.last_edit[x] = (r, attr, old, new, dict(self.state[x]), copy.deepcopy(self.sources[x]), self.last_shown[x])
        if attr == "accessory" and old != "none":  # "Take off Maya's hat." / "Replace Maya's hat with ...": said
            self.said_old[x][(attr, old)] = r
        self.state[x][attr] = new
        self.sources[x][attr] = {"round": r, "via": "text"}
        scene = self.history[x][-1][1]
        self._show(r, [x], scene, "edit", edit_text(x, attr, old, new), "Done.",
                   edit={"name": x, "attribute": attr, "from": old, "to": new})

    def _rollback_options(self, r: int, x: str) -> list:
        """[(by, restored round, state, sources, scene, text)] restorable for x at round r (x solo at r-1)."""
        if not self.rounds or self.rounds[-1]["shown"] != [x]:
            return []
        p = _phrases()
        out = []
        cur = self.state[x]
        if x in self.last_edit:
            e, attr, old, new, before, src, prev = self.last_edit[x]
            if cur[attr] == new and before != cur:
                out.append(("undo", prev, before, src, self.history[x][-1][1], _undo_text(x, attr, old, new)))
        scenes = [h[1] for h in self.history[x]]
        for k, scene, look, src in self.history[x][:-1]:
            if scenes.count(scene) == 1 and look != cur:
                text = (f"Go back to the picture of {x} {p[scene]}." if self.rng.random() < 0.5
                        else f"Show {x} as in the picture {p[scene]} again.")
                out.append(("scene", k, look, src, scene, text))
        return out

    def _rollback(self, r: int, x: str, option) -> None:
        by, k, look, src, scene, text = option
        self.state[x] = dict(look)
        self.sources[x] = copy.deepcopy(src)
        for attr, value in look.items():  # a restored value an edit's text named since is text-given now
            said = self.said_old[x].get((attr, value))
            if said is not None and self.sources[x][attr]["via"] == "image" and said > self.sources[x][attr]["round"]:
                self.sources[x][attr] = {"round": said, "via": "text"}
        self.last_edit.pop(x, None)
        self._show(r, [x], scene, "rollback", text, "Here is the earlier version.", restores_round=k,
                   rollback={"name": x, "by": by, "previous_round": r - 1})

    # -- the schedule ----------------------------------------------------------------------------------------
    def build(self) -> dict:
        rng, names, n_rounds = self.rng, self.names, self.num_rounds
        a, b = names[0], names[1]
        first = a if rng.random() < 0.5 else b
        second = b if first == a else a
        # the other one of the round-1 pair stays away until `back` (distance back, 2 .. MAX_DISTANCE)
        back = int(rng.integers(2, min(MAX_DISTANCE, n_rounds - 1) + 1))
        third_at = None
        if len(names) == 3:
            options = [q for q in range(1, n_rounds - 1) if q != back and not (back == 2 and q == 1)
                       and any(q2 != back for q2 in range(q + 1, n_rounds))]  # a round to name the third again
            if options:
                third_at = int(options[rng.integers(len(options))])
            else:
                names = self.names = names[:2]
        self._introduce(0, [a, b])
        named_first = False
        for r in range(1, n_rounds):
            if r == third_at:
                self._introduce(r, [names[2]])
                continue
            if not named_first:
                named_first = True
                self._solo(r, first, allow_rollback=False)
                continue
            if r == back:
                self._solo(r, second)
                continue
            introduced = [x for x in names if x in self.last_shown and not (x == second and r < back)]
            slots = sum(1 for q in range(r, n_rounds) if q != third_at and q != back)
            need = [x for x in introduced if not self.recalled[x]] + ([names[2]] if third_at and r < third_at else [])
            overdue = [x for x in introduced if r - self.last_shown[x] >= MAX_DISTANCE]
            prev = self.rounds[-1]
            if len(overdue) >= 2:
                self._pair(r, *overdue[:2])
            elif overdue:
                self._solo(r, overdue[0])
            elif len(need) >= slots and any(x in introduced for x in need):
                waiting = sorted((x for x in need if x in introduced), key=lambda x: self.last_shown[x])
                self._solo(r, waiting[0])
            elif prev["action"] == "edit" and prev["shown"][0] in introduced and rng.random() < _AFTER_EDIT_P:
                self._solo(r, prev["shown"][0])  # the edited person again: an undo becomes possible
            else:
                order = sorted(introduced, key=lambda x: (self.due[x], rng.random()))
                if len(order) >= 2 and rng.random() < _PAIR_P:
                    self._pair(r, order[0], order[1])
                else:
                    self._solo(r, order[0])
        return dict(num_rounds=n_rounds, people=[(x, dict(self.initial[x])) for x in names],
                    rounds=self.rounds, naming_order="first" if first == a else "second", first_named=first)

    def _solo(self, r: int, x: str, allow_rollback: bool = True) -> None:
        if self.describe_p and self.rng.random() < self.describe_p:
            return self._describe(r, x)
        options = self._rollback_options(r, x) if allow_rollback else []
        if options and self.rng.random() < _ROLLBACK_P:
            self._rollback(r, x, options[int(self.rng.integers(len(options)))])
        elif self.rng.random() < _EDIT_P:
            self._edit(r, x)
        else:
            self._recall(r, x)


def plan_conversation(rng: np.random.Generator, pool: str = "train", describe_p: float = 0.0) -> dict:
    """A recall conversation without pixels: {num_rounds, people: [(name, initial attributes)], naming_order,
    first_named, rounds: [{action, shown, scene, text, answer, looks: {name: attributes}, distance, sources,
    introduces?, restores_round?, rollback?, edit?}]}."""
    return _Planner(rng, pool, describe_p).build()


_META_KEYS = ("action", "shown", "distance", "sources", "restores_round", "rollback", "edit", "described")


def make_recall(rng: np.random.Generator, size: int, base: dict, pool: str = "train", describe_p: float = 0.0,
                text_only: bool = False):
    """(rounds, people, metadata) of one rendered recall conversation (see `synthetic.make_conversation`)."""
    plan = plan_conversation(rng, pool, describe_p)
    rounds = []
    for rd in plan["rounds"]:
        who = rd["shown"]
        meta = {k: copy.deepcopy(rd[k]) for k in _META_KEYS if k in rd}
        if not who:  # a 'describe' round: text only
            rounds.append(Round(rd["text"], [], rd["answer"], None, metadata=meta))
            continue
        if text_only:  # the answer says who is shown, and how, instead of drawing them
            said = " ".join(describe(x, rd["looks"][x], list(ATTRIBUTES)) for x in who)
            rounds.append(Round(rd["text"], [], f"{rd['answer']} {said}", None, introduces=list(rd.get("introduces", [])),
                                metadata=meta))
            continue
        slots = [SOLO] if len(who) == 1 else list(PAIR)
        image = render_scene([(Person(x, rd["looks"][x]), jitter(rng, f)) for x, f in zip(who, slots)], rd["scene"], size)
        rounds.append(Round(rd["text"], [], rd["answer"], image, introduces=list(rd.get("introduces", [])),
                            metadata=meta))
    people = [Person(x, dict(a)) for x, a in plan["people"]]
    meta = dict(base, naming_order=plan["naming_order"], first_named=plan["first_named"], num_people=len(people),
                num_rounds=plan["num_rounds"], names=pool)
    return rounds, people, meta


def is_recall(conv: Conversation) -> bool:
    """A conversation of this kind: its rounds carry the per-round ground truth (`sources`)."""
    return bool(conv.rounds) and "sources" in conv.rounds[0].metadata


def restored_look(conv, r: int) -> Optional[dict]:
    """The attributes a rollback round r restores (the person's look in round `restores_round`), else None."""
    meta = conv.rounds[r].metadata
    if "restores_round" not in meta or "rollback" not in meta:
        return None
    x = meta["rollback"]["name"]
    img = conv.rounds[meta["restores_round"]].assistant_image
    return next((dict(p.attributes) for p in img.people if p.name == x), None)


# ----------------------------------------------------------------------------------------------------------
# The counterfactual name probe (scored by cig_jax.eval.recall)
# ----------------------------------------------------------------------------------------------------------
PROBE_SEED = 77


@dataclasses.dataclass
class ProbePair:
    """The same history, then a last round naming `names[0]` (conversations[0]) or `names[1]`."""

    conversations: tuple  # (Conversation, Conversation)
    names: tuple  # (A, B)
    looks: tuple  # (A's attributes, B's attributes) at the probe round


def _last_look(conv: Conversation, name: str, upto: int):
    for r in range(upto - 1, -1, -1):
        img = conv.rounds[r].assistant_image
        for p in (img.people if img is not None else []):
            if p.name == name:
                return r, p, img.attributes.get("scene")
    raise ValueError(f"conversation {conv.id!r}: {name!r} is not shown before round {upto}")


def probe_pairs(convs: Sequence[Conversation], seed: int = PROBE_SEED, size: Optional[int] = None) -> list:
    """One `ProbePair` per recall conversation: its first `cut` rounds (cut drawn in 2..len-1: the history
    holds both people of round 1 and often more, and the probe is no longer than the conversation, so within
    the lengths and positions training covers) and a last round 'Show X <scene>.' for X = A or B, in a scene
    neither was last shown in; ground truth: X as last shown there, alone."""
    out = []
    for i, conv in enumerate(c for c in convs if is_recall(c)):
        rng = np.random.default_rng([seed, i])
        cut = int(rng.integers(2, max(3, len(conv.rounds))))
        a, b = conv.rounds[0].metadata["shown"][:2]
        last = {x: _last_look(conv, x, cut) for x in (a, b)}
        options = [s for s in SCENES if s not in {last[a][2], last[b][2]}]
        scene = str(options[rng.integers(len(options))])
        px = size or conv.rounds[0].assistant_image.pixels.shape[0]
        pair = []
        for x in (a, b):
            r, person, _ = last[x]
            image = render_scene([(Person(x, dict(person.attributes)), SOLO)], scene, px)
            meta = {"action": "recall", "shown": [x], "distance": {x: cut - r},
                    "sources": {x: conv.rounds[r].metadata["sources"][x]}, "probe": True}
            probe = Round(f"Show {x} {SCENE_PHRASE[scene]}.", [], f"Here is {x} {SCENE_PHRASE[scene]}.", image,
                          metadata=meta)
            pair.append(dataclasses.replace(conv, id=f"{conv.id}-probe-{'ab'[len(pair)]}",
                                            rounds=list(conv.rounds[:cut]) + [probe]))
        out.append(ProbePair(tuple(pair), (a, b), (dict(last[a][1].attributes), dict(last[b][1].attributes))))
    return out
