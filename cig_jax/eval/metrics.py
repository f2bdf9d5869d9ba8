"""Metrics for generated conversations: does a later round draw the right person from the name alone?

Owns:
  - `round_attribute_accuracy`: per-round attribute accuracy of every person in every generated image, read by
    the attribute classifier (`eval/attributes.py`) and split by what the conversation's text gave
    (`text`) versus what only an earlier image showed (`image_only`, from the record metadata
    `text_attributes` / `image_only_attributes`), with chance levels, and a `recalled` summary over
    people named in a round after the one that introduced them.
  - `identity_similarity`: cosine of identity embeddings (`faces/identity.py`) between reference and
    generated faces; face-detection failures are counted and reported, never dropped silently.
  - `clip_t_score`: CLIP-T prompt alignment with a local CLIP checkpoint, or a 'skipped: <reason>' result.
  - `drawn_identity_similarity`: the same question for drawn people, through the identity code of the
    attributes the classifier reads (the procedural faces are not faces to a face embedder).
  - `multi_round_consistency`: how alike the same named person looks across the generated rounds they
    appear in (identity cosine, and attribute agreement when given a classifier).
  - `names_copied`: whether each answer writes the names its request named, intact.
  - `evaluate`: all of the above as one JSON-ready report (with, for the recall kind, `eval/recall.py`'s rows by
    distance, length and naming order, rollback agreement and self-consistency), and a CLI over conversation
    folders.

Does not own: the classifier itself, face detection/embedding, sampling. Identity scores live in
`identity_score.py`, CLIP-T in `clip_score.py`, reading generated rounds in `rounds.py` (all re-exported here).

Inputs: `truth` is a list of ground-truth Conversations (synthetic records carry each person's attributes
and pixel box in every image); `generated` is aligned with it, one item per conversation: a Conversation
whose assistant images are the generated ones, a list of per-round images (RGB uint8 arrays, schema
Images, or None where nothing was generated), or a dict {round index: image}. Rounds are 0-based.
A person is read from the whole generated image when the ground-truth image shows one person, else from
their ground-truth box scaled to the generated image's size.

Reading the numbers: round-1 `image_only` attributes are not determined by anything the model was told,
so chance is the expected score there; in later rounds they are determined by the round-1 image. When
the history holds the model's own round-1 image (free-running sampling), compare with
`multi_round_consistency`, which does not need ground truth. Identity cosines depend on the backend:
dlib's 128-d embeddings put different people at ~0.8-0.9 (insightface's t1.jpg: 0.81-0.91) and the same
person above ~0.93, ArcFace puts different people near 0-0.3 and the same person at ~0.4-0.8; every
identity result names its backend, and only numbers from one backend compare.

    python -m cig_jax.eval.metrics --truth DIR --generated DIR [--out report.json --cache /tmp/cig_eval
        --clip /path/to/clip-vit-large-patch14 --identity auto|dlib|insightface|none]
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cig_jax import cli
from cig_jax.data import world
from cig_jax.data.schema import Conversation, mentioned_names
from cig_jax.data.schema_io import load_conversation
from cig_jax.eval import recall
from cig_jax.eval.attributes import load_or_train_classifier
from cig_jax.eval.clip_score import clip_t_score, round_clip_t  # noqa: F401 (part of this module's API)
from cig_jax.eval.identity_score import (EmbeddingCache, cosine,  # noqa: F401
                                         drawn_identity_similarity, face_embedding, identity_similarity,
                                         round_identity_similarity)
from cig_jax.eval.rounds import aligned, appearances, generated_images, intro_rounds, scale_box  # noqa: F401
from cig_jax.faces import backends

GROUPS = ("text", "image_only", "all")
def chance_levels(attributes: Optional[dict] = None) -> dict:
    """{attr: 1 / number of values}: the accuracy of guessing uniformly at random."""
    attributes = world.ATTRIBUTES if attributes is None else attributes
    return {k: 1.0 / len(v) for k, v in attributes.items()}


# ----------------------------------------------------------------------------------------------------------
# Attribute accuracy
# ----------------------------------------------------------------------------------------------------------
class _Tally:
    """Correct counts and chance sums per attribute, for one group of (person, round, attribute) items."""

    def __init__(self):
        self.correct: dict = {}
        self.n: dict = {}
        self.chance_sum: dict = {}

    def add(self, attr: str, ok: bool, chance: float) -> None:
        self.correct[attr] = self.correct.get(attr, 0) + int(ok)
        self.n[attr] = self.n.get(attr, 0) + 1
        self.chance_sum[attr] = self.chance_sum.get(attr, 0.0) + chance

    def summary(self, per_attribute: bool = False) -> dict:
        n = sum(self.n.values())
        out = {"accuracy": sum(self.correct.values()) / n if n else None, "n": n,
               "chance": sum(self.chance_sum.values()) / n if n else None}
        if per_attribute:
            out["per_attribute"] = {k: {"accuracy": self.correct[k] / self.n[k], "n": self.n[k],
                                        "chance": self.chance_sum[k] / self.n[k]} for k in self.n}
        return out


def _groups_of(truth: Conversation, name: str, attrs: Sequence[str], r: Optional[int] = None) -> dict:
    """{attr: 'text' | 'image_only' | None} from the record metadata: round r's `sources` where the record
    has them (the recall kind: 'text' when a user text said the current value, else 'image_only'), else the
    conversation's `text_attributes` / `image_only_attributes`."""
    sources = ((truth.rounds[r].metadata.get("sources") or {}).get(name) if r is not None else None)
    if sources:
        via = {"text": "text", "image": "image_only"}
        return {k: via.get((sources.get(k) or {}).get("via")) for k in attrs}
    text = set((truth.metadata.get("text_attributes") or {}).get(name, []))
    image_only = set((truth.metadata.get("image_only_attributes") or {}).get(name, []))
    return {k: "text" if k in text else "image_only" if k in image_only else None for k in attrs}


