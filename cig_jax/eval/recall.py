"""The recall protocol: does a model draw the person who is *named*, whatever the round, the distance or the order?

Owns, over conversations of the 'recall' kind (`cig_jax/data/recall.py`, ground truth in round metadata):
  - `breakdown`: attribute accuracy of recalled people (named again after the round that introduced them) by
    recall distance (rounds since last shown), by conversation length, by naming order ('first' / 'second':
    which of the round-1 pair is named first afterwards) and for distance >= 2 per naming order, each split
    into text-described and image-only attributes (where each value came from: `sources`), with chance;
  - `rollback_agreement`: on rollback rounds, over the attributes where the restored round's look and the
    previous round's differ, how often the answer follows the restored round, and how often the previous
    one (what a Markov model, seeing only the previous image, would copy);
  - `self_consistency`: free-running (`--context generated`): how often a later drawing of a person agrees
    with the model's own drawing in the round that introduced them, over attributes the ground truth keeps;
  - the counterfactual name probe over `data.recall.probe_pairs` (the same history, then a last round naming A
    or B, the round-1 pair, in the same scene): `probe_score` (the fraction of pairs where the drawn attributes
    follow the name in both versions, and of single versions) and `run_probe` (generate, read, score).

Items are those of `metrics.round_attribute_accuracy(..., return_items=True)`: {"conversation", "round",
"name", "predicted", "truth", "groups"}. Chance of the probe: a model that picks A or B at random follows the
name in half the versions and a quarter of the pairs; a model that ignores the name (it draws the same
person for both versions) follows it in at most half the versions and in no pair.

Does not own: generation (`eval/run.py`), the classifier (`eval/attributes.py`), the per-round table
(`metrics.py`).
"""
from __future__ import annotations

from typing import Callable, Sequence

from cig_jax.data.recall import ProbePair, is_recall
from cig_jax.data.schema import Conversation


# ----------------------------------------------------------------------------------------------------------
# Accuracy by distance, length and naming order
# ----------------------------------------------------------------------------------------------------------
class _Acc:
    def __init__(self):
        self.ok, self.n, self.chance = 0, 0, 0.0

    def add(self, ok: bool, chance: float) -> None:
        self.ok += int(ok)
        self.n += 1
        self.chance += chance

    def summary(self) -> dict:
        return {"accuracy": self.ok / self.n if self.n else None, "n": self.n,
                "chance": self.chance / self.n if self.n else None}


def _groups() -> dict:
    return {"text": _Acc(), "image_only": _Acc(), "all": _Acc()}


def _summary(table: dict) -> dict:
    return {str(k): {g: t.summary() for g, t in v.items()} for k, v in sorted(table.items(), key=lambda kv: str(kv[0]))}


def breakdown(truth: Sequence[Conversation], items: Sequence[dict], vocab: dict) -> dict:
    """{"by_distance": {d: {text|image_only|all: {accuracy, n, chance}}}, "by_length": {L: ...},
    "by_order": {first|second: ...}, "far_by_order": {first|second: ...} (distance >= 2), "far": {...}}."""
    convs = {c.id: c for c in truth if is_recall(c)}
    tables = {"by_distance": {}, "by_length": {}, "by_order": {}, "far_by_order": {}, "far": {}}
    for it in items:
        conv = convs.get(it["conversation"])
        if conv is None:
            continue
        meta = conv.rounds[it["round"]].metadata
        d = (meta.get("distance") or {}).get(it["name"])
        if d is None:
            continue
        order = conv.metadata.get("naming_order")
        keys = [("by_distance", d), ("by_length", len(conv.rounds)), ("by_order", order)]
        if d >= 2:
            keys += [("far_by_order", order), ("far", "all")]
        for k, v in it["truth"].items():
            group = it["groups"].get(k)
            chance = 1.0 / len(vocab[k])
            ok = it["predicted"][k] == v
            for table, key in keys:
                cell = tables[table].setdefault(key, _groups())
                cell["all"].add(ok, chance)
                if group is not None:
                    cell[group].add(ok, chance)
    out = {name: _summary(t) for name, t in tables.items()}
    out["far"] = out["far"].get("all", {g: _Acc().summary() for g in ("text", "image_only", "all")})
    return out


