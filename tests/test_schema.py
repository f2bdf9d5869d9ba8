"""Conversation schema: JSON round trips are byte-stable, and every error names the file, round and field."""
import json

import numpy as np
import pytest
from PIL import Image as PILImage

from cig_jax.data import schema
from cig_jax.data import schema_io
from cig_jax.data.schema import Conversation, Image, Person, Round, SchemaError
from cig_jax.data.synthetic import make_conversation


def _write_chat(tmp_path, d, name="chat.json"):
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


def _png(path, mode="RGB", size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (10, 20, 30), "RGBA": (10, 20, 30, 0), "L": 77, "P": 3, "CMYK": (1, 2, 3, 4)}.get(mode, 1000)
    PILImage.new(mode, size, color).save(path)
    return path


def _chat_with_image(img_path="faces/bob.png"):
    return {
        "id": "c1",
        "kind": "name_based",
        "people": [{"name": "Bob"}],
        "rounds": [
            {"user_text": "This is Bob.", "user_images": [{"path": img_path}], "introduces": ["Bob"],
             "assistant_text": "Hi Bob.", "assistant_image": None},
        ],
    }


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["name_based", "single_turn", "rollback", "markov_edit"])
def test_json_round_trip_is_byte_stable_and_lossless(tmp_path, kind):
    conv = make_conversation(kind, seed=1, index=2)
    first = tmp_path / "a" / "chat.json"
    schema_io.save_conversation(conv, first)
    loaded = schema_io.load_conversation(first)
    schema_io.save_conversation(loaded, first)  # same folder: paths kept, bytes unchanged
    second = tmp_path / "b" / "chat.json"
    schema_io.save_conversation(loaded, second)  # elsewhere: images copied beside it, same relative paths
    assert first.read_bytes() == second.read_bytes()
    assert schema_io.dumps(schema_io.to_dict(schema_io.load_conversation(second))).encode() == second.read_bytes()
    again = schema.with_pixels(schema_io.load_conversation(second))
    for (_, a), (_, b) in zip(schema.iter_images(conv), schema.iter_images(again)):
        assert np.array_equal(a.pixels, b.pixels) and a.people == b.people and a.attributes == b.attributes
    assert [r.user_text for r in again.rounds] == [r.user_text for r in conv.rounds]
    assert again.metadata == conv.metadata and again.people == conv.people
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_minimal_user_chat_gets_defaults(tmp_path):
    p = _write_chat(tmp_path, {"rounds": [{"user_text": "Draw Ann at the beach."}]}, "my_chat.json")
    conv = schema_io.load_conversation(p)
    assert conv.id == "my_chat" and conv.kind == "chat" and schema.pending_rounds(conv) == [0]


def test_pending_rounds_are_the_unanswered_tail():
    conv = make_conversation("name_based", 0, 0)
    conv.rounds[2].assistant_text = None
    conv.rounds[2].assistant_image = None
    conv.rounds.append(Round(user_text="Now both at night."))
    assert schema.pending_rounds(conv) == [2, 3]
    schema.validate(conv)


def test_user_segments_follow_image_markers():
    a, b = Image(pixels=np.zeros((4, 4, 3), np.uint8)), Image(pixels=np.ones((4, 4, 3), np.uint8))
    rnd = Round(user_text="This is Ann <image> and Bob <image>.", user_images=[a, b])
    segs = schema.user_segments(rnd)
    assert [type(s).__name__ for s in segs] == ["str", "Image", "str", "Image", "str"]
    assert segs[1] is a and segs[3] is b
    assert schema.user_segments(Round(user_text="hi", user_images=[a])) == [a, "hi"]


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_supported_image_modes_read_as_rgb(tmp_path, mode):
    px = schema.read_image(_png(tmp_path / f"x_{mode}.png", mode))
    assert px.shape == (8, 8, 3) and px.dtype == np.uint8
    if mode == "RGBA":  # fully transparent -> composited over white
        assert (px == 255).all()


