"""The MLLM and its chat template: frozen ViT, loss masks, cached rounds equal the full forward, token round trip."""
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
from cig_jax.data.chat_template import IMAGE_QUERY, INPUT_IMAGE, pad_to
from cig_jax.data.schema import Conversation, Image, Round
from cig_jax.models.llm import KVCache
from cig_jax.models.mllm import MLLM, mllm_loss, pool_targets, regression_loss

ROOT = Path(__file__).resolve().parents[1]
Q = 4  # num_image_tokens of the tiny config


def _img(seed):
    return Image(pixels=np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8))


def _conv_two_images():
    """3 rounds, 2 images: a user image (round 0) and an assistant image (round 1) that round 2 refers to."""
    return Conversation(id="t", rounds=[
        Round(user_text="Julian has red hair.", user_images=[_img(0)], assistant_text="Sure."),
        Round(user_text="Draw Julian and Maya in the park.", assistant_text="Here are Julian and Maya.",
              assistant_image=_img(1)),
        Round(user_text="Who wears a hat?", assistant_text="Maya wears a hat."),
    ])


def _conv_three_images():
    """Assistant images in rounds 0 and 2, a user image in round 1 (text between the <image> marker)."""
    return Conversation(id="c", rounds=[
        Round(user_text="Draw Nora at the beach.", assistant_text="Here is Nora.", assistant_image=_img(2)),
        Round(user_text="This is Leo: <image> Leo has a round face.", user_images=[_img(3)],
              assistant_text="Nice to meet Leo."),
        Round(user_text="Draw Leo and Nora in the snow.", assistant_image=_img(4)),
    ])


@pytest.fixture(scope="module")
def model_cfg(template):
    cfg = load_config(ROOT / "configs" / "model" / "tiny.yaml").model
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=len(template.tokenizer)))


@pytest.fixture(scope="module")
def model(model_cfg):
    return MLLM(model_cfg, rngs=nnx.Rngs(0))


def _batch(template, conv, pad=0, seed=0):
    enc = template.encode(conv)
    arrays = pad_to(enc, len(enc) + pad, template.pad_id)
    images = np.random.default_rng(seed).standard_normal((len(enc.images), 32, 32, 3)).astype(np.float32)
    batch = {k: jnp.asarray(v[None]) for k, v in arrays.items() if k != "round_index"}
    batch["images"] = jnp.asarray(images[None])
    return enc, batch


def _loss_fn(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def f(params, batch):
        return mllm_loss(nnx.merge(graphdef, params, rest), batch)

    return params, f


# ----------------------------------------------------------------------------------------------------------
def test_lm_head_at_the_loss_positions_only_gives_the_full_loss_and_gradient(model, model_cfg, template):
    """model.mllm.lm_head_fraction: the head runs on the positions carrying loss only; with room for all of them the
    loss and its gradient are the full head's; with too little room the excess is dropped and counted."""
    enc, batch = _batch(template, _conv_two_images(), pad=7)
    n = int(np.asarray(batch["loss_mask"][0, 1:]).sum())
    t = batch["input_ids"].shape[1]

    def run(fraction):
        m = dataclasses.replace(model_cfg, mllm=dataclasses.replace(model_cfg.mllm, lm_head_fraction=fraction))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        graphdef = nnx.split(MLLM(m, rngs=nnx.Rngs(0)))[0] if fraction else graphdef

        def f(p):
            loss, metrics = mllm_loss(nnx.merge(graphdef, p, rest), batch)
            return loss, metrics

        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        return float(metrics["lm_loss"]), metrics, grads

    full, _, g_full = run(0.0)
    sel, metrics, g_sel = run((n + 2) / t)
    assert abs(sel - full) < 1e-5 * max(1.0, abs(full)) and int(metrics["lm_tokens_dropped"]) == 0
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_sel)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
    short, metrics, _ = run((n - 3) / t)
    assert int(metrics["lm_tokens_dropped"]) == 3 and abs(short - full) > 1e-6


@pytest.mark.long
def test_regression_grads_reach_llm_and_output_resampler_but_not_frozen_vit(model, template):
    _, batch = _batch(template, _conv_two_images())
    params, f = _loss_fn(model)
    grads = jax.grad(lambda p: f(p, batch)[1]["reg_loss"])(params)
    total = jax.grad(lambda p: f(p, batch)[0])(params)

    def norm(tree):
        return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))

    for g in (grads, total):  # the ViT is frozen: exactly zero, whatever the loss
        assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(g["vit"]))
    assert norm(grads["output_resampler"]) > 0
    assert norm(grads["llm"]["layers"]) > 0
    assert norm(grads["input_resampler"]) > 0  # the query block attends to the user image's tokens
    assert norm(grads["llm"]["lm_head"]) == 0  # the regression never reads the LM head
    assert norm(total["llm"]["lm_head"]) > 0


