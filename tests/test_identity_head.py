"""The MLLM's identity head: what it reads, what it learns from, and when sampling draws with its prediction."""
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cig_jax.config import check
from cig_jax.config_base import ConfigError
from cig_jax.config_io import load_config
from cig_jax.data.chat_template import IMAGE_QUERY, pad_to
from cig_jax.data.pipeline import shown_identities
from cig_jax.data.schema import Conversation, Image, Person, PersonIdentity, Round
from cig_jax.models.mllm import MLLM, identity_loss, mllm_loss
from cig_jax.sample.identities import with_predicted

ROOT = Path(__file__).resolve().parents[1]
Q, DE = 4, 8


def _ident(seed, dim=DE):
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return PersonIdentity("synthetic", tuple(float(x) for x in v / np.linalg.norm(v)))


def _img(seed, people=()):
    return Image(pixels=np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8), people=list(people))


@pytest.fixture(scope="module")
def model(template):
    cfg = load_config(ROOT / "configs" / "model" / "tiny.yaml").model
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=len(template.tokenizer)),
                              mllm=dataclasses.replace(cfg.mllm, identity_dim=DE),
                              dit=dataclasses.replace(cfg.dit, identity=dataclasses.replace(cfg.dit.identity,
                                                                                            embedding_dim=DE)))
    return MLLM(cfg, rngs=nnx.Rngs(0))


def test_identity_loss_is_one_minus_cosine_over_blocks_with_one_known_person():
    a, b = np.eye(DE, dtype=np.float32)[:2]
    identity = jnp.asarray(np.stack([a, b, np.zeros(DE, np.float32)])[None])  # images 0, 1 known; image 2 not
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    target = jnp.asarray([[0, 1, 2, -1]])  # blocks: image 0, image 1, image 2 (unknown), no block
    pred = jnp.asarray(np.stack([3 * a, a, b, np.zeros(DE, np.float32)])[None])  # right, orthogonal, -, zero
    loss, n = identity_loss(pred, identity, mask, target)
    assert float(n) == 2.0
    assert float(loss) == pytest.approx((0.0 + 1.0) / 2, abs=1e-6)
    grad = jax.grad(lambda p: identity_loss(p, identity, mask, target)[0])(pred)  # a zero prediction: finite
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad[0, 2:]).max()) == 0.0


def test_pipeline_carries_the_one_shown_persons_identity():
    maya, leo = _ident(1), _ident(2)
    images = [_img(0, [Person("Maya", identity=maya), Person("Leo", identity=leo)]),  # a pair: no one identity
              _img(1, [Person("Leo", identity=leo)]), _img(2)]
    ident, mask = shown_identities(images, DE + 2, 4, "t")
    assert mask.tolist() == [0.0, 1.0, 0.0, 0.0]
    np.testing.assert_allclose(ident[1], np.pad(leo.vector(), (0, 2)))  # a synthetic code is zero-padded
    assert not ident[[0, 2, 3]].any()


def test_head_reads_the_mean_query_state_and_never_the_answer_image(model, template):
    conv = Conversation(id="t", rounds=[
        Round(user_text="Draw Maya.", assistant_text="Here is Maya.", assistant_image=_img(0)),
        Round(user_text="Show Maya again.", assistant_text="Here is Maya.", assistant_image=_img(1))])
    enc = template.encode(conv)
    arrays = {k: jnp.asarray(v[None]) for k, v in pad_to(enc, len(enc), template.pad_id).items() if k != "round_index"}
    images = np.random.default_rng(0).standard_normal((1, 2, 32, 32, 3)).astype(np.float32)
    run = lambda im: model(arrays["input_ids"], arrays["role"], arrays["image_index"], images=jnp.asarray(im))  # noqa: E731
    out = run(images)
    assert out.identity.shape == (1, 2, DE)
    # independent: the head's kernel and bias on the mean of the second query block's final hidden states
    rows = np.flatnonzero(np.asarray(arrays["role"][0]) == IMAGE_QUERY)[Q:]
    mean = np.asarray(out.hidden_states[0, rows]).mean(axis=0)
    expected = mean @ np.asarray(model.identity_head.kernel.value) + np.asarray(model.identity_head.bias.value)
    np.testing.assert_allclose(np.asarray(out.identity[0, 1]), expected, rtol=1e-4, atol=1e-5)
    changed = images.copy()
    changed[0, 1] = -changed[0, 1]  # the second (answer) image: its own block cannot see it
    np.testing.assert_array_equal(np.asarray(run(changed).identity[0, 1]), np.asarray(out.identity[0, 1]))
    changed = images.copy()
    changed[0, 0] = -changed[0, 0]  # the history image: the second block reads it
    assert float(jnp.abs(run(changed).identity[0, 1] - out.identity[0, 1]).max()) > 1e-4
    batch = dict(arrays, images=jnp.asarray(images), loss_mask=arrays["loss_mask"],
                 image_identity=jnp.asarray(np.stack([_ident(1).vector(), _ident(2).vector()])[None]),
                 image_identity_mask=jnp.asarray([[1.0, 1.0]]))
    _, metrics = mllm_loss(model, batch)
    assert float(metrics["identity_blocks"]) == 2.0 and 0.0 < float(metrics["identity_loss"]) < 2.0


