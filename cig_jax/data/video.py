"""Name-based multi-round conversations from two-person video clips.

Owns: face detection on sampled frames through an `IdentityEmbedder`, linking faces into tracks (`track_faces`)
and tracks into identities (`cluster_identities`), each person's identity embedding (`person_embedding`: the
mean of its best-quality faces, written into every `Person.identity` of the record), choosing the frames of a
record (both people; each one alone), cropping them, naming the people, and the builder + CLI that writes
conversations and says why each clip was kept or dropped (`build_from_videos`, `Report`).

Does not own: decoding clips (`video_decode.py`), captions (`captions.py`), face detection and embedding
(`faces/identity.py`), the conversation schema and file format (`schema.py`), records (`tfds_builder.py`).

A kept clip becomes a 'name_based' conversation (source 'video:<file>'): round 1 introduces two names and
shows the frame with both (the left name is the left person), round 2 asks for the first name alone, round 3
for the second. Every assistant image lists who is in it, with their face box in its pixels.

Thresholds (cosine between L2-normalised embeddings; pass `threshold=` for any other embedder):
  dlib         identities 0.92, track links 0.85. dlib's documented rule is Euclidean distance < 0.6 on raw
               descriptors; their norm is ~1.5, so that is cosine ~0.92. Measured: the six people of
               insightface's t1.jpg score 0.81-0.91 between people. In the clip of tests/test_video.py (two
               of them, faces 52-68 px, +-6 degrees, +-12% light, H.264) one person's faces score >= 0.96
               with each other, the two people 0.88-0.92 face to face and 0.905 mean to mean; the margin is
               thin, and what keeps such a pair apart is that clusters seen in the same frame never merge
               (the test clip clusters correctly for any threshold from 0.80 to 0.96).
  insightface  identities 0.35, track links 0.20 (ArcFace: same person usually > 0.4, different < 0.25;
               not measured here, no model pack offline).
Links inside a track are looser because the face also has to stay in place (IoU) between samples.

Limits: a person is "alone" in a frame when no other face is detected there and the other identity's track
does not span it; a person who is in the frame but turned away is not seen.

CLI (writes OUT/conversations/<id>.json + images/, and OUT/report.json):
    python -m cig_jax.data.video --videos DIR --out DIR [--backend dlib] [--fps 2] [--size 512] [--seed 0]
"""
from __future__ import annotations

import dataclasses
import json
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image as PILImage

from cig_jax import cli
from cig_jax.data.captions import (CaptionModelNotFoundError, Captioner, HFCaptioner, Shot,  # noqa: F401
                                   TemplateCaptioner)
from cig_jax.data.schema import Conversation, Image, Person, PersonIdentity, Round, validate
from cig_jax.data.schema_io import save_conversation
from cig_jax.data.video_decode import Frame, VideoReadError, read_frames  # noqa: F401
from cig_jax.data.world import NAMES as DEFAULT_NAMES
from cig_jax.faces import backends

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
_COUNT_WORDS = {0: "no faces", 1: "one identity", 3: "three identities", 4: "four identities"}


# ----------------------------------------------------------------------------------------------------------
# Faces -> tracks -> identities
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Detection:
    sample: int
    time: float
    box: tuple  # x0, y0, x1, y1 in frame pixels
    score: float
    embedding: np.ndarray  # [D] float32, L2-normalised

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]


