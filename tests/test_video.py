"""Video -> name-based conversations: a rendered two-person clip through dlib, and the frame-choice rules
on clips of coloured squares seen by a stub embedder."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFilter

from cig_jax.data import schema, video
from cig_jax.data import schema_io
from cig_jax.data.video import Frame, build_from_videos, process_clip
from cig_jax.faces.backends import BACKENDS
from cig_jax.faces.identity import Face

FPS = 10  # rendered clip
SAMPLE_FPS = 5  # sampled by the builder
W, H = 320, 240
# Face boxes (x0, y0, x1, y1) of three people in insightface's t1.jpg.
T1_FACES = {"A": (1118, 283, 1227, 391), "B": (67, 283, 176, 391), "C": (724, 367, 833, 475)}


# ----------------------------------------------------------------------------------------------------------
# A rendered clip: real faces (crops of t1.jpg) moving over an animated background
# ----------------------------------------------------------------------------------------------------------
def _t1() -> PILImage.Image:
    insightface = pytest.importorskip("insightface")
    return PILImage.open(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").convert("RGB")


def _head(t1: PILImage.Image, who: str, face_px: float, angle: float, gain: float):
    """A soft-edged head crop with a face about `face_px` wide. -> (pixels [S, S, 3] float, alpha [S, S])."""
    x0, y0, x1, y1 = T1_FACES[who]
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, 1.1 * (x1 - x0)
    crop = t1.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half))).rotate(angle, PILImage.BICUBIC)
    side = int(round(face_px * 2.2))
    crop = crop.resize((side, side), PILImage.LANCZOS)
    mask = PILImage.new("L", (side, side), 0)
    ImageDraw.Draw(mask).ellipse([side * 0.08, side * 0.02, side * 0.92, side * 1.1], fill=255)
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(side * 0.04)), np.float32) / 255
    return np.asarray(crop, np.float32) * gain, alpha


def _paste(frame: np.ndarray, head, x: int, y: int) -> None:
    px, alpha = head
    s = alpha.shape[0]
    fx0, fy0, fx1, fy1 = max(x, 0), max(y, 0), min(x + s, W), min(y + s, H)
    if fx0 >= fx1 or fy0 >= fy1:
        return
    a = alpha[fy0 - y:fy1 - y, fx0 - x:fx1 - x, None]
    frame[fy0:fy1, fx0:fx1] = frame[fy0:fy1, fx0:fx1] * (1 - a) + px[fy0 - y:fy1 - y, fx0 - x:fx1 - x] * a


def _background(t: float) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    return np.stack([120 + 60 * np.sin(x / 37 + t * 3), 110 + 50 * np.cos(y / 29 - t * 2),
                     140 + 40 * np.sin((x + y) / 53 + t)], -1)


def _lerp(k, k0, k1, v0, v1):
    return v0 + (v1 - v0) * min(max((k - k0) / (k1 - k0), 0.0), 1.0)


def two_person_schedule(k: int) -> dict:
    """Head top-left corners at frame k (None = off screen). A walks in from the left (frames 0-8), B from the
    right (24-32), A walks out to the left (50-58): A alone, then both, then B alone."""
    ax = _lerp(k, 0, 8, -140, 24) if k < 50 else _lerp(k, 50, 58, 24, -160)
    bx = _lerp(k, 24, 32, W + 10, 176)
    return {"A": (int(ax), int(50 + 12 * np.sin(k / 5))), "B": (int(bx), int(70 + 10 * np.cos(k / 4)))}


def one_person_schedule(k: int) -> dict:
    return {"C": (int(_lerp(k, 0, 30, 10, 170)), 60)}


def render_clip(path: Path, schedule, frames: int) -> list:
    """Encodes the clip (PyAV H.264, else OpenCV mp4v). -> per frame, the set of people whose face is wholly
    on screen."""
    t1 = _t1()
    visible, pixels = [], []
    for k in range(frames):
        frame = _background(k / FPS)
        seen = set()
        for i, (who, (x, y)) in enumerate(sorted(schedule(k).items())):
            face_px = 60 + 8 * np.sin(k / 7 + i)  # 52..68 px
            head = _head(t1, who, face_px, angle=6 * np.sin(k / 9 + 2 * i), gain=1 + 0.12 * np.sin(k / 11 + i))
            _paste(frame, head, x, y)
            s = head[1].shape[0]
            if 0.2 * s >= -x and x + 0.8 * s <= W:  # face box is roughly the middle 55% of the head crop
                seen.add(who)
        visible.append(seen)
        pixels.append(np.clip(frame, 0, 255).astype(np.uint8))
    try:
        import av

        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            for p in pixels:
                for packet in stream.encode(av.VideoFrame.from_ndarray(p, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    except ImportError:
        import cv2

        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (W, H))
        for p in pixels:
            writer.write(np.ascontiguousarray(p[..., ::-1]))
        writer.release()
    return visible


@pytest.fixture(scope="module")
def dlib_embedder():
    pytest.importorskip("dlib")
    from cig_jax.faces.backends import make_identity_embedder

    return make_identity_embedder("dlib")


@pytest.fixture(scope="module")
def built(tmp_path_factory, dlib_embedder):
    root = tmp_path_factory.mktemp("video")
    clips = root / "clips"
    clips.mkdir()
    visible = render_clip(clips / "pair.mp4", two_person_schedule, 80)
    render_clip(clips / "solo.mp4", one_person_schedule, 40)
    (clips / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    report = build_from_videos(clips, root / "out", embedder=dlib_embedder, fps=SAMPLE_FPS, image_size=128, seed=3,
                               verbose=False)
    return report, visible, root / "out"


def test_two_person_clip_becomes_three_rounds_with_the_right_people(built):
    report, visible, out = built
    (res,) = [r for r in report.results if r.clip == "pair.mp4"]
    assert res.kept, res.detail
    conv = schema_io.load_conversation(res.path)
    assert (conv.kind, conv.source, len(conv.rounds)) == ("name_based", "video:pair.mp4", 3)
    a_name, b_name = [p.name for p in conv.people]
    assert conv.rounds[0].introduces == [a_name, b_name]
    frame_of = [int(round(rnd.metadata["time_s"] * FPS)) for rnd in conv.rounds]
    # Round 1: both people on screen, A (who enters first, from the left) on the left.
    assert visible[frame_of[0]] == {"A", "B"}
    assert two_person_schedule(frame_of[0])["A"][0] < two_person_schedule(frame_of[0])["B"][0]
    # Rounds 2 and 3: the left person's name shows A alone, the right person's name shows B alone.
    assert visible[frame_of[1]] == {"A"} and visible[frame_of[2]] == {"B"}
    for rnd, names in zip(conv.rounds, ([a_name, b_name], [a_name], [b_name])):
        img = rnd.assistant_image
        assert [p.name for p in img.people] == names
        assert img.load(conv.base_dir).shape == (128, 128, 3)
        for p in img.people:  # a face box of sensible size inside the image
            assert 15 <= p.box[2] - p.box[0] <= 100
        assert schema.mentioned_names(rnd.user_text, [a_name, b_name]) == names
    # Clustering: each identity was seen from its first to its last on-screen stretch, and nowhere else.
    for who, name in (("A", a_name), ("B", b_name)):
        on = [k for k, v in enumerate(visible) if who in v]
        stats = conv.metadata["identities"][name]
        assert on[0] / FPS - 0.3 <= stats["first_s"] <= on[0] / FPS + 0.3
        assert on[-1] / FPS - 0.3 <= stats["last_s"] <= on[-1] / FPS + 0.3
        assert stats["detections"] >= 0.8 * len(on) * SAMPLE_FPS / FPS
        assert stats["min_similarity_to_mean"] > BACKENDS["dlib"].same_person
    assert conv.metadata["identity_similarity"] < BACKENDS["dlib"].same_person


def test_single_person_and_broken_clips_are_dropped_with_reasons(built):
    report, _, out = built
    reasons = {r.clip: r.reason for r in report.results}
    assert reasons == {"pair.mp4": "kept", "solo.mp4": "one identity", "broken.mp4": "unreadable"}
    saved = json.loads((out / "report.json").read_text())
    assert (saved["kept"], saved["dropped"]) == (1, 2)
    assert sorted(p.name for p in (out / "conversations").glob("*.json")) == ["vid-pair.json"]
    assert "1 one identity" in report.summary() and "1 unreadable" in report.summary()


def test_opencv_decoder_samples_the_same_frames_as_pyav(built):
    pytest.importorskip("av")
    pytest.importorskip("cv2")
    path = built[2].parent / "clips" / "pair.mp4"
    a = list(video.read_frames(path, fps=2, decoder="pyav"))
    b = list(video.read_frames(path, fps=2, decoder="opencv"))
    assert [f.index for f in a] == [f.index for f in b] and len(a) == 16
    assert np.allclose([f.time for f in a], [f.time for f in b])
    assert max(np.abs(x.pixels.astype(int) - y.pixels.astype(int)).mean() for x, y in zip(a, b)) < 3


def test_auto_decoder_falls_back_to_opencv_without_pyav(built, monkeypatch):
    pytest.importorskip("cv2")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    frames = list(video.read_frames(built[2].parent / "clips" / "pair.mp4", fps=1))
    assert len(frames) == 8 and frames[0].pixels.shape == (H, W, 3)


# ----------------------------------------------------------------------------------------------------------
# Frame-choice rules with a stub embedder: each colour is a person, its square is their face
# ----------------------------------------------------------------------------------------------------------
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class SquareEmbedder:
    """Finds solid squares of known colours; the embedding is the colour's axis plus a little noise."""

    name = "squares"
    embedding_dim = 8

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def detect(self, image):
        faces = []
        for k, c in enumerate(COLOURS.values()):
            ys, xs = np.nonzero(np.all(image == c, axis=-1))
            if len(xs):
                emb = np.eye(self.embedding_dim, dtype=np.float32)[k] + 0.05 * self.rng.standard_normal(8).astype(np.float32)
                box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                faces.append(Face(box, np.zeros((5, 2), np.float32), 1.0, np.zeros((112, 112, 3), np.uint8),
                                  emb / np.linalg.norm(emb)))
        return faces

    def embed_crops(self, crops):
        raise NotImplementedError


