"""Diffusion for the detokenizer: training losses, samplers and classifier-free guidance (visual + identity).

Owns: the two noise processes and everything that walks them.
  * Rectified flow (flow matching): x_t = (1 - t) x0 + t noise, t in [0, 1] (1 = pure noise); the model
    predicts the velocity v = noise - x0 and sees `t * timestep_scale` (PixArt's timestep embedding
    expects [0, 1000)). Training t ~ logit-normal (SD3) or uniform; samplers Euler and Heun over a
    schedule optionally shifted as SD3 (t' = shift t / (1 + (shift - 1) t)).
  * DDPM (epsilon prediction) for a PixArt-initialised DiT: the discrete beta schedule of diffusers'
    DDPMScheduler ('linear' or 'scaled_linear'), the epsilon loss, and the deterministic DDIM sampler with
    diffusers DDIMScheduler's timestep spacing and step (tested number-for-number against it).
  * Classifier-free guidance with separate scales for the visual condition and the identity condition:
    pred = uncond + s_vis (cond_vis - uncond) + s_id (cond_vis_id - cond_vis), the three branches batched
    into one model call; training-time condition dropout (`drop_conditions`).

Does not own: the network (`models/dit.py`), the VAE (`models/vae.py`), wiring them (`models/detokenizer.py`).

Conventions. A *model_fn* is `model_fn(latents [b, H, W, C], timesteps [b], **cond) -> prediction [b, H, W, C]`
with DiT keyword names (`visual_embeddings`, `condition_mask`, `identity_embeddings`, `id_scale`): a `DiT`
instance is a model_fn. A *denoise_fn* is `denoise_fn(x [b, H, W, C], timesteps [b]) -> prediction`, a
model_fn with its conditions bound (`guided_denoise_fn` builds one). Samplers loop with `lax.fori_loop`
over a schedule fixed at trace time, so they jit as one program; every random draw comes from an explicit
key, so a seed fixes the result.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cig_jax.config import DiffusionConfig, validate_diffusion

ModelFn = Callable[..., jax.Array]
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _per_sample(v: jax.Array, x: jax.Array) -> jax.Array:
    """[b] -> [b, 1, 1, ...] broadcastable against x."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _mse(pred: jax.Array, target: jax.Array, weights: Optional[jax.Array] = None) -> jax.Array:
    """Mean squared error; with weights [b], a weighted mean of the per-example means."""
    sq = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    if weights is None:
        return jnp.mean(sq)
    per_example = jnp.mean(sq.reshape(sq.shape[0], -1), axis=1)
    w = weights.astype(jnp.float32)
    return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1e-6)


# ----------------------------------------------------------------------------------------------------------
# Rectified flow
# ----------------------------------------------------------------------------------------------------------
def sample_flow_time(key: jax.Array, batch: int, cfg: DiffusionConfig) -> jax.Array:
    """Training times t [batch] in (0, 1): sigmoid(N(logit_mean, logit_std)) or U(0, 1)."""
    if cfg.time_sampling == "logit_normal":
        return jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, (batch,), jnp.float32))
    return jax.random.uniform(key, (batch,), jnp.float32)


