"""Personalization DiT: a PixArt-style latent transformer conditioned on visual embeddings and identity tokens.

Owns: patch embedding with PixArt's 2-D sin-cos positions (base_size / interpolation_scale), the timestep
embedding and the shared adaLN-single modulation (`adaln_single` + per-block `scale_shift_table`), blocks
of self-attention, cross-attention to the projected condition sequence (`caption_projection` of the
MLLM's `visual_embeddings`), GELU-tanh feed-forward, the final modulated layer and unpatchify; and the
identity branch: an `IDEncoder` (face embedding -> identity tokens) injected either by 'concat' (identity
tokens appended to the condition sequence) or 'parallel' (zero-initialised cross-attention to identity
tokens after every N blocks, scaled by `id_scale`, PuLID-FLUX style), for one identity per image [b, De] or
several [b, P, De], each bound to its person's region: a patch reads only the identity tokens of the people
whose box it overlaps (`person_identities`; region-masked attention as in FastComposer / UniPortrait); optionally (`visual_grid_injection`)
the projected visual embeddings, read as a spatial grid, added to the patch tokens of their region, and
(`identity_grid_injection`) each person's projected identity added to the patch tokens of their region. With
`identity_injection='none'` and no grid injection it is number-for-number diffusers `PixArtTransformer2DModel`.

Does not own: noise schedules and samplers (`cig_jax/diffusion.py`), checkpoint loading
(`convert/diffusers.py`), face embedders (`faces/identity.py`).

Latents are NHWC: [batch, H, W, C]. Block parameters are stacked on a leading 'layers' axis and run under
`lax.scan` (or a Python loop, `scan_layers=False`) with an optional remat policy.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cig_jax.config_model import DiTConfig
from cig_jax.models import layers
from cig_jax.models.id_encoder import IDEncoder, embedding_input
from cig_jax.models.layers import dtype_of

# ----------------------------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------------------------
def sincos_2d(embed_dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float) -> np.ndarray:
    """PixArt positions [grid_h * grid_w, embed_dim], row-major tokens; first half encodes x, second half y."""
    f32 = np.float32
    ys = np.arange(grid_h, dtype=f32) / f32(grid_h / base_size) / f32(interpolation_scale)
    xs = np.arange(grid_w, dtype=f32) / f32(grid_w / base_size) / f32(interpolation_scale)
    x, y = np.meshgrid(xs, ys, indexing="xy")  # [grid_h, grid_w] each
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def one_d(pos):
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(x), one_d(y)], axis=1).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """t [b] (float or int) -> [b, dim] fp32, [cos, sin] order (diffusers flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _layer_norm(x, eps: float):
    """LayerNorm without affine parameters, computed in fp32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------
class MLP2(nnx.Module):
    """linear_1 -> act -> linear_2 (timestep embedders: SiLU; caption projection: GELU-tanh)."""

    def __init__(self, din: int, dhid: int, dout: int, act, names, *, rngs, dtype, param_dtype, zero_out: bool = False):
        kw = dict(rngs=rngs, use_bias=True, dtype=dtype, param_dtype=param_dtype)
        self.act = act
        self.linear_1 = layers.Dense(din, dhid, names[0], **kw)
        out_init = dict(kernel_init=nnx.initializers.zeros_init()) if zero_out else {}
        self.linear_2 = layers.Dense(dhid, dout, names[1], **out_init, **kw)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class Attention(nnx.Module):
    """Multi-head attention in the diffusers `Attention` layout (to_q, to_k, to_v, to_out)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, head_dim: int, *, bias: bool, zero_out: bool = False,
                 impl=None, rngs, dtype, param_dtype):
        self.heads, self.head_dim, self.impl = heads, head_dim, impl
        inner = heads * head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = layers.Dense(dim, inner, ("embed", "heads"), use_bias=bias, **kw)
        self.to_k = layers.Dense(kv_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
        self.to_v = layers.Dense(kv_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
        zero = nnx.initializers.zeros_init()
        out_init = dict(kernel_init=zero) if zero_out else {}
        self.to_out = layers.Dense(inner, dim, ("heads", "embed"), use_bias=True, **out_init, **kw)

    def __call__(self, x, context=None, mask=None):  # x [b, n, dim], context [b, m, kv_dim], mask [b, 1, 1, m]
        ctx = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, self.head_dim)
        k = self.to_k(ctx).reshape(b, ctx.shape[1], self.heads, self.head_dim)
        v = self.to_v(ctx).reshape(b, ctx.shape[1], self.heads, self.head_dim)
        o = layers.attention(q, k, v, mask=mask, implementation=self.impl)
        return self.to_out(o.reshape(b, n, self.heads * self.head_dim))


class FeedForward(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, use_bias=True, dtype=dtype, param_dtype=param_dtype)
        self.proj_in = layers.Dense(dim, hidden, ("embed", "mlp"), **kw)
        self.proj_out = layers.Dense(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.proj_out(_gelu_tanh(self.proj_in(x)))


class DiTBlock(nnx.Module):
    """adaLN-single block: modulated self-attention, plain cross-attention, modulated feed-forward."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        d = cfg.inner_dim()
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pd)
        self.eps = cfg.norm_eps
        self.scale_shift_table = layers.param(rngs, lambda k, s, t: jax.random.normal(k, s, t) / d ** 0.5,
                                              (6, d), (None, "embed"), dtype=pd)
        self.norm1 = layers.layer_norm(d, eps=cfg.norm_eps, **kw) if cfg.norm_elementwise_affine else None
        self.norm2 = layers.layer_norm(d, eps=cfg.norm_eps, **kw) if cfg.norm_elementwise_affine else None
        self.attn1 = Attention(d, d, cfg.num_heads, cfg.head_dim, bias=cfg.attention_bias, impl=cfg.attention_impl, **kw)
        self.attn2 = Attention(d, cfg.cross_attention_dim or d, cfg.num_heads, cfg.head_dim, bias=cfg.attention_bias,
                               impl=cfg.attention_impl, **kw)
        self.ff = FeedForward(d, d * cfg.mlp_ratio, **kw)

    def _norm(self, norm, x):
        return norm(x) if norm is not None else _layer_norm(x, self.eps)

    def __call__(self, x, condition, condition_mask, t6):
        # x [b, n, d]; condition [b, m, d_cross]; condition_mask [b, 1, 1, m] or None; t6 [b, 6, d]
        mod = self.scale_shift_table[...].astype(x.dtype)[None] + t6
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)  # [b, 1, d]
        h = self._norm(self.norm1, x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn1(h)
        x = x + self.attn2(x, condition, condition_mask)
        h = self._norm(self.norm2, x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(h)


class IdentityAttention(nnx.Module):
    """Parallel identity cross-attention: hidden states attend to identity tokens; output starts at zero."""

    def __init__(self, cfg: DiTConfig, id_dim: int, *, rngs: nnx.Rngs):
        d = cfg.inner_dim()
        self.eps = cfg.norm_eps
        self.attn = Attention(d, id_dim, cfg.num_heads, cfg.head_dim, bias=True, zero_out=True,
                              impl=cfg.attention_impl, rngs=rngs, dtype=dtype_of(cfg.dtype),
                              param_dtype=dtype_of(cfg.param_dtype))

    def __call__(self, x, identity_tokens, mask=None):  # [b, n, d], [b, K, id_dim], [b, 1, n, K] -> [b, n, d]
        return self.attn(_layer_norm(x, self.eps), identity_tokens, mask)


class AdaLNSingle(nnx.Module):
    """Timestep (+ optional resolution / aspect-ratio micro-conditions) -> embedded_timestep [b, d] and the
    shared modulation [b, 6 d] every block adds to its own scale_shift_table."""

    def __init__(self, cfg: DiTConfig, *, rngs, dtype, param_dtype):
        d = cfg.inner_dim()
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        names = ((None, "embed"), ("embed", "mlp"))
        self.timestep_embedder = MLP2(256, d, d, jax.nn.silu, names, **kw)
        if cfg.use_additional_conditions:
            self.resolution_embedder = MLP2(256, d // 3, d // 3, jax.nn.silu, names, **kw)
            self.aspect_ratio_embedder = MLP2(256, d // 3, d // 3, jax.nn.silu, names, **kw)
        else:
            self.resolution_embedder = self.aspect_ratio_embedder = None
        self.linear = layers.Dense(d, 6 * d, ("embed", "mlp"), use_bias=True, **kw)

    def __call__(self, timesteps, resolution=None, aspect_ratio=None, dtype=jnp.float32):
        emb = self.timestep_embedder(timestep_embedding(timesteps).astype(dtype))  # [b, d]
        if self.resolution_embedder is not None:
            if resolution is None or aspect_ratio is None:
                raise ValueError("this DiT uses micro-conditions: pass resolution [b, 2] and aspect_ratio [b, 1]")
            b = timesteps.shape[0]
            res = self.resolution_embedder(timestep_embedding(resolution.reshape(-1)).astype(dtype)).reshape(b, -1)
            ar = self.aspect_ratio_embedder(timestep_embedding(aspect_ratio.reshape(-1)).astype(dtype)).reshape(b, -1)
            emb = emb + jnp.concatenate([res, ar], axis=1)
        return self.linear(jax.nn.silu(emb)), emb


# ----------------------------------------------------------------------------------------------------------
# The DiT
# ----------------------------------------------------------------------------------------------------------
class DiT(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        d, p = cfg.inner_dim(), cfg.patch_size
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pd)
        self.out_channels = cfg.out_channels or cfg.in_channels
        cross_dim = cfg.cross_attention_dim or d
        self.pos_embed = nnx.Conv(  # PatchEmbed.proj
            cfg.in_channels, d, (p, p), strides=p, padding="VALID", dtype=dt, param_dtype=pd,
            kernel_init=layers.logical(nnx.initializers.xavier_uniform(), None, None, "conv_in", "embed"),
            bias_init=layers.logical(nnx.initializers.zeros_init(), "embed"), rngs=rngs,
        )
        self.adaln_single = AdaLNSingle(cfg, **kw)
        self.caption_projection = (MLP2(cfg.caption_channels, d, d, _gelu_tanh, (("mlp", "embed"), ("embed", "mlp")), **kw)
                                   if cfg.caption_channels is not None else None)
        # zero-init: a model with grid injection starts as the same model without it
        self.visual_grid_proj = (layers.Dense(d, d, ("mlp", "embed"), use_bias=False, kernel_init=nnx.initializers.zeros_init(), **kw)
                                 if cfg.visual_grid_injection else None)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return DiTBlock(cfg, rngs=rngs)

        self.transformer_blocks = make_blocks(rngs)
        self.scale_shift_table = layers.param(rngs, lambda k, s, t: jax.random.normal(k, s, t) / d ** 0.5,
                                              (2, d), (None, "embed"), dtype=pd)
        self.proj_out = layers.Dense(d, p * p * self.out_channels, ("embed", None), use_bias=True, **kw)

        # Identity branch (new parameters; absent with identity_injection='none').
        mode = cfg.identity_injection
        id_dim = cross_dim if mode == "concat" else d
        self.id_encoder = IDEncoder(cfg.identity, id_dim, dtype=dt, param_dtype=pd, rngs=rngs) if mode != "none" else None

        @nnx.split_rngs(splits=cfg.num_layers // cfg.identity_every)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_id_attn(rngs):
            return IdentityAttention(cfg, id_dim, rngs=rngs)

        self.id_attn = make_id_attn(rngs) if mode == "parallel" else None  # [num_layers // identity_every, ...]
        # zero-init output: a model with identity grid injection starts as the same model without it
        de = cfg.identity.embedding_dim
        self.identity_grid_proj = (MLP2(de, d, d, _gelu_tanh, ((None, "mlp"), ("mlp", "embed")), zero_out=True, **kw)
                                   if cfg.identity_grid_injection else None)

    # -- pieces ----------------------------------------------------------------------------------------------
    def patchify(self, latents):  # [b, H, W, C] -> tokens [b, (H/p)(W/p), d] with positions added
        cfg = self.cfg
        x = self.pos_embed(latents.astype(dtype_of(cfg.dtype)))  # [b, H/p, W/p, d]
        b, gh, gw, d = x.shape
        interp = cfg.interpolation_scale if cfg.interpolation_scale is not None else max(cfg.sample_size // 64, 1)
        pos = sincos_2d(d, gh, gw, cfg.sample_size // cfg.patch_size, interp)
        return x.reshape(b, gh * gw, d) + jnp.asarray(pos, x.dtype)[None]

    def unpatchify(self, x, gh: int, gw: int):  # [b, gh*gw, p*p*c] -> [b, gh*p, gw*p, c]
        p, c = self.cfg.patch_size, self.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return jnp.einsum("nhwpqc->nhpwqc", x).reshape(x.shape[0], gh * p, gw * p, c)

    def grid_condition(self, condition, mask, gh: int, gw: int):
        """Projected condition [b, q*q, d] (raster order) -> [b, gh*gw, d]: each token's region of the patch grid."""
        b, n, d = condition.shape
        q = math.isqrt(n)
        if q * q != n or gh % q or gw % q:
            raise ValueError(f"visual_grid_injection: {n} visual embeddings are not a square grid dividing the "
                             f"{gh}x{gw} patch grid")
        if mask is not None:
            condition = condition * mask[..., None].astype(condition.dtype)
        grid = self.visual_grid_proj(condition).reshape(b, q, 1, q, 1, d)
        grid = jnp.broadcast_to(grid, (b, q, gh // q, q, gw // q, d))
        return grid.reshape(b, gh * gw, d)

    def identity_tokens(self, identity_embeddings, identity_features=None):
        """[b, De] (+ [b, Nf, Df]) -> [b, K, id_dim]; the branch must be enabled."""
        if self.id_encoder is None:
            raise ValueError("identity_embeddings given but this DiT has identity_injection='none'")
        return self.id_encoder(identity_embeddings, identity_features)

    def person_identities(self, identity_embeddings, identity_mask, identity_boxes, scale, gh: int, gw: int,
                          identity_features=None):
        """Several identities per image, each bound to its person's region (region-masked identity attention,
        FastComposer / UniPortrait style): identity_embeddings [b, P, De], identity_mask [b, P] (1: slot used),
        identity_boxes [b, P, 4] (x0, y0, x1, y1 as fractions of the image; None: the whole image), scale
        [b or 1, 1, 1] (0 switches a row's identities off). -> (identity tokens [b, P*K, id_dim], which patch
        sees which token [b, gh*gw, P*K] bool, which patch belongs to which person [b, gh*gw, P] bool). A patch sees the K tokens of every person whose box it overlaps;
        one person with the whole image is exactly the single-identity path (the other slots masked out)."""
        b, n_p, de = identity_embeddings.shape
        feats = None if identity_features is None else identity_features.reshape(b * n_p, *identity_features.shape[2:])
        tokens = self.identity_tokens(identity_embeddings.reshape(b * n_p, de), feats)  # [b*P, K, id_dim]
        k = tokens.shape[1]
        tokens = tokens.reshape(b, n_p * k, tokens.shape[-1])  # [b, P*K, id_dim]
        sees = self.person_regions(identity_mask, identity_boxes, scale, b, n_p, gh, gw)  # [b, n, P]
        return tokens, jnp.repeat(sees, k, axis=-1), sees  # [b, n, P*K], [b, n, P]

    @staticmethod
    def person_regions(identity_mask, identity_boxes, scale, b: int, n_p: int, gh: int, gw: int):
        """Which patch belongs to which used identity slot: [b, gh*gw, P] bool (row-major patches). A patch
        belongs to every person whose box (fractions; None: the whole image) it overlaps."""
        on = jnp.ones((b, n_p), bool) if identity_mask is None else identity_mask > 0
        on = on & (scale[:, :, 0] != 0)  # [b, P]
        if identity_boxes is None:
            region = jnp.ones((b, gh * gw, n_p), bool)
        else:
            bx = identity_boxes.astype(jnp.float32)  # [b, P, 4]
            xs, ys = jnp.arange(gw, dtype=jnp.float32), jnp.arange(gh, dtype=jnp.float32)
            in_x = (bx[:, None, :, 0] < (xs[None, :, None] + 1) / gw) & (bx[:, None, :, 2] > xs[None, :, None] / gw)
            in_y = (bx[:, None, :, 1] < (ys[None, :, None] + 1) / gh) & (bx[:, None, :, 3] > ys[None, :, None] / gh)
            region = (in_y[:, :, None, :] & in_x[:, None, :, :]).reshape(b, gh * gw, n_p)  # [b, n, P], row-major
        return region & on[:, None, :]  # [b, n, P]

    def identity_grid(self, identity_embeddings, regions, scale):
        """The additive identity path: embeddings [b, P, De], regions [b, n, P] bool, scale [b, 1, 1] ->
        [b, n, d], each patch the sum of its people's projected identities."""
        e = embedding_input(identity_embeddings, self.cfg.identity)
        h = self.identity_grid_proj(e.astype(dtype_of(self.cfg.dtype)))  # [b, P, d]
        return jnp.einsum("bnp,bpd->bnd", regions.astype(h.dtype), h) * scale

    def _run_blocks(self, x, condition, mask, t6, id_tokens, id_scale, id_mask=None, id_gate=None):
        cfg = self.cfg
        block_def, block_state = nnx.split(self.transformer_blocks)

        def block_fn(x, state):
            return nnx.merge(block_def, state)(x, condition, mask, t6), None

        block_fn = layers.remat(block_fn, cfg.remat_policy, scanned=cfg.scan_layers)

        parallel = self.id_attn is not None and id_tokens is not None
        n = cfg.identity_every if parallel else cfg.num_layers
        groups = cfg.num_layers // n
        block_state = jax.tree.map(lambda a: a.reshape(groups, n, *a.shape[1:]), block_state)
        id_state = None
        if parallel:
            id_def, id_state = nnx.split(self.id_attn)

        def group_fn(x, xs):  # n blocks, then (parallel injection) one identity cross-attention
            bstate, istate = xs
            x, _ = layers.scan_or_loop(block_fn, x, bstate, scan=cfg.scan_layers, length=n)
            if parallel:
                out = nnx.merge(id_def, istate)(x, id_tokens, id_mask)
                x = x + id_scale * (out if id_gate is None else out * id_gate)
            return x, None

        x, _ = layers.scan_or_loop(group_fn, x, (block_state, id_state), scan=cfg.scan_layers, length=groups)
        return x

    # -- forward ---------------------------------------------------------------------------------------------
    def __call__(
        self,
        latents: jax.Array,  # [b, H, W, C]
        timesteps: jax.Array,  # [b]
        visual_embeddings: jax.Array,  # [b, Nc, Dc]
        condition_mask: Optional[jax.Array] = None,  # [b, Nc] True/1 = real token
        identity_embeddings: Optional[jax.Array] = None,  # [b, De], or [b, P, De]: P people, see person_identities
        id_scale: Union[float, jax.Array] = 1.0,  # scalar or [b]; 0 switches identity off (per sample)
        *,
        identity_mask: Optional[jax.Array] = None,  # [b, P] with [b, P, De] embeddings: 1 = slot holds a person
        identity_boxes: Optional[jax.Array] = None,  # [b, P, 4] each person's region (fractions); None: whole image
        identity_features: Optional[jax.Array] = None,  # [b, Nf, Df] face-crop features, if configured
        resolution: Optional[jax.Array] = None,  # [b, 2] micro-conditions (use_additional_conditions only)
        aspect_ratio: Optional[jax.Array] = None,  # [b, 1]
    ) -> jax.Array:
        """-> prediction [b, H, W, out_channels] in the compute dtype."""
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        b, hh, ww, _ = latents.shape
        gh, gw = hh // cfg.patch_size, ww // cfg.patch_size
        x = self.patchify(latents)  # [b, n, d]
        t6, embedded_timestep = self.adaln_single(timesteps, resolution, aspect_ratio, dtype=dt)  # [b, 6d], [b, d]
        t6 = t6.reshape(b, 6, -1)

        condition = visual_embeddings.astype(dt)
        if self.caption_projection is not None:
            condition = self.caption_projection(condition)  # [b, Nc, d]
        mask = None if condition_mask is None else condition_mask.astype(bool)  # [b, Nc]
        if self.visual_grid_proj is not None:
            x = x + self.grid_condition(condition, mask, gh, gw)

        id_tokens, id_mask, id_gate = None, None, None
        scale = jnp.asarray(id_scale, dt).reshape(-1, 1, 1)  # [b or 1, 1, 1]
        if identity_embeddings is not None and identity_embeddings.ndim == 3:  # several people, bound by region
            scale = jnp.broadcast_to(scale, (b, 1, 1))
            id_tokens, sees, regions = self.person_identities(
                identity_embeddings, identity_mask, identity_boxes, scale, gh, gw,
                identity_features)  # [b, P*K, id_dim], [b, n, P*K], [b, n, P]
            if self.identity_grid_proj is not None:
                x = x + self.identity_grid(identity_embeddings, regions, scale)  # [b, n, d]
            if cfg.identity_injection == "concat":
                vis = jnp.ones(condition.shape[:2], bool) if mask is None else mask  # [b, Nc]
                vis = jnp.broadcast_to(vis[:, None, :], (b, sees.shape[1], vis.shape[1]))
                condition = jnp.concatenate([condition, id_tokens], axis=1)  # [b, Nc + P*K, d_cross]
                mask = jnp.concatenate([vis, sees], axis=-1)  # [b, n, Nc + P*K]: per patch
                id_tokens = None
            else:
                id_mask = sees[:, None]  # [b, 1, n, P*K]
                id_gate = jnp.any(sees, axis=-1, keepdims=True).astype(dt)  # [b, n, 1]: patches of no person get 0
        elif identity_embeddings is not None:
            id_tokens = self.identity_tokens(identity_embeddings, identity_features)  # [b, K, id_dim]
            if self.identity_grid_proj is not None:  # one identity: the whole image
                x = x + self.identity_grid(identity_embeddings[:, None], jnp.ones((b, gh * gw, 1), bool),
                                           jnp.broadcast_to(scale, (b, 1, 1)))  # [b, n, d]
            if cfg.identity_injection == "concat":
                if mask is None:
                    mask = jnp.ones(condition.shape[:2], bool)
                id_mask = jnp.broadcast_to(scale[:, :, 0] != 0, id_tokens.shape[:2])  # [b, K]
                condition = jnp.concatenate([condition, id_tokens], axis=1)  # [b, Nc + K, d_cross]
                mask = jnp.concatenate([mask, id_mask], axis=1)
                id_tokens = None
        if mask is None:
            mask4 = None
        else:  # [b, 1, 1, m], or [b, 1, n, m] per patch (several identities by 'concat')
            mask4 = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]

        x = self._run_blocks(x, condition, mask4, t6, id_tokens, scale, id_mask, id_gate)

        mod = self.scale_shift_table[...].astype(dt)[None] + embedded_timestep[:, None]  # [b, 2, d]
        shift, scale_out = mod[:, 0:1], mod[:, 1:2]
        x = _layer_norm(x, 1e-6) * (1 + scale_out) + shift
        x = self.proj_out(x)  # [b, n, p*p*c]
        return self.unpatchify(x, gh, gw)
