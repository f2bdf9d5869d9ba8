"""The recall kind: shortcut-free multi-round data (random naming order, 3-8 rounds, recall distances 1-6,
disjoint name pools, edits kept, content-addressed rollbacks), its ground truth, and the counterfactual name
probe, which a model answering by round position cannot pass and one answering by name passes fully."""
import collections
import json
import re

import numpy as np
import pytest

from cig_jax.data import names as name_pool
from cig_jax.data import schema, synthetic
from cig_jax.data import schema_io
from cig_jax.data.recall import DESCRIBE_P, MAX_DISTANCE, MAX_ROUNDS, MIN_ROUNDS, plan_conversation, restored_look
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


def test_describe_rounds_say_the_current_look_of_someone_shown_before_and_leave_the_recall_kind_unchanged(plans):
    described = 0
    for i in range(300):
        plain = plan_conversation(np.random.default_rng([SEED, i]), describe_p=0.0)
        assert plain == plans[i]  # describe_p 0 draws nothing more: the recall kind's plans are as before
        p = plan_conversation(np.random.default_rng([SEED, i]), describe_p=DESCRIBE_P)
        for r, rd in enumerate(p["rounds"]):
            if rd["action"] != "describe":
                continue
            described += 1
            x = rd["described"]
            assert rd["shown"] == [] and x in rd["text"] and rd["answer"].startswith(x + " ")
            before = [k for k in range(r) if x in p["rounds"][k]["shown"]]
            assert before and rd["distance"][x] == r - before[-1]
            look = p["rounds"][before[-1]]["looks"][x]  # as last shown: nothing changes a look between images
            assert rd["answer"] == synthetic.describe(x, look, list(ATTRIBUTES))
            for key, value in look.items():  # every attribute is said, and only this person's value
                assert synthetic.describe("X", look, [key]).split(" ", 2)[2].rstrip(".") in rd["answer"]
    assert described > 100
    conv = synthetic.make_conversation("recall_describe", SEED, 0)
    schema.validate(conv)
    assert all((r.assistant_image is None) == (r.metadata["action"] == "describe") for r in conv.rounds)


def test_recall_text_says_in_words_whom_each_round_shows_and_how():
    for i in range(20):
        text, drawn = (synthetic.make_conversation(k, SEED, i) for k in ("recall_text", "recall"))
        schema.validate(text)
        assert [r.user_text for r in text.rounds] == [r.user_text for r in drawn.rounds]  # the same plan
        for t, d in zip(text.rounds, drawn.rounds):
            assert t.assistant_image is None and t.metadata == d.metadata
            said = " ".join(synthetic.describe(p.name, p.attributes, list(ATTRIBUTES)) for p in d.assistant_image.people)
            assert t.assistant_text == f"{d.assistant_text} {said}"


def test_held_out_names_never_occur_in_the_training_pool(plans):
    train = {x for p in plans for x, _ in p["people"]}
    held = {x for i in range(1000) for x, _ in plan_conversation(np.random.default_rng([SEED, i]), "heldout")["people"]}
    assert len(train) > 1500 and len(held) > 1500  # thousands of names: a name carries no prior
    assert not train & held
    assert {name_pool.pool_of(x) for x in train} == {"train"} and {name_pool.pool_of(x) for x in held} == {"heldout"}
    assert any(not x.isascii() for x in held) and any(x.isascii() for x in held)


def test_unseen_names_encode_and_decode_with_the_tiny_tokenizer(tmp_path):
    from cig_jax.data.tiny_tokenizer import build_tiny_tokenizer

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
                    assert src["round"] <= r
                    if src["via"] == "image":
                        assert x in s["shown"] and s["looks"][x][k] == rd["looks"][x][k]
                    else:  # that round's user text said the value of x's attribute
                        assert said(s["text"], x, k, rd["looks"][x][k]), (s["text"], x, k, rd["looks"][x][k])
                look[x] = dict(rd["looks"][x])
    assert edits > 500


def said(text: str, x: str, attr: str, value: str) -> bool:
    """Whether a sentence of `text` naming `x` states `value` for `attr` (as the generator's describe, edit and
    undo sentences phrase attributes: "blue hair", "hair blue", "shirt to red", "a hat", "no hat or glasses", ...)."""
    phrases = {"hair_color": [f"{value} hair", f"hair {value}"],
               "clothing_color": [f"{value} shirt", f"shirt to {value}"],
               "accessory": ["no hat or glasses", "Take off"] if value == "none" else [value],
               "face_shape": [f"{value} face"], "skin_tone": [f"{value} skin"], "eye_color": [f"{value} eyes"],
               "hair_style": [{"bald": "bald", "ponytail": "ponytail"}.get(value, f"{value} hair")]}[attr]
    for sentence in re.split(r"(?<=\.) ", text):
        if not re.search(rf"\b{re.escape(x)}\b", sentence):
            continue
        if attr == "accessory" and value != "none":
            sentence = sentence.replace("no hat or glasses", "")
        if any(re.search(rf"\b{re.escape(ph)}\b", sentence) for ph in phrases):
            return True
    return False