def square_clip(layout: list) -> list:
    """layout: per frame {colour: (x, y, side)} -> Frames (1 per second) on a grey 200x120 canvas."""
    frames = []
    for k, people in enumerate(layout):
        px = np.full((120, 200, 3), 128, np.uint8)
        for colour, (x, y, s) in people.items():
            px[y:y + s, x:x + s] = COLOURS[colour]
        frames.append(Frame(k, float(k), px))
    return frames


def run(layout, **kw):
    kw = {"threshold": 0.9, "names": ["Ada", "Bo", "Cy", "Di"], "image_size": 64, "min_face": 10, **kw}
    return process_clip(square_clip(layout), "squares", SquareEmbedder(), **kw)


R, G, B = ({"red": (20, 30, 40)}, {"green": (130, 30, 40)}, {"blue": (80, 60, 40)})


def test_three_people_clip_is_dropped():
    res = run([R, R, {**R, **G}, {**R, **G}, G, B, B])
    assert (res.kept, res.reason) == (False, "three identities")


def test_people_who_never_share_a_frame_are_dropped():
    assert run([R, R, R, G, G, G]).reason == "no frame with both"


def test_person_never_alone_is_named_in_the_reason():
    res = run([R, R, {**R, **G}, {**R, **G}, {**R, **G}])
    assert res.reason == "no solo frame" and "the right person" in res.detail