def flow_interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t noise, t [b]."""
    t = _per_sample(t, x0)
    return (1.0 - t) * x0 + t * noise


def velocity_from_sample(model_fn: ModelFn, timestep_scale: float, min_time: float) -> ModelFn:
    """A model that predicts the clean sample x0 (`prediction: sample`) seen as a velocity model:
    v = (x_t - x0_hat) / max(t, min_time), since x_t = x0 + t v. For pixel-space models whose patches are wider
    than their tokens (64 px, patch 8: 192 values a token), x0 is easy to predict and the noise is not."""

    def fn(x, timesteps, **cond):
        x0_hat = model_fn(x, timesteps, **cond).astype(jnp.float32)[..., : x.shape[-1]]
        t = _per_sample(jnp.maximum(timesteps.astype(jnp.float32) / timestep_scale, min_time), x)
        return (x.astype(jnp.float32) - x0_hat) / t

    return fn


def flow_matching_loss(model_fn: ModelFn, x0_latents: jax.Array, key: jax.Array, cfg: DiffusionConfig,
                       weights: Optional[jax.Array] = None, **cond) -> jax.Array:
    """Rectified-flow loss: mean ||v_hat(x_t, t * timestep_scale, **cond) - (noise - x0)||^2 (fp32 scalar), v_hat
    the model's output ('velocity') or derived from its x0 prediction ('sample'). A model with extra output
    channels (PixArt-alpha's 2C) is scored on its first C. The SD3 `shift` is a sampling-schedule option only;
    training times are not shifted."""
    if cfg.prediction == "sample":
        model_fn = velocity_from_sample(model_fn, cfg.timestep_scale, cfg.min_time)
    k_t, k_n = jax.random.split(key)
    b = x0_latents.shape[0]
    x0 = x0_latents.astype(jnp.float32)
    t = sample_flow_time(k_t, b, cfg)  # [b]
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    x_t = flow_interpolate(x0, noise, t)
    pred = model_fn(x_t, t * cfg.timestep_scale, **cond)[..., : x0.shape[-1]]
    return _mse(pred, noise - x0, weights)


def flow_sigmas(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """Sampling times [num_steps + 1] from 1 down to 0, linear in t then shifted (SD3)."""
    t = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
    t = shift * t / (1.0 + (shift - 1.0) * t)
    return t.astype(np.float32)


def _velocity(denoise_fn: DenoiseFn, x: jax.Array, t: jax.Array, timestep_scale: float) -> jax.Array:
    ts = jnp.full((x.shape[0],), t * timestep_scale, jnp.float32)
    return denoise_fn(x, ts).astype(jnp.float32)[..., : x.shape[-1]]


def euler_sample(denoise_fn: DenoiseFn, noise: jax.Array, sigmas, timestep_scale: float = 1000.0) -> jax.Array:
    """Integrates dx/dt = v(x, t) from t = sigmas[0] (noise) to sigmas[-1] with explicit Euler steps."""
    s = jnp.asarray(sigmas, jnp.float32)

    def body(i, x):
        v = _velocity(denoise_fn, x, s[i], timestep_scale)
        return x + (s[i + 1] - s[i]) * v

    return jax.lax.fori_loop(0, s.shape[0] - 1, body, noise.astype(jnp.float32))


def heun_sample(denoise_fn: DenoiseFn, noise: jax.Array, sigmas, timestep_scale: float = 1000.0) -> jax.Array:
    """Heun (trapezoidal predictor-corrector) steps; a step that ends at t = 0 is a plain Euler step (as
    k-diffusion / EDM), so N steps cost 2N - 1 model evaluations when the schedule ends at 0."""
    sig = np.asarray(sigmas, np.float32)
    last_is_zero = bool(sig[-1] == 0.0)
    s = jnp.asarray(sig)
    n_heun = len(sig) - 1 - int(last_is_zero)

    def body(i, x):
        dt = s[i + 1] - s[i]
        v1 = _velocity(denoise_fn, x, s[i], timestep_scale)
        v2 = _velocity(denoise_fn, x + dt * v1, s[i + 1], timestep_scale)
        return x + dt * 0.5 * (v1 + v2)

    x = jax.lax.fori_loop(0, n_heun, body, noise.astype(jnp.float32))
    if last_is_zero:
        x = x + (s[-1] - s[-2]) * _velocity(denoise_fn, x, s[-2], timestep_scale)
    return x


# ----------------------------------------------------------------------------------------------------------
# DDPM / DDIM
# ----------------------------------------------------------------------------------------------------------
def ddpm_alphas_cumprod(cfg: DiffusionConfig) -> np.ndarray:
    """alpha-bar [num_train_timesteps] fp32, as diffusers DDPMScheduler / DDIMScheduler build it."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=np.float32) ** 2
    else:
        raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}")
    return np.cumprod((1.0 - betas).astype(np.float32), dtype=np.float32)