def test_text_loss_ignores_user_turns_and_padding(model, template):
    enc, batch = _batch(template, _conv_two_images(), pad=7)
    ids, mask = np.asarray(batch["input_ids"][0]), np.asarray(batch["loss_mask"][0])
    tok = template.tokenizer
    # targets are exactly the assistant's words, the <img> that starts its drawing, and the final </s>
    assert tok.decode(ids[mask == 1]) == "Sure.Here are Julian and Maya.<img>Maya wears a hat.</s>"
    assert not mask[: len(enc)][enc.role != 0].any()

    params, f = _loss_fn(model)
    base = f(params, dict(batch, labels=batch["input_ids"]))[1]["lm_loss"]
    rng = np.random.default_rng(1)
    labels = ids.copy()
    ignored = np.flatnonzero(mask == 0)  # user turns, image slots, </img>, padding
    labels[ignored] = rng.integers(0, 1024, ignored.size)
    same = f(params, dict(batch, labels=jnp.asarray(labels[None])))[1]["lm_loss"]
    assert float(same) == float(base)
    labels[np.flatnonzero(mask == 1)[0]] = (ids[np.flatnonzero(mask == 1)[0]] + 1) % 1024
    assert float(f(params, dict(batch, labels=jnp.asarray(labels[None])))[1]["lm_loss"]) != float(base)


@pytest.mark.long
def test_cached_rounds_equal_full_forward(model, template):
    enc, batch = _batch(template, _conv_three_images(), seed=3)
    images = batch["images"]
    full = model(batch["input_ids"], batch["role"], batch["image_index"], images=images)
    assert full.visual_embeddings.shape == (1, 3, Q, 64)
    np.testing.assert_array_equal(np.asarray(full.query_image_index), [[0, 2, -1]])  # 2 query blocks, 3 images

    feats = model.encode_images(images)  # the session encodes each image once
    graphdef, state = nnx.split(model)

    @jax.jit
    def append(state, ids, role, ii, cache):
        out = nnx.merge(graphdef, state)(ids, role, ii, image_features=feats, cache=cache, num_query_blocks=0)
        return out.hidden_states, out.cache

    generate = jax.jit(lambda state, cache: nnx.merge(graphdef, state).generate_image(cache, template.query_ids))
    cache = KVCache.init(model.llm.cfg, 1, len(enc))
    ids, role, ii = (np.asarray(batch[k]) for k in ("input_ids", "role", "image_index"))
    is_query = enc.role == IMAGE_QUERY
    query_starts = [int(t) for t in np.flatnonzero(is_query & ~np.concatenate([[False], is_query[:-1]]))]
    # chunk boundaries: every round start and every query block (generated in one step)
    cuts = sorted(set(np.flatnonzero(np.diff(enc.round_index) != 0) + 1) | set(query_starts))
    pos, generated = 0, []
    for cut in cuts + [len(enc)]:
        if cut > pos:
            sl = slice(pos, cut)
            hidden, cache = append(state, ids[:, sl], role[:, sl], ii[:, sl], cache)
            np.testing.assert_allclose(hidden, full.hidden_states[:, sl], atol=1e-5)
            pos = cut
        if cut in query_starts:
            vis, cache = generate(state, cache)
            generated.append(vis)
            pos = cut + Q
    assert len(generated) == 2
    for k, vis in enumerate(generated):
        np.testing.assert_allclose(vis[0], full.visual_embeddings[0, k], atol=1e-5)


def test_chat_template_lays_out_three_rounds_two_images(template):
    conv = _conv_two_images()
    enc = template.encode(conv)
    starts = np.flatnonzero(np.diff(np.concatenate([[0], enc.role])) > 0)  # where each image block's slots begin
    kinds = [(int(enc.role[t]), int(enc.round_index[t])) for t in starts]
    assert kinds == [(INPUT_IMAGE, 0), (IMAGE_QUERY, 1), (INPUT_IMAGE, 1)]
    # the assistant image: query block and write-back input block both name image 1
    assert set(enc.image_index[enc.role == IMAGE_QUERY]) == {1}
    assert set(enc.image_index[enc.role == INPUT_IMAGE]) == {0, 1}
    assert len(enc.images) == 2 and enc.images[1] is conv.rounds[1].assistant_image
    text = template.tokenizer.decode(enc.input_ids)
    assert text.startswith("<s>[INST] <img>") and "[/INST]\nSure.\n[INST] Draw" in text and text.endswith("</s>")

    # a pending last round ends with the generation prompt (no </s>)
    pending = Conversation(id="p", rounds=conv.rounds[:1] + [Round(user_text="Draw Maya.")])
    prompt = template.encode(pending)
    assert template.tokenizer.decode(prompt.input_ids).endswith("[/INST]\n") and prompt.loss_mask[-1] == 0