def rollback_agreement(truth: Sequence[Conversation], items: Sequence[dict]) -> dict:
    """{"restored": fraction of differing attributes drawn as in the restored round, "previous": as in the
    previous round (the Markov-style baseline), "n": attributes compared, "rounds": rollback answers scored}."""
    convs = {c.id: c for c in truth if is_recall(c)}
    restored = previous = n = rounds = 0
    for it in items:
        conv = convs.get(it["conversation"])
        if conv is None:
            continue
        meta = conv.rounds[it["round"]].metadata
        if meta.get("action") != "rollback" or meta["rollback"]["name"] != it["name"]:
            continue
        look = lambda q: next(p.attributes for p in conv.rounds[q].assistant_image.people if p.name == it["name"])  # noqa: E731
        back, prev = look(meta["restores_round"]), look(meta["rollback"]["previous_round"])
        rounds += 1
        for k in it["predicted"]:
            if back.get(k) != prev.get(k):
                n += 1
                restored += it["predicted"][k] == back[k]
                previous += it["predicted"][k] == prev[k]
    return {"restored": restored / n if n else None, "previous": previous / n if n else None, "n": n,
            "rounds": rounds}


def self_consistency(truth: Sequence[Conversation], items: Sequence[dict]) -> dict:
    """Agreement of each later drawing of a person with the model's own drawing in the round that introduced
    them, over attributes whose ground truth is the same in both rounds: {"all": {agreement, n}, "image_only":
    {...} (attributes whose current value no text gave), "by_round": {r: {...}} (per later round)}."""
    convs = {c.id: c for c in truth if is_recall(c)}
    first: dict = {}
    for it in items:
        conv = convs.get(it["conversation"])
        if conv is not None and it["name"] in conv.rounds[it["round"]].metadata.get("distance", {}) \
                and conv.rounds[it["round"]].metadata["distance"][it["name"]] is None:
            first[(it["conversation"], it["name"])] = it
    acc = {"all": _Acc(), "image_only": _Acc()}
    by_round: dict = {}
    for it in items:
        ref = first.get((it["conversation"], it["name"]))
        if ref is None or ref is it or it["round"] <= ref["round"]:
            continue
        for k, v in it["truth"].items():
            if ref["truth"].get(k) != v:
                continue
            ok = it["predicted"][k] == ref["predicted"][k]
            acc["all"].add(ok, 0.0)
            by_round.setdefault(it["round"], _Acc()).add(ok, 0.0)
            if it["groups"].get(k) == "image_only":
                acc["image_only"].add(ok, 0.0)
    fmt = lambda a: {"agreement": a.summary()["accuracy"], "n": a.n}  # noqa: E731
    return {"all": fmt(acc["all"]), "image_only": fmt(acc["image_only"]),
            "by_round": {str(r): fmt(a) for r, a in sorted(by_round.items())}}


# ----------------------------------------------------------------------------------------------------------
# The counterfactual name probe
# ----------------------------------------------------------------------------------------------------------
def probe_score(pairs: Sequence[ProbePair], drawn: Sequence[tuple]) -> dict:
    """`drawn[i]` = (attributes read when A is named, when B is named). A version follows the name when its
    drawing matches the named person on more of the attributes where A and B differ than the other person.
    -> {"pairs_follow", "versions_follow", "n", "chance": {"pairs": 0.25, "versions": 0.5}}."""
    if len(pairs) != len(drawn):
        raise ValueError(f"got {len(pairs)} probe pairs but {len(drawn)} answers")
    follow_pairs = follow_versions = 0
    for pair, answers in zip(pairs, drawn):
        ok = []
        for v, got in enumerate(answers):
            named, other = pair.looks[v], pair.looks[1 - v]
            keys = [k for k in got if k in named and named[k] != other.get(k)]
            ok.append(sum(got[k] == named[k] for k in keys) > sum(got[k] == other[k] for k in keys))
        follow_versions += sum(ok)
        follow_pairs += all(ok)
    n = len(pairs)
    return {"pairs_follow": follow_pairs / n if n else None, "versions_follow": follow_versions / (2 * n) if n else None,
            "n": n, "chance": {"pairs": 0.25, "versions": 0.5}}