# ---------------------------------------------------------------------------------------------------------
# Errors name file / round / field
# ---------------------------------------------------------------------------------------------------------
def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "chat.json"
    p.write_text('{"rounds": [\n  {"user_text": "a",}\n]}')
    with pytest.raises(SchemaError, match=r"chat\.json: malformed JSON at line 2"):
        schema_io.load_conversation(p)


def test_missing_required_field_names_round(tmp_path):
    p = _write_chat(tmp_path, {"rounds": [{"user_text": "a"}, {"user_images": []}]})
    with pytest.raises(SchemaError, match=r"chat\.json: rounds\[1\]\.user_text: missing required field"):
        schema_io.load_conversation(p)
    with pytest.raises(SchemaError, match=r"chat\.json: rounds: missing required field"):
        schema_io.load_conversation(_write_chat(tmp_path, {"id": "x"}))


def test_wrong_type_names_field(tmp_path):
    d = {"rounds": [{"user_text": "a", "assistant_text": 5}]}
    with pytest.raises(SchemaError, match=r"chat\.json: rounds\[0\]\.assistant_text: expected a string or null, got int 5"):
        schema_io.load_conversation(_write_chat(tmp_path, d))
    d = {"rounds": [{"user_text": "a", "user_images": [{"path": "x.png", "people": [{"name": "A", "box": [0, 1]}]}]}]}
    with pytest.raises(SchemaError, match=r"rounds\[0\]\.user_images\[0\]\.people\[0\]\.box: expected 4 integers"):
        schema_io.load_conversation(_write_chat(tmp_path, d), check_images=False)
    with pytest.raises(SchemaError, match=r"chat\.json: rounds\[0\]\.user_txt: unknown field"):
        schema_io.load_conversation(_write_chat(tmp_path, {"rounds": [{"user_text": "a", "user_txt": "b"}]}))


def test_missing_image_names_round_and_path(tmp_path):
    d = _chat_with_image()
    d["rounds"] = [{"user_text": "Hello."}, {"user_text": "Hello."}] + d["rounds"]
    d["rounds"][0]["assistant_text"] = d["rounds"][1]["assistant_text"] = "ok"
    d["kind"] = "chat"
    with pytest.raises(SchemaError, match=r"chat\.json: rounds\[2\]\.user_images\[0\]\.path: file not found: faces/bob\.png"):
        schema_io.load_conversation(_write_chat(tmp_path, d))


def test_undecodable_image_is_reported(tmp_path):
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "bob.png").write_bytes(b"not a png at all")
    with pytest.raises(SchemaError, match=r"chat\.json: rounds\[0\]\.user_images\[0\]\.path: cannot decode image faces/bob\.png"):
        schema_io.load_conversation(_write_chat(tmp_path, _chat_with_image()))


@pytest.mark.parametrize("mode,suffix", [("CMYK", "tif"), ("I;16", "png")])
def test_unsupported_image_mode_is_refused_with_advice(tmp_path, mode, suffix):
    _png(tmp_path / "faces" / f"bob.{suffix}", mode)
    p = _write_chat(tmp_path, _chat_with_image(f"faces/bob.{suffix}"))
    with pytest.raises(SchemaError, match=rf"rounds\[0\]\.user_images\[0\]\.path: unsupported image mode '{mode}'.*convert it to 8-bit RGB"):
        schema_io.load_conversation(p)