def test_targets_pool_like_seedx_and_config_mismatches_are_named(model_cfg):
    f = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)
    np.testing.assert_allclose(pool_targets(f, 4, "sequence"), f.reshape(2, 4, 4, 3).mean(2))  # avg_pool1d(4)
    grid = pool_targets(f, 4, "grid")  # 4x4 grid -> 2x2 windows
    np.testing.assert_allclose(grid[:, 0], f[:, [0, 1, 4, 5]].mean(1))
    bad = dataclasses.replace(model_cfg, output_resampler=dataclasses.replace(model_cfg.output_resampler, num_queries=9))
    with pytest.raises(ConfigError, match="output_resampler.num_queries"):
        check(bad, key="model")


def test_position_normalized_regression_weighs_each_slot_by_its_target_variance():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 3, 4, 8))  # [batch, blocks, Q, D]
    valid = np.array([[1, 1, 0], [1, 0, 1]])
    # known answer: per slot, the mean squared error over valid blocks / the slot's target variance over them
    v = valid.astype(bool)
    want = np.mean(((pred - target) ** 2)[v].mean(-1) / target[v].var(0).mean(-1))
    np.testing.assert_allclose(regression_loss(pred, target, valid, "mse_position"), want, rtol=1e-5)
    # invariance: scaling one slot's targets and predictions (a slot whose targets vary more) leaves it unchanged,
    # where the plain MSE grows with the scale
    scale = np.array([1.0, 10.0, 1.0, 1.0])[:, None]
    np.testing.assert_allclose(regression_loss(pred * scale, target * scale, valid, "mse_position"), want, rtol=1e-5)
    assert regression_loss(pred * scale, target * scale, valid, "mse") > 10 * regression_loss(pred, target, valid)
    # padded blocks play no part
    junk = np.where(v[..., None, None], target, 1e3)
    np.testing.assert_allclose(regression_loss(pred, junk, valid, "mse_position"), want, rtol=1e-5)


@pytest.mark.long
def test_train_step_compiles_ahead_of_time_sharded_by_batch(model_cfg):
    """The AOT bench's step on an 8-device FSDP mesh keeps activations split by batch: each device runs the ViT
    on its own 2 of the 16 images and the LLM on its own sequence. (Without the activation constraints, XLA
    meets the FSDP-sharded weights by gathering the whole batch onto every device once weights are wide.)"""
    from cig_jax import sharding
    from cig_jax.train.compile import compile_train_step
    from cig_jax.config import Config, DataConfig, MeshConfig, TrainConfig

    m = model_cfg
    wide = dataclasses.replace(
        m, llm=dataclasses.replace(m.llm, hidden_size=512, intermediate_size=2048, num_heads=8, num_kv_heads=8),
        vit=dataclasses.replace(m.vit, hidden_size=512, intermediate_size=2048,
                                attn_pool=dataclasses.replace(m.vit.attn_pool, kv_dim=512)),
        input_resampler=dataclasses.replace(m.input_resampler, embed_dim=512),
        output_resampler=dataclasses.replace(m.output_resampler, kv_dim=512))
    cfg = Config(model=wide, mesh=MeshConfig(data=1, fsdp=8, tensor=1), train=TrainConfig(stage="personalize"),
                 data=DataConfig(seq_len=32, max_images=2))
    report = compile_train_step(cfg, sharding.make_mesh(cfg.mesh), verbose=False)
    assert report["global_batch"] == 8 and report["frozen_params"] > 0
    hlo = report["compiled"].as_text()
    assert "f32[2,16,2048]" in hlo and "f32[16,16,2048]" not in hlo  # ViT MLP: 2 images x 16 patches
    assert "f32[1,32,2048]" in hlo and "f32[8,32,2048]" not in hlo  # LLM MLP: 1 sequence x 32 tokens
    assert report["compiled"].memory_analysis() is not None


def test_image_tokens_enter_at_the_llms_embedding_scale(model_cfg):
    """model.mllm.image_token_rms: every input image token has that root-mean-square before the patch position is
    added (a released LLM's layers expect its own embeddings' scale); 0 leaves the resampler's output alone."""
    feats = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, model_cfg.input_resampler.kv_dim)) * 7.0,
                        jnp.float32)
    cfg = dataclasses.replace(model_cfg, mllm=dataclasses.replace(model_cfg.mllm, image_token_rms=0.13,
                                                                  add_patch_pos=False))
    scaled = MLLM(cfg, rngs=nnx.Rngs(0)).image_tokens(feats)
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(np.asarray(scaled)), axis=-1)), 0.13, rtol=1e-5)
    raw = MLLM(dataclasses.replace(cfg, mllm=dataclasses.replace(cfg.mllm, image_token_rms=0.0)),
               rngs=nnx.Rngs(0)).image_tokens(feats)
    direction = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(direction(scaled), direction(raw), atol=1e-5)  # the same tokens, rescaled
    assert abs(float(np.sqrt(np.mean(np.square(np.asarray(raw))))) - 0.13) > 0.05