def test_missed_detection_inside_a_track_is_not_a_solo_frame():
    # Frame 3: green is there but not detected (absent in the layout), and red is at its biggest there.
    big_red = {"red": (10, 10, 60)}
    res = run([{**R, **G}, {**R, **G}, {**R, **G}, big_red, {**R, **G}, R, R, G, G])
    assert res.kept, res.detail
    assert [r.metadata["sample"] for r in res.conversation.rounds[1:]] == [5, 7]


def test_names_are_deterministic_given_seed_and_left_person_comes_first():
    layout = [R, {**R, **G}, {**R, **G}, R, G]
    first = run(layout, seed=1).conversation
    again = run(layout, seed=1).conversation
    assert [p.name for p in first.people] == [p.name for p in again.people]
    assert {p.name for p in first.people} <= {"Ada", "Bo", "Cy", "Di"}
    assert [r.user_text for r in first.rounds] == [r.user_text for r in again.rounds]
    left = first.rounds[1].assistant_image.people[0].name
    assert left == first.people[0].name and first.rounds[0].assistant_image.people[0].name == left
    seeds = {tuple(p.name for p in run(layout, seed=s).conversation.people) for s in range(6)}
    assert len(seeds) > 1


def test_unknown_embedder_needs_an_explicit_threshold(tmp_path):
    (tmp_path / "clips").mkdir()
    with pytest.raises(ValueError, match="pass threshold="):
        build_from_videos(tmp_path / "clips", tmp_path / "out", embedder=SquareEmbedder(), verbose=False)