def round_attribute_accuracy(truth: Sequence[Conversation], generated, classifier,
                             return_items: bool = False) -> dict:
    """Attribute accuracy of generated people against ground truth, per round and split text / image-only.

    -> {"rounds": [{"round": r, "people": N, "text"|"image_only"|"all": {"accuracy", "n", "chance"},
                    "per_attribute": {attr: {"accuracy", "n", "chance"}}}],
        "overall": {group: {...}}, "recalled": {group: {...}} (people named after their introduction round),
        "chance": {attr: 1/k}, "missing_images": number of (round, person) with no generated image,
        "items": [...] (with return_items)}. Accuracies are None where n is 0."""
    attrs = list(classifier.attributes)
    vocab = dict(classifier.vocab)
    chance = {k: 1.0 / len(vocab[k]) for k in attrs}
    per_round: dict = {}
    overall = {g: _Tally() for g in GROUPS}
    recalled = {g: _Tally() for g in GROUPS}
    people_per_round: dict = {}
    missing = 0
    queries, meta = [], []  # one classifier query per (conversation, round, person)
    for conv, gen in aligned(truth, generated):
        intro = intro_rounds(conv)
        for r, p, g, gbox, _, _ in appearances(conv, gen):
            if not all(k in p.attributes for k in attrs):
                continue
            if g is None:
                missing += 1
                continue
            queries.append((g, gbox))
            meta.append((conv, r, p, intro.get(p.name, r)))
    preds = classifier.predict([q[0] for q in queries], [q[1] for q in queries]) if queries else []
    items = []
    for (conv, r, p, intro_r), pred in zip(meta, preds):
        groups = _groups_of(conv, p.name, attrs, r)
        rt = per_round.setdefault(r, {g: _Tally() for g in GROUPS})
        people_per_round[r] = people_per_round.get(r, 0) + 1
        for k in attrs:
            ok = pred[k] == p.attributes[k]
            targets = [rt, overall] + ([recalled] if r > intro_r else [])
            for t in targets:
                t["all"].add(k, ok, chance[k])
                if groups[k] is not None:
                    t[groups[k]].add(k, ok, chance[k])
        if return_items:
            items.append({"conversation": conv.id, "round": r, "name": p.name, "predicted": pred,
                          "truth": {k: p.attributes[k] for k in attrs}, "groups": groups})
    rounds = []
    for r in sorted(per_round):
        entry = {"round": r, "people": people_per_round[r]}
        entry.update({g: per_round[r][g].summary() for g in GROUPS})
        entry["per_attribute"] = per_round[r]["all"].summary(per_attribute=True)["per_attribute"]
        rounds.append(entry)
    out = {"rounds": rounds, "overall": {g: overall[g].summary() for g in GROUPS},
           "recalled": {g: recalled[g].summary() for g in GROUPS}, "chance": chance, "missing_images": missing}
    if return_items:
        out["items"] = items
    return out


