"""Visual encoder: a configurable pre-norm ViT (CLIP, SigLIP, Qwen-VL ViT-G as used by SEED-X).

Owns: patch embedding, learned positions (resized to the input's patch grid with torch-exact bicubic or
bilinear interpolation, so any resolution divisible by the patch works), the stacked pre-norm blocks run
under `lax.scan` with an optional remat policy, and the variant heads: CLIP class-token pool, SigLIP MAP
head, Qwen-VL attention-pool resampler (256 queries -> ln_post -> 4096x4096 projection).

Does not own: image preprocessing (resize/normalise: the data pipeline), checkpoint names (`convert/`),
the resampler itself (`resampler.py`).

Input images are channels-last: pixel_values [batch, height, width, channels], already normalised.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from cig_jax.config_model import ResamplerConfig, ViTConfig
from cig_jax.models import layers
from cig_jax.models.layers import dtype_of
from cig_jax.models.resampler import CrossAttention, Resampler, resize_grid

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
_INIT = nnx.initializers.normal(0.02)


def qwen_vit_g_config(**overrides) -> ViTConfig:
    """The Qwen-VL ViT-G of SEED-X: 448 px, patch 14, width 1664, 48 layers, 16 heads, mlp int(1664*4.9231),
    16x16 learned positions, attention pool of 256 queries (4096 wide, 32 heads) -> ln_post -> 4096x4096."""
    cfg = ViTConfig(
        image_size=448, patch_size=14, hidden_size=1664, intermediate_size=int(1664 * 4.9231), num_layers=48,
        num_heads=16, hidden_act="gelu", layer_norm_eps=1e-6, class_token=False, patch_bias=False,
        pos_grid_size=16, pre_norm=True, post_norm="none", pool="resampler",
        attn_pool=ResamplerConfig(num_queries=256, embed_dim=4096, num_heads=32, kv_dim=1664, out_dim=4096,
                                  proj_bias=False, layer_norm_eps=1e-6),
    )
    return dataclasses.replace(cfg, **overrides)


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------
class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, use_bias=True, dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT)
        self.fc1 = layers.Dense(dim, hidden, ("embed", "mlp"), **kw)
        self.fc2 = layers.Dense(hidden, dim, ("mlp", "embed"), **kw)
        self.act = ACTIVATIONS[act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        ln = dict(eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pd, rngs=rngs)
        self.ln_1 = layers.layer_norm(cfg.hidden_size, **ln)
        self.attn = CrossAttention(cfg.hidden_size, cfg.num_heads, rngs=rngs, dtype=dt, param_dtype=pd,
                                   attention_impl=cfg.attention_impl)  # used as self-attention
        self.ln_2 = layers.layer_norm(cfg.hidden_size, **ln)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, rngs=rngs, dtype=dt, param_dtype=pd)

    def __call__(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h)
        return x + self.mlp(self.ln_2(x))


class MAPHead(nnx.Module):
    """SigLIP multihead attention-pooling head: one learned probe attends to the tokens -> [batch, dim]."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dt
        self.probe = layers.param(rngs, _INIT, (1, cfg.hidden_size), (None, "embed"), pd)
        self.attention = CrossAttention(cfg.hidden_size, cfg.num_heads, rngs=rngs, dtype=dt, param_dtype=pd,
                                        attention_impl=cfg.attention_impl)
        self.layernorm = layers.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pd,
                                           rngs=rngs)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, rngs=rngs, dtype=dt, param_dtype=pd)

    def __call__(self, x):
        # x: [batch, len, dim] -> [batch, dim]
        probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (x.shape[0], *self.probe.shape))
        h = self.attention(probe, x, x)  # [batch, 1, dim]
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


# ----------------------------------------------------------------------------------------------------------
# Vision transformer
# ----------------------------------------------------------------------------------------------------------
class ViTOutput(NamedTuple):
    last_hidden_state: jax.Array  # [batch, tokens, hidden] (tokens = patches, +1 with a class token)
    pooled: Optional[jax.Array]  # cls/map: [batch, hidden]; resampler: [batch, num_queries, out_dim]; none: None


