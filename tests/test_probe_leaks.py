"""The embedding name probe cannot read its answer: the probe round's answer image is encoded right after the
image-query block the probe reads, and only the causal mask keeps it out, so changing that image must leave the
prediction where it was (while the target it is scored against moves). Both versions of a pair share one draw:
the same history, a last round that differs only in the name and the person drawn.

(History images do reach the query block: a check that inverts them must copy each version's rounds on their
own, since the two versions of a pair share their history's round objects and an image inverted through both
is inverted twice, back to where it was.)"""
import copy

import numpy as np

from cig_jax.data import schema, sources
from cig_jax.data.recall import probe_pairs
from cig_jax.eval import probe_embeddings
from cig_jax.sample.session import ChatSession

SEED = 515_151


def _pairs(session):
    convs = sources.open_records("synthetic", num=2, seed=SEED, size=session.image_size, kinds=("recall",),
                                 names="heldout")
    return probe_pairs([schema.with_pixels(convs[i]) for i in range(len(convs))])


def test_changing_the_answer_image_does_not_move_the_probe_prediction(tiny_run):
    session = ChatSession.from_checkpoint(tiny_run)
    versions = [c for p in _pairs(session) for c in p.conversations]
    pred, target, _ = probe_embeddings._last_blocks(session, versions)
    changed = copy.deepcopy(versions)
    for conv in changed:  # another answer: the probe round's image inverted
        image = conv.rounds[-1].assistant_image
        image.pixels = (255 - np.asarray(image.pixels)).astype(np.uint8)
    pred_changed, target_changed, _ = probe_embeddings._last_blocks(session, changed)
    assert np.abs(target_changed - target).max() > 1e-3  # what the probe is scored against did change
    np.testing.assert_allclose(pred_changed, pred, atol=1e-5, rtol=0)  # what the model predicts did not
    # control: the prediction is not a constant; the probe round's request (before the query block) moves it
    asked = copy.deepcopy(versions)
    for conv in asked:
        conv.rounds[-1].user_text = "Please. " + conv.rounds[-1].user_text
    assert np.abs(probe_embeddings._last_blocks(session, asked)[0] - pred).max() > 1e-3


def test_both_versions_of_a_pair_share_one_draw(tiny_run):
    session = ChatSession.from_checkpoint(tiny_run)
    for pair in _pairs(session):
        a, b = pair.conversations
        assert a.rounds[:-1] == b.rounds[:-1]  # the same history, round for round
        ta, tb = a.rounds[-1].user_text, b.rounds[-1].user_text
        assert ta.replace(pair.names[0], "X") == tb.replace(pair.names[1], "X")  # the same request but the name
        assert a.rounds[-1].metadata["distance"].keys() != b.rounds[-1].metadata["distance"].keys()
