"""The data pipeline: synthetic records through the TFDS builder (array_record) and back through grain."""
import dataclasses

import numpy as np
import pytest

from cig_jax.data import schema, synthetic
from cig_jax.data import schema_io
from cig_jax.data.pipeline import PipelineOptions, SkipCounter, make_dataset, markov_view
from cig_jax.data.tfds_builder import build_dataset, load_records

from batch_checks import assert_same, take

OPTS = PipelineOptions(seq_len=384, max_images=8, image_size=16, batch_size=4, seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    build_dataset(data_dir, source="synthetic", num_train=24, num_val=4, seed=0, size=32)
    return data_dir


@pytest.fixture(scope="module")
def records(data_dir):
    return load_records(data_dir, "train")


def test_same_seed_gives_byte_identical_batches(records, template):
    a = take(make_dataset(records, template, OPTS), 5)
    b = take(make_dataset(records, template, OPTS), 5)
    for x, y in zip(a, b):
        assert_same(x, y)
    c = take(make_dataset(records, template, dataclasses.replace(OPTS, seed=4)), 1)[0]
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
        assert_same(next(resumed), want)


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
    tagged = dataclasses.replace(good[2], rounds=[dataclasses.replace(  # a text that would end the conversation
        good[2].rounds[0], assistant_text="Here </s> it is.")] + good[2].rounds[1:])
    mixed = good + [missing, unknown, long, tagged]
    skips = SkipCounter()
    opts = dataclasses.replace(OPTS, num_epochs=1, batch_size=1, shuffle=False)
    got = [int(b["record_index"][0]) for b in make_dataset(mixed, template, opts, skips)]
    assert got == list(range(8))
    assert dict(skips.counts) == {"missing image": 1, "unknown name": 1, "too long": 1, "layout token in text": 1}


def test_markov_view_keeps_only_the_last_round_and_its_previous_output():
    conv = synthetic.make_conversation("markov_edit", 0, 1, size=32)
    view = markov_view(conv)
    assert len(view.rounds) == 1
    assert view.rounds[0].assistant_image == conv.rounds[-1].assistant_image
    assert any(img == conv.rounds[-2].assistant_image for img in view.rounds[0].user_images)


def test_kind_selection_and_image_counts_read_no_record(records, monkeypatch):
    """The build stores each record's kind and image count: selecting by kind and listing a detokenizer
    stage's images decode nothing; what they report equals the decoded records."""
    from cig_jax.data import pipeline, sources, tfds_builder

    truth = [(records[i].kind, len(list(schema.iter_images(records[i])))) for i in range(len(records))]
    decoded = []
    real = tfds_builder.example_to_conversation
    monkeypatch.setattr(tfds_builder, "example_to_conversation", lambda ex: decoded.append(1) or real(ex))
    subset = sources.KindSubset(records, ["single_turn", "rollback"])
    counts = [sources.num_images(records, i) for i in range(len(records))]
    pipeline.make_image_dataset(subset, OPTS, identity_dim=8)  # builds its (record, image) index
    assert decoded == []
    assert counts == [n for _, n in truth]
    assert [subset.kind(i) for i in range(len(subset))] == [k for k, _ in truth if k in ("single_turn", "rollback")]
    assert len(subset) > 0 and {subset[i].kind for i in range(len(subset))} == {"single_turn", "rollback"}
    assert len(decoded) == len(subset)  # now each record was decoded once, on access


def test_one_opener_for_every_source(data_dir, tmp_path):
    """synthetic draws, array_record splits, JSON folders and JSONL files open through `sources.open_records`
    to the same conversations."""
    import json

    from cig_jax.data import sources

    drawn = sources.open_records("synthetic", num=6, seed=4, size=32, kinds=["name_based"])
    assert [c.id for c in drawn] == [c.id for c in synthetic.generate(6, seed=4, kinds=["name_based"], size=32)]
    folder = tmp_path / "json"
    for c in drawn:
        schema_io.save_conversation(c, folder / f"{c.id}.json")
    lines = [json.dumps(json.loads((folder / f"{c.id}.json").read_text())) for c in drawn]  # paths relative to folder
    (folder / "all.jsonl").write_text("\n".join(lines) + "\n")
    from_folder = sources.open_records(str(folder))
    from_jsonl = sources.open_records(str(folder / "all.jsonl"), num=4)
    assert [c.id for c in from_folder] == sorted(c.id for c in drawn)
    assert [c.id for c in from_jsonl] == [c.id for c in drawn][:4]
    for a, b in zip(from_jsonl, drawn):
        assert a.rounds[0].user_text == b.rounds[0].user_text
    split = sources.open_records("tfds", data_dir=str(data_dir), kinds=["rollback"], num=2)
    assert len(split) == 2 and all(split[i].kind == "rollback" for i in range(2))


def test_grain_worker_processes_give_the_in_process_batches_and_resume_theassert_same(records, template):
    """data.worker_count 2 (grain mp_prefetch) yields the in-process pipeline's batches byte for byte, skipped
    records included (max_images 2 skips some), and its iterator state resumes at the same batch."""
    opts = dataclasses.replace(OPTS, max_images=2)
    skips = SkipCounter()
    ref = take(make_dataset(records, template, opts, skips), 6)
    assert skips.counts  # the check covers skipped records
    it = iter(make_dataset(records, template, dataclasses.replace(opts, worker_count=2, prefetch_buffer=2)))
    got = [next(it) for _ in range(4)]
    state = it.get_state()
    got += [next(it) for _ in range(2)]
    for a, b in zip(ref, got):
        assert_same(a, b)
    resumed = iter(make_dataset(records, template, dataclasses.replace(opts, worker_count=2)))
    resumed.set_state(state)
    assert_same(next(resumed), ref[4])


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