def test_crop_keeps_far_apart_faces_by_padding():
    px = np.full((100, 400, 3), 200, np.uint8)
    crop, boxes = video.crop_people(px, [(5, 20, 45, 60), (355, 20, 395, 60)], 100, context=2.2)
    assert crop.shape == (100, 100, 3)
    assert boxes[0][0] >= 0 and boxes[1][2] <= 100 and boxes[0][2] < boxes[1][0]
    assert (crop[:10] == 0).all()  # the square is wider than the frame is tall: black above and below


def test_hf_captioner_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(video.CaptionModelNotFoundError, match="never downloads"):
        video.HFCaptioner(tmp_path / "no_such_model")


def _tiny_captioning_model(path: Path) -> list:
    """A random-weight ViT -> GPT-2 image-to-text model with a word-level tokenizer, saved at `path`."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "two", "people", "at", "a", "table", "smiling"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                         pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    enc = transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32)
    dec = transformers.GPT2Config(vocab_size=len(words), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    model = transformers.VisionEncoderDecoderModel(cfg)
    gen = model.generation_config
    gen.decoder_start_token_id, gen.pad_token_id, gen.eos_token_id = 1, 0, 2
    gen.suppress_tokens, gen.min_new_tokens = [0, 1, 3], 2  # always some words
    model.save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return words[4:]


def test_hf_captioner_adds_a_local_model_caption_to_the_template(tmp_path):
    words = _tiny_captioning_model(tmp_path / "captioner")
    captioner = video.HFCaptioner(tmp_path / "captioner", max_new_tokens=4)
    res = run([R, {**R, **G}, {**R, **G}, R, G], captioner=captioner)
    assert res.kept, res.detail
    for rnd in res.conversation.rounds:
        template, caption = rnd.user_text.split(" Scene: ")
        assert schema.mentioned_names(template, [p.name for p in res.conversation.people])
        assert caption.endswith(".") and set(caption[:-1].split()) <= set(words) and caption[:-1].split()


def test_cli_writes_a_report(tmp_path, dlib_embedder):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "broken.mov").write_bytes(b"not a video")
    (tmp_path / "clips" / "notes.txt").write_text("ignored")
    video.main(["--videos", str(tmp_path / "clips"), "--out", str(tmp_path / "out"), "--backend", "dlib"])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(c["clip"], c["reason"]) for c in saved["clips"]] == [("broken.mov", "unreadable")]


def test_video_record_carries_each_persons_embedding_close_to_their_photo(built, dlib_embedder):
    """Each tracked person's embedding (mean of its best faces) is nearer to that person's photo in t1.jpg than
    to the other person's."""
    report, _, _ = built
    (res,) = [r for r in report.results if r.clip == "pair.mp4"]
    conv = schema_io.load_conversation(res.path)
    photo = np.asarray(_t1())
    faces = dlib_embedder.detect(photo)

    def photo_embedding(who):
        box = T1_FACES[who]
        return max(faces, key=lambda f: -sum(abs(a - b) for a, b in zip(f.box, box))).embedding

    a_name, b_name = [p.name for p in conv.people]  # A is the left person, B the right
    ref = {a_name: photo_embedding("A"), b_name: photo_embedding("B")}
    seen = {}
    for p in conv.people + [q for rnd in conv.rounds for q in rnd.assistant_image.people]:
        assert p.identity is not None and p.identity.backend == "dlib" and len(p.identity.embedding) == 128
        seen.setdefault(p.name, set()).add(p.identity.embedding)
    assert all(len(v) == 1 for v in seen.values())  # one embedding per person, the same in every image
    for name, other in ((a_name, b_name), (b_name, a_name)):
        v = conv.people[[p.name for p in conv.people].index(name)].identity.vector()
        own, cross = float(v @ ref[name]), float(v @ ref[other])
        print(f"{name}: cosine to own photo {own:.3f}, to the other's {cross:.3f}")
        assert own > cross
