"""Our AutoencoderKL, loaded from a diffusers checkpoint directory, matches diffusers number-for-number."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from cig_jax.convert.diffusers import ConversionError, load_vae  # noqa: E402

TINY = dict(
    block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16,
)
CASES = {
    "sd": dict(latent_channels=4),  # SD 1.x/2.x/XL style: quant convs, scale only
    "sd3": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,  # SD3/FLUX style
                scaling_factor=1.5305, shift_factor=0.0609),
}


def _tiny_vae_dir(tmp_path, case):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = diffusers.AutoencoderKL(**TINY, **CASES[case]).eval()
    with torch.no_grad():  # move every parameter (norms included) off its init so nothing passes by accident
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / case
    model.save_pretrained(path)
    return model, path


def _nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_decode_match_diffusers(tmp_path, case):
    ref, path = _tiny_vae_dir(tmp_path, case)
    ours = load_vae(path)
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        post = ref.encode(images).latent_dist
        z = post.mean + 0.5 * torch.randn_like(post.mean)
        decoded = ref.decode(z).sample
    mean, logvar = ours.encode(_nhwc(images))
    np.testing.assert_allclose(_nchw(mean), post.mean.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_nchw(logvar), post.logvar.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_nchw(ours.decode(_nhwc(z))), decoded.numpy(), atol=1e-4, rtol=1e-4)

    # The DiT-side helpers apply (z - shift) * scale and its inverse.
    cfg = ref.config
    shift = cfg.shift_factor or 0.0
    np.testing.assert_allclose(np.asarray(ours.images_to_latents(_nhwc(images))),
                               (np.asarray(mean) - shift) * cfg.scaling_factor, rtol=1e-6, atol=1e-6)
    lat = ours.normalize(_nhwc(z))
    want = np.clip(decoded.numpy(), -1, 1)
    np.testing.assert_allclose(_nchw(ours.latents_to_images(lat)), want, atol=1e-4, rtol=1e-4)


def test_mismatched_checkpoint_lists_missing_and_unexpected(tmp_path):
    _, path = _tiny_vae_dir(tmp_path, "sd")
    f = path / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd.pop("decoder.conv_out.bias")
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    save_file(sd, f)
    with pytest.raises(ConversionError) as e:
        load_vae(path)
    msg = str(e.value)
    assert "decoder.conv_out.bias" in msg and "encoder.extra.weight" in msg and "quant_conv.weight" in msg
    assert "missing" in msg and "unexpected" in msg and "shape mismatch" in msg
