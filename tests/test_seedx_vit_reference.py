"""Our Qwen-VL ViT (the SEED-X visual encoder) against an independent PyTorch forward pass.

A tiny random `qwen_vl_reference.QwenVisual` (written from the published Qwen-VL architecture, its state dict
named as Qwen-VL-Chat's `transformer.visual`) is saved as a torch file, loaded by the run's own loader
(`init_weights.vit`: `cig_jax.convert.init` -> `seedx.vit_to_ours`) and both forwards are compared number for
number (fp32, 1e-4), at the native patch grid and at a larger one (positions and attention-pool keys resized
bicubically). Every reference tensor is then perturbed in turn: each perturbation must break the match, so no
tensor passes unchecked.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen_vl_reference import QwenVisual, jitter

from cig_jax.config import Config, MeshConfig
from cig_jax.config_model import ModelConfig, ResamplerConfig, ViTConfig
from cig_jax.convert.init import load_abstract
from cig_jax.models.vit import VisionTransformer
from cig_jax.sharding import make_mesh
from cig_jax.train.state import sharded_abstract

# Every width differs and every attention has several heads, so a transposed or mis-split tensor cannot pass.
VIT = ViTConfig(image_size=28, patch_size=7, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=3,
                hidden_act="gelu", layer_norm_eps=1e-6, pos_grid_size=4, pool="resampler",
                attn_pool=ResamplerConfig(num_queries=16, embed_dim=16, num_heads=2, kv_dim=24, out_dim=16,
                                          layer_norm_eps=1e-6))
TOL = dict(atol=1e-4, rtol=1e-4)


def reference(seed: int = 0) -> QwenVisual:
    torch.manual_seed(seed)
    pool = VIT.attn_pool
    ref = QwenVisual(patch=VIT.patch_size, width=VIT.hidden_size, layers=VIT.num_layers, heads=VIT.num_heads,
                     mlp_width=VIT.intermediate_size, pos_side=VIT.pos_grid_size, num_queries=pool.num_queries,
                     out_dim=pool.out_dim, pool_heads=pool.num_heads, eps=VIT.layer_norm_eps)
    return jitter(ref, seed=seed)


def save_qwen_vit(ref: torch.nn.Module, path) -> None:
    """As Qwen-VL-Chat stores its visual encoder: names under `transformer.visual.`."""
    torch.save({"transformer.visual." + k: v.detach().clone() for k, v in ref.state_dict().items()}, path)


def load_ours(path, vit: ViTConfig = VIT) -> VisionTransformer:
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1)
    cfg = Config(model=ModelConfig(vit=vit), mesh=mesh_cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VisionTransformer(vit, rngs=nnx.Rngs(0))))
    abstract = sharded_abstract(abstract, make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.axis_rules)
    return nnx.merge(graphdef, load_abstract(abstract, "vit", str(path), cfg, say=lambda *a: None))


def pixels(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def run_ref(ref, px):
    with torch.no_grad():
        return tuple(t.numpy() for t in ref(torch.from_numpy(px)))


_forward = jax.jit(lambda m, x: m(x))


def run_ours(ours, px):
    out = _forward(ours, jnp.asarray(px.transpose(0, 2, 3, 1)))  # ours: channels-last
    return np.asarray(out.last_hidden_state), np.asarray(out.pooled)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_vit") / "qwen_vit_G.pt"
    ref = reference()
    save_qwen_vit(ref, path)
    return ref, load_ours(path)


@pytest.mark.parametrize("size", [28, 42])  # 4x4 patches (the table's grid); 6x6 (4x4 positions resized)
def test_qwen_vit_matches_independent_torch_reference(loaded, size):
    ref, ours = loaded
    (hidden_ref, pooled_ref), (hidden, pooled) = run_ref(ref, pixels(size)), run_ours(ours, pixels(size))
    assert pooled.shape == pooled_ref.shape == (2, VIT.attn_pool.num_queries, VIT.attn_pool.out_dim)
    np.testing.assert_allclose(hidden, hidden_ref, **TOL)
    np.testing.assert_allclose(pooled, pooled_ref, **TOL)
    assert np.abs(pooled_ref).mean() > 0.1  # not a comparison of near-zero outputs


def test_python_loop_and_remat_match_too(loaded, tmp_path):
    ref, _ = loaded
    save_qwen_vit(ref, tmp_path / "vit.pt")
    ours = load_ours(tmp_path / "vit.pt", dataclasses.replace(VIT, scan_layers=False, remat_policy="full"))
    np.testing.assert_allclose(run_ours(ours, pixels(28, 1))[1], run_ref(ref, pixels(28, 1))[1], **TOL)


def test_every_reference_tensor_is_checked(loaded):
    """Perturbing any one reference tensor (ours unchanged) must break the match at the test's tolerance. The
    attention pool's sin-cos table is fixed (the loader rejects any other table), so it is not perturbed."""
    ref, ours = loaded
    px = pixels(42)
    hidden, pooled = run_ours(ours, px)
    g = torch.Generator().manual_seed(1)
    unnoticed = []
    for name, tensor in ref.state_dict().items():
        if name == "attn_pool.pos_embed":
            continue
        saved = tensor.clone()
        with torch.no_grad():
            tensor.add_(0.02 * torch.randn(tensor.shape, generator=g))
            hidden_ref, pooled_ref = run_ref(ref, px)
            tensor.copy_(saved)
        if np.allclose(pooled, pooled_ref, **TOL) and np.allclose(hidden, hidden_ref, **TOL):
            unnoticed.append(name)
    assert unnoticed == []
    np.testing.assert_allclose(run_ref(ref, px)[1], pooled, **TOL)  # restored