class VisionTransformer(nnx.Module):
    """pixel_values [batch, height, width, channels] -> ViTOutput. Layers stacked on a leading 'layers' axis."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dt
        d, p = cfg.hidden_size, cfg.patch_size
        self.pos_side = cfg.pos_grid_size or cfg.image_size // p
        # Patch embedding as a [p, p, channels, hidden] kernel (a stride-p convolution written as an einsum).
        self.patch_kernel = layers.param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                         (p, p, cfg.num_channels, d), (None, None, "conv_in", "embed"), pd)
        self.patch_bias = (layers.param(rngs, nnx.initializers.zeros_init(), (d,), ("embed",), pd)
                           if cfg.patch_bias else None)
        self.class_token = layers.param(rngs, _INIT, (d,), ("embed",), pd) if cfg.class_token else None
        num_pos = self.pos_side ** 2 + int(cfg.class_token)
        self.pos_embed = layers.param(rngs, _INIT, (num_pos, d), (None, "embed"), pd)
        ln = dict(eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pd, rngs=rngs)
        self.ln_pre = layers.layer_norm(d, **ln) if cfg.pre_norm else None

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.ln_post = layers.layer_norm(d, **ln) if cfg.post_norm != "none" else None
        self.head = MAPHead(cfg, rngs=rngs) if cfg.pool == "map" else None
        # The attention pool runs with the ViT's execution settings (its own dtype fields are ignored here).
        pool_cfg = cfg.attn_pool and dataclasses.replace(cfg.attn_pool, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                                         attention_impl=cfg.attention_impl)
        self.attn_pool = Resampler(pool_cfg, rngs=rngs) if cfg.pool == "resampler" else None

    # -- pieces ----------------------------------------------------------------------------------------
    def positions(self, grid: tuple[int, int]) -> jax.Array:
        """Learned positions for a patch grid (gh, gw) -> [(1 +) gh*gw, hidden], fp32; resized when needed."""
        table = self.pos_embed[...]
        cls = table[:1] if self.cfg.class_token else None
        patches = table[1:] if self.cfg.class_token else table
        patches = resize_grid(patches, (self.pos_side, self.pos_side), grid, self.cfg.pos_interpolation)
        return patches if cls is None else jnp.concatenate([cls.astype(patches.dtype), patches], axis=0)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """[batch, H, W, C] -> tokens [batch, (1 +) (H//p)*(W//p), hidden] with positions added."""
        p = self.cfg.patch_size
        b, h, w, c = pixel_values.shape
        gh, gw = h // p, w // p
        x = pixel_values[:, : gh * p, : gw * p].astype(self.dtype).reshape(b, gh, p, gw, p, c)
        x = jnp.einsum("byixjc,ijcd->byxd", x, self.patch_kernel[...].astype(self.dtype))
        if self.patch_bias is not None:
            x = x + self.patch_bias[...].astype(self.dtype)
        x = x.reshape(b, gh * gw, -1)  # [batch, patches, hidden]
        if self.class_token is not None:
            cls = jnp.broadcast_to(self.class_token[...].astype(self.dtype), (b, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        return (x + self.positions((gh, gw)).astype(self.dtype)).astype(self.dtype)

    def _run_blocks(self, x: jax.Array) -> jax.Array:
        graphdef, state = nnx.split(self.blocks)

        def body(x, block_state):
            return nnx.merge(graphdef, block_state)(x), None

        body = layers.remat(body, self.cfg.remat_policy, scanned=self.cfg.scan_layers)
        x, _ = layers.scan_or_loop(body, x, state, scan=self.cfg.scan_layers, length=self.cfg.num_layers)
        return x

    # -- forward -----------------------------------------------------------------------------------------
    def __call__(self, pixel_values: jax.Array) -> ViTOutput:
        x = self.embed(pixel_values)  # [batch, tokens, hidden]
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = self._run_blocks(x)  # [batch, tokens, hidden]
        pooled = None
        if self.cfg.post_norm == "hidden":
            x = self.ln_post(x)
        if self.cfg.pool == "cls":
            pooled = x[:, 0]  # [batch, hidden]
            if self.cfg.post_norm == "pooled":
                pooled = self.ln_post(pooled)
        elif self.cfg.pool == "map":
            pooled = self.head(x)  # [batch, hidden]
        elif self.cfg.pool == "resampler":
            pooled = self.attn_pool(x)  # [batch, num_queries, out_dim]
        return ViTOutput(x, pooled)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """What SEED-X feeds the input resampler: the pooled tokens of a 'resampler' ViT ([batch, 256, 4096] for
        ViT-G), else the last hidden state's patch tokens (a CLIP class token is left out, as LLaVA selects
        'patch' features: the resampler reads a square grid)."""
        out = self(pixel_values)
        if self.cfg.pool == "resampler":
            return out.pooled
        return out.last_hidden_state[:, 1:] if self.cfg.class_token else out.last_hidden_state
