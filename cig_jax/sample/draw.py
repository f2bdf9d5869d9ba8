"""The detokenizer call of a sampled round: visual embeddings (+ identity) -> images, one seed per row.

Owns: the jitted `detokenize` (negative visual condition, per-row noise keys, guidance scales) and the tqdm bar
ticked from inside the diffusion loop. Does not own: the samplers (`cig_jax/diffusion.py`), the detokenizer
(`cig_jax/models/detokenizer.py`), when a round draws (`session.py`).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from cig_jax.models.mllm import pool_targets

_PROGRESS: list = [None]  # the host function the diffusion loop ticks (set while a progress bar is open)


def _tick(_t):
    if _PROGRESS[0] is not None:
        _PROGRESS[0]()


@partial(jax.jit, static_argnums=(0, 9, 10, 11))
def detokenize(graph, state, seeds, visual, identity, identity_on, identity_boxes, visual_scale, identity_scale, cfg,
               num_steps, progress):
    """Visual embeddings [b, Q, D_vit] (+ identities [b, P, De], slot p used where identity_on [b, P], bound to
    identity_boxes [b, P, 4]) -> images [b, H, W, 3] in [-1, 1], with the noise of each row from its own seed."""
    model = nnx.merge(graph, state)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(seeds)
    negative = None
    if cfg.negative_visual == "provided":  # SEED-X: the embeddings of an all-black image
        mllm = model.mllm
        side = mllm.vit.cfg.image_size
        feats = mllm.encode_images(-jnp.ones((1, side, side, 3), jnp.float32))
        negative = pool_targets(feats, mllm.num_image_tokens, mllm.cfg.reg_target_pool)[0]
    id_scale = identity_scale * jnp.any(identity_on, axis=-1).astype(jnp.float32)[:, None, None, None]
    return model.detokenizer.generate(keys, visual, identity, cfg, negative_visual=negative,
                                      visual_scale=visual_scale, identity_scale=id_scale, num_steps=num_steps,
                                      on_step=_tick if progress else None, identity_mask=identity_on,
                                      identity_boxes=identity_boxes)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _Bar:
    """A tqdm bar over diffusion steps, ticked from inside the jitted sampler."""

    def __init__(self, total: int):
        self.total = total

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc="diffusion", unit="step", leave=False)
        _PROGRESS[0] = lambda: self.bar.update(1)
        return self

    def __exit__(self, *a):
        jax.effects_barrier()
        _PROGRESS[0] = None
        self.bar.close()
        return False


def diffusion_bar(progress: bool, n_steps: int, sampler: str):
    """A context manager: a tqdm bar over the diffusion steps when `progress`, else nothing."""
    if not progress:
        return _Null()
    return _Bar(n_steps * (2 if sampler == "heun" else 1))
