"""IDEncoder: a face identity embedding (and optional face-crop features) -> K identity tokens for the DiT.

Owns: the perceiver that turns `identity_embeddings` [batch, De] (De = 512 for ArcFace, 128 for dlib),
optionally with `identity_features` [batch, Nf, Df] (e.g. ViT patch features of the aligned face crop), into
`identity_tokens` [batch, K, out_dim]. The face embedding is expanded by an MLP into a few context tokens;
K learned latent queries cross-attend (Flamingo/IP-Adapter-Plus style: keys are context + latents) in
`depth` layers, each followed by a feed-forward.

Does not own: computing face embeddings (`faces/identity.py`), or how identity tokens enter the DiT
(`models/dit.py`: 'concat' or 'parallel' injection).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from cig_jax.config_model import IDEncoderConfig
from cig_jax.models import layers


def embedding_input(identity_embeddings: jax.Array, cfg: IDEncoderConfig) -> jax.Array:
    """What the identity branches read of an embedding [..., De]: float32, L2-normalised with
    `cfg.normalize_embedding`."""
    e = identity_embeddings.astype(jnp.float32)
    if cfg.normalize_embedding:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-6)
    return e


class PerceiverLayer(nnx.Module):
    def __init__(self, cfg: IDEncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        w = cfg.width
        self.num_heads = cfg.num_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm_latents = layers.layer_norm(w, **kw)
        self.norm_context = layers.layer_norm(w, **kw)
        self.to_q = layers.Dense(w, w, ("embed", "heads"), **kw)
        self.to_k = layers.Dense(w, w, ("embed", "heads"), **kw)
        self.to_v = layers.Dense(w, w, ("embed", "heads"), **kw)
        self.to_out = layers.Dense(w, w, ("heads", "embed"), **kw)
        self.norm_ff = layers.layer_norm(w, **kw)
        self.ff_in = layers.Dense(w, w * cfg.mlp_ratio, ("embed", "mlp"), use_bias=True, **kw)
        self.ff_out = layers.Dense(w * cfg.mlp_ratio, w, ("mlp", "embed"), use_bias=True, **kw)

    def __call__(self, latents, context):  # latents [b, K, w], context [b, Nc, w]
        b, k, w = latents.shape
        h = self.num_heads
        lat = self.norm_latents(latents)
        kv = jnp.concatenate([self.norm_context(context), lat], axis=1)  # [b, Nc + K, w]
        q = self.to_q(lat).reshape(b, k, h, w // h)
        key = self.to_k(kv).reshape(b, kv.shape[1], h, w // h)
        val = self.to_v(kv).reshape(b, kv.shape[1], h, w // h)
        latents = latents + self.to_out(layers.attention(q, key, val).reshape(b, k, w))
        ff = self.ff_out(jax.nn.gelu(self.ff_in(self.norm_ff(latents)), approximate=True))
        return latents + ff


class IDEncoder(nnx.Module):
    def __init__(self, cfg: IDEncoderConfig, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        w, m = cfg.width, cfg.num_embedding_tokens
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.latents = layers.param(rngs, nnx.initializers.normal(w ** -0.5), (cfg.num_tokens, w), (None, "embed"),
                                    dtype=param_dtype)
        self.embedding_in = layers.Dense(cfg.embedding_dim, w, (None, "embed"), use_bias=True, **kw)
        self.embedding_out = layers.Dense(w, m * w, ("embed", "mlp"), use_bias=True, **kw)
        self.feature_in = (layers.Dense(cfg.feature_dim, w, (None, "embed"), use_bias=True, **kw)
                           if cfg.feature_dim else None)
        self.layers = nnx.List([PerceiverLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.depth)])
        self.norm_out = layers.layer_norm(w, **kw)
        self.proj_out = layers.Dense(w, out_dim, ("embed", "mlp"), use_bias=True, **kw)

    def __call__(self, identity_embeddings: jax.Array, identity_features: Optional[jax.Array] = None) -> jax.Array:
        """identity_embeddings [b, De], identity_features [b, Nf, Df] or None -> identity_tokens [b, K, out_dim]."""
        cfg = self.cfg
        e = embedding_input(identity_embeddings, cfg).astype(self.dtype)
        b = e.shape[0]
        context = self.embedding_out(jax.nn.gelu(self.embedding_in(e), approximate=True))
        context = context.reshape(b, cfg.num_embedding_tokens, cfg.width)  # [b, M, w]
        if self.feature_in is not None and identity_features is not None:
            context = jnp.concatenate([context, self.feature_in(identity_features.astype(self.dtype))], axis=1)
        latents = jnp.broadcast_to(self.latents[...].astype(self.dtype), (b, *self.latents.shape))  # [b, K, w]
        for layer in self.layers:
            latents = layer(latents, context)
        return self.proj_out(self.norm_out(latents))  # [b, K, out_dim]