@dataclasses.dataclass
class Identity:
    tracks: list  # list[list[Detection]], each in sample order
    embedding: np.ndarray  # [D] normalised mean of all its detections

    @property
    def detections(self) -> list:
        return sorted((d for t in self.tracks for d in t), key=lambda d: d.sample)

    @property
    def samples(self) -> set:
        return {d.sample for t in self.tracks for d in t}

    def spans(self, sample: int) -> bool:
        """Seen at `sample`, or inside a gap of one of its tracks (a missed detection)."""
        return any(t[0].sample <= sample <= t[-1].sample for t in self.tracks)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.linalg.norm(x)), 1e-12)


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect_faces(embedder, frame: Frame, min_face: float = 40, max_side: Optional[int] = 960) -> list:
    """Faces in one frame at least `min_face` pixels wide; frames larger than `max_side` are downscaled for
    detection (boxes come back in full-frame pixels)."""
    pixels = frame.pixels
    h, w = pixels.shape[:2]
    scale = 1.0
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = np.asarray(PILImage.fromarray(pixels).resize(size, PILImage.BILINEAR))
    out = []
    for face in embedder.detect(pixels):
        box = tuple(float(v) / scale for v in face.box)
        if box[2] - box[0] >= min_face:
            embedding = _normalize(np.asarray(face.embedding, np.float32))
            out.append(Detection(frame.index, frame.time, box, float(face.score), embedding))
    return out


def track_faces(per_sample: Sequence[list], link_threshold: float, iou_min: float = 0.2, max_gap: int = 1) -> list:
    """Greedy tracker: a face joins the track whose last box it overlaps (IoU >= iou_min, at most `max_gap`
    samples missed) and whose mean embedding it matches (cosine >= link_threshold). -> list of tracks."""
    tracks: list = []
    sums: list = []
    for dets in per_sample:
        if not dets:
            continue
        s = dets[0].sample
        live = [i for i, t in enumerate(tracks) if s - t[-1].sample <= max_gap + 1]
        pairs = []
        for j, d in enumerate(dets):
            for i in live:
                cos = float(_normalize(sums[i]) @ d.embedding)
                if cos >= link_threshold and _iou(tracks[i][-1].box, d.box) >= iou_min:
                    pairs.append((cos, i, j))
        used_t, used_d = set(), set()
        for cos, i, j in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
            if i not in used_t and j not in used_d:
                used_t.add(i), used_d.add(j)
                tracks[i].append(dets[j])
                sums[i] = sums[i] + dets[j].embedding
        for j, d in enumerate(dets):
            if j not in used_d:
                tracks.append([d])
                sums.append(d.embedding.astype(np.float64))
    return tracks


def cluster_identities(tracks: Sequence[list], threshold: float, min_detections: int = 2) -> tuple[list, list]:
    """Agglomerative clustering of tracks: repeatedly merge the two clusters with the most similar mean
    embeddings while that cosine >= threshold, never merging clusters seen in the same frame (one person
    cannot be twice in a frame). -> (identities with >= min_detections faces, most faces first; the rest)."""
    if not tracks:
        return [], []
    members = [[t] for t in tracks]
    sums = np.stack([np.sum([d.embedding for d in t], axis=0) for t in tracks]).astype(np.float64)  # [n, D]
    seen = [{d.sample for d in t} for t in tracks]
    clash = np.array([[bool(a & b) for b in seen] for a in seen]) | np.eye(len(tracks), dtype=bool)  # [n, n]
    while len(members) > 1:
        means = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        sim = np.where(clash, -np.inf, means @ means.T)
        i, j = sorted(np.unravel_index(int(np.argmax(sim)), sim.shape))
        if sim[i, j] < threshold:
            break
        members[i] += members.pop(j)
        sums[i] += sums[j]
        clash[i] |= clash[j]
        clash[:, i] |= clash[:, j]
        sums, clash = np.delete(sums, j, 0), np.delete(np.delete(clash, j, 0), j, 1)
    ids = [Identity(sorted(m, key=lambda t: t[0].sample), _normalize(v).astype(np.float32)) for m, v in zip(members, sums)]
    ids.sort(key=lambda x: (-len(x.samples), min(x.samples)))
    return [x for x in ids if len(x.samples) >= min_detections], [x for x in ids if len(x.samples) < min_detections]


# ----------------------------------------------------------------------------------------------------------
# One clip -> one conversation
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ClipResult:
    clip: str
    reason: str  # 'kept' or why dropped: 'unreadable', 'no faces', 'one identity', 'three identities', ...
    detail: str = ""
    conversation: Optional[Conversation] = None
    path: Optional[str] = None  # the JSON written, when kept

    @property
    def kept(self) -> bool:
        return self.conversation is not None


