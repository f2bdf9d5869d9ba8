"""AutoencoderKL (the latent space the DiT works in), in the diffusers module layout so public VAEs load.

Owns: encoder and decoder (resnet blocks, down/up sampling, mid-block attention), the optional 1x1 quant
convs, the diagonal-Gaussian posterior (mean, logvar), and the scaling/shift between VAE latents and the
DiT's normalised latents. Images and latents are NHWC here (diffusers is NCHW; `convert.diffusers` transposes
kernels, callers transpose data). Images are in [-1, 1].

Does not own: loading checkpoints (`cig_jax.convert.diffusers`), tiling or slicing for huge images.
Attribute names mirror diffusers (`encoder.down_blocks.0.resnets.1.conv1`) so conversion is a rename.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from cig_jax.config_model import VAEConfig
from cig_jax.models import layers
from cig_jax.models.layers import dtype_of

ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}
_EPS = 1e-6  # every norm in the diffusers AutoencoderKL


def conv(cin: int, cout: int, k: int, *, stride: int = 1, padding=None, rngs, dtype, param_dtype) -> nnx.Conv:
    """Conv2d with a [k, k, cin, cout] kernel named (None, None, conv_in, conv_out); torch-style padding."""
    pad = ((k // 2, k // 2), (k // 2, k // 2)) if padding is None else padding
    return nnx.Conv(
        cin, cout, (k, k), strides=stride, padding=pad, dtype=dtype, param_dtype=param_dtype,
        kernel_init=layers.logical(nnx.initializers.lecun_normal(), None, None, "conv_in", "conv_out"),
        bias_init=layers.logical(nnx.initializers.zeros_init(), "conv_out"), rngs=rngs,
    )


def group_norm(c: int, groups: int, *, rngs, dtype, param_dtype) -> nnx.GroupNorm:
    return nnx.GroupNorm(
        c, num_groups=groups, epsilon=_EPS, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=layers.logical(nnx.initializers.ones_init(), "norm"),
        bias_init=layers.logical(nnx.initializers.zeros_init(), "norm"), rngs=rngs,
    )


class ResnetBlock2D(nnx.Module):
    """GroupNorm -> act -> conv3x3 -> GroupNorm -> act -> conv3x3, plus a 1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pd)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.norm1 = group_norm(cin, cfg.norm_num_groups, **kw)
        self.conv1 = conv(cin, cout, 3, **kw)
        self.norm2 = group_norm(cout, cfg.norm_num_groups, **kw)
        self.conv2 = conv(cout, cout, 3, **kw)
        self.conv_shortcut = conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x):  # [b, h, w, cin] -> [b, h, w, cout]
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Pad right/bottom by one, then a stride-2 conv3x3 (diffusers `downsample_padding=0`)."""

    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.conv = conv(c, c, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype_of(cfg.dtype),
                         param_dtype=dtype_of(cfg.param_dtype))

    def __call__(self, x):  # [b, h, w, c] -> [b, h/2, w/2, c]
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.conv = conv(c, c, 3, rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))

    def __call__(self, x):  # [b, h, w, c] -> [b, 2h, 2w, c]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class SpatialAttention(nnx.Module):
    """Single-head self-attention over all positions with a GroupNorm in front and a residual (mid-block)."""

    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.group_norm = group_norm(c, cfg.norm_num_groups, rngs=rngs, dtype=dt, param_dtype=pd)
        kw = dict(rngs=rngs, use_bias=True, dtype=dt, param_dtype=pd)
        self.to_q = layers.Dense(c, c, ("conv_in", "conv_out"), **kw)
        self.to_k = layers.Dense(c, c, ("conv_in", "conv_out"), **kw)
        self.to_v = layers.Dense(c, c, ("conv_in", "conv_out"), **kw)
        self.to_out = layers.Dense(c, c, ("conv_out", "conv_in"), **kw)

    def __call__(self, x):  # [b, h, w, c]
        b, hh, ww, c = x.shape
        h = self.group_norm(x).reshape(b, hh * ww, c)
        q, k, v = (f(h)[:, :, None, :] for f in (self.to_q, self.to_k, self.to_v))  # [b, hw, 1, c]
        o = layers.attention(q, k, v).reshape(b, hh * ww, c)
        return x + self.to_out(o).reshape(b, hh, ww, c)


class MidBlock2D(nnx.Module):
    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(c, c, cfg, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([SpatialAttention(c, cfg, rngs=rngs)]) if cfg.mid_block_add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class SamplerBlock(nnx.Module):
    """`DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then an optional down- or up-sampler."""

    def __init__(self, cin: int, cout: int, num_layers: int, cfg: VAEConfig, *, down: Optional[bool], rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, cfg, rngs=rngs) for i in range(num_layers)])
        sampler = nnx.List([(Downsample2D if down else Upsample2D)(cout, cfg, rngs=rngs)]) if down is not None else None
        self.downsamplers = sampler if down else None
        self.upsamplers = sampler if down is False else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for s in (self.downsamplers or self.upsamplers or ()):
            x = s(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        ch = cfg.block_out_channels
        self.act = ACTIVATIONS[cfg.act_fn]
        self.conv_in = conv(cfg.in_channels, ch[0], 3, rngs=rngs, dtype=dt, param_dtype=pd)
        blocks, prev = [], ch[0]
        for i, c in enumerate(ch):
            last = i == len(ch) - 1
            blocks.append(SamplerBlock(prev, c, cfg.layers_per_block, cfg, down=None if last else True, rngs=rngs))
            prev = c
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock2D(ch[-1], cfg, rngs=rngs)
        self.conv_norm_out = group_norm(ch[-1], cfg.norm_num_groups, rngs=rngs, dtype=dt, param_dtype=pd)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, rngs=rngs, dtype=dt, param_dtype=pd)

    def __call__(self, x):  # [b, H, W, 3] -> [b, H/f, W/f, 2 * latent_channels]
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        ch = list(reversed(cfg.block_out_channels))
        self.act = ACTIVATIONS[cfg.act_fn]
        self.conv_in = conv(cfg.latent_channels, ch[0], 3, rngs=rngs, dtype=dt, param_dtype=pd)
        self.mid_block = MidBlock2D(ch[0], cfg, rngs=rngs)
        blocks, prev = [], ch[0]
        for i, c in enumerate(ch):
            last = i == len(ch) - 1
            blocks.append(SamplerBlock(prev, c, cfg.layers_per_block + 1, cfg, down=None if last else False, rngs=rngs))
            prev = c
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = group_norm(ch[-1], cfg.norm_num_groups, rngs=rngs, dtype=dt, param_dtype=pd)
        self.conv_out = conv(ch[-1], cfg.out_channels, 3, rngs=rngs, dtype=dt, param_dtype=pd)

    def __call__(self, z):  # [b, h, w, latent_channels] -> [b, h*f, w*f, 3]
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """images [b, H, W, 3] in [-1, 1] <-> latents [b, H/f, W/f, latent_channels], f = 2**(len(blocks)-1)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.quant_conv = conv(2 * lc, 2 * lc, 1, rngs=rngs, dtype=dt, param_dtype=pd) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lc, lc, 1, rngs=rngs, dtype=dt, param_dtype=pd) if cfg.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [b, H, W, 3] -> posterior (mean, logvar), each [b, H/f, W/f, latent_channels]."""
        h = self.encoder(images.astype(dtype_of(self.cfg.dtype)))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Raw VAE latents [b, h, w, latent_channels] -> images [b, h*f, w*f, 3] (roughly [-1, 1])."""
        z = latents.astype(dtype_of(self.cfg.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # -- the DiT's latent space: (z - shift) * scale ---------------------------------------------------------
    def normalize(self, z: jax.Array) -> jax.Array:
        return (z - (self.cfg.shift_factor or 0.0)) * self.cfg.scaling_factor

    def denormalize(self, latents: jax.Array) -> jax.Array:
        return latents / self.cfg.scaling_factor + (self.cfg.shift_factor or 0.0)

    def images_to_latents(self, images: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        """images [b, H, W, 3] -> normalised DiT latents; samples the posterior when `key` is given, else its mean."""
        mean, logvar = self.encode(images)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.normalize(z)

    def latents_to_images(self, latents: jax.Array) -> jax.Array:
        """Normalised DiT latents -> images [b, H, W, 3], clipped to [-1, 1]."""
        return jnp.clip(self.decode(self.denormalize(latents)), -1.0, 1.0)
