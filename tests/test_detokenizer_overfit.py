"""The detokenizer can memorise 16 images from (visual embeddings, identity embedding), and uses the identity.

Pixel space (no VAE): the DiT sees 32x32x3 images in [-1, 1], patch 4 (64 tokens), 4 blocks of width 128,
identity injected 'parallel' (a zero-initialised identity cross-attention after every block; it learned
faster here than 'concat'). Trained with rectified flow (uniform t) + AdamW; sampled with 10 Euler steps
through the visual + identity guidance path (scales 1, 1) from a fixed seed.

The 16 images are 4 identities x 4 contexts (scene + shirt colour), drawn by the synthetic renderer. Stand-in
conditions: the *visual embeddings* are a fixed random projection of an 8x8 downsample of the same picture
drawn with a neutral face (they carry the context, not who it is), 64 tokens x 16; the *identity embedding*
is a fixed random projection (128-d) of the face attributes. So an image is only recoverable when both
paths are used, and swapping identities between two images of one context must turn one into the other.

Run alone with `-s` to see the PSNR and timings.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from flax import nnx

from cig_jax.config import DiffusionConfig
from cig_jax.config_model import DiTConfig, IDEncoderConfig
from cig_jax.models.detokenizer import Detokenizer

pytestmark = pytest.mark.long  # minutes each: `python -m pytest -m long` (.ci/run), not the default suite

SIZE = 32
FACES = [  # face_shape, skin_tone, hair_color, hair_style, eye_color, accessory
    dict(face_shape="round", skin_tone="light", hair_color="black", hair_style="short", eye_color="brown", accessory="none"),
    dict(face_shape="oval", skin_tone="dark", hair_color="blonde", hair_style="long", eye_color="blue", accessory="glasses"),
    dict(face_shape="square", skin_tone="tan", hair_color="red", hair_style="bald", eye_color="green", accessory="hat"),
    dict(face_shape="oval", skin_tone="medium", hair_color="blue", hair_style="ponytail", eye_color="brown", accessory="none"),
]
NEUTRAL_FACE = dict(face_shape="round", skin_tone="medium", hair_color="grey", hair_style="short", eye_color="brown",
                    accessory="none")
CONTEXTS = [("beach", "red"), ("park", "blue"), ("night", "yellow"), ("snow", "purple")]


def _render(face: dict, context) -> np.ndarray:
    from cig_jax.data.synthetic import render_person

    scene, cloth = context
    px = render_person(dict(face, clothing_color=cloth), size=SIZE, scene=scene).pixels
    return px.astype(np.float32) / 127.5 - 1.0  # [32, 32, 3] in [-1, 1]


def make_data(seed: int = 0):
    """-> images [16, 32, 32, 3], visual_embeddings [16, 64, 16], identity_embeddings [16, 128], (face, context) ids."""
    from cig_jax.data.synthetic import ATTRIBUTES

    rng = np.random.default_rng(seed)
    w_vis = rng.standard_normal((8 * 8 * 3, 64 * 16)).astype(np.float32) / np.sqrt(8 * 8 * 3)
    keys = [k for k in NEUTRAL_FACE]
    onehot_dim = sum(len(ATTRIBUTES[k]) for k in keys)
    w_id = rng.standard_normal((onehot_dim, 128)).astype(np.float32)

    def identity_embedding(face):
        parts = [np.eye(len(ATTRIBUTES[k]), dtype=np.float32)[ATTRIBUTES[k].index(face[k])] for k in keys]
        return np.concatenate(parts) @ w_id

    images, visual, ident, ids = [], [], [], []
    for fi, face in enumerate(FACES):
        for ci, ctx in enumerate(CONTEXTS):
            images.append(_render(face, ctx))
            coarse = _render(NEUTRAL_FACE, ctx).reshape(8, 4, 8, 4, 3).mean(axis=(1, 3))  # [8, 8, 3]
            visual.append((coarse.reshape(-1) @ w_vis).reshape(64, 16))
            ident.append(identity_embedding(face))
            ids.append((fi, ci))
    return (jnp.asarray(np.stack(images)), jnp.asarray(np.stack(visual)), jnp.asarray(np.stack(ident)), ids)


def psnr(a, b) -> np.ndarray:
    """Per-image PSNR in dB of images in [-1, 1] (peak = the [0, 1] range)."""
    mse = np.mean(np.square((np.asarray(a) - np.asarray(b)) / 2.0), axis=(1, 2, 3))
    return -10.0 * np.log10(np.maximum(mse, 1e-12))


DIT = DiTConfig(num_layers=4, num_heads=4, head_dim=32, in_channels=3, patch_size=4, sample_size=SIZE,
                caption_channels=16, identity_injection="parallel",
                identity=IDEncoderConfig(embedding_dim=128, num_tokens=4, num_embedding_tokens=2, width=64, depth=1,
                                         num_heads=4, mlp_ratio=2))
DIFFUSION = DiffusionConfig(objective="flow", sampler="euler", num_steps=10, time_sampling="uniform")


def train_and_check(steps: int = 600, target_psnr: float = 25.0, reps: int = 1, lr: float = 6e-3,
                    check_every: int = 100, dit: DiTConfig = DIT, diffusion: DiffusionConfig = DIFFUSION, log=print):
    t_start = time.time()
    images, visual, ident, ids = make_data()
    model = Detokenizer(dit, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, 50, steps, lr / 20)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=0.0))
    opt_state = tx.init(state)

    @jax.jit
    def train_step(state, opt_state, key):
        def loss_fn(state):
            m = nnx.merge(graphdef, state)
            tile = lambda a: jnp.concatenate([a] * reps, axis=0)
            return m.loss(key, tile(images), tile(visual), tile(ident), diffusion)

        loss, grads = jax.value_and_grad(loss_fn)(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    @jax.jit
    def generate(state, key, visual, ident):
        return nnx.merge(graphdef, state).generate(key, visual, ident, diffusion, visual_scale=1.0, identity_scale=1.0)

    key = jax.random.key(0)
    sample_key = jax.random.key(1234)
    best, t_train, checks = 0.0, 0.0, []
    for step in range(1, steps + 1):
        key, sub = jax.random.split(key)
        state, opt_state, loss = train_step(state, opt_state, sub)
        if step % check_every == 0 or step == steps:
            t0 = time.time()
            recon = generate(state, sample_key, visual, ident)
            best = float(np.mean(psnr(recon, images)))
            checks.append((step, float(loss), best))
            log(f"step {step}: loss {float(loss):.4f}, mean PSNR {best:.2f} dB (sampling {time.time() - t0:.1f}s, "
                f"elapsed {time.time() - t_start:.0f}s)")
            if best > target_psnr + 2.0:
                break
    t_train = time.time() - t_start

    # Swap identities between two images of the same context: each should become the other person.
    recon = generate(state, sample_key, visual, ident)
    i, j = ids.index((0, 1)), ids.index((2, 1))
    swapped_ident = ident.at[i].set(ident[j]).at[j].set(ident[i])
    swapped = generate(state, sample_key, visual, swapped_ident)
    return dict(psnr=float(np.mean(psnr(recon, images))), seconds=t_train, checks=checks, recon=recon, swapped=swapped,
                images=images, pair=(i, j))


def test_detokenizer_overfits_and_uses_identity():
    out = train_and_check()
    images, recon, swapped = (np.asarray(out[k]) for k in ("images", "recon", "swapped"))
    i, j = out["pair"]
    p_orig = psnr(recon[[i, j]], images[[i, j]])
    p_swap_vs_orig = psnr(swapped[[i, j]], images[[i, j]])
    p_swap_vs_other = psnr(swapped[[i, j]], images[[j, i]])
    print(f"\nmean reconstruction PSNR {out['psnr']:.2f} dB after {out['checks'][-1][0]} steps, {out['seconds']:.0f}s; "
          f"swap pair PSNR vs own image {p_orig.round(1)} -> {p_swap_vs_orig.round(1)}, vs the other person's "
          f"{p_swap_vs_other.round(1)}")
    assert out["psnr"] > 25.0
    assert np.all(p_orig - p_swap_vs_orig > 6.0)  # the identity embedding changes the image ...
    assert np.all(p_swap_vs_other > 20.0)  # ... into the other person in the same context
    # other images are untouched by the swap (same seed, same conditions)
    rest = [k for k in range(16) if k not in (i, j)]
    np.testing.assert_allclose(swapped[rest], recon[rest], atol=1e-5)


if __name__ == "__main__":
    test_detokenizer_overfits_and_uses_identity()


def test_latent_detokenizer_ddpm_loss_and_ddim_generate():
    """With a (tiny, random) VAE: the epsilon loss with condition dropout is finite and has gradients for the
    DiT and its identity encoder only; DDIM generation returns images, deterministically per seed."""
    from cig_jax.config_model import VAEConfig

    vae = VAEConfig(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=32)
    dit = DiTConfig(num_layers=2, num_heads=2, head_dim=16, in_channels=4, out_channels=8, patch_size=2, sample_size=8,
                    caption_channels=16, identity_injection="concat",
                    identity=IDEncoderConfig(embedding_dim=128, num_tokens=2, num_embedding_tokens=1, width=32, depth=1))
    cfg = DiffusionConfig(objective="ddpm", sampler="ddim", num_steps=3, p_drop_visual=0.5, p_drop_identity=0.5,
                          negative_visual="provided", visual_guidance_scale=2.0, identity_guidance_scale=1.5)
    model = Detokenizer(dit, vae, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
    visual = jnp.asarray(rng.standard_normal((8, 64, 16)), jnp.float32)
    ident = jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)
    negative = jnp.zeros((64, 16)) + 0.1

    loss, grads = nnx.value_and_grad(lambda m: m.loss(jax.random.key(0), images, visual, ident, cfg,
                                                      negative_visual=negative))(model)
    assert np.isfinite(float(loss))
    norms = {k: float(optax.global_norm(v)) for k, v in grads.items()}
    assert norms["dit"] > 0 and norms["vae"] == 0.0
    assert float(optax.global_norm(grads["dit"]["id_encoder"])) > 0  # some of the 8 kept their identity

    gen = nnx.jit(lambda m, k: m.generate(k, visual, ident, cfg, negative_visual=negative))
    a, b = gen(model, jax.random.key(3)), gen(model, jax.random.key(3))
    assert a.shape == (8, 16, 16, 3) and np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