def _touches_border(box, shape) -> bool:
    h, w = shape[:2]
    return box[0] <= 1 or box[1] <= 1 or box[2] >= w - 1 or box[3] >= h - 1


def _place(req_lo: float, req_hi: float, side: float, extent: int, want: float) -> float:
    """Start of a window of `side` that contains [req_lo, req_hi], inside [0, extent] when it fits, near `want`."""
    lo, hi = req_hi - side, req_lo
    if side <= extent:
        lo, hi = max(lo, 0.0), min(hi, extent - side)
    return float(np.clip(want, lo, hi)) if lo <= hi else (req_lo + req_hi - side) / 2


def _union(boxes) -> np.ndarray:
    b = np.asarray(boxes, np.float64)
    return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])


def _window(boxes, context: float) -> np.ndarray:
    """Each face widened to `context` face widths, shifted down (head and shoulders), unioned."""
    b = np.asarray(boxes, np.float64)
    fw = b[:, 2] - b[:, 0]
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2 + 0.35 * fw
    return _union(np.stack([cx - context * fw / 2, cy - context * fw / 2, cx + context * fw / 2, cy + context * fw / 2], 1))


def _inside_fraction(window: np.ndarray, shape) -> float:
    h, w = shape[:2]
    inner = np.clip(window, 0, [w, h, w, h])
    area = lambda b: max(b[2] - b[0], 0) * max(b[3] - b[1], 0)  # noqa: E731
    return area(inner) / max(area(window), 1e-9)


def crop_people(pixels: np.ndarray, boxes: Sequence[tuple], size: Optional[int], context: float) -> tuple:
    """Square crop around face boxes (see `_window`), shrunk to the frame's short side if needed but never
    cutting a face (black padding then). -> (pixels [size, size, 3] uint8, face boxes in its pixels)."""
    h, w = pixels.shape[:2]
    req = _union(boxes)
    wx0, wy0, wx1, wy1 = _window(boxes, context)
    side = max(min(max(wx1 - wx0, wy1 - wy0), min(h, w)), req[2] - req[0], req[3] - req[1])
    x0 = _place(req[0], req[2], side, w, (wx0 + wx1 - side) / 2)
    y0 = _place(req[1], req[3], side, h, (wy0 + wy1 - side) / 2)
    x0, y0, side_px = int(round(x0)), int(round(y0)), int(round(side))
    crop = PILImage.fromarray(pixels).crop((x0, y0, x0 + side_px, y0 + side_px))  # black outside the frame
    out = size or side_px
    if out != side_px:
        crop = crop.resize((out, out), PILImage.LANCZOS)
    s = out / side_px
    new_boxes = []
    for b in boxes:
        x_0, y_0 = (int(np.clip(round((b[0] - x0) * s), 0, out - 1)), int(np.clip(round((b[1] - y0) * s), 0, out - 1)))
        x_1, y_1 = (int(np.clip(round((b[2] - x0) * s), x_0 + 1, out)), int(np.clip(round((b[3] - y0) * s), y_0 + 1, out)))
        new_boxes.append((x_0, y_0, x_1, y_1))
    return np.asarray(crop.convert("RGB"), dtype=np.uint8).copy(), new_boxes


def person_embedding(detections: Sequence[Detection], shapes: dict, best: int = 5) -> np.ndarray:
    """A tracked person's identity embedding: the L2-normalised mean of its `best` best-quality faces (whole
    faces first, then the widest, then the most confident). detections: the person's faces; shapes: frame
    shape per sample. -> float32 [D]."""
    ranked = sorted(detections, key=lambda d: (not _touches_border(d.box, shapes[d.sample]), d.width, d.score),
                    reverse=True)[:best]
    return _normalize(np.mean([d.embedding for d in ranked], axis=0)).astype(np.float32)