# ----------------------------------------------------------------------------------------------------------
# Multi-round consistency
# ----------------------------------------------------------------------------------------------------------
def multi_round_consistency(truth: Sequence[Conversation], generated, embedder=None, classifier=None) -> dict:
    """How alike each named person looks across the generated rounds they appear in (who appears where, and
    their boxes, come from the ground-truth conversations; their looks only from the generated images).

    -> {"identity": {"mean", "n" (pairs of appearances scored), "pairs", "detect_failures" (appearances
    without a face), "appearances", "backend", "note"} (when `embedder`), "attributes": {"agreement", "n"}
    (when `classifier`: the fraction of attributes read the same in two appearances, over attributes the
    ground truth keeps unchanged between them), "people": number of people seen in 2+ rounds}."""
    embed = EmbeddingCache(embedder) if embedder is not None else None
    id_values, failures, n_appearances, people = [], 0, 0, 0
    agree, agree_n = 0, 0
    for conv, gen in aligned(truth, generated):
        seen: dict = {}
        for r, p, g, gbox, _, _ in appearances(conv, gen):
            if g is not None:
                seen.setdefault(p.name, []).append((r, p, g, gbox))
        for name, apps in seen.items():
            if len(apps) < 2:
                continue
            people += 1
            if embed is not None:
                embs = [embed(g, gbox) for _, _, g, gbox in apps]
                n_appearances += len(embs)
                failures += sum(e is None for e in embs)
                for a, b in itertools.combinations(embs, 2):
                    id_values.append(cosine(a, b) if a is not None and b is not None else None)
            if classifier is not None:
                preds = classifier.predict([g for _, _, g, _ in apps], [gbox for _, _, _, gbox in apps])
                for (i, pa), (j, pb) in itertools.combinations(list(enumerate(preds)), 2):
                    ta, tb = apps[i][1].attributes, apps[j][1].attributes
                    for k in classifier.attributes:
                        if k in ta and ta.get(k) == tb.get(k):
                            agree += pa[k] == pb[k]
                            agree_n += 1
    out: dict = {"people": people}
    if embedder is not None:
        ok = [v for v in id_values if v is not None]
        out["identity"] = {"mean": float(np.mean(ok)) if ok else None, "n": len(ok), "pairs": len(id_values),
                           "detect_failures": failures, "appearances": n_appearances, "backend": embedder.name,
                           "note": backends.note(embedder.name)}
    if classifier is not None:
        out["attributes"] = {"agreement": agree / agree_n if agree_n else None, "n": agree_n}
    return out


