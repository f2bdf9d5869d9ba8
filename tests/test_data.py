"""The data pipeline: synthetic records through the TFDS builder (array_record) and back through grain."""
import dataclasses

import numpy as np
import pytest

from cig_jax.data import schema, synthetic
from cig_jax.data.chat_template import ChatTemplate, build_tiny_tokenizer
from cig_jax.data.pipeline import PipelineOptions, SkipCounter, make_dataset, markov_view
from cig_jax.data.tfds_builder import build_dataset, load_records

OPTS = PipelineOptions(seq_len=384, max_images=8, image_size=16, batch_size=4, seed=3)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return ChatTemplate(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")), num_image_tokens=4)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    build_dataset(data_dir, source="synthetic", num_train=24, num_val=4, seed=0, size=32)
    return load_records(data_dir, "train")


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


def test_same_seed_gives_byte_identical_batches(records, template):
    a = _take(make_dataset(records, template, OPTS), 5)
    b = _take(make_dataset(records, template, OPTS), 5)
    for x, y in zip(a, b):
        _same(x, y)
    c = _take(make_dataset(records, template, dataclasses.replace(OPTS, seed=4)), 1)[0]
    assert c["record_index"].tolist() != a[0]["record_index"].tolist()
    assert a[0]["input_ids"].shape == (4, 384) and a[0]["images"].shape == (4, 8, 16, 16, 3)
    # loss only on assistant outputs: every loss position is a text token
    assert np.all(a[0]["role"][a[0]["loss_mask"] == 1] == 0)


def test_processes_get_disjoint_shards_covering_the_split(records, template):
    seen = []
    for pid in range(2):
        opts = dataclasses.replace(OPTS, num_epochs=1, batch_size=1, process_index=pid, process_count=2)
        seen.append({int(b["record_index"][0]) for b in make_dataset(records, template, opts)})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(records)))


def test_iterator_state_restores_exactly(records, template):
    ds = make_dataset(records, template, OPTS)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = iter(make_dataset(records, template, OPTS))
    resumed.set_state(state)
    for want in expected:
        _same(next(resumed), want)


def test_round3_needs_an_attribute_only_visible_in_round1_image(records):
    checked = 0
    for conv in records:
        if conv.kind != "name_based":
            continue
        round1, round3 = conv.rounds[0], conv.rounds[2]
        target = round3.assistant_image.people[0]
        in_round1_image = {p.name: p.attributes for p in round1.assistant_image.people}[target.name]
        image_only = conv.metadata["image_only_attributes"][target.name]
        assert image_only, conv.id
        for attr in image_only:
            assert in_round1_image[attr] == target.attributes[attr]
        assert any(target.attributes[a].replace("_", " ") not in round1.user_text for a in image_only)
        checked += 1
    assert checked >= 3


def test_bad_records_are_skipped_and_counted(records, template, tmp_path):
    good = [records[i] for i in range(8)]
    missing = dataclasses.replace(good[0], base_dir=str(tmp_path), rounds=[
        dataclasses.replace(good[0].rounds[0], assistant_image=schema.Image(path="nowhere.png"))] + good[0].rounds[1:])
    named = next(c for c in good if c.kind == "name_based")
    first = named.people[0].name
    unknown = dataclasses.replace(named, rounds=[dataclasses.replace(named.rounds[0], introduces=[first])]
                                  + named.rounds[1:])
    long = dataclasses.replace(good[1], rounds=[dataclasses.replace(good[1].rounds[0],
                                                                    user_text="tell me more " * 300)])
    mixed = good + [missing, unknown, long]
    skips = SkipCounter()
    opts = dataclasses.replace(OPTS, num_epochs=1, batch_size=1, shuffle=False)
    got = [int(b["record_index"][0]) for b in make_dataset(mixed, template, opts, skips)]
    assert got == list(range(8))
    assert dict(skips.counts) == {"missing image": 1, "unknown name": 1, "too long": 1}


def test_markov_view_keeps_only_the_last_round_and_its_previous_output():
    conv = synthetic.make_conversation("markov_edit", 0, 1, size=32)
    view = markov_view(conv)
    assert len(view.rounds) == 1
    assert view.rounds[0].assistant_image == conv.rounds[-1].assistant_image
    assert any(img == conv.rounds[-2].assistant_image for img in view.rounds[0].user_images)


def test_detokenizer_images_read_every_identity_from_the_record(records):
    """The image pipeline takes identities from the records (the array_record round trip keeps them), never from
    the renderer: one person -> its code for the whole image; two -> both, each bound to its box."""
    from cig_jax.data import world
    from cig_jax.data.pipeline import image_example

    conv = next(records[i] for i in range(len(records)) if records[i].kind == "name_based")
    pair, solo = conv.rounds[0].assistant_image, conv.rounds[1].assistant_image
    ex = image_example(solo, conv, 16, 128, max_identities=2)
    np.testing.assert_array_equal(ex["identity_mask"], [1, 0])
    np.testing.assert_allclose(ex["identity"][0], world.identity_embedding(solo.people[0].attributes, 128), atol=1e-7)
    np.testing.assert_array_equal(ex["identity_boxes"][0], [0, 0, 1, 1])
    ex = image_example(pair, conv, 16, 128, max_identities=2)
    np.testing.assert_array_equal(ex["identity_mask"], [1, 1])
    side = pair.pixels.shape[0] if pair.pixels is not None else 32
    for k, p in enumerate(pair.people):
        np.testing.assert_allclose(ex["identity"][k], world.identity_embedding(p.attributes, 128), atol=1e-7)
        np.testing.assert_allclose(ex["identity_boxes"][k], np.asarray(p.box) / side, atol=1e-6)
    # a record whose people carry no identity gives none, whatever attributes it has
    bare = dataclasses.replace(pair, people=[dataclasses.replace(p, identity=None) for p in pair.people])
    assert image_example(bare, conv, 16, 128)["identity_mask"].sum() == 0
    # an embedding of another width is an error naming the record, not a silent drop
    odd = dataclasses.replace(pair, people=[dataclasses.replace(pair.people[0], identity=schema.PersonIdentity.of(
        "dlib", np.ones(128, np.float32)))])
    with pytest.raises(ValueError, match=r"a dlib identity embedding of 128 values, but the model's identity width"):
        image_example(odd, conv, 16, 512)
