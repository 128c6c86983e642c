"""The diffusers VAE encode on the pack's own call path (``sd_features.vae_moments``): the same moments as
the VAE's own ``encode`` to the last bit, on a VAE in SD's layout (shortcut convolutions where the width
changes, downsamplers, the mid block's attention), in both convolution layouts; ``encode`` itself wherever
the VAE is set up in a way only it honours."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D

from iconmatting_core.features import ChannelsLastConvolutions, posterior_of_moments
from iconmatting_core.sd_features import vae_moments
from tiny_models import randomise, tiny_vae_config


@pytest.fixture(scope="module")
def vae():
    cfg = tiny_vae_config()
    cfg.update(layers_per_block=2)  # two resnets per level: the second one has no shortcut convolution
    return randomise(AutoencoderKL.from_config(cfg), seed=3).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@torch.no_grad()
def test_the_own_path_gives_the_moments_of_encode_exactly(vae, images, layout):
    def run(fn):
        if layout == "channels_last":
            with ChannelsLastConvolutions():
                return fn()
        return fn()
    assert any(b.conv_shortcut is not None for d in vae.encoder.down_blocks for b in d.resnets)
    expected = run(lambda: vae.encode(images).latent_dist.parameters)
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in vae.modules() if isinstance(m, ResnetBlock2D)]
    try:
        got = run(lambda: vae_moments(vae, images))
    finally:
        for h in hooks:
            h.remove()
    assert got.shape == (2, 8, 8, 8)
    assert torch.equal(got, expected)
    assert calls == []  # every resnet block on the own path, none through its forward


@torch.no_grad()
def test_the_own_path_leaves_the_input_and_the_vae_as_they_were(vae, images):
    before_images = images.clone()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    attributes = {name: dict(vars(m)) for name, m in vae.named_modules()}
    vae_moments(vae, images)
    assert torch.equal(images, before_images)
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    assert {name: dict(vars(m)) for name, m in vae.named_modules()} == attributes


@pytest.mark.parametrize("setting", ["use_tiling", "use_slicing", "_hf_hook", "training"])
@torch.no_grad()
def test_what_only_encode_honours_sends_the_encode_there(setting, images):
    vae = randomise(AutoencoderKL.from_config(tiny_vae_config()), seed=4).eval()
    if setting == "training":
        vae.encoder.down_blocks[0].resnets[0].train()  # dropout would act: its own forward decides
    else:
        setattr(vae, setting, True)
    calls = []
    real = vae.encode

    def encode(x):
        calls.append(x.shape)
        return real(x)
    vae.encode = encode
    trained = []
    vae.encoder.down_blocks[0].resnets[0].register_forward_hook(lambda *_: trained.append(1))
    moments = vae_moments(vae, images)
    assert calls == ([] if setting == "training" else [images.shape])
    assert trained  # through encode, or (training) through the block's own forward
    assert moments.shape == (2, 8, 8, 8)


def test_the_posterior_is_mean_and_exp_half_clamped_logvar():
    moments = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, 2.0, -40.0, 30.0]).reshape(1, 8, 1, 1)
    mean, std = posterior_of_moments(moments)
    assert mean.flatten().tolist() == [1.0, -2.0, 0.5, 3.0]
    expected = torch.tensor([1.0, 2.718281828459045, 3.059023205018258e-07, 22026.465794806718])
    assert torch.allclose(std.flatten(), expected, rtol=1e-6)
    assert std.dtype == torch.float32


@torch.no_grad()
def test_an_identity_norm_keeps_the_block_on_its_own_forward_and_the_input_intact(images):
    vae = randomise(AutoencoderKL.from_config(tiny_vae_config()), seed=6).eval()
    block = vae.encoder.down_blocks[1].resnets[0]
    block.norm1 = torch.nn.Identity()  # an in-place SiLU after it would overwrite the block's input
    expected = vae.encode(images).latent_dist.parameters
    assert torch.equal(vae_moments(vae, images), expected)


def test_gradient_checkpointing_with_gradients_on_goes_through_encode(images):
    vae = randomise(AutoencoderKL.from_config(tiny_vae_config()), seed=7).eval()
    vae.enable_gradient_checkpointing()
    calls = []
    real = vae.encode
    vae.encode = lambda x: calls.append(1) or real(x)
    with torch.no_grad():
        vae_moments(vae, images)
    assert calls == []  # no gradients: nothing to checkpoint, the own path
    vae_moments(vae, images)
    assert calls == [1]
