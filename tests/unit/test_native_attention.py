"""The attention the native path runs where it records nothing, over ComfyUI's own modules (fast, no boot):
the VAE encoder's attention blocks during the pack's encode, and the UNet's unrecorded layers."""
import pytest
import torch


@pytest.fixture()
def native(pack):
    return pack.native_features


@pytest.fixture()
def encoder(pack):
    """ComfyUI's own SD VAE encoder in miniature (one attention block, in its mid block), built as the host
    builds it on the CPU: ComfyUI chooses its split attention there unless started with a flag."""
    from comfy.ldm.modules.diffusionmodules.model import Encoder

    torch.manual_seed(0)
    enc = Encoder(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
                  resolution=32, z_channels=4, double_z=True).eval()
    with torch.no_grad():  # ComfyUI's layers skip initialisation (weights come from a file)
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    return enc


def _attention_blocks(encoder):
    return [m for m in encoder.modules() if hasattr(m, "optimized_attention")]


def _names(encoder):
    return [m.optimized_attention.__name__ for m in _attention_blocks(encoder)]


def _image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _encode_seeing_attention(native, encoder, device, fail=False):
    """Runs the encoder inside vae_encoder_attention; returns (output, the attention each block ran)."""
    seen = []

    def spy(module, _args):
        seen.append(module.optimized_attention.__name__)
        if fail:
            raise RuntimeError("interrupted")

    hooks = [m.register_forward_pre_hook(spy) for m in _attention_blocks(encoder)]
    try:
        with torch.no_grad(), native.vae_encoder_attention(encoder, device):
            return encoder(_image()), seen
    finally:
        for h in hooks:
            h.remove()


def test_the_pack_encodes_with_sdpa_on_the_cpu_and_gives_the_vae_its_split_attention_back(native, encoder):
    assert _names(encoder) == ["normal_attention"]  # the host's CPU default
    with torch.no_grad():
        split = encoder(_image())
    fused, seen = _encode_seeing_attention(native, encoder, torch.device("cpu"))
    assert seen == ["pytorch_attention"]
    assert _names(encoder) == ["normal_attention"]
    assert (fused - split).abs().max() <= 1e-5 * split.abs().max()


def test_the_vae_gets_its_attention_back_after_an_error(native, encoder):
    with pytest.raises(RuntimeError, match="interrupted"):
        _encode_seeing_attention(native, encoder, torch.device("cpu"), fail=True)
    assert _names(encoder) == ["normal_attention"]


@pytest.mark.parametrize("flag", ["use_split_cross_attention", "use_quad_cross_attention", "use_pytorch_cross_attention",
                                  "use_sage_attention", "use_flash_attention"])
def test_an_attention_the_user_chose_with_a_flag_is_kept(native, encoder, monkeypatch, flag):
    from comfy.cli_args import args

    monkeypatch.setattr(args, flag, True)
    assert native.user_chose_attention()
    assert _encode_seeing_attention(native, encoder, torch.device("cpu"))[1] == ["normal_attention"]
    from comfy.ldm.modules import attention

    assert native.feature_attention(torch.device("cpu")) is attention.optimized_attention


def test_off_the_cpu_the_host_choice_is_kept(native, encoder):
    from comfy.ldm.modules import attention

    assert not native.user_chose_attention()
    assert _encode_seeing_attention(native, encoder, torch.device("cuda"))[1] == ["normal_attention"]
    assert native.feature_attention(torch.device("cuda")) is attention.optimized_attention
    assert native.feature_attention(torch.device("cpu")) is attention.attention_pytorch


def test_a_block_with_another_attention_is_left_alone(native, encoder):
    block = _attention_blocks(encoder)[0]
    from comfy.ldm.modules.diffusionmodules import model

    block.optimized_attention = model.xformers_attention  # e.g. what the host chose; never called here
    with native.vae_encoder_attention(encoder, torch.device("cpu")):
        assert block.optimized_attention is model.xformers_attention
    assert block.optimized_attention is model.xformers_attention