def test_sampling_draws_with_the_prediction_only_when_one_person_and_no_reference():
    rnd = Round(user_text="Show Maya at the beach.", assistant_text="Here is Maya at the beach.")
    empty = (np.zeros((2, DE), np.float32), np.zeros(2, np.float32), np.zeros((2, 4), np.float32),
             {"identity": "no identity: no face reference", "identities": []})
    pred = 5 * _ident(3).vector()
    ident, mask, boxes, record = with_predicted(*empty, pred, rnd, ["Maya", "Leo"])
    np.testing.assert_allclose(ident[0], _ident(3).vector(), rtol=1e-5)
    assert mask.tolist() == [1.0, 0.0] and boxes[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert record["identities"] == [{"name": "Maya", "source": "predicted", "box": [0.0, 0.0, 1.0, 1.0]}]
    pair = Round(user_text="Draw Maya and Leo together.", assistant_text="Here are Maya and Leo.")
    out = with_predicted(*empty, pred, pair, ["Maya", "Leo"])
    assert not out[1].any() and "2 people named" in out[3]["identity"]
    referenced = (empty[0], np.array([1.0, 0.0], np.float32), empty[2], {"identity": "identity: a photo"})
    assert with_predicted(*referenced, pred, rnd, ["Maya"])[3] == {"identity": "identity: a photo"}


def test_identity_width_must_match_the_detokenizer():
    cfg = load_config(ROOT / "configs" / "model" / "tiny.yaml")
    bad = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, mllm=dataclasses.replace(cfg.model.mllm, identity_dim=cfg.model.dit.identity.embedding_dim + 1)))
    with pytest.raises(ConfigError, match="identity_dim"):
        check(bad)


def test_a_checkpoint_written_before_the_head_existed_is_the_same_model_without_one():
    from cig_jax.config_base import to_dict
    from cig_jax.train.checkpoint import model_config_diffs

    model = load_config(ROOT / "configs" / "model" / "tiny.yaml").model
    saved = to_dict(model)
    for key in ("identity_dim", "identity_weight", "image_token_rms"):  # fields newer than the checkpoint
        del saved["mllm"][key]
    assert model_config_diffs(saved, to_dict(model)) == []
    with_head = dataclasses.replace(model, mllm=dataclasses.replace(model.mllm, identity_dim=8))
    assert model_config_diffs(saved, to_dict(with_head)) == ["model.mllm.identity_dim: checkpoint 0 vs config 8"]


def test_person_slots_draw_a_photographed_and_a_described_person_each_in_their_strip():
    """'This is Maya [photo]. Draw Maya and Julian.': Maya's reference goes to the left strip, Julian (only
    described: no reference) to the right with the MLLM's prediction; without a prediction his strip stays
    empty and Maya stays left. A reference of someone not drawn keeps the references as chosen."""
    rnd = Round(user_text="This is Maya. Draw Maya and Julian together.", assistant_text="Here are Maya and Julian.")
    maya, julian = _ident(1).vector(), _ident(2).vector()
    chosen = (np.stack([maya, np.zeros(DE, np.float32)]), np.array([1.0, 0.0], np.float32),
              np.array([[0, 0, 1, 1], [0, 0, 0, 0]], np.float32),
              {"identity": "identity: Maya (photo)",
               "identities": [{"name": "Maya", "source": "Maya (photo)", "box": [0.0, 0.0, 1.0, 1.0]}]})
    pred = np.stack([np.zeros(DE, np.float32), 3 * julian])  # Maya: found a face (the reference wins); Julian: read
    ident, mask, boxes, record = with_predicted(*chosen, pred, rnd, ["Maya", "Julian"], drawn=["Maya", "Julian"])
    np.testing.assert_allclose(ident, np.stack([maya, julian]), rtol=1e-5)
    assert mask.tolist() == [1.0, 1.0] and boxes.tolist() == [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]
    assert [(u["name"], u["source"]) for u in record["identities"]] == [("Maya", "Maya (photo)"), ("Julian", "predicted")]
    assert "Julian as the MLLM predicted" in record["identity"]
    ident, mask, boxes, _ = with_predicted(*chosen, np.zeros_like(pred), rnd, ["Maya", "Julian"],
                                           drawn=["Maya", "Julian"])
    assert mask.tolist() == [1.0, 0.0] and boxes[0].tolist() == [0, 0, 0.5, 1]
    np.testing.assert_allclose(ident[0], maya)
    assert with_predicted(*chosen, pred, rnd, ["Maya", "Julian"], drawn=["Julian"])[3] is chosen[3]
