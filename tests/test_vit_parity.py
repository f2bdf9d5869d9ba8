"""Our ViT loaded from tiny random transformers CLIP / SigLIP vision models reproduces their outputs (fp32)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cig_jax.convert.checkpoint_io import CheckpointError
from cig_jax.convert.hf_vit import load_hf_vit
from cig_jax.models import vit as vit_lib

TINY = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4)


def _save(kind: str, path, **extra):
    import transformers

    torch.manual_seed(0)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY, **extra))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY, **extra))
    with torch.no_grad():  # make the zero-initialised biases and unit norms non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path)
    return model


def _compare(ref, ours, size, pooled_ndim):
    x = np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        r = ref(pixel_values=torch.from_numpy(x), interpolate_pos_encoding=True)
    out = jax.jit(lambda m, px: m(px))(ours, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), r.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    if pooled_ndim:
        assert out.pooled.ndim == pooled_ndim
        np.testing.assert_allclose(np.asarray(out.pooled), r.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_vision_tower_matches_transformers_at_native_and_other_resolution(kind, tmp_path):
    ref = _save(kind, tmp_path)
    ours = load_hf_vit(tmp_path)
    assert ours.cfg.pool == ("cls" if kind == "clip" else "map")
    for size in (32, 48):  # 48 px: the 4x4 position grid is bicubically resized to 6x6
        _compare(ref, ours, size, pooled_ndim=2)


def test_siglip_without_head_and_python_loop_matches(tmp_path):
    ref = _save("siglip", tmp_path, vision_use_head=False)
    ours = load_hf_vit(tmp_path, scan_layers=False, remat_policy="full")
    assert ours.head is None
    _compare(ref, ours, 40, pooled_ndim=0)


def test_sharded_checkpoint_with_vision_model_prefix_loads(tmp_path):
    from safetensors.numpy import load_file, save_file

    ref = _save("clip", tmp_path / "src")
    tensors = load_file(str(tmp_path / "src" / "model.safetensors"))
    names = sorted(tensors)
    dst = tmp_path / "sharded"
    dst.mkdir()
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({"vision_model." + k: tensors[k] for k in keys}, str(dst / fname))
        weight_map.update({"vision_model." + k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (dst / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    _compare(ref, load_hf_vit(dst), 32, pooled_ndim=2)


def test_mismatched_checkpoint_names_every_bad_tensor(tmp_path):
    _save("clip", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80  # fc1/fc2 shapes now disagree
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blocks\.mlp\.fc1\.kernel"):
        load_hf_vit(tmp_path)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 96, 1  # layer 1 now has no place in the model
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"no place for.*encoder\.layers\.1\."):
        load_hf_vit(tmp_path)


def test_qwen_vit_shapes_logical_names_and_resolution_change():
    cfg = vit_lib.qwen_vit_g_config(image_size=56, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                    pos_grid_size=2)
    cfg = dataclasses.replace(cfg, attn_pool=dataclasses.replace(cfg.attn_pool, num_queries=4, embed_dim=16,
                                                                 num_heads=2, kv_dim=32, out_dim=24))
    model = vit_lib.VisionTransformer(cfg, rngs=nnx.Rngs(0))
    out = model(jnp.ones((2, 56, 56, 3)))  # 4x4 patches; 2x2 learned positions resized to 4x4
    assert out.last_hidden_state.shape == (2, 16, 32)
    assert out.pooled.shape == (2, 4, 24)
    assert model.image_features(jnp.ones((1, 84, 84, 3))).shape == (1, 4, 24)  # 6x6 patch grid
    names = {p: v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert names[("blocks", "mlp", "fc1", "kernel")] == ("layers", "embed", "mlp")
    assert names[("patch_kernel",)] == (None, None, "conv_in", "embed")
    assert names[("attn_pool", "attn", "q", "kernel")] == ("embed", "heads")