def test_an_attribute_given_by_image_was_never_said_in_a_user_text_about_that_person(plans):
    """The 'image_only' ground truth is honest: no user text up to the round (an introduction, an edit's
    "Take off Maya's hat.", an undo) stated the value of an attribute whose source is an image."""
    checked = 0
    for p in plans:
        for r, rd in enumerate(p["rounds"]):
            for x in rd["shown"]:
                for k, src in rd["sources"][x].items():
                    if src["via"] != "image":
                        continue
                    checked += 1
                    value = rd["looks"][x][k]
                    stated = [q for q in range(r + 1) if said(p["rounds"][q]["text"], x, k, value)]
                    assert stated == [], (p["rounds"][stated[0]]["text"], x, k, value, r)
    assert checked > 10_000


def test_an_undo_names_the_change_not_the_value_it_restores(plans):
    undos = collections.Counter()
    for p in plans:
        for r, rd in enumerate(p["rounds"]):
            if rd["action"] != "rollback":
                continue
            x = rd["rollback"]["name"]
            before = p["rounds"][r - 1]["looks"][x]
            restored = {k: v for k, v in rd["looks"][x].items() if v != before[k]}
            assert restored
            if rd["rollback"]["by"] == "undo":
                undos[next(iter(restored))] += 1
            words = set(re.findall(r"[a-z]+", rd["text"].lower()))
            assert not {v for v in restored.values() if v != "none"} & words, (rd["text"], restored)
    assert undos["accessory"] >= 20 and undos["clothing_color"] >= 10 and undos["hair_color"] >= 10


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
        back = schema_io.save_conversation(c, tmp_path / f"{c.id}.json")
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


# ----------------------------------------------------------------------------------------------------------
# The protocol (cig_jax/eval/recall.py) against stand-in models that answer with attributes
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered():
    return [synthetic.make_conversation("recall", SEED + 1, i, 64, "heldout") for i in range(80)]


def _latest_look(conv, name, upto):
    for rnd in reversed(conv.rounds[:upto]):
        for p in rnd.assistant_image.people:
            if p.name == name:
                return dict(p.attributes)
    raise AssertionError(f"{name} not shown before round {upto}")


def by_name(conv, r=None):
    """Draws the person the round's text names, as the history last showed them."""
    r = len(conv.rounds) - 1 if r is None else r
    named = schema.mentioned_names(conv.rounds[r].user_text, [p.name for p in conv.people])
    return _latest_look(conv, named[0], r)


def by_first_position(conv, r=None):
    """Draws whoever stood on the left in round 1, whatever the text says."""
    return dict(conv.rounds[0].assistant_image.people[0].attributes)


def by_round_position(conv, r=None):
    """'Round 2 draws the left person, round 3 the right one': the person of round 1 at index (round - 1) % 2."""
    r = len(conv.rounds) - 1 if r is None else r
    return dict(conv.rounds[0].assistant_image.people[(r - 1) % 2].attributes)


def test_name_probe_scores_a_position_model_at_chance_and_a_name_model_fully(rendered):
    from cig_jax.data.recall import probe_pairs
    from cig_jax.eval.recall import probe_score

    pairs = probe_pairs(rendered)
    assert len(pairs) == len(rendered)
    for pair, conv in zip(pairs, rendered):  # the two versions differ only in the name of the last round
        a, b = pair.conversations
        assert 3 <= len(a.rounds) <= max(3, len(conv.rounds)) and a.rounds[:-1] == conv.rounds[:len(a.rounds) - 1]
        assert a.rounds[:-1] == b.rounds[:-1] and a.rounds[-1].user_text != b.rounds[-1].user_text
        assert a.rounds[-1].user_text.replace(pair.names[0], "X") == b.rounds[-1].user_text.replace(pair.names[1], "X")
        assert [p.attributes for p in a.rounds[-1].assistant_image.people] == [pair.looks[0]]
        schema.validate(a)
    answer = lambda model: [(model(p.conversations[0]), model(p.conversations[1])) for p in pairs]  # noqa: E731
    name = probe_score(pairs, answer(by_name))
    assert name["pairs_follow"] == 1.0 and name["versions_follow"] == 1.0
    for model in (by_first_position, by_round_position):
        blind = probe_score(pairs, answer(model))
        assert blind["versions_follow"] == blind["chance"]["versions"] == 0.5
        assert blind["pairs_follow"] == 0.0 < blind["chance"]["pairs"]