def _identity_field(embedder, vector: np.ndarray) -> Optional[PersonIdentity]:
    """The `Person.identity` of an embedder's vector, or None for an embedder that is no known backend."""
    name = getattr(embedder, "name", None)
    backend = backends.BACKENDS.get(name)
    if backend is None or backend.load is None:
        return None
    if backend.dim is not None and vector.size != backend.dim:
        return None
    return PersonIdentity.of(name, vector)


def _safe_id(clip: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(Path(clip).with_suffix("")))


def _count_reason(n: int) -> str:
    return _COUNT_WORDS.get(n, f"{n} identities")


def process_clip(source: Union[str, Path, Sequence[Frame]], clip: str, embedder, *, threshold: float,
                 conv_id: Optional[str] = None, link_threshold: Optional[float] = None,
                 fps: Optional[float] = 2.0, decoder: str = "auto", names: Sequence[str] = DEFAULT_NAMES,
                 seed: int = 0, image_size: Optional[int] = 512,
                 captioner: Optional[Captioner] = None, min_face: float = 40, max_side: Optional[int] = 960,
                 min_detections: int = 2, pair_context: float = 2.2, solo_context: float = 3.0) -> ClipResult:
    """Detect, track and cluster faces in one clip (a video file or a re-iterable list of Frames) and build
    its conversation, or say why not. `clip` (e.g. the file's path under the video folder) is the source
    'video:<clip>', seeds the names with `seed`, and gives the id 'vid-<clip without suffix>' unless `conv_id`.
    Faces narrower than `min_face` are ignored everywhere, also when deciding that someone is alone."""
    pool = list(dict.fromkeys(map(str, names)))
    if len(pool) < 2:
        raise ValueError(f"need at least two distinct names to choose from, got {list(names)}")

    def frames():
        return read_frames(source, fps, decoder) if isinstance(source, (str, Path)) else iter(source)

    # -- pass 1: faces on every sampled frame ------------------------------------------------------------
    per_sample, shapes, times, counts = [], {}, {}, {}
    try:
        for f in frames():
            per_sample.append(detect_faces(embedder, f, min_face, max_side))
            shapes[f.index], times[f.index], counts[f.index] = f.pixels.shape, f.time, len(per_sample[-1])
    except VideoReadError as e:
        return ClipResult(clip, "unreadable", str(e))
    if not per_sample:
        return ClipResult(clip, "unreadable", "no frames decoded")
    tracks = track_faces(per_sample, threshold if link_threshold is None else link_threshold)
    ids, noise = cluster_identities(tracks, threshold, min_detections)
    stats = f"{len(per_sample)} frames, {sum(map(len, per_sample))} faces, {len(tracks)} tracks"
    if len(ids) != 2:
        return ClipResult(clip, _count_reason(len(ids)), stats)

    # -- choose frames -----------------------------------------------------------------------------------
    faces = [{d.sample: d for d in x.detections} for x in ids]
    both = sorted(set(faces[0]) & set(faces[1]))
    if not both:
        return ClipResult(clip, "no frame with both", stats)

    def quality(dets, s, context):  # whole faces, then a crop that fits the frame, then big faces
        return (not any(_touches_border(d.box, shapes[s]) for d in dets),
                _inside_fraction(_window([d.box for d in dets], context), shapes[s]) >= 0.95,
                min(d.width for d in dets), sum(d.score for d in dets), -s)

    pair_s = max(both, key=lambda s: quality([faces[0][s], faces[1][s]], s, pair_context))
    order = sorted((0, 1), key=lambda i: faces[i][pair_s].box[0] + faces[i][pair_s].box[2])  # left first
    rng = np.random.default_rng([seed, zlib.crc32(clip.encode("utf-8"))])
    picked = [str(n) for n in rng.choice(pool, 2, replace=False)]
    name_of = {order[0]: picked[0], order[1]: picked[1]}
    solo = {}
    for i in order:
        other = ids[1 - i]
        alone = [s for s in faces[i] if counts[s] == 1 and not other.spans(s)]
        if not alone:
            side = "left" if i == order[0] else "right"
            return ClipResult(clip, "no solo frame", f"no solo frame for {name_of[i]} (the {side} person); {stats}")
        solo[i] = max(alone, key=lambda s: quality([faces[i][s]], s, solo_context))

    # -- pass 2: fetch the chosen frames, crop, caption --------------------------------------------------
    wanted = {pair_s, solo[order[0]], solo[order[1]]}
    pixels = {}
    try:
        for f in frames():
            if f.index in wanted:
                pixels[f.index] = f.pixels
            if len(pixels) == len(wanted):
                break
    except VideoReadError as e:
        return ClipResult(clip, "unreadable", f"second pass: {e}")
    if len(pixels) != len(wanted):
        return ClipResult(clip, "unreadable", "second pass decoded fewer frames than the first")

    ident = {i: _identity_field(embedder, person_embedding(list(faces[i].values()), shapes)) for i in order}
    captioner = captioner or TemplateCaptioner()
    shots = [(pair_s, order, pair_context, list(picked))] + [(solo[i], [i], solo_context, []) for i in order]
    rounds = []
    for r, (s, who, context, new) in enumerate(shots):
        img_px, boxes = crop_people(pixels[s], [faces[i][s].box for i in who], image_size, context)
        people = [Person(name_of[i], box=b, identity=ident[i]) for i, b in zip(who, boxes)]
        user, assistant = captioner(Shot(img_px, [name_of[i] for i in who], new, r, rng))
        image = Image(pixels=img_px, people=people, attributes={"time_s": f"{times[s]:.2f}"})
        rounds.append(Round(user, [], assistant, image, introduces=new,
                            metadata={"sample": int(s), "time_s": round(float(times[s]), 3)}))
    conv = Conversation(
        id=conv_id or f"vid-{_safe_id(clip)}", rounds=rounds,
        people=[Person(name_of[i], identity=ident[i]) for i in order],
        kind="name_based", source=f"video:{clip}",
        metadata={"clip": clip, "fps": fps, "backend": getattr(embedder, "name", type(embedder).__name__),
                  "threshold": threshold, "boxes": "face boxes in the assistant image's pixels",
                  "frames": len(per_sample), "faces": sum(map(len, per_sample)), "tracks": len(tracks),
                  "ignored_faces": sum(len(x.samples) for x in noise),
                  "identity_similarity": round(float(ids[0].embedding @ ids[1].embedding), 4),
                  "identities": {name_of[i]: {
                      "detections": len(faces[i]), "tracks": len(ids[i].tracks),
                      "first_s": round(min(d.time for d in faces[i].values()), 3),
                      "last_s": round(max(d.time for d in faces[i].values()), 3),
                      "min_similarity_to_mean": round(min(float(d.embedding @ ids[i].embedding)
                                                          for d in faces[i].values()), 4),
                  } for i in order}})
    validate(conv)
    return ClipResult(clip, "kept", stats, conv)


