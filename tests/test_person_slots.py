"""Person slots: the layout (a named person's slot after each image, person queries before a drawn image's
queries), the crops that fill the slots, the retrieval head (a sampling cache's memory of earlier slots gives what
one pass over the whole sequence gives) and the retrieval loss."""
import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cig_jax.config_io import load_config
from cig_jax.data.chat_template import PERSON_QUERY, PERSON_SLOT, ChatTemplate
from cig_jax.data.tiny_tokenizer import build_tiny_tokenizer
from cig_jax.data.persons import drawn_people
from cig_jax.data.pipeline import preprocess_image, shown_identities
from cig_jax.data.schema import Conversation, Image, Person, PersonIdentity, Round
from cig_jax.models.llm import KVCache
from cig_jax.models.mllm import MLLM
from cig_jax.models.person_retrieval import NAME_TOKENS, retrieval_loss
from cig_jax.sample.cache import pieces
from cig_jax.sample import session as session_module
from cig_jax.sample.session import ChatSession
from conftest import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
Q, DE, SIZE = 4, 8, 16


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return ChatTemplate(build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")), num_image_tokens=Q,
                        person_slots=True)


def _ident(seed):
    v = np.random.default_rng(seed).standard_normal(DE).astype(np.float32)
    return PersonIdentity("synthetic", tuple(float(x) for x in v / np.linalg.norm(v)))


def _image(seed, names):
    pixels = np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    people = [dataclasses.replace(p, identity=_ident(hash(p.name) % 1000)) for p in drawn_people(names, SIZE)]
    return Image(pixels=pixels, people=people)


def _conversation():
    return Conversation(id="c", people=[Person("Maya"), Person("Leo")], rounds=[
        Round(user_text="Draw Maya and Leo.", assistant_text="Here are Maya and Leo.",
              assistant_image=_image(0, ["Maya", "Leo"])),
        Round(user_text="Show Leo.", assistant_text="Here is Leo.", assistant_image=_image(1, ["Leo"]))])


def test_layout_puts_each_named_person_beside_its_crop(template):
    conv = _conversation()
    out = template.encode(conv, add_generation_prompt=False)
    tok = template.tokenizer
    slots, queries = np.flatnonzero(out.role == PERSON_SLOT), np.flatnonzero(out.role == PERSON_QUERY)
    assert len(slots) == len(queries) == 3
    named = lambda ts: [tok.decode(out.input_ids[t - 1:t]).strip() for t in ts]  # noqa: E731
    assert named(slots) == named(queries) == ["Maya", "Leo", "Leo"]
    # images: round 0's drawing, its two crops, round 1's drawing, its crop; each query and slot of a person
    # points at the crop of that person in the drawing it belongs to
    assert [len(im.people) for im in out.images] == [2, 1, 1, 1, 1]
    assert [out.images[k].people[0].name for k in out.image_index[slots]] == ["Maya", "Leo", "Leo"]
    assert out.image_index[queries].tolist() == out.image_index[slots].tolist() == [1, 2, 4]
    x0, y0, x1, y1 = conv.rounds[0].assistant_image.people[1].box
    np.testing.assert_array_equal(out.images[2].pixels, conv.rounds[0].assistant_image.pixels[y0:y1, x0:x1])
    assert (out.loss_mask[slots] == 0).all() and (out.loss_mask[queries] == 0).all()
    # a query precedes its image's queries; a slot follows its image's write-back block
    assert queries[-1] < np.flatnonzero(out.role == 2)[-1] < slots[-1]


@pytest.fixture(scope="module")
def model(template):
    cfg = load_config(ROOT / "configs" / "model" / "tiny.yaml").model
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=len(template.tokenizer)),
                              mllm=dataclasses.replace(cfg.mllm, identity_dim=DE, person_slots=True),
                              dit=dataclasses.replace(cfg.dit, identity=dataclasses.replace(cfg.dit.identity,
                                                                                            embedding_dim=DE)))
    m = MLLM(cfg, rngs=nnx.Rngs(0))
    shape = m.person_to_queries.kernel.value.shape  # not the zero start
    m.person_to_queries.kernel.value = jnp.asarray(np.random.default_rng(0).standard_normal(shape) / shape[0] ** 0.5,
                                                   jnp.float32)
    m.person_key.kernel.value = 10.0 * m.person_key.kernel.value  # sharp: the slots outscore 'no one' (score 0)
    m.person_none.value = jnp.zeros_like(m.person_none.value)
    return m