# ----------------------------------------------------------------------------------------------------------
# Everything, and a CLI
# ----------------------------------------------------------------------------------------------------------
def evaluate(truth: Sequence[Conversation], generated=None, *, classifier=None, embedder=None,
             clip_path=None) -> dict:
    """One JSON-ready report: attribute accuracy and drawn-person identity (with `classifier`), identity
    similarity and consistency (with `embedder`), CLIP-T (with `clip_path`, else skipped). `generated=None`
    scores the ground truth against itself (the ceiling each metric can reach)."""
    truth = list(truth)
    generated = None if generated is None else list(generated)
    report: dict = {"conversations": len(truth)}
    if classifier is not None:
        report["attributes"] = round_attribute_accuracy(truth, generated, classifier, return_items=True)
        items = report["attributes"].pop("items")
        report["drawn_identity"] = drawn_identity_similarity(items)
        if any(recall.is_recall(c) for c in truth):  # the recall kind's rows (cig_jax/eval/recall.py)
            report["recall"] = recall.breakdown(truth, items, dict(classifier.vocab))
            report["rollback"] = recall.rollback_agreement(truth, items)
            report["self_consistency"] = recall.self_consistency(truth, items)
    if embedder is not None:
        report["identity"] = round_identity_similarity(truth, generated, embedder)
        report["identity"]["overall"].pop("values")
    if classifier is not None or embedder is not None:
        report["consistency"] = multi_round_consistency(truth, generated, embedder, classifier)
    report["clip_t"] = round_clip_t(truth, generated, clip_path)
    report["clip_t"].pop("scores")
    if generated is not None and all(isinstance(g, Conversation) for g in generated):  # images alone: no answers
        report["names"] = names_copied(truth, [[r.assistant_text for r in g.rounds] for g in generated])
    return report


def names_copied(truth: Sequence[Conversation], answers: Sequence[Sequence[Optional[str]]]) -> dict:
    """Does the answer write the names the user wrote? answers[c][r]: the generated answer text of conversation c's
    round r (None: not generated). Over rounds whose user text names people of the cast (`Conversation.people`)
    that the reference answer names too (an edit's "Done." names nobody), the fraction whose answer holds every
    such name intact (as a whole word, the same characters: a name garbled by the tokenizer or the model does not
    count), and a few misses to read."""
    n = ok = 0
    misses = []
    for t, said in zip(truth, answers):
        cast = [p.name for p in t.people]
        for r, (tr, answer) in enumerate(zip(t.rounds, said)):
            asked = mentioned_names(tr.assistant_text or "", mentioned_names(tr.user_text, cast))
            if not asked:
                continue
            n += 1
            if set(mentioned_names(answer or "", asked)) == set(asked):
                ok += 1
            elif len(misses) < 5:
                misses.append({"conversation": t.id, "round": r, "names": asked, "answer": answer})
    return {"rounds": n, "intact": ok / n if n else None, "misses": misses}


def json_safe(x):
    """A metrics report ready for json.dumps: NaN/inf -> null, numpy scalars -> Python numbers, keys -> str."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return json_safe(x.item())
    return x


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = cli.parser(cli.prog(module="cig_jax.eval.metrics"), "Score generated conversations against ground-truth ones.")
    ap.add_argument("--truth", required=True, help="folder of ground-truth conversation JSON files")
    ap.add_argument("--generated", help="folder of generated conversation JSON files with the same ids "
                                        "(default: score the ground truth against itself)")
    ap.add_argument("--out", help="write the report here (JSON); it is printed either way")
    ap.add_argument("--cache", default="/tmp/cig_eval", help="where the attribute classifier is cached")
    ap.add_argument("--clip", help="local CLIP checkpoint folder for CLIP-T (skipped without one)")
    ap.add_argument("--identity", default="auto", choices=backends.choices(none=True),
                    help="face embedder for identity similarity (the 'face' extra)")
    args = ap.parse_args(argv)

    files = sorted(Path(args.truth).glob("*.json"))
    if not files:
        raise SystemExit(f"no conversation JSON files in {args.truth}")
    truth = [load_conversation(f) for f in files]
    generated = None
    if args.generated:
        by_id = {c.id: c for c in (load_conversation(f) for f in sorted(Path(args.generated).glob("*.json")))}
        absent = [c.id for c in truth if c.id not in by_id]
        if absent:
            raise SystemExit(f"{len(absent)} conversations have no generated counterpart in {args.generated}, "
                             f"e.g. {absent[0]!r}")
        generated = [by_id[c.id] for c in truth]
    embedder = None
    if args.identity != "none":
        embedder = backends.make_identity_embedder(args.identity)
    classifier = load_or_train_classifier(args.cache, verbose=True)
    report = json_safe(evaluate(truth, generated, classifier=classifier, embedder=embedder, clip_path=args.clip))
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    cli.run_main(main)