# ----------------------------------------------------------------------------------------------------------
# Folder builder and CLI
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    results: list  # list[ClipResult]

    @property
    def kept(self) -> list:
        return [r for r in self.results if r.kept]

    @property
    def dropped(self) -> list:
        return [r for r in self.results if not r.kept]

    def to_dict(self) -> dict:
        return {"kept": len(self.kept), "dropped": len(self.dropped),
                "clips": [{"clip": r.clip, "reason": r.reason, "detail": r.detail, "conversation": r.path}
                          for r in self.results]}

    def summary(self, per_clip: bool = True) -> str:
        counts: dict = {}
        for r in self.dropped:
            counts[r.reason] = counts.get(r.reason, 0) + 1
        lines = [f"kept {len(self.kept)} of {len(self.results)} clips" +
                 (f"; dropped: {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}" if counts else "")]
        lines += [f"  {r.clip}: {r.reason}" + (f" ({r.detail})" if r.detail else "") for r in self.results if per_clip]
        return "\n".join(lines)


def default_thresholds(embedder, threshold: Optional[float], link_threshold: Optional[float]) -> tuple:
    name = getattr(embedder, "name", None)
    if threshold is None:
        known = [b for b, v in backends.BACKENDS.items() if v.same_person is not None]
        if name not in known:
            raise ValueError(f"no default identity threshold for embedder {name!r} (known: "
                             f"{', '.join(known)}); pass threshold=<cosine>")
        threshold = backends.BACKENDS[name].same_person
    if link_threshold is None:
        link = backends.BACKENDS[name].track_link if name in backends.BACKENDS else None
        link_threshold = min(threshold if link is None else link, threshold)
    return threshold, link_threshold


