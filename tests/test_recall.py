"""The recall kind: shortcut-free multi-round data (random naming order, 3-8 rounds, recall distances 1-6,
disjoint name pools, edits kept, content-addressed rollbacks), its ground truth, and the counterfactual name
probe, which a model answering by round position cannot pass and one answering by name passes fully."""
import collections
import json

import numpy as np
import pytest

from cig_jax.data import names as name_pool
from cig_jax.data import schema, synthetic
from cig_jax.data.recall import MAX_DISTANCE, MAX_ROUNDS, MIN_ROUNDS, plan_conversation, restored_look
from cig_jax.data.world import ATTRIBUTES

SEED = 515_151


@pytest.fixture(scope="module")
def plans():
    return [plan_conversation(np.random.default_rng([SEED, i])) for i in range(1000)]


def test_naming_order_is_balanced_over_1000_conversations(plans):
    orders = collections.Counter(p["naming_order"] for p in plans)
    assert set(orders) == {"first", "second"}
    for order, n in orders.items():
        assert 0.45 <= n / len(plans) <= 0.55, (order, n)
    for p in plans:  # the order names who of the round-1 pair is shown first afterwards
        pair = p["rounds"][0]["shown"]
        later = next(rd for rd in p["rounds"][1:] if rd["action"] != "introduce")
        assert later["shown"] == [pair[0] if p["naming_order"] == "first" else pair[1]]


def test_lengths_cover_3_to_8_and_recall_distances_1_to_6(plans):
    lengths = collections.Counter(p["num_rounds"] for p in plans)
    assert sorted(lengths) == list(range(MIN_ROUNDS, MAX_ROUNDS + 1)) == list(range(3, 9))
    distances = collections.Counter(d for p in plans for rd in p["rounds"] for d in rd["distance"].values()
                                    if d is not None)
    assert sorted(distances) == list(range(1, MAX_DISTANCE + 1)) == list(range(1, 7))
    assert min(distances.values()) >= 20  # every distance is common enough to report
    people = collections.Counter(len(p["people"]) for p in plans)
    assert set(people) == {2, 3}


def test_every_person_returns_and_distances_count_rounds_since_last_shown(plans):
    for p in plans:
        last = {}
        for r, rd in enumerate(p["rounds"]):
            for x in rd["shown"]:
                assert rd["distance"][x] == (None if x not in last else r - last[x])
                last[x] = r
        recalled = {x for rd in p["rounds"] for x, d in rd["distance"].items() if d is not None}
        assert recalled == {x for x, _ in p["people"]}


def test_held_out_names_never_occur_in_the_training_pool(plans):
    train = {x for p in plans for x, _ in p["people"]}
    held = {x for i in range(1000) for x, _ in plan_conversation(np.random.default_rng([SEED, i]), "heldout")["people"]}
    assert len(train) > 1500 and len(held) > 1500  # thousands of names: a name carries no prior
    assert not train & held
    assert {name_pool.pool_of(x) for x in train} == {"train"} and {name_pool.pool_of(x) for x in held} == {"heldout"}
    assert any(not x.isascii() for x in held) and any(x.isascii() for x in held)


def test_unseen_names_encode_and_decode_with_the_tiny_tokenizer(tmp_path):
    from cig_jax.data.chat_template import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path)
    held = name_pool.draw_names(np.random.default_rng(0), 40, "heldout")
    lengths = set()
    for x in held:
        ids = tok.encode(x, add_special_tokens=False)
        assert tok.decode(ids) == x and tok.unk_token_id not in ids
        lengths.add(len(ids))
    assert len(lengths) >= 4  # varied tokenisation


def test_edits_persist_until_changed_and_sources_say_where_each_value_came_from(plans):
    edits = 0
    for p in plans:
        look: dict = {}
        for r, rd in enumerate(p["rounds"]):
            for x in rd["shown"]:
                if rd["action"] == "edit":
                    e = rd["edit"]
                    edits += 1
                    assert look[x][e["attribute"]] == e["from"] and rd["looks"][x][e["attribute"]] == e["to"]
                    assert rd["sources"][x][e["attribute"]] == {"round": r, "via": "text"}
                    assert {k: v for k, v in rd["looks"][x].items() if k != e["attribute"]} == \
                        {k: v for k, v in look[x].items() if k != e["attribute"]}
                elif rd["action"] in ("recall", "pair"):
                    assert rd["looks"][x] == look[x]  # later appearances keep every change
                for k, src in rd["sources"][x].items():
                    s = p["rounds"][src["round"]]
                    assert src["round"] <= r and x in s["shown"] and s["looks"][x][k] == rd["looks"][x][k]
                    if src["via"] == "text" and s["action"] != "rollback":
                        assert x in s["text"]
                look[x] = dict(rd["looks"][x])
    assert edits > 500


def test_rollbacks_restore_an_earlier_look_named_by_content_not_by_recency(plans):
    by = collections.Counter()
    for p in plans:
        for r, rd in enumerate(p["rounds"]):
            if rd["action"] != "rollback":
                continue
            x, k = rd["rollback"]["name"], rd["restores_round"]
            by[rd["rollback"]["by"]] += 1
            assert rd["rollback"]["previous_round"] == r - 1 and p["rounds"][r - 1]["shown"] == [x]
            assert rd["looks"][x] == p["rounds"][k]["looks"][x] != p["rounds"][r - 1]["looks"][x]
            assert x in rd["text"] and "last" not in rd["text"]
            if rd["rollback"]["by"] == "scene":
                assert rd["scene"] == p["rounds"][k]["scene"]
                assert [q for q, s in enumerate(p["rounds"][:r]) if x in s["shown"] and s["scene"] == rd["scene"]] == [k]
    assert by["undo"] >= 50 and by["scene"] >= 20


def test_rendered_records_validate_and_keep_ground_truth_through_json_and_records(tmp_path):
    from cig_jax.data import tfds_builder

    convs = [synthetic.make_conversation("recall", SEED, i, 64, "heldout") for i in range(6)]
    for c in convs:
        schema.validate(c)
        assert c.metadata["names"] == "heldout" and c.metadata["num_rounds"] == len(c.rounds)
        for rnd in c.rounds:
            assert [p.name for p in rnd.assistant_image.people] == rnd.metadata["shown"]
            for p in rnd.assistant_image.people:
                assert set(rnd.metadata["sources"][p.name]) == set(ATTRIBUTES)
        for r, rnd in enumerate(c.rounds):
            if "restores_round" in rnd.metadata:
                x = rnd.metadata["rollback"]["name"]
                assert restored_look(c, r) == next(p.attributes for p in rnd.assistant_image.people if p.name == x)
        back = schema.save_conversation(c, tmp_path / f"{c.id}.json")
        assert json.loads(json.dumps([r.metadata for r in back.rounds])) == [r.metadata for r in c.rounds]
        assert back.metadata == c.metadata
        example = tfds_builder.conversation_to_example(c)  # images as stored (PNG), decoded as tfds reads them
        example["images"] = [schema.decode_png(b) for b in example["images"]]
        rec = tfds_builder.example_to_conversation(example)
        assert [r.metadata for r in rec.rounds] == [r.metadata for r in c.rounds] and rec.metadata == c.metadata


def test_a_name_used_before_its_introduction_is_refused():
    c = next(c for c in (synthetic.make_conversation("recall", SEED, i, 64) for i in range(50)) if len(c.people) == 3)
    third = c.people[2].name
    schema.validate(c)
    c.rounds[0].user_text += f" Also {third}."
    with pytest.raises(schema.SchemaError, match=f"name '{third}' is used before it is introduced"):
        schema.validate(c)
