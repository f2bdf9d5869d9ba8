"""Samplers, losses and guidance in cig_jax.diffusion: DDIM against diffusers, flow integrators
against analytic fields, guidance algebra, determinism."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cig_jax.config import DiffusionConfig, validate_diffusion
from cig_jax.config_base import ConfigError
from cig_jax import diffusion as D

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 4, 4, 3)


def _fake_eps_np(x, t, acp):
    # the ideal epsilon for data ~ N(0, I) (sqrt(1 - abar_t) x_t) plus a perturbation: keeps latents O(1)
    return np.sqrt(1.0 - acp[t]) * x + 0.05 * np.tanh(x) + 0.01 * np.float32(t) / 1000.0


def _fake_eps_jax(acp):
    acp = jnp.asarray(acp)

    def eps(x, timesteps):
        a = D._per_sample(acp[timesteps], x)
        return jnp.sqrt(1.0 - a) * x + 0.05 * jnp.tanh(x) + 0.01 * D._per_sample(timesteps.astype(jnp.float32), x) / 1000.0

    return eps


@pytest.mark.parametrize("schedule,spacing,steps,offset,alpha_one", [
    ("linear", "leading", 20, 0, True),
    ("scaled_linear", "trailing", 25, 0, False),
    ("scaled_linear", "leading", 50, 1, False),
    ("linear", "linspace", 10, 0, True),
])
def test_ddim_matches_diffusers(schedule, spacing, steps, offset, alpha_one):
    beta = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}[schedule]
    cfg = DiffusionConfig(objective="ddpm", sampler="ddim", beta_schedule=schedule, beta_start=beta[0], beta_end=beta[1],
                          timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one, num_steps=steps)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=beta[0], beta_end=beta[1], beta_schedule=schedule,
                                    clip_sample=False, set_alpha_to_one=alpha_one, steps_offset=offset,
                                    timestep_spacing=spacing, prediction_type="epsilon")
    sched.set_timesteps(steps)
    np.testing.assert_allclose(D.ddpm_alphas_cumprod(cfg), sched.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(D.ddim_timesteps(cfg, steps), sched.timesteps.numpy())

    noise = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    # one step, same model output
    t0 = int(sched.timesteps[0])
    acp = sched.alphas_cumprod.numpy()
    eps = _fake_eps_np(noise, t0, acp).astype(np.float32)
    ref1 = sched.step(torch.from_numpy(eps), t0, torch.from_numpy(noise)).prev_sample.numpy()
    ours1 = D.ddim_step(jnp.asarray(eps), jnp.asarray(noise), t0, t0 - 1000 // steps, D.ddpm_alphas_cumprod(cfg),
                        1.0 if alpha_one else float(sched.alphas_cumprod[0]))
    np.testing.assert_allclose(np.asarray(ours1), ref1, atol=1e-5, rtol=0)
    # the whole loop
    x = torch.from_numpy(noise)
    for t in sched.timesteps:
        e = torch.from_numpy(_fake_eps_np(x.numpy(), int(t), acp).astype(np.float32))
        x = sched.step(e, t, x).prev_sample
    ours = jax.jit(lambda n: D.ddim_sample(_fake_eps_jax(D.ddpm_alphas_cumprod(cfg)), n, cfg))(jnp.asarray(noise))
    assert 0.3 < float(np.abs(x.numpy()).mean()) < 3.0  # a sane trajectory, so 1e-5 is a meaningful bound
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=1e-5, rtol=0)


def test_ddpm_add_noise_matches_diffusers():
    cfg = DiffusionConfig(objective="ddpm", sampler="ddim", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([3, 870])
    ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    ours = D.ddpm_add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), D.ddpm_alphas_cumprod(cfg))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6)


def test_flow_sigmas_shift_matches_diffusers():
    # our schedule is linspace(1, 0, N + 1) then the SD3 shift; diffusers' default spacing stops short of 0
    # (its last nonzero sigma is shift(1/1000)), so hand it our unshifted times and compare the shift
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, 11)[:-1])
    ours = D.flow_sigmas(10, 3.0)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and np.all(np.diff(ours) < 0)
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), atol=1e-6)
    np.testing.assert_allclose(D.flow_sigmas(4, 1.0), [1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("sampler", [D.euler_sample, D.heun_sample])
def test_constant_velocity_reaches_exact_endpoint(sampler):
    c = jnp.asarray(np.random.default_rng(2).standard_normal(SHAPE), jnp.float32)
    x1 = jnp.ones(SHAPE)
    out = sampler(lambda x, t: jnp.broadcast_to(c, x.shape), x1, D.flow_sigmas(7, shift=2.5))
    np.testing.assert_allclose(np.asarray(out), np.asarray(x1 - c), atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_on_optimal_single_point_field_lands_on_the_point(shift):
    # data = a point mass at x0: the ideal velocity is (x - x0) / t and its trajectories are straight lines,
    # so Euler is exact at any step count
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    field = lambda x, ts: (x - x0) / D._per_sample(ts / 1000.0, x)
    out = jax.jit(lambda n: D.euler_sample(field, n, D.flow_sigmas(5, shift)))(noise)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-5)


def test_heun_is_second_order_on_linear_field():
    # dx/dt = x from t = 1 to ~0: x(0) = x(1) / e. Doubling the steps divides Euler's error by ~2 and Heun's
    # by ~4. The schedule ends at a tiny positive time so every Heun step is a full trapezoid step.
    x1 = jnp.ones((1, 1, 1, 1))
    sig = lambda n: np.linspace(1.0, 1e-9, n + 1).astype(np.float32)
    err = lambda sampler, n: abs(float(sampler(lambda x, t: x, x1, sig(n)).reshape(())) - np.exp(-1.0))
    e_h = [err(D.heun_sample, n) for n in (8, 16)]
    e_e = [err(D.euler_sample, n) for n in (8, 16)]
    assert e_h[0] / e_h[1] > 3.5 and 1.7 < e_e[0] / e_e[1] < 2.5 and e_h[1] < e_e[1] / 10


def test_flow_matching_loss_is_zero_for_the_oracle():
    rng = np.random.default_rng(4)
    x0 = jnp.asarray(rng.standard_normal((1, 4, 4, 3)), jnp.float32)
    cfg = DiffusionConfig(time_sampling="uniform")
    oracle = lambda x, ts: (x - x0) / D._per_sample(ts / cfg.timestep_scale, x)
    loss = D.flow_matching_loss(oracle, x0, jax.random.key(0), cfg)
    assert float(loss) < 1e-8
    assert float(D.flow_matching_loss(lambda x, ts: jnp.zeros_like(x), x0, jax.random.key(0), cfg)) > 0.5


def test_epsilon_loss_is_zero_for_the_oracle():
    cfg = DiffusionConfig(objective="ddpm", sampler="ddim")
    acp = jnp.asarray(D.ddpm_alphas_cumprod(cfg))
    x0 = jnp.asarray(np.random.default_rng(5).standard_normal((3, 4, 4, 3)), jnp.float32)

    def oracle(x, t):
        a = D._per_sample(acp[t], x)
        return (x - a ** 0.5 * x0) / (1 - a) ** 0.5

    assert float(D.epsilon_loss(oracle, x0, jax.random.key(1), cfg)) < 1e-6


def _toy_model(latents, timesteps, visual_embeddings, identity_embeddings=None, id_scale=1.0, condition_mask=None):
    """Depends on every input; identity enters scaled by id_scale (as the DiT's switch)."""
    v = jnp.mean(visual_embeddings, axis=(1, 2))  # [b]
    out = latents * 0.9 + D._per_sample(v + timesteps / 1000.0, latents)
    if identity_embeddings is not None:
        s = jnp.broadcast_to(jnp.asarray(id_scale, jnp.float32).reshape(-1), (latents.shape[0],))
        out = out + D._per_sample(s * jnp.sum(identity_embeddings, axis=-1), latents)
    return out


def test_guidance_scales_pick_the_right_branch():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    vis = jnp.asarray(rng.standard_normal((2, 8, 5)), jnp.float32)
    ide = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    t = jnp.array([500.0, 500.0])
    cond_vis = _toy_model(x, t, vis)
    cond_vis_id = _toy_model(x, t, vis, ide, 1.0)
    uncond = _toy_model(x, t, jnp.zeros_like(vis))
    g = lambda sv, si, **kw: D.guided_denoise_fn(_toy_model, vis, ide, visual_scale=sv, identity_scale=si, **kw)(x, t)
    np.testing.assert_allclose(g(1.0, 0.0), cond_vis, atol=1e-5)
    np.testing.assert_allclose(g(1.0, 1.0), cond_vis_id, atol=1e-5)
    np.testing.assert_allclose(g(0.0, 0.0), uncond, atol=1e-5)
    np.testing.assert_allclose(g(3.0, 2.0), uncond + 3 * (cond_vis - uncond) + 2 * (cond_vis_id - cond_vis), atol=1e-4)
    neg = jnp.full((8, 5), 0.3)
    np.testing.assert_allclose(g(0.0, 0.0, negative_visual=neg), _toy_model(x, t, jnp.broadcast_to(neg, vis.shape)), atol=1e-5)
    # without identity embeddings: two branches
    only_vis = D.guided_denoise_fn(_toy_model, vis, visual_scale=2.0)(x, t)
    np.testing.assert_allclose(only_vis, uncond + 2 * (cond_vis - uncond), atol=1e-5)


def test_guidance_batches_three_branches_into_one_call():
    calls = []

    def model(latents, timesteps, **cond):
        calls.append((latents.shape[0], cond["id_scale"]))
        return latents

    D.guided_denoise_fn(model, jnp.ones((2, 4, 3)), jnp.ones((2, 16)))(jnp.ones(SHAPE), jnp.zeros(2))
    assert len(calls) == 1 and calls[0][0] == 6
    np.testing.assert_array_equal(calls[0][1], [0, 0, 0, 0, 1, 1])


def test_drop_conditions_rates_and_values():
    vis = jnp.ones((4000, 2, 3))
    v, s = D.drop_conditions(jax.random.key(7), vis, 0.25, 0.5)
    dropped_v = np.asarray(jnp.all(v == 0, axis=(1, 2)))
    assert abs(dropped_v.mean() - 0.25) < 0.03 and abs(float(jnp.mean(s == 0)) - 0.5) < 0.03
    assert set(np.unique(np.asarray(s)).tolist()) == {0.0, 1.0}
    v0, s0 = D.drop_conditions(jax.random.key(7), vis, 0.0, 0.0)
    assert bool(jnp.all(v0 == vis)) and bool(jnp.all(s0 == 1))


@pytest.mark.parametrize("cfg", [DiffusionConfig(num_steps=4), DiffusionConfig(sampler="heun", num_steps=3, shift=3.0),
                                 DiffusionConfig(objective="ddpm", sampler="ddim", num_steps=5)])
def test_same_seed_same_samples(cfg):
    vis = jnp.asarray(np.random.default_rng(8).standard_normal((2, 8, 5)), jnp.float32)
    ide = jnp.ones((2, 16))
    fn = jax.jit(lambda k: D.sample(D.guided_denoise_fn(_toy_model, vis, ide, visual_scale=2.0, identity_scale=1.5),
                                    k, SHAPE, cfg))
    a, b, c = fn(jax.random.key(11)), fn(jax.random.key(11)), fn(jax.random.key(12))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.all(np.isfinite(np.asarray(a))) and float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_diffusion_config_validation():
    validate_diffusion(DiffusionConfig())
    for bad in (dict(objective="sde"), dict(sampler="ddim"), dict(objective="ddpm", sampler="euler"),
                dict(beta_schedule="cosine"), dict(negative_visual="ones"), dict(shift=0.0)):
        with pytest.raises(ConfigError):
            validate_diffusion(dataclasses.replace(DiffusionConfig(), **bad))