def find_videos(video_dir: Union[str, Path]) -> list:
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise FileNotFoundError(f"video folder not found: {video_dir}")
    return sorted(p for p in video_dir.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def build_from_videos(video_dir: Union[str, Path], out_dir: Union[str, Path], *, embedder=None, backend: str = "auto",
                      threshold: Optional[float] = None, link_threshold: Optional[float] = None,
                      names: Optional[Sequence[str]] = None, verbose: bool = True, **clip_kwargs) -> Report:
    """Every video under `video_dir` -> OUT/conversations/<id>.json (+ images/) for the clips kept, and
    OUT/report.json. `embedder`: any IdentityEmbedder (default `make_identity_embedder(backend)`);
    `clip_kwargs` go to `process_clip` (fps, decoder, seed, image_size, captioner, min_face, ...)."""
    if embedder is None:
        embedder = backends.make_identity_embedder(backend)
    threshold, link_threshold = default_thresholds(embedder, threshold, link_threshold)
    names = DEFAULT_NAMES if names is None else names
    video_dir, out_dir = Path(video_dir), Path(out_dir)
    conv_dir = out_dir / "conversations"
    results, used = [], set()
    for path in find_videos(video_dir):
        rel = path.relative_to(video_dir).as_posix()
        conv_id = f"vid-{_safe_id(rel)}"
        conv_id = conv_id if conv_id not in used else f"{conv_id}_{path.suffix.lstrip('.').lower()}"
        used.add(conv_id)
        t0 = time.time()
        res = process_clip(path, rel, embedder, threshold=threshold, link_threshold=link_threshold,
                           conv_id=conv_id, names=names, **clip_kwargs)
        if res.conversation is not None:
            json_path = conv_dir / f"{res.conversation.id}.json"
            save_conversation(res.conversation, json_path, image_dir="images")
            res.path = str(json_path)
        results.append(res)
        if verbose:
            print(f"{rel}: {res.reason}" + (f" ({res.detail})" if res.detail else "") + f" [{time.time() - t0:.1f}s]")
    report = Report(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    if verbose:
        print(report.summary(per_clip=False))
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = cli.parser(cli.prog(module="cig_jax.data.video"), "Build name-based conversations from two-person video clips.")
    ap.add_argument("--videos", required=True, help="folder of clips (searched recursively)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--backend", default="auto", choices=backends.choices(),
                    help="face embedder (the 'face' extra; auto: insightface if its pack is found, else dlib)")
    ap.add_argument("--fps", type=float, default=2.0, help="frames sampled per second")
    ap.add_argument("--size", type=int, default=512, help="side of the square output images")
    ap.add_argument("--seed", type=int, default=0, help="name choice and phrasing")
    ap.add_argument("--threshold", type=float, default=None, help="identity cosine threshold (default per backend)")
    ap.add_argument("--min-face", type=float, default=40, help="smallest face width kept, in frame pixels")
    ap.add_argument("--decoder", default="auto", choices=["auto", "pyav", "opencv"],
                    help="clip decoder (pyav: the 'video' extra; auto: PyAV when installed, else OpenCV)")
    ap.add_argument("--captioner", default=None, help="local transformers image-to-text model dir (default: templates)")
    args = ap.parse_args(argv)
    captioner = HFCaptioner(args.captioner) if args.captioner else None
    build_from_videos(args.videos, args.out, backend=args.backend, threshold=args.threshold, fps=args.fps,
                      image_size=args.size, seed=args.seed, min_face=args.min_face, decoder=args.decoder,
                      captioner=captioner)


if __name__ == "__main__":
    cli.run_main(main)