def run_probe(session, pairs: Sequence[ProbePair], classifier, *, generate: Callable, seed: int = 0,
              options=None) -> dict:
    """Generates the last round of both versions of every pair (ground-truth history), reads the drawn person
    with `classifier` and scores them (`probe_score`). `generate`: the generation protocol
    (`cig_jax.eval.run.generate_rounds`, which calls this)."""
    convs = [c for p in pairs for c in p.conversations]
    images = generate(session, convs, view="history", context="truth", seed=seed, only_last=True, options=options)
    last = [g[-1] for g in images]
    preds = classifier.predict(last, [None] * len(last)) if last else []
    report = probe_score(pairs, [(preds[2 * i], preds[2 * i + 1]) for i in range(len(pairs))])
    report["missing_images"] = sum(g is None for g in last)
    return report


# ----------------------------------------------------------------------------------------------------------
# The printed rows
# ----------------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def _cells(table: dict, group: str) -> str:
    return "  ".join(f"{k}:{_pct(v[group]['accuracy'])}" for k, v in table.items()) or "-"


def format_recall(reports: dict) -> str:
    """Per model: recalled people's image-only / text accuracy (%) by distance, length and naming order, the
    distance >= 2 rows per order, rollback agreement (restored vs previous round), the counterfactual probe
    and, when present, free-running self-consistency."""
    lines = []
    for name, rep in reports.items():
        rec = rep.get("recall")
        if not rec:
            continue
        far = rec["far"]
        lines.append(f"{name}: recalled people, attribute accuracy % (image-only / text; chance "
                     f"{_pct(far['image_only']['chance'])} / {_pct(far['text']['chance'])})")
        for group in ("image_only", "text"):
            lines.append(f"  {group:<10} by distance   {_cells(rec['by_distance'], group)}")
            lines.append(f"  {group:<10} by length     {_cells(rec['by_length'], group)}")
            lines.append(f"  {group:<10} by order      {_cells(rec['by_order'], group)}   distance>=2: "
                         f"{_cells(rec['far_by_order'], group)}  (all {_pct(far[group]['accuracy'])}, n {far[group]['n']})")
        rb = rep.get("rollback") or {}
        lines.append(f"  rollback: follows the restored round {_pct(rb.get('restored'))}%, the previous round "
                     f"{_pct(rb.get('previous'))}% ({rb.get('rounds', 0)} rounds, {rb.get('n', 0)} attributes)")
        pr = rep.get("probe")
        if pr:
            lines.append(f"  name probe: pairs following the name {_pct(pr['pairs_follow'])}% (chance 25, name-blind 0), "
                         f"versions {_pct(pr['versions_follow'])}% (chance 50), {pr['n']} pairs")
            emb = pr.get("embeddings")
            if emb and emb.get("n"):
                lines.append(f"  name probe, predicted visual embeddings (teacher-forced): share of the A-B target "
                             f"difference {emb['name_share']:.2f} (name-blind 0, by name 1), versions nearer their "
                             f"own target {_pct(emb['versions_nearer'])}%, pairs {_pct(emb['pairs_nearer'])}%")
        sc = rep.get("self_consistency") or {}
        if (rep.get("protocol") or {}).get("context") == "generated" and sc:
            lines.append(f"  free-running: later drawings agree with the model's own introduction drawing "
                         f"{_pct(sc['all']['agreement'])}% (image-only attributes {_pct(sc['image_only']['agreement'])}%)")
    return "\n".join(lines)
