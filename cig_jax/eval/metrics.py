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
  - `evaluate`: all of the above as one JSON-ready report, and a CLI over conversation folders.

Does not own: the classifier itself, face detection/embedding, sampling.

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

import argparse
import functools
import itertools
import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from cig_jax.data import world
from cig_jax.data.schema import Conversation, Image, load_conversation

GROUPS = ("text", "image_only", "all")
BACKEND_NOTES = {
    "dlib": "dlib 128-d cosine: different people often score 0.8-0.9, the same person above ~0.93; "
            "not comparable with ArcFace (insightface) numbers",
    "insightface": "ArcFace cosine: different people near 0-0.3, the same person ~0.4-0.8; "
                   "not comparable with dlib numbers",
}


def chance_levels(attributes: Optional[dict] = None) -> dict:
    """{attr: 1 / number of values}: the accuracy of guessing uniformly at random."""
    attributes = world.ATTRIBUTES if attributes is None else attributes
    return {k: 1.0 / len(v) for k, v in attributes.items()}


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------
def _pixels(image, base_dir=None) -> Optional[np.ndarray]:
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
        return [_pixels(r.assistant_image, generated.base_dir) for r in generated.rounds]
    if isinstance(generated, dict):
        return [_pixels(generated.get(r)) for r in range(n)]
    generated = list(generated)
    if len(generated) != n:
        raise ValueError(f"conversation {truth.id!r}: truth has {n} rounds, got {len(generated)} generated images")
    return [_pixels(g) for g in generated]


def _aligned(truth: Sequence[Conversation], generated) -> list:
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


def _appearances(truth: Conversation, gen: list):
    """(round, truth person, generated pixels, box in generated pixels or None, truth pixels, truth box or None)
    for every person with full ground-truth attributes in every round's assistant image."""
    for r, rnd in enumerate(truth.rounds):
        img = rnd.assistant_image
        if img is None or not img.people:
            continue
        truth_px = _pixels(img, truth.base_dir)  # read once per round: face embeddings are cached by array
        solo = len(img.people) == 1
        g = gen[r]
        for p in img.people:
            if not solo and p.box is None:
                continue
            gbox = None if (solo or g is None) else scale_box(p.box, truth_px.shape[:2], g.shape[:2])
            yield r, p, g, gbox, truth_px, (None if solo else p.box)


def _intro_rounds(truth: Conversation) -> dict:
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


def _groups_of(truth: Conversation, name: str, attrs: Sequence[str]) -> dict:
    """{attr: 'text' | 'image_only' | None} from the record metadata."""
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
    for conv, gen in _aligned(truth, generated):
        intro = _intro_rounds(conv)
        for r, p, g, gbox, _, _ in _appearances(conv, gen):
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
        groups = _groups_of(conv, p.name, attrs)
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
# Identity similarity
# ----------------------------------------------------------------------------------------------------------
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
    px = _pixels(image)
    if px is None:
        return None
    face = _pick_face(embedder.detect(px), box)
    return None if face is None else np.asarray(face.embedding, np.float32)


class _EmbeddingCache:
    def __init__(self, embedder):
        self.embedder, self.cache = embedder, {}

    def __call__(self, image, box=None):
        if image is None:
            return None
        key = (id(image), None if box is None else tuple(round(float(v), 2) for v in box))
        if key not in self.cache:
            self.cache[key] = (image, face_embedding(self.embedder, image, box))  # keep image alive: stable id
        return self.cache[key][1]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def _similarity_summary(values: list, ref_fail: int, gen_fail: int, backend: str) -> dict:
    ok = [v for v in values if v is not None]
    return {"mean": float(np.mean(ok)) if ok else None, "n": len(ok), "pairs": len(values),
            "detect_failures": ref_fail + gen_fail, "reference_failures": ref_fail, "generated_failures": gen_fail,
            "backend": backend, "note": BACKEND_NOTES.get(backend, ""), "values": values}


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
        from cig_jax.faces.identity import make_identity_embedder

        embedder = make_identity_embedder("auto")
    embed = _embed or _EmbeddingCache(embedder)
    ref_boxes = ref_boxes if ref_boxes is not None else [None] * len(references)
    gen_boxes = gen_boxes if gen_boxes is not None else [None] * len(generated)
    values, ref_fail, gen_fail = [], 0, 0
    for ref, gen, rb, gb in zip(references, generated, ref_boxes, gen_boxes):
        e_ref, e_gen = embed(ref, rb), embed(gen, gb)
        ref_fail += e_ref is None
        gen_fail += e_gen is None
        values.append(_cosine(e_ref, e_gen) if e_ref is not None and e_gen is not None else None)
    return _similarity_summary(values, ref_fail, gen_fail, embedder.name)


def round_identity_similarity(truth: Sequence[Conversation], generated, embedder) -> dict:
    """Identity similarity of every person in every generated round to the same person in the ground-truth
    image of that round, overall and per round ({"overall": {...}, "rounds": [{"round": r, ...}]})."""
    embed = _EmbeddingCache(embedder)
    rows = [(r, tpx, tbox, g, gbox) for conv, gen in _aligned(truth, generated)
            for r, p, g, gbox, tpx, tbox in _appearances(conv, gen)]
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


# ----------------------------------------------------------------------------------------------------------
# CLIP-T
# ----------------------------------------------------------------------------------------------------------
def _skipped(reason: str, message: str) -> dict:
    return {"status": f"skipped: {reason}", "mean": None, "n": 0, "scores": [], "message": message}