def ddpm_add_noise(x0: jax.Array, noise: jax.Array, timesteps: jax.Array, alphas_cumprod) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, timesteps [b] integer."""
    abar = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
    return _per_sample(abar ** 0.5, x0) * x0 + _per_sample((1.0 - abar) ** 0.5, x0) * noise


def epsilon_loss(model_fn: ModelFn, x0_latents: jax.Array, key: jax.Array, cfg: DiffusionConfig,
                 weights: Optional[jax.Array] = None, **cond) -> jax.Array:
    """DDPM epsilon-prediction loss, t ~ U{0, ..., T-1}. With out_channels = 2C (PixArt-alpha's learned
    variance), only the first C channels (epsilon) are trained here."""
    k_t, k_n = jax.random.split(key)
    x0 = x0_latents.astype(jnp.float32)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, cfg.num_train_timesteps)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    x_t = ddpm_add_noise(x0, noise, t, ddpm_alphas_cumprod(cfg))
    pred = model_fn(x_t, t, **cond)[..., : x0.shape[-1]]
    return _mse(pred, noise, weights)


def ddim_timesteps(cfg: DiffusionConfig, num_steps: int) -> np.ndarray:
    """Integer timesteps [num_steps], descending, as diffusers DDIMScheduler.set_timesteps."""
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = n // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    raise ValueError(f"unknown timestep_spacing {cfg.timestep_spacing!r}")


def ddim_step(eps: jax.Array, sample: jax.Array, timestep, prev_timestep, alphas_cumprod,
              final_alpha_cumprod: float = 1.0) -> jax.Array:
    """One deterministic DDIM step (eta = 0) from `timestep` to `prev_timestep` (< 0: to the end, where
    abar = final_alpha_cumprod). Scalar timesteps; epsilon prediction; no clipping (DDIM formula 12)."""
    acp = jnp.asarray(alphas_cumprod, jnp.float32)
    a_t = acp[timestep]
    a_prev = jnp.where(prev_timestep >= 0, acp[jnp.maximum(prev_timestep, 0)], jnp.float32(final_alpha_cumprod))
    b_t = 1 - a_t
    x0 = (sample - b_t ** 0.5 * eps) / a_t ** 0.5
    direction = (1 - a_prev) ** 0.5 * eps
    return a_prev ** 0.5 * x0 + direction


def ddim_sample(denoise_fn: DenoiseFn, noise: jax.Array, cfg: DiffusionConfig, num_steps: Optional[int] = None) -> jax.Array:
    """Deterministic DDIM from x_T = noise over `num_steps` (default cfg.num_steps) steps. As diffusers, the
    previous timestep of t is t - T // num_steps whatever the spacing."""
    n = num_steps or cfg.num_steps
    ts = ddim_timesteps(cfg, n)
    prev = ts - cfg.num_train_timesteps // n
    acp = ddpm_alphas_cumprod(cfg)
    final = 1.0 if cfg.set_alpha_to_one else float(acp[0])
    ts_j, prev_j = jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32)
    b = noise.shape[0]

    def body(i, x):
        eps = denoise_fn(x, jnp.full((b,), ts_j[i], jnp.int32)).astype(jnp.float32)[..., : x.shape[-1]]
        return ddim_step(eps, x, ts_j[i], prev_j[i], acp, final)

    return jax.lax.fori_loop(0, n, body, noise.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# Classifier-free guidance (visual + identity)
# ----------------------------------------------------------------------------------------------------------
def drop_conditions(key: jax.Array, visual_embeddings: jax.Array, p_visual: float, p_identity: float,
                    negative_visual: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Training-time condition dropout. Per sample, with probability p_visual the visual embeddings
    [b, N, D] become `negative_visual` ([N, D] or [b, N, D]; None: zeros), and independently with
    probability p_identity the identity is switched off. Returns (visual_embeddings, id_scale [b] in {0, 1})."""
    k_v, k_i = jax.random.split(key)
    b = visual_embeddings.shape[0]
    neg = jnp.zeros_like(visual_embeddings) if negative_visual is None else jnp.broadcast_to(
        negative_visual, visual_embeddings.shape).astype(visual_embeddings.dtype)
    drop_v = jax.random.bernoulli(k_v, p_visual, (b,))
    drop_i = jax.random.bernoulli(k_i, p_identity, (b,))
    visual = jnp.where(drop_v[:, None, None], neg, visual_embeddings)
    return visual, jnp.where(drop_i, 0.0, 1.0).astype(jnp.float32)


def combine_guidance(uncond: jax.Array, cond_vis: jax.Array, cond_vis_id: Optional[jax.Array],
                     visual_scale, identity_scale) -> jax.Array:
    """uncond + s_vis (cond_vis - uncond) + s_id (cond_vis_id - cond_vis)."""
    out = uncond + visual_scale * (cond_vis - uncond)
    if cond_vis_id is not None:
        out = out + identity_scale * (cond_vis_id - cond_vis)
    return out


def guided_denoise_fn(model_fn: ModelFn, visual_embeddings: jax.Array, identity_embeddings: Optional[jax.Array] = None,
                      *, visual_scale=1.0, identity_scale=1.0, negative_visual: Optional[jax.Array] = None,
                      condition_mask: Optional[jax.Array] = None, **extra) -> DenoiseFn:
    """A denoise_fn with classifier-free guidance over the visual and the identity condition.

    One model call per step on a batch of three stacked branches: [uncond (negative visual, no identity),
    cond_vis (visual, no identity), cond_vis_id (visual + identity)] (two without identity_embeddings).
    The identity-free branches keep the identity embeddings but pass id_scale 0, which the DiT turns into
    "no identity tokens" ('concat': masked out; 'parallel': zero-weighted). visual_embeddings [b, N, D];
    negative_visual [N, D] or [b, N, D] (None: zeros; SEED-X: the embeddings of an all-zero image);
    identity_embeddings [b, De]; condition_mask [b, N]; extra: more model keywords with a leading batch axis.
    """
    b = visual_embeddings.shape[0]
    neg = jnp.zeros_like(visual_embeddings) if negative_visual is None else jnp.broadcast_to(
        negative_visual, visual_embeddings.shape).astype(visual_embeddings.dtype)
    branches = 2 if identity_embeddings is None else 3
    visual = jnp.concatenate([neg] + [visual_embeddings] * (branches - 1), axis=0)  # [branches * b, N, D]
    cond = {"visual_embeddings": visual}
    if condition_mask is not None:
        cond["condition_mask"] = jnp.concatenate([condition_mask] * branches, axis=0)
    if identity_embeddings is not None:
        cond["identity_embeddings"] = jnp.concatenate([identity_embeddings] * 3, axis=0)
        cond["id_scale"] = jnp.repeat(jnp.asarray([0.0, 0.0, 1.0], jnp.float32), b)  # [3 b]
    for k, v in extra.items():
        cond[k] = jnp.concatenate([v] * branches, axis=0)

    def denoise(x, timesteps):
        reps = (branches,) + (1,) * (x.ndim - 1)
        pred = model_fn(jnp.tile(x, reps), jnp.tile(timesteps, branches), **cond).astype(jnp.float32)
        parts = jnp.split(pred, branches, axis=0)
        return combine_guidance(parts[0], parts[1], parts[2] if branches == 3 else None, visual_scale, identity_scale)

    return denoise


# ----------------------------------------------------------------------------------------------------------
# Entry points by config
# ----------------------------------------------------------------------------------------------------------
def training_loss(model_fn: ModelFn, x0_latents: jax.Array, key: jax.Array, cfg: DiffusionConfig,
                  weights: Optional[jax.Array] = None, **cond) -> jax.Array:
    """The configured objective's loss ('flow': velocity, 'ddpm': epsilon); weights [b] weight examples."""
    if cfg.objective == "flow":
        return flow_matching_loss(model_fn, x0_latents, key, cfg, weights, **cond)
    return epsilon_loss(model_fn, x0_latents, key, cfg, weights, **cond)


def initial_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T ~ N(0, I) [shape] fp32 from one key, or from one key per sample (keys [shape[0]]): then each sample's
    noise depends on its own key only, so a sample comes out the same whatever else shares its batch."""
    per_sample = key.ndim == (1 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 2)
    if not per_sample:
        return jax.random.normal(key, shape, jnp.float32)
    if key.shape[0] != shape[0]:
        raise ValueError(f"{key.shape[0]} keys for a batch of {shape[0]} samples")
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(key)


def sample(denoise_fn: DenoiseFn, key: jax.Array, shape: tuple[int, ...], cfg: DiffusionConfig,
           num_steps: Optional[int] = None, *, on_step: Optional[Callable[[jax.Array], None]] = None) -> jax.Array:
    """Draws x_T ~ N(0, I) of `shape` from `key` (one key, or one per sample: `initial_noise`) and runs the
    configured sampler -> x0 [shape] fp32. on_step: a host function called with the timestep after every model
    evaluation (through `jax.debug.callback`, so under jit too), e.g. to move a progress bar."""
    validate_diffusion(cfg)
    n = num_steps or cfg.num_steps
    noise = initial_noise(key, shape)
    if on_step is not None:
        inner = denoise_fn

        def denoise_fn(x, timesteps):
            out = inner(x, timesteps)
            jax.debug.callback(on_step, timesteps[0])
            return out
    if cfg.objective == "ddpm":
        return ddim_sample(denoise_fn, noise, cfg, n)
    if cfg.prediction == "sample":
        denoise_fn = velocity_from_sample(denoise_fn, cfg.timestep_scale, cfg.min_time)
    sigmas = flow_sigmas(n, cfg.shift)
    if cfg.sampler == "heun":
        return heun_sample(denoise_fn, noise, sigmas, cfg.timestep_scale)
    return euler_sample(denoise_fn, noise, sigmas, cfg.timestep_scale)
