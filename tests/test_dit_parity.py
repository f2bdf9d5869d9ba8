"""Our DiT, loaded from a diffusers PixArtTransformer2DModel directory, matches it number-for-number with the
identity branch off; with the branch on, parallel injection starts as a no-op and then carries identity."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from cig_jax.config_model import IDEncoderConfig
from cig_jax.convert.diffusers import load_pixart  # noqa: E402

BASE = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2)
CASES = {
    # PixArt-Sigma-like: no micro-conditions, square input at the training size, padded condition.
    "plain": dict(config={}, size=(8, 8), overrides=dict(scan_layers=True)),
    # PixArt-alpha-1024-like: micro-conditions, interpolation_scale, affine norms, non-square input, loop + remat.
    "micro": dict(config=dict(num_attention_heads=3, cross_attention_dim=24, use_additional_conditions=True,
                              interpolation_scale=2, norm_elementwise_affine=True, num_layers=3),
                  size=(8, 12), overrides=dict(scan_layers=False, remat_policy="nothing_saveable")),
}
ID = IDEncoderConfig(embedding_dim=32, num_tokens=4, num_embedding_tokens=2, width=32, depth=1, num_heads=2)


def _tiny_pixart_dir(tmp_path, case):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = diffusers.PixArtTransformer2DModel(**{**BASE, **CASES[case]["config"]}).eval()
    with torch.no_grad():  # zero-initialised projections in diffusers would hide mapping mistakes
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / case
    model.save_pretrained(path)
    return model, path


def _inputs(model, size, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    latents = torch.randn(batch, cfg.in_channels, *size, generator=g)
    timesteps = torch.tensor([10.0, 999.0])[:batch]
    cond = torch.randn(batch, 5, cfg.caption_channels, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])[:batch]
    extra = dict(resolution=torch.tensor([[64.0, 96.0]] * batch), aspect_ratio=torch.tensor([[1.5]] * batch))
    return latents, timesteps, cond, mask, extra


def _ours(model, inputs, **kw):
    latents, timesteps, cond, mask, extra = inputs
    extra = {k: jnp.asarray(v.numpy()) for k, v in extra.items()} if model.cfg.use_additional_conditions else {}
    out = model(jnp.asarray(latents.numpy().transpose(0, 2, 3, 1)), jnp.asarray(timesteps.numpy()),
                jnp.asarray(cond.numpy()), jnp.asarray(mask.numpy()), **kw, **extra)
    return np.asarray(out).transpose(0, 3, 1, 2)


def _ref(model, inputs):
    latents, timesteps, cond, mask, extra = inputs
    added = extra if model.config.use_additional_conditions else None
    with torch.no_grad():
        return model(latents, encoder_hidden_states=cond, timestep=timesteps, encoder_attention_mask=mask,
                     added_cond_kwargs=added).sample.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformer_matches_diffusers(tmp_path, case):
    ref, path = _tiny_pixart_dir(tmp_path, case)
    ours = load_pixart(path, **CASES[case]["overrides"])
    inputs = _inputs(ref, CASES[case]["size"])
    want = _ref(ref, inputs)
    np.testing.assert_allclose(_ours(ours, inputs), want, atol=1e-4, rtol=1e-4)


@pytest.mark.long
def test_parallel_identity_starts_as_noop_then_carries_identity(tmp_path):
    ref, path = _tiny_pixart_dir(tmp_path, "plain")
    inputs = _inputs(ref, (8, 8))
    want = _ref(ref, inputs)
    ours = load_pixart(path, identity_injection="parallel", identity_every=1, identity=ID)
    e1, e2 = jax.random.normal(jax.random.key(0), (2, 2, ID.embedding_dim))
    # Zero-initialised output projection: enabled branch == PixArt exactly.
    np.testing.assert_allclose(_ours(ours, inputs, identity_embeddings=e1), want, atol=1e-4, rtol=1e-4)

    # Perturb the identity output projection: the identity now changes the prediction, and id_scale=0 removes it.
    out = ours.id_attn.attn.to_out.kernel
    out[...] = 0.5 * jax.random.normal(jax.random.key(1), out[...].shape)
    a = _ours(ours, inputs, identity_embeddings=e1)
    b = _ours(ours, inputs, identity_embeddings=e2)
    assert np.abs(a - want).max() > 1e-3
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_allclose(_ours(ours, inputs, identity_embeddings=e1, id_scale=0.0), want, atol=1e-4, rtol=1e-4)
    half = _ours(ours, inputs, identity_embeddings=e1, id_scale=jnp.array([0.0, 1.0]))  # per-sample scale
    np.testing.assert_allclose(half[0], want[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(half[1], a[1], atol=1e-4, rtol=1e-4)

    # Gradients reach the identity encoder through the (now non-zero) branch.
    def loss(m):
        return jnp.mean(jnp.asarray(_ours_traced(m, inputs, e1)) ** 2)
    grads = nnx.grad(loss)(ours)
    g = grads["id_encoder"]["embedding_in"]["kernel"][...]
    assert float(jnp.abs(g).max()) > 0


def _ours_traced(model, inputs, emb):
    latents, timesteps, cond, mask, _ = inputs
    return model(jnp.asarray(latents.numpy().transpose(0, 2, 3, 1)), jnp.asarray(timesteps.numpy()),
                 jnp.asarray(cond.numpy()), jnp.asarray(mask.numpy()), identity_embeddings=emb)


def test_concat_identity_changes_output_and_scale_zero_masks_it(tmp_path):
    ref, path = _tiny_pixart_dir(tmp_path, "plain")
    inputs = _inputs(ref, (8, 8))
    want = _ref(ref, inputs)
    ours = load_pixart(path, identity_injection="concat", identity=ID)
    e1 = jax.random.normal(jax.random.key(0), (2, ID.embedding_dim))
    assert np.abs(_ours(ours, inputs, identity_embeddings=e1) - want).max() > 1e-3
    np.testing.assert_allclose(_ours(ours, inputs, identity_embeddings=e1, id_scale=0.0), want, atol=1e-4, rtol=1e-4)


def test_visual_grid_injection_starts_as_pixart_then_adds_each_embedding_to_its_region(tmp_path):
    ref, path = _tiny_pixart_dir(tmp_path, "plain")
    latents, timesteps, cond, mask, extra = _inputs(ref, (8, 8))
    inputs = (latents, timesteps, cond[:, :4], mask[:, :4], extra)  # 4 embeddings = a 2x2 grid over 4x4 patches
    want = _ref(ref, inputs)
    ours = load_pixart(path, visual_grid_injection=True)
    np.testing.assert_allclose(_ours(ours, inputs), want, atol=1e-4, rtol=1e-4)  # zero-init: PixArt exactly

    kernel = ours.visual_grid_proj.kernel
    kernel[...] = jax.random.normal(jax.random.key(2), kernel[...].shape)
    projected = np.asarray(ours.caption_projection(jnp.asarray(cond[:, :4].numpy())))  # [b, 4, d]
    got = np.asarray(ours.grid_condition(jnp.asarray(projected), jnp.asarray(mask[:, :4].numpy()), 4, 4))
    k, m = np.asarray(kernel[...]), mask[:, :4].numpy()
    for b in range(2):
        for i in range(4):
            for j in range(4):
                src = (i // 2) * 2 + j // 2  # the grid cell covering patch (i, j)
                np.testing.assert_allclose(got[b, i * 4 + j], m[b, src] * projected[b, src] @ k, atol=1e-5, rtol=1e-5)
    assert np.abs(_ours(ours, inputs) - want).max() > 1e-3
    with pytest.raises(ValueError, match="square grid"):
        _ours(ours, (latents, timesteps, cond, mask, extra))  # 5 embeddings are no grid


@pytest.mark.parametrize("mode", ["parallel", "concat"])
def test_several_identities_bind_to_regions_and_one_person_is_the_single_path(tmp_path, mode):
    """[b, P, De] identities: one person over the whole image (other slots masked) computes exactly the
    single-identity path; swapping two people's embeddings together with their regions changes nothing; a
    second person in a region changes the prediction; id_scale 0 / an empty mask is PixArt again."""
    ref, path = _tiny_pixart_dir(tmp_path, "plain")
    inputs = _inputs(ref, (8, 8))
    want = _ref(ref, inputs)
    ours = load_pixart(path, identity_injection=mode, identity_every=1, identity=ID)
    if mode == "parallel":
        out = ours.id_attn.attn.to_out.kernel
        out[...] = 0.5 * jax.random.normal(jax.random.key(1), out[...].shape)
    e1, e2 = jax.random.normal(jax.random.key(0), (2, 2, ID.embedding_dim))
    pair = jnp.stack([e1, e2], axis=1)  # [b, 2, De]
    whole, left, right = [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]
    boxes = lambda *bs: jnp.asarray([list(bs)] * 2)  # noqa: E731
    single = _ours(ours, inputs, identity_embeddings=e1)
    one = _ours(ours, inputs, identity_embeddings=pair, identity_mask=jnp.asarray([[1, 0]] * 2),
                identity_boxes=boxes(whole, left))
    np.testing.assert_allclose(one, single, atol=1e-6, rtol=1e-6)
    two = _ours(ours, inputs, identity_embeddings=pair, identity_mask=jnp.ones((2, 2)), identity_boxes=boxes(left, right))
    swapped = _ours(ours, inputs, identity_embeddings=pair[:, ::-1], identity_mask=jnp.ones((2, 2)),
                    identity_boxes=boxes(right, left))
    np.testing.assert_allclose(two, swapped, atol=1e-6, rtol=1e-6)
    only_left = _ours(ours, inputs, identity_embeddings=pair, identity_mask=jnp.asarray([[1, 0]] * 2),
                      identity_boxes=boxes(left, right))
    assert np.abs(two - only_left).max() > 1e-3 and np.abs(two - single).max() > 1e-3
    np.testing.assert_allclose(_ours(ours, inputs, identity_embeddings=pair, identity_mask=jnp.ones((2, 2)),
                                     identity_boxes=boxes(left, right), id_scale=0.0), want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_ours(ours, inputs, identity_embeddings=pair, identity_mask=jnp.zeros((2, 2))), want,
                               atol=1e-4, rtol=1e-4)


def test_identity_grid_injection_starts_as_a_noop_then_adds_each_identity_to_its_box_only(tmp_path):
    """identity_grid_injection: zero-initialised, the DiT computes what it computes without it; once its output
    layer is non-zero, each person's projected identity is added to exactly the patches of their box (the sum
    where boxes overlap), one identity [b, De] covers the whole image, and id_scale 0 switches it off."""
    ref, path = _tiny_pixart_dir(tmp_path, "plain")
    inputs = _inputs(ref, (8, 8))
    plain = load_pixart(path, identity_injection="concat", identity=ID)
    ours = load_pixart(path, identity_injection="concat", identity=ID, identity_grid_injection=True)
    e = jax.random.normal(jax.random.key(0), (2, 2, ID.embedding_dim))
    left, right = [0.0, 0.0, 0.5, 1.0], [0.25, 0.0, 1.0, 1.0]  # overlapping in the second patch column
    kw = dict(identity_embeddings=e, identity_mask=jnp.ones((2, 2)), identity_boxes=jnp.asarray([[left, right]] * 2))
    np.testing.assert_allclose(_ours(ours, inputs, **kw), _ours(plain, inputs, **kw), atol=1e-6, rtol=1e-6)

    out = ours.identity_grid_proj.linear_2.kernel
    out[...] = jax.random.normal(jax.random.key(3), out[...].shape)
    scale = jnp.ones((2, 1, 1))
    regions = ours.person_regions(kw["identity_mask"], kw["identity_boxes"], scale, 2, 2, 4, 4)  # [b, 16, 2]
    got = np.asarray(ours.identity_grid(e, regions, scale))  # [b, 16, d]
    unit = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    proj = np.asarray(ours.identity_grid_proj(unit))  # [b, 2, d]
    for j in range(4):  # patch columns: 0 left only, 1 both, 2-3 right only
        want = proj[:, 0] * (j <= 1) + proj[:, 1] * (j >= 1)
        for i in range(4):
            np.testing.assert_allclose(got[:, i * 4 + j], want, atol=1e-5, rtol=1e-5)
    assert np.abs(_ours(ours, inputs, **kw) - _ours(plain, inputs, **kw)).max() > 1e-3
    np.testing.assert_allclose(_ours(ours, inputs, **kw, id_scale=0.0), _ours(plain, inputs, **kw, id_scale=0.0),
                               atol=1e-5, rtol=1e-5)
    single = _ours(ours, inputs, identity_embeddings=e[:, 0])
    whole = _ours(ours, inputs, identity_embeddings=e, identity_mask=jnp.asarray([[1, 0]] * 2),
                  identity_boxes=jnp.asarray([[[0.0, 0.0, 1.0, 1.0], left]] * 2))
    np.testing.assert_allclose(whole, single, atol=1e-5, rtol=1e-5)
