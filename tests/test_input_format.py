"""The chat-history input format: the JSON Schema file and data/schema.py accept and refuse the same histories,
and the Hugging Face / OpenAI `messages` form reads into the same conversation as our own form."""
import base64
import copy
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from cig_jax.data import messages, schema
from cig_jax.data import schema_io

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "cig_jax" / "data" / "conversation.schema.json").read_text())
EXAMPLE = json.loads((ROOT / "examples" / "two_friends.json").read_text())


def _ours_accepts(d) -> bool:
    try:
        schema.validate(schema_io.conversation_from_dict(d), check_images=False)
        return True
    except schema.SchemaError:
        return False


def _schema_accepts(d) -> bool:
    try:
        jsonschema.validate(d, SCHEMA, cls=jsonschema.Draft202012Validator)
        return True
    except jsonschema.ValidationError:
        return False


def _edit(fn):
    d = copy.deepcopy(EXAMPLE)
    fn(d)
    return d


GOOD = {
    "the example": EXAMPLE,
    "minimal": {"rounds": [{"user_text": "hi"}]},
    "a person with a dlib identity": {"people": [{"name": "A", "identity": {"backend": "dlib", "embedding": [0.5] * 128}}],
                                      "rounds": [{"user_text": "x"}]},
    "image only turn": {"rounds": [{"user_text": "", "user_images": ["a.png"]}]},
    "image as mapping with people": {"rounds": [{"user_text": "x", "user_images": [
        {"path": "a.png", "people": [{"name": "Ann", "box": [0, 0, 4, 4]}], "attributes": {"scene": "park"}}]}]},
    "answered with image": {"rounds": [{"user_text": "draw", "assistant_text": "ok", "assistant_image": "b.png"}]},
    "null box": {"rounds": [{"user_text": "x", "user_images": [{"path": "a.png", "people": [{"name": "A", "box": None}]}]}]},
    "pending round with metadata": {"version": 1, "id": "c", "kind": "chat", "source": "", "people": [],
                                    "rounds": [{"user_text": "x", "assistant_text": None, "metadata": {"k": 1}}],
                                    "metadata": {}},
}
BAD = {
    "identity of an unknown backend": {"people": [{"name": "A", "identity": {"backend": "clip", "embedding": [0.1]}}],
                                       "rounds": [{"user_text": "x"}]},
    "dlib identity of the wrong length": {"people": [{"name": "A", "identity": {"backend": "dlib",
                                                                                 "embedding": [0.1, 0.2, 0.3]}}],
                                          "rounds": [{"user_text": "x"}]},
    "not a mapping": [1, 2],
    "no rounds key": {"id": "x"},
    "empty rounds": {"rounds": []},
    "unknown top field": {"rounds": [{"user_text": "x"}], "colour": "red"},
    "unknown round field": {"rounds": [{"user_text": "x", "assistant": "y"}]},
    "missing user_text": {"rounds": [{"user_images": ["a.png"]}]},
    "empty user turn": {"rounds": [{"user_text": ""}]},
    "user_text a number": {"rounds": [{"user_text": 3}]},
    "version too new": {"version": 2, "rounds": [{"user_text": "x"}]},
    "version a bool": {"version": True, "rounds": [{"user_text": "x"}]},
    "image a number": {"rounds": [{"user_text": "x", "user_images": [7]}]},
    "image mapping without path": {"rounds": [{"user_text": "x", "user_images": [{"people": []}]}]},
    "image unknown field": {"rounds": [{"user_text": "x", "user_images": [{"path": "a.png", "url": "u"}]}]},
    "box of 3": {"rounds": [{"user_text": "x", "user_images": [{"path": "a", "people": [{"name": "A", "box": [1, 2, 3]}]}]}]},
    "box with a bool": {"rounds": [{"user_text": "x", "user_images": [
        {"path": "a", "people": [{"name": "A", "box": [0, 0, True, 4]}]}]}]},
    "negative box": {"rounds": [{"user_text": "x", "user_images": [{"path": "a", "people": [{"name": "A", "box": [-1, 0, 3, 4]}]}]}]},
    "cast member with a box": {"people": [{"name": "A", "box": [0, 0, 1, 1]}], "rounds": [{"user_text": "x"}]},
    "person without name": {"people": [{"attributes": {}}], "rounds": [{"user_text": "x"}]},
    "attribute not a string": {"people": [{"name": "A", "attributes": {"age": 3}}], "rounds": [{"user_text": "x"}]},
    "introduces a number": {"rounds": [{"user_text": "x", "introduces": [1]}]},
    "metadata a list": {"rounds": [{"user_text": "x", "metadata": []}]},
    "assistant_text a list": {"rounds": [{"user_text": "x", "assistant_text": ["a"]}]},
    "example with a bad field": _edit(lambda d: d["rounds"][0].update(user_images="a.png")),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_json_schema_and_validation_accept_the_same_histories(name):
    assert _ours_accepts(GOOD[name]) and _schema_accepts(GOOD[name]), name


@pytest.mark.parametrize("name", sorted(BAD))
def test_json_schema_and_validation_refuse_the_same_histories(name):
    assert not _ours_accepts(BAD[name]), name
    assert not _schema_accepts(BAD[name]), name


def _png_data_url(pixels) -> str:
    return "data:image/png;base64," + base64.b64encode(schema.encode_png(pixels)).decode()


def test_messages_form_reads_as_the_same_conversation(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    (tmp_path / "ann.png").write_bytes(schema.encode_png(pixels))
    msgs = {"id": "m1", "messages": [
        {"role": "system", "content": "You draw pictures."},
        {"role": "user", "content": [{"type": "image", "image": "ann.png"}, {"type": "text", "text": "This is Ann."}]},
        {"role": "assistant", "content": "Nice to meet Ann."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                     {"type": "image_url", "image_url": {"url": _png_data_url(pixels)}},
                                     {"type": "text", "text": " with her."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Here."}, {"type": "image", "path": "ann.png"}]},
        {"role": "user", "content": "Now at the beach."},
    ]}
    (tmp_path / "m1.json").write_text(json.dumps(msgs))
    conv = messages.load_any(tmp_path / "m1.json")
    ours = {"id": "m1", "rounds": [
        {"user_text": "This is Ann.", "user_images": ["ann.png"], "assistant_text": "Nice to meet Ann."},
        {"user_text": "Compare <image> with her.", "user_images": ["x.png"], "assistant_text": "Here.",
         "assistant_image": "ann.png"},
        {"user_text": "Now at the beach."}]}
    expected = schema_io.conversation_from_dict(ours, base_dir=tmp_path)
    assert [(r.user_text, r.assistant_text, len(r.user_images), r.pending) for r in conv.rounds] == \
        [(r.user_text, r.assistant_text, len(r.user_images), r.pending) for r in expected.rounds]
    assert schema.pending_rounds(conv) == [2]
    full = schema.with_pixels(conv)
    for _, im in schema.iter_images(full):
        assert np.array_equal(im.pixels, pixels)
    assert conv.metadata["system"] == ["You draw pictures."]
    (tmp_path / "ours.json").write_text(json.dumps(dict(ours, rounds=ours["rounds"][:1])))
    assert messages.load_any(tmp_path / "ours.json").rounds[0].user_text == "This is Ann."  # our form still reads


@pytest.mark.parametrize("bad, expected", [
    ([{"role": "assistant", "content": "hi"}], "must follow a user message"),
    ([{"role": "user", "content": [{"type": "image", "image": "https://example.com/a.png"}]}], "not downloaded"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "text, image or image_url"),
    ([{"role": "robot", "content": "x"}], "role"),
])
def test_messages_form_refuses_what_it_cannot_read_with_a_message(bad, expected, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(schema.SchemaError, match=expected) as e:
        messages.load_any(path)
    assert str(e.value).startswith(str(path))
