"""SEED-X checkpoint names <-> our MLLM: round trips on a synthetic state dict with the real names, the Qwen
per-head packed in_proj and conv layouts checked against torch math, and clear errors for bad checkpoints."""
import dataclasses

import numpy as np
import pytest
import torch
from flax import nnx

from cig_jax.config_model import LLMConfig, MLLMConfig, ModelConfig, ResamplerConfig, ViTConfig
from cig_jax.convert.checkpoint_io import CheckpointError
from cig_jax.convert.seedx import (vit_names, model_params, mllm_from_seedx, ours_to_seedx, seedx_shapes,
                                   seedx_to_ours)
from cig_jax.models.mllm import MLLM
from cig_jax.models.resampler import sincos_2d

# Tiny, but every part as in SEED-X: ViT width != pool width != LLM width (all kv projections exist).
CFG = ModelConfig(
    llm=LLMConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=4),
    vit=ViTConfig(image_size=28, patch_size=7, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=3,
                  pos_grid_size=4, attn_pool=ResamplerConfig(num_queries=16, embed_dim=16, num_heads=2, kv_dim=24,
                                                             out_dim=16, layer_norm_eps=1e-6)),
    input_resampler=ResamplerConfig(num_queries=4, embed_dim=32, num_heads=4, kv_dim=16),
    output_resampler=ResamplerConfig(num_queries=4, embed_dim=16, num_heads=2, kv_dim=32),
    mllm=MLLMConfig(num_image_tokens=4),
)


def _synthetic_seedx(seed=0):
    rng = np.random.default_rng(seed)
    t = {k: rng.standard_normal(s).astype(np.float32) for k, s in seedx_shapes(CFG).items()}
    for prefix, rc in (("input_resampler.", CFG.input_resampler), ("output_resampler.", CFG.output_resampler),
                       ("visual.attn_pool.", CFG.vit.attn_pool)):
        t[prefix + "pos_embed"] = np.array(sincos_2d(rc.embed_dim, int(rc.num_queries ** 0.5)))
    return t


def test_real_names_are_expected():
    names = seedx_shapes(CFG)
    for name in ("llm.model.layers.1.self_attn.q_proj.weight", "llm.lm_head.weight", "input_resampler.kv_proj.weight",
                 "output_resampler.attn.in_proj_weight", "patch_pos_embed", "visual.conv1.weight",
                 "visual.transformer.resblocks.1.attn.in_proj.weight", "visual.attn_pool.kv_proj.weight",
                 "visual.ln_post.weight", "visual.proj"):
        assert name in names, name
    assert names["visual.transformer.resblocks.0.attn.in_proj.weight"] == (72, 24)


def test_seedx_to_ours_to_seedx_is_identity():
    t = _synthetic_seedx()
    back = ours_to_seedx(seedx_to_ours(t, CFG), CFG)
    assert sorted(back) == sorted(t)
    for k in t:
        np.testing.assert_array_equal(back[k], t[k], err_msg=k)


def test_ours_to_seedx_to_ours_is_identity_through_a_built_model():
    model = MLLM(CFG, rngs=nnx.Rngs(1))
    params = model_params(model)
    loaded = mllm_from_seedx(ours_to_seedx(params, CFG), CFG)
    again = model_params(loaded)
    assert sorted(again) == sorted(params)
    for k in params:
        np.testing.assert_array_equal(again[k], params[k], err_msg=str(k))


def test_qwen_per_head_in_proj_and_conv_layouts_match_torch_math():
    t = _synthetic_seedx(2)
    ours = seedx_to_ours(t, CFG)
    w, b = t["visual.transformer.resblocks.1.attn.in_proj.weight"], t["visual.transformer.resblocks.1.attn.in_proj.bias"]
    x = np.random.default_rng(3).standard_normal((5, 24)).astype(np.float32)
    h, hd = 3, 8
    # Qwen-VL VisualAttention: in_proj(x) viewed as [..., heads, 3 * head_dim], split into q, k, v
    mixed = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b))
    q_ref, k_ref, v_ref = mixed.view(5, h, 3 * hd).split(hd, dim=-1)
    for name, ref in zip("qkv", (q_ref, k_ref, v_ref)):
        got = x @ ours[("vit", "blocks", "attn", name, "kernel")][1] + ours[("vit", "blocks", "attn", name, "bias")][1]
        np.testing.assert_allclose(got.reshape(5, h, hd), ref.numpy(), atol=1e-5)
    img = np.random.default_rng(4).standard_normal((1, 3, 28, 28)).astype(np.float32)
    conv = torch.nn.functional.conv2d(torch.from_numpy(img), torch.from_numpy(t["visual.conv1.weight"]), stride=7)
    ref = conv.flatten(2).transpose(1, 2).numpy()[0]  # [patches, width], row-major grid
    patches = img[0].transpose(1, 2, 0).reshape(4, 7, 4, 7, 3).transpose(0, 2, 1, 3, 4).reshape(16, 7, 7, 3)
    got = np.einsum("nijc,ijcd->nd", patches, ours[("vit", "patch_kernel")])
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_vit_file_prefixes_are_normalised():
    assert set(vit_names({"conv1.weight": 0, "transformer.visual.proj": 1, "visual.ln_pre.bias": 2})) == {
        "visual.conv1.weight", "visual.proj", "visual.ln_pre.bias"}


def test_missing_and_misshaped_tensors_are_all_named():
    t = _synthetic_seedx()
    del t["llm.model.layers.1.mlp.up_proj.weight"]
    t["visual.transformer.resblocks.0.attn.in_proj.weight"] = np.zeros((24, 24), np.float32)
    t["llm.model.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 32), np.float32)
    with pytest.raises(CheckpointError) as e:
        seedx_to_ours(t, CFG, source="agent.bin")
    msg = str(e.value)
    assert msg.startswith("agent.bin: ")
    assert "missing from the checkpoint: ['llm.model.layers.1.mlp.up_proj.weight']" in msg
    assert "visual.transformer.resblocks.0.attn.in_proj.weight: checkpoint (24, 24) vs expected (72, 24)" in msg
    assert "lora_A" in msg
    wrong = dataclasses.replace(CFG, vit=dataclasses.replace(CFG.vit, pool="none"))
    with pytest.raises(CheckpointError, match="Qwen-VL ViT-G"):
        seedx_shapes(wrong)
