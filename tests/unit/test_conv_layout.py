"""The extractor's VAE encode on channels-last activations (``features.ChannelsLastConvolutions``, on by default
on the CPU): the same features and alpha as the contiguous run, the layout really used inside our own VAE
encode (and not in the UNet pass, where it was measured slower), and the caller's modules left in their own
layout. (The native path runs the same mode from the
same FeatureExtractor methods: tests/host.)"""
from contextlib import contextmanager

import pytest
import torch

from sample_inputs import make_reference, make_targets
from iconmatting_core.features import ChannelsLastConvolutions
from iconmatting_core.pipeline import IconMattingPipeline, build_model
from iconmatting_core.sd_loading import load_sd_components, SDComponents
from tiny_models import tiny_head

CL = torch.channels_last


@contextmanager
def conv_outputs(module):
    """Every output of the 2-d convolutions under ``module`` while the block runs."""
    seen, handles = [], []
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            handles.append(m.register_forward_hook(lambda _m, _i, out: seen.append(out)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def run(pipe, layout):
    """The reference's tokens, one target's features (those its matte was made from, taken as the extractor
    returns them) and its alpha, with ``channels_last`` = ``layout``."""
    ext = pipe.model.extractor
    ext.channels_last = layout
    passes = []
    handle = ext.register_forward_hook(lambda _m, _i, out: passes.append(out))
    try:
        context = pipe.encode_reference(*make_reference())
        alpha = pipe.matte(context, make_targets(n=1))[0]
    finally:
        ext.channels_last = None
        handle.remove()
    assert len(passes) == 2  # the reference's, then the target's
    return context.tokens, passes[1], alpha


def assert_same(plain, fast, alpha_tol):
    tokens_p, feats_p, alpha_p = plain
    tokens_f, feats_f, alpha_f = fast
    pairs = [(f"up{i}", p, f) for i, (p, f) in enumerate(zip(feats_p.up_features, feats_f.up_features))]
    pairs += [(f"attention {r}", feats_p.attention[r], feats_f.attention[r]) for r in feats_p.attention]
    # The reference's tokens: measured here 3e-6 relative with 2 torch threads and 1.3e-5 with 1 (oneDNN picks
    # other channels-last kernels); the targets' features stay within 1.1e-6 either way. A layout bug is O(1).
    pairs.append(("tokens", tokens_p, tokens_f, 2e-5))
    for name, p, f, *bound in pairs:  # relative error in the 2-norm
        rel = float(torch.linalg.vector_norm(f - p)) / float(torch.linalg.vector_norm(p))
        assert rel <= (bound[0] if bound else 1e-5), f"{name} differ by {rel:.2e} relative"
    assert float((alpha_f - alpha_p).abs().max()) <= alpha_tol


def test_channels_last_gives_the_contiguous_features_and_alpha(pipe):
    assert_same(run(pipe, False), run(pipe, True), 1e-6)


def test_the_default_on_the_cpu_runs_every_convolution_of_our_vae_encode_channels_last(pipe):
    ext = pipe.model.extractor
    assert ext.channels_last is None and ext.device.type == "cpu"
    x = torch.rand(1, 3, pipe.config.image_size, pipe.config.image_size) * 2 - 1
    for layout, expected in ((None, True), (False, False), (True, True)):
        ext.channels_last = layout
        try:
            with conv_outputs(ext.vae) as vae_out, conv_outputs(ext.unet) as unet_out:
                ext(x)
        finally:
            ext.channels_last = None
        assert vae_out and unet_out
        # a 1x1 output is both layouts at once; every other one tells them apart
        assert all(o.is_contiguous(memory_format=CL) == expected for o in vae_out if o.shape[-1] * o.shape[-2] > 1)
        assert not any(o.is_contiguous(memory_format=CL) for o in unet_out if o.shape[-1] * o.shape[-2] > 1)
    # outside our own passes the caller's modules run in the layout they are given
    with conv_outputs(ext.vae) as vae_out:
        ext.vae.encode(x)
    assert not any(o.is_contiguous(memory_format=CL) for o in vae_out if o.shape[-1] * o.shape[-2] > 1)


def test_the_callers_weights_keep_their_layout(tiny_dir):
    sd = load_sd_components(tiny_dir / "sd")
    convs = [m for mod in (sd.unet, sd.vae) for m in mod.modules() if isinstance(m, torch.nn.Conv2d)]
    before = [(m.weight.data_ptr(), m.weight.stride()) for m in convs]
    pipe = IconMattingPipeline(build_model(SDComponents(sd.unet, sd.vae, sd.empty_prompt_embedding), tiny_head()))
    pipe.matte(pipe.encode_reference(*make_reference()), make_targets(n=1))
    assert [(m.weight.data_ptr(), m.weight.stride()) for m in convs] == before


def test_only_2d_convolution_inputs_change_layout():
    x, w = torch.randn(2, 4, 5, 6), torch.randn(3, 4, 3, 3)
    with ChannelsLastConvolutions():
        y = torch.nn.functional.conv2d(x, w, padding=1)
        z = x + 1  # any other op: untouched
    assert y.is_contiguous(memory_format=CL) and z.is_contiguous() and x.is_contiguous() and w.is_contiguous()
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # the full-size SD 2.1 architecture (random weights) at 128 px: ~1 min on 2 cores
def test_full_size_models_give_the_same_alpha_and_features():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from iconmatting_core.config import IconMattingConfig, load_sd_config
    from iconmatting_core.matting_head import IconMattingHead

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(load_sd_config("unet")).eval()
    vae = AutoencoderKL.from_config(load_sd_config("vae")).eval()
    head = IconMattingHead(IconMattingConfig(image_size=128))
    pipe = IconMattingPipeline(build_model(SDComponents(unet, vae, torch.randn(1, 77, 1024)), head))
    assert_same(run(pipe, False), run(pipe, True), 1e-6)