def test_retrieval_from_a_cache_memory_equals_one_pass(template, model):
    """What sampling does (the history in one call, its person slots handed back and given to the next call as
    memory) retrieves exactly what one pass over the whole sequence retrieves."""
    out = template.encode(_conversation(), add_generation_prompt=False)
    pixels = jnp.asarray(np.stack([preprocess_image(im.pixels, model.vit.cfg.image_size) for im in out.images]))[None]
    tokens = model.image_tokens(model.encode_images(pixels))
    ids, role, ii = (jnp.asarray(a)[None] for a in (out.input_ids, out.role, out.image_index))
    known = tuple(jnp.asarray(a)[None] for a in shown_identities(out.images, DE, len(out.images), "test"))
    full = model(ids, role, ii, image_tokens=tokens, num_query_blocks=2, slot_identity=known)
    assert float(jnp.abs(full.identity[0, 2]).max()) > 0  # round 1's Leo found someone
    cut = int(np.flatnonzero(out.role == PERSON_QUERY)[-1]) - 2  # round 1's drawing in the second call
    cache = KVCache.init(model.llm.cfg, 1, len(out) + 8)
    first = model(ids[:, :cut], role[:, :cut], ii[:, :cut], image_tokens=tokens, cache=cache, num_query_blocks=0,
                  attention_mask=jnp.ones((1, cut), bool), return_person_slots=True, slot_identity=known)
    memory, at = first.person_slots
    assert np.asarray(at)[0, :3].tolist() == [*np.flatnonzero(out.role[:cut] == PERSON_SLOT).tolist(), -1]
    n = len(out) - cut
    second = model(ids[:, cut:], role[:, cut:], ii[:, cut:], image_tokens=tokens, cache=first.cache,
                   num_query_blocks=1, attention_mask=jnp.ones((1, n), bool), person_memory=memory,
                   slot_identity=known)
    np.testing.assert_allclose(np.asarray(second.identity[0, 0]), np.asarray(full.identity[0, 2]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(second.visual_embeddings[0, 0]), np.asarray(full.visual_embeddings[0, 1]),
                               atol=2e-3)  # sharp keys (x10) amplify the cache's rounding
    # the memory matters: without it the query finds no slot and retrieves nothing
    alone = model(ids[:, cut:], role[:, cut:], ii[:, cut:], image_tokens=tokens, cache=first.cache,
                  num_query_blocks=1, attention_mask=jnp.ones((1, n), bool), slot_identity=known)
    assert float(jnp.abs(alone.identity[0, 0]).max()) == 0.0  # no one: no identity
    assert float(jnp.abs(alone.visual_embeddings - second.visual_embeddings).max()) > 1e-3


def test_retrieval_loss_rewards_attention_on_the_same_person_or_on_no_one():
    a, b = np.eye(DE, dtype=np.float32)[:2]
    identity = jnp.asarray(np.stack([a, b, a, b])[None])  # crops 0 (A), 1 (B), 2 (A again), 3 (B)
    mask = jnp.ones((1, 4))
    role = jnp.asarray([[PERSON_SLOT, 0, PERSON_QUERY, PERSON_QUERY]])
    index = jnp.asarray([[0, -1, 2, 3]])
    crops = jnp.asarray([[2]])  # the query draws A, whom slot 0 shows
    allowed = jnp.asarray([[[True, True, False, False, False]]])  # columns: no one, then the positions
    at = lambda *w: jnp.asarray([[list(w)]], jnp.float32)  # noqa: E731
    loss = lambda attn, c=crops: float(retrieval_loss(attn, allowed, c, role, index, identity, mask)[0])  # noqa: E731
    top1 = lambda attn, c=crops: float(retrieval_loss(attn, allowed, c, role, index, identity, mask)[2])  # noqa: E731
    assert loss(at(0, 1, 0, 0, 0)) == pytest.approx(0.0, abs=1e-6)
    assert loss(at(0.5, 0.5, 0, 0, 0)) == pytest.approx(np.log(2.0), abs=1e-5)
    assert loss(at(1, 0, 0, 0, 0)) > 10.0
    assert (top1(at(0, 1, 0, 0, 0)), top1(at(0.6, 0.4, 0, 0, 0))) == (1.0, 0.0)
    b_query = jnp.asarray([[3]])  # B: no earlier slot shows B, so 'no one' is right
    assert loss(at(1, 0, 0, 0, 0), b_query) == pytest.approx(0.0, abs=1e-6)
    assert loss(at(0, 1, 0, 0, 0), b_query) > 10.0
    assert float(retrieval_loss(at(0, 1, 0, 0, 0), allowed, jnp.asarray([[-1]]), role, index, identity, mask)[1]) == 0.0


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    run = save_tiny_checkpoint(tmp_path_factory.mktemp("person_run") / "run",
                               ["model.mllm.person_slots=true", "model.mllm.identity_dim=128",
                                "model.llm.vocab_size=1088"])
    return ChatSession.from_checkpoint(run, identity_embedder=False)


def test_session_draws_named_people_with_what_one_pass_retrieves(session, monkeypatch):
    """A sampled chat: each drawing's person queries are the people its request names (first on the left), a
    drawn image is written back with their slots, the cache holds the template's encoding, and what the person
    queries retrieve (the identities handed to the detokenizer) is what one pass of the model over the whole
    history retrieves."""
    seen = []
    real = session_module.with_predicted
    monkeypatch.setattr(session_module, "with_predicted",
                        lambda *a, **kw: seen.append((np.asarray(a[4]), kw["drawn"])) or real(*a, **kw))
    session.reset()
    session.replay(Conversation(id="chat", people=[Person("Maya"), Person("Julian")], rounds=[]))
    force = session.options(force_image=True, max_new_tokens=3)
    photo = _image(5, ["Julian"])  # a photo of Julian (his recorded identity): a slot with an identity
    session.round("This is Julian.", [photo], seed=0, options=session.options(max_new_tokens=2))
    session.round("Draw Maya and Julian in the park.", seed=1, options=force)
    session.round("Now show Maya at the beach.", seed=2, options=force)
    assert [d for _, d in seen] == [["Maya", "Julian"], ["Maya"]]
    history = session.history
    assert [p.name for p in history.rounds[1].assistant_image.people] == ["Maya", "Julian"]
    session.flush()
    enc = session.template.encode(history, add_generation_prompt=False)
    assert [t[0] for t in session.cache.tokens[0]] == enc.input_ids[:-1].tolist()
    slots = np.flatnonzero(enc.role == PERSON_SLOT)
    assert sorted(session.cache.people[0]) == slots.tolist() and len(slots) == 4  # Julian; Maya, Julian; Maya

    mllm = nnx.merge(session.graph, session.state).mllm
    pixels = jnp.asarray(np.stack([preprocess_image(im.pixels, session.image_size) for im in enc.images]))[None]
    ids, role, ii = (jnp.asarray(a)[None] for a in (enc.input_ids, enc.role, enc.image_index))
    known = shown_identities(enc.images, 128, len(enc.images), "history")
    assert known[1][1] == 1  # the photo's crop carries Julian's identity
    full = mllm(ids, role, ii, images=pixels, num_query_blocks=3,
                slot_identity=(jnp.asarray(known[0])[None], jnp.asarray(known[1])[None]))
    np.testing.assert_allclose(seen[0][0][:2], np.asarray(full.identity[0, :2]), atol=2e-4)  # round 1: Maya, Julian
    np.testing.assert_allclose(seen[1][0][0], np.asarray(full.identity[0, 2]), atol=2e-4)  # round 2: Maya


def test_cache_chunks_keep_a_name_with_its_slot():
    """A chunk boundary never falls between a person slot and the name tokens before it (its key reads them)."""
    tokens = [(1, 0, None)] * 300
    for at in (254, 255, 256, 257):
        row = list(tokens)
        row[at] = (7, PERSON_SLOT, "crop")
        cuts = np.cumsum([len(p) for p in pieces(row, 256)])[:-1]
        assert all(not (at - NAME_TOKENS < c <= at) for c in cuts), (at, cuts)
        assert sum(len(p) for p in pieces(row, 256)) == 300


def test_adaptation_draws_with_the_identities_the_retrieval_found_laid_out_as_sampling_does():
    """The detokenizer adapting to the MLLM's predictions (train.trainable [dit]) is given what sampling gives it:
    each person query's retrieved identity (zero: none), two people in the left / right halves, one over the
    whole image (persons.layout_boxes); without person slots, nothing."""
    from types import SimpleNamespace

    from cig_jax.data.persons import layout_boxes
    from cig_jax.train.stages import drawn_identities
    a, b = np.eye(DE, dtype=np.float32)[:2]
    # two blocks of P = 2 queries: block 0 draws A and B (B found no one), block 1 draws A alone
    ident = jnp.asarray(np.stack([a, np.zeros(DE, np.float32), a, np.zeros(DE, np.float32)])[None])
    out = SimpleNamespace(identity=ident, identity_image_index=jnp.asarray([[1, 2, 3, -1]]),
                          identity_valid=jnp.asarray([[True, True, True, False]]))
    got, on, boxes = drawn_identities(out, 2, 2)
    np.testing.assert_array_equal(np.asarray(got[0, 0]), a)
    assert np.asarray(on).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    np.testing.assert_allclose(np.asarray(boxes[0]), layout_boxes(2))
    np.testing.assert_allclose(np.asarray(boxes[1, 0]), layout_boxes(1)[0])
    out.identity = ident.at[0, 1].set(jnp.asarray(b))  # B found: both on
    assert np.asarray(drawn_identities(out, 2, 2)[1]).tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert drawn_identities(SimpleNamespace(identity=None, identity_image_index=None), 2, 2) == (None, None, None)