def test_name_used_before_introduction_is_refused(tmp_path):
    d = {
        "kind": "name_based",
        "people": [{"name": "Ann"}, {"name": "Bob"}],
        "rounds": [
            {"user_text": "This is Ann.", "introduces": ["Ann"], "assistant_text": "ok"},
            {"user_text": "Show Ann with Bob.", "assistant_text": "ok"},
            {"user_text": "This is Bob.", "introduces": ["Bob"], "assistant_text": "ok"},
        ],
    }
    with pytest.raises(SchemaError, match=r"chat\.json: rounds\[1\]\.user_text: name 'Bob' is used before it is introduced \(introduced only in rounds\[2\]\)"):
        schema_io.load_conversation(_write_chat(tmp_path, d))
    d["rounds"][2]["introduces"] = ["Carl"]
    with pytest.raises(SchemaError, match=r"rounds\[2\]\.introduces\[0\]: 'Carl' is not in people"):
        schema_io.load_conversation(_write_chat(tmp_path, d))


def test_in_memory_pixels_box_and_marker_checks():
    conv = make_conversation("single_turn", 0, 0)
    conv.rounds[0].assistant_image.pixels = conv.rounds[0].assistant_image.pixels.astype(np.float32)
    with pytest.raises(SchemaError, match=r"conversation 'syn-0-0000000': rounds\[0\]\.assistant_image\.pixels: expected dtype uint8"):
        schema.validate(conv)
    conv = make_conversation("single_turn", 0, 0)
    conv.rounds[0].assistant_image.people[0].box = (0, 0, 10, 999)
    with pytest.raises(SchemaError, match=r"rounds\[0\]\.assistant_image\.people\[0\]\.box: .* outside the 64x64 image"):
        schema.validate(conv)
    conv = make_conversation("single_turn", 0, 0)
    conv.rounds[0].user_text = "<image> and <image>"
    with pytest.raises(SchemaError, match=r"rounds\[0\]\.user_text: 2 '<image>' markers but 1 user_images"):
        schema.validate(conv)


def test_save_refuses_image_without_pixels_or_path(tmp_path):
    conv = Conversation(id="x", rounds=[Round("hi", [Image(people=[Person("A")])])])
    with pytest.raises(SchemaError, match=r"conversation 'x': rounds\[0\]\.user_images\[0\]: has neither 'path' nor pixels"):
        schema_io.save_conversation(conv, tmp_path / "x.json")


def test_person_identity_round_trips_exactly_and_bad_ones_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(128).astype(np.float32)
    conv = make_conversation("single_turn", 0, 0)
    conv.rounds[0].assistant_image.people[0].identity = schema.PersonIdentity.of("dlib", vec)
    conv.people[0].identity = schema.PersonIdentity.of("dlib", vec)
    schema_io.save_conversation(conv, tmp_path / "c.json")
    back = schema_io.load_conversation(tmp_path / "c.json")
    ident = back.rounds[0].assistant_image.people[0].identity
    assert ident.backend == "dlib" and ident.vector().tobytes() == vec.tobytes()  # float32 values exactly
    assert back.people[0].identity == conv.people[0].identity
    # the user image (face reference) carries the synthetic code the generator wrote
    assert back.rounds[0].user_images[0].people[0].identity.backend == "synthetic"
    d = schema_io.to_dict(back)
    for bad, msg in [({"backend": "dlib", "embedding": [0.0] * 127}, r"embedding: a dlib embedding has 128 values, got 127"),
                     ({"backend": "facenet", "embedding": [1.0]}, r"backend: expected one of insightface, dlib, synthetic"),
                     ({"backend": "synthetic", "embedding": [1.0, float("nan")]}, r"embedding: expected a non-empty list"),
                     ({"backend": "dlib"}, r"embedding: missing required field")]:
        d["rounds"][0]["assistant_image"]["people"][0]["identity"] = bad
        with pytest.raises(SchemaError, match=r"rounds\[0\]\.assistant_image\.people\[0\]\.identity\." + msg):
            schema_io.conversation_from_dict(d)
    conv.people[0].identity = schema.PersonIdentity.of("insightface", vec)  # in memory: checked by validate
    with pytest.raises(SchemaError, match=r"people\[0\]\.identity\.embedding: a insightface embedding has 512"):
        schema.validate(conv)