@functools.lru_cache(maxsize=2)
def _load_clip(path: str):
    import torch  # noqa: F401  (transformers' CLIP is a PyTorch model)
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def clip_t_score(images: Sequence, prompts: Sequence[str], clip_path: Union[str, Path, None] = None,
                 batch_size: int = 16) -> dict:
    """CLIP-T: cosine between CLIP's image and text embeddings of each (image, prompt) pair.

    `clip_path`: a local folder with a transformers CLIPModel checkpoint and its processor files (e.g. a
    saved openai/clip-vit-large-patch14). Nothing is downloaded: without a path, with a missing folder or
    one that does not load, the result is {"status": "skipped: <reason>", "mean": None, "message": ...}
    and nothing is raised. Prompts longer than CLIP's context are truncated. A None image is skipped.
    -> {"status": "ok", "mean", "n", "scores" (per pair, None for a missing image), "model"}."""
    how = ("save a CLIPModel and its CLIPProcessor (model.save_pretrained(DIR); processor.save_pretrained(DIR)) "
           "to a local folder and pass its path; cig_jax never downloads models")
    if clip_path is None:
        return _skipped("no CLIP checkpoint given", f"CLIP-T not computed: {how}.")
    path = Path(clip_path).expanduser()
    if not path.is_dir():
        return _skipped(f"CLIP checkpoint folder not found: {path}", f"CLIP-T not computed: {how}.")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    try:
        model, processor = _load_clip(str(path.resolve()))
    except Exception as e:  # a broken or partial checkpoint: report, never crash an evaluation
        return _skipped(f"cannot load CLIP from {path}: {type(e).__name__}: {e}", f"CLIP-T not computed: {how}.")
    import torch

    pixels = [_pixels(im) for im in images]
    idx = [i for i, px in enumerate(pixels) if px is not None]
    scores: list = [None] * len(pixels)
    max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))
    for s in range(0, len(idx), batch_size):
        chunk = idx[s:s + batch_size]
        inputs = processor(text=[prompts[i] for i in chunk], images=[pixels[i] for i in chunk], return_tensors="pt",
                           padding=True, truncation=True, max_length=max_len)
        with torch.no_grad():
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        pixel_values=inputs["pixel_values"])
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        for i, v in zip(chunk, (img * txt).sum(-1).tolist()):
            scores[i] = float(v)
    ok = [v for v in scores if v is not None]
    return {"status": "ok", "mean": float(np.mean(ok)) if ok else None, "n": len(ok), "scores": scores,
            "model": str(path)}


def round_clip_t(truth: Sequence[Conversation], generated, clip_path=None) -> dict:
    """CLIP-T of each generated round image against that round's user text."""
    pairs = [(g, rnd.user_text) for conv, gen in _aligned(truth, generated) for rnd, g in zip(conv.rounds, gen)
             if g is not None and rnd.user_text]
    return clip_t_score([p[0] for p in pairs], [p[1] for p in pairs], clip_path)


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
    embed = _EmbeddingCache(embedder) if embedder is not None else None
    id_values, failures, appearances, people = [], 0, 0, 0
    agree, agree_n = 0, 0
    for conv, gen in _aligned(truth, generated):
        seen: dict = {}
        for r, p, g, gbox, _, _ in _appearances(conv, gen):
            if g is not None:
                seen.setdefault(p.name, []).append((r, p, g, gbox))
        for name, apps in seen.items():
            if len(apps) < 2:
                continue
            people += 1
            if embed is not None:
                embs = [embed(g, gbox) for _, _, g, gbox in apps]
                appearances += len(embs)
                failures += sum(e is None for e in embs)
                for a, b in itertools.combinations(embs, 2):
                    id_values.append(_cosine(a, b) if a is not None and b is not None else None)
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
                           "detect_failures": failures, "appearances": appearances, "backend": embedder.name,
                           "note": BACKEND_NOTES.get(embedder.name, "")}
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
        report["drawn_identity"] = drawn_identity_similarity(report["attributes"].pop("items"))
    if embedder is not None:
        report["identity"] = round_identity_similarity(truth, generated, embedder)
        report["identity"]["overall"].pop("values")
    if classifier is not None or embedder is not None:
        report["consistency"] = multi_round_consistency(truth, generated, embedder, classifier)
    report["clip_t"] = round_clip_t(truth, generated, clip_path)
    report["clip_t"].pop("scores")
    return report


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
    ap = argparse.ArgumentParser(description="Score generated conversations against ground-truth ones.")
    ap.add_argument("--truth", required=True, help="folder of ground-truth conversation JSON files")
    ap.add_argument("--generated", help="folder of generated conversation JSON files with the same ids "
                                        "(default: score the ground truth against itself)")
    ap.add_argument("--out", help="write the report here (JSON); it is printed either way")
    ap.add_argument("--cache", default="/tmp/cig_eval", help="where the attribute classifier is cached")
    ap.add_argument("--clip", help="local CLIP checkpoint folder for CLIP-T (skipped without one)")
    ap.add_argument("--identity", default="auto", choices=("auto", "dlib", "insightface", "none"))
    args = ap.parse_args(argv)
    from cig_jax.eval.attributes import load_or_train_classifier

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
        from cig_jax.faces.identity import make_identity_embedder

        embedder = make_identity_embedder(args.identity)
    classifier = load_or_train_classifier(args.cache, verbose=True)
    report = json_safe(evaluate(truth, generated, classifier=classifier, embedder=embedder, clip_path=args.clip))
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
