"""Detokenizer: the MLLM's visual embeddings (+ the face identity embeddings of the people shown) -> an image.

Owns: wiring the personalization DiT (which holds its own IDEncoder) to a VAE (latent space) or to no VAE
(pixel space: the DiT works on images in [-1, 1] directly, for tiny tests); the training loss on images and
generation with visual + identity classifier-free guidance, both by a `DiffusionConfig`.

Does not own: the network pieces (`dit.py`, `id_encoder.py`, `vae.py`), schedules, samplers and guidance
(`cig_jax/diffusion.py`), computing face embeddings (`identity.py`), which parameters train (train/stages.py).
The VAE is used under `stop_gradient`: it is frozen whenever it is here.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from cig_jax.config import DiffusionConfig, validate_diffusion
from cig_jax.config_model import DiTConfig, VAEConfig
from cig_jax.models.dit import DiT
from cig_jax.models.vae import AutoencoderKL
from cig_jax import diffusion


class Detokenizer(nnx.Module):
    def __init__(self, dit: DiTConfig, vae: Optional[VAEConfig] = None, *, rngs: nnx.Rngs):
        self.dit = DiT(dit, rngs=rngs)
        self.vae = AutoencoderKL(vae, rngs=rngs) if vae is not None else None
        if vae is None and dit.in_channels != 3:
            raise ValueError(f"a pixel-space detokenizer (no VAE) needs dit.in_channels = 3, got {dit.in_channels}")
        if vae is not None and dit.in_channels != vae.latent_channels:
            raise ValueError(f"dit.in_channels ({dit.in_channels}) must equal vae.latent_channels ({vae.latent_channels})")

    def images_to_latents(self, images: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        """images [b, H, W, 3] in [-1, 1] -> the DiT's latents (the images themselves without a VAE)."""
        if self.vae is None:
            return images.astype(jnp.float32)
        return jax.lax.stop_gradient(self.vae.images_to_latents(images, key))

    def latents_to_images(self, latents: jax.Array) -> jax.Array:
        """The DiT's latents -> images [b, H, W, 3] clipped to [-1, 1]."""
        if self.vae is None:
            return jnp.clip(latents, -1.0, 1.0)
        return self.vae.latents_to_images(latents)

    def output_size(self) -> int:
        """Side of the images it makes (and is trained on): the DiT's sample size, times the VAE's downsampling."""
        c = self.dit.cfg
        if self.vae is None:
            return c.sample_size
        return c.sample_size * self.vae.downsample_factor

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        c = self.dit.cfg
        return (batch, c.sample_size, c.sample_size, c.in_channels)

    def loss(self, key: jax.Array, images: jax.Array, visual_embeddings: jax.Array,
             identity_embeddings: Optional[jax.Array] = None, cfg: DiffusionConfig = DiffusionConfig(), *,
             condition_mask: Optional[jax.Array] = None, negative_visual: Optional[jax.Array] = None,
             identity_mask: Optional[jax.Array] = None, identity_boxes: Optional[jax.Array] = None,
             weights: Optional[jax.Array] = None) -> jax.Array:
        """Diffusion loss (cfg.objective) of reconstructing `images` [b, H, W, 3] from visual_embeddings
        [b, N, D] and identity_embeddings [b, De] (one identity per image; identity_mask [b], 1: it applies,
        switches it off per example) or [b, P, De] (P people, identity_mask [b, P] which slots hold one,
        identity_boxes [b, P, 4] each one's region, see `DiT.person_identities`), with condition dropout
        p_drop_visual / p_drop_identity (the identity dropout drops all of an image's identities together);
        weights [b] weight the examples' losses (0: padding)."""
        k_enc, k_drop, k_loss = jax.random.split(key, 3)
        latents = self.images_to_latents(images, k_enc)
        visual, id_scale = visual_embeddings, jnp.ones((images.shape[0],), jnp.float32)
        if cfg.p_drop_visual > 0 or cfg.p_drop_identity > 0:
            visual, id_scale = diffusion.drop_conditions(k_drop, visual_embeddings, cfg.p_drop_visual,
                                                         cfg.p_drop_identity, negative_visual)
        cond = dict(visual_embeddings=visual, condition_mask=condition_mask)
        if identity_embeddings is not None:
            if identity_embeddings.ndim == 3:  # several people: the mask and boxes bind them
                cond.update(identity_mask=identity_mask, identity_boxes=identity_boxes)
            elif identity_mask is not None:
                id_scale = id_scale * identity_mask.astype(jnp.float32)
            cond.update(identity_embeddings=identity_embeddings, id_scale=id_scale)
        return diffusion.training_loss(self.dit, latents, k_loss, cfg, weights, **cond)

    def generate(self, key: jax.Array, visual_embeddings: jax.Array, identity_embeddings: Optional[jax.Array] = None,
                 cfg: DiffusionConfig = DiffusionConfig(), *, condition_mask: Optional[jax.Array] = None,
                 negative_visual: Optional[jax.Array] = None, visual_scale=None, identity_scale=None,
                 num_steps: Optional[int] = None, on_step=None, identity_mask: Optional[jax.Array] = None,
                 identity_boxes: Optional[jax.Array] = None) -> jax.Array:
        """Noise from `key` (one key, or one per sample) -> images [b, H, W, 3] in [-1, 1]. identity_embeddings
        [b, De], or [b, P, De] with identity_mask [b, P] and identity_boxes [b, P, 4] (as in `loss`). Scales default to the
        config's (a scale may also be an array broadcasting against [b, H, W, C], e.g. a per-sample identity scale);
        with negative_visual 'provided' the caller must pass `negative_visual` (e.g. the embeddings of a black
        image). on_step: see `diffusion.sample`."""
        validate_diffusion(cfg)
        if cfg.negative_visual == "provided" and negative_visual is None:
            raise ValueError("cfg.negative_visual = 'provided': pass negative_visual (the embeddings of an all-zero image)")
        denoise = diffusion.guided_denoise_fn(
            self.dit, visual_embeddings, identity_embeddings,
            visual_scale=cfg.visual_guidance_scale if visual_scale is None else visual_scale,
            identity_scale=cfg.identity_guidance_scale if identity_scale is None else identity_scale,
            negative_visual=negative_visual, condition_mask=condition_mask,
            **({} if identity_mask is None else {"identity_mask": identity_mask}),
            **({} if identity_boxes is None else {"identity_boxes": identity_boxes}))
        latents = diffusion.sample(denoise, key, self.latent_shape(visual_embeddings.shape[0]), cfg, num_steps,
                                   on_step=on_step)
        return self.latents_to_images(latents)