def _items(convs, model):
    from cig_jax.eval.metrics import _groups_of

    items = []
    for c in convs:
        for r, rnd in enumerate(c.rounds):
            for p in rnd.assistant_image.people:
                pred = model(c, r, p.name)
                items.append({"conversation": c.id, "round": r, "name": p.name, "predicted": pred,
                              "truth": dict(p.attributes), "groups": _groups_of(c, p.name, list(ATTRIBUTES), r)})
    return items


def test_breakdown_by_naming_order_catches_a_positional_shortcut(rendered):
    from cig_jax.eval.recall import breakdown

    truthful = breakdown(rendered, _items(rendered, lambda c, r, n: _latest_look(c, n, r + 1)), ATTRIBUTES)
    for table in ("by_distance", "by_length", "by_order", "far_by_order"):
        for cell in truthful[table].values():
            assert cell["all"]["accuracy"] == 1.0
    assert {int(d) for d in truthful["by_distance"]} >= {1, 2, 3, 4}
    assert set(truthful["by_order"]) == {"first", "second"}
    assert truthful["far"]["image_only"]["n"] > 0 and truthful["far"]["text"]["n"] > 0

    def shortcut(c, r, n):  # the introduction round as it was; later rounds by round position
        return _latest_look(c, n, r + 1) if rendered and c.rounds[r].metadata["distance"][n] is None \
            else by_round_position(c, r)

    cut = breakdown(rendered, _items(rendered, shortcut), ATTRIBUTES)
    first, second = (cut["by_order"][o]["image_only"]["accuracy"] for o in ("first", "second"))
    assert first > second + 0.1  # right when the left person happens to be named first
    assert cut["far"]["image_only"]["accuracy"] < 0.7  # a wrong person shares some attributes by chance


def test_rollback_agreement_tells_restoring_from_copying_the_previous_round(rendered):
    from cig_jax.eval.recall import rollback_agreement

    convs = [c for c in rendered if any(r.metadata["action"] == "rollback" for r in c.rounds)]
    assert convs
    truthful = rollback_agreement(convs, _items(convs, lambda c, r, n: _latest_look(c, n, r + 1)))
    assert truthful["restored"] == 1.0 and truthful["previous"] == 0.0 and truthful["n"] > 0

    def markov(c, r, n):  # copies the previous round's look of that person
        return _latest_look(c, n, r) if c.rounds[r].metadata["action"] == "rollback" else _latest_look(c, n, r + 1)

    copied = rollback_agreement(convs, _items(convs, markov))
    assert copied["restored"] == 0.0 and copied["previous"] == 1.0 and copied["rounds"] == truthful["rounds"]


def test_self_consistency_compares_later_drawings_with_the_models_own_first_drawing(rendered):
    from cig_jax.eval.recall import self_consistency

    fixed = {}

    def own(c, r, n):  # draws each person as it first drew them (a constant wrong look), ignoring edits
        return fixed.setdefault((c.id, n), {k: v[(len(n) + i) % len(v)] for i, (k, v) in enumerate(ATTRIBUTES.items())})

    rep = self_consistency(rendered, _items(rendered, own))
    assert rep["all"]["agreement"] == 1.0 and rep["image_only"]["n"] > 0
    rnd = np.random.default_rng(0)
    noisy = self_consistency(rendered, _items(rendered, lambda c, r, n: {k: v[rnd.integers(len(v))] for k, v in ATTRIBUTES.items()}))
    assert noisy["all"]["agreement"] < 0.6


def test_embedding_probe_scores_a_name_model_fully_and_a_name_blind_or_positional_one_at_zero():
    from cig_jax.eval.probe_embeddings import score

    rng = np.random.default_rng(0)
    ta, tb = rng.normal(size=(2, 50, 16, 8))
    by_name = score(ta + 0.1 * rng.normal(size=ta.shape), tb + 0.1 * rng.normal(size=tb.shape), ta, tb)
    assert by_name["pairs_nearer"] == 1.0 and by_name["versions_nearer"] == 1.0
    assert abs(by_name["name_share"] - 1.0) < 0.05
    same = rng.normal(size=ta.shape)  # whatever it predicts, the same for both names
    blind = score(same, same, ta, tb)
    assert blind["name_share"] == 0.0 and blind["pairs_nearer"] == 0.0
    positional = score(ta, ta, ta, tb)  # always draws the first of the round-1 pair
    assert positional == {"n": 50, "name_share": 0.0, "versions_nearer": 0.5, "pairs_nearer": 0.0}
    half = score(0.5 * (ta + tb) + 0.5 * (ta - tb) * 0.5, 0.5 * (ta + tb) - 0.5 * (ta - tb) * 0.5, ta, tb)
    assert abs(half["name_share"] - 0.5) < 1e-9  # moves half as far as the targets do
    with pytest.raises(ValueError, match="pairs, Q, D"):
        score(ta[0], tb[0], ta[0], tb[0])
