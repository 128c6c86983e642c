"""The attention the native path runs where it records nothing, over ComfyUI's own modules (fast, no boot):
the VAE encoder's attention blocks in the pack's own encode (which rebinds nothing of the VAE), and the
UNet's unrecorded layers."""
import pytest
import torch

from object_snapshot import changes, snapshot


@pytest.fixture()
def native(pack):
    return pack.native_features


def _encoder(attention_at_16=False):
    """ComfyUI's own SD VAE encoder in miniature, built as the host builds it on the CPU (ComfyUI chooses its
    split attention there unless started with a flag): one attention block in its mid block, as SD's VAE,
    and optionally one after each ResNet block of the second level (16 x 16 pixels)."""
    from comfy.ldm.modules.diffusionmodules.model import Encoder

    torch.manual_seed(0)
    enc = Encoder(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[16] if attention_at_16 else [],
                  in_channels=3, resolution=32, z_channels=4, double_z=True).eval()
    with torch.no_grad():  # ComfyUI's layers skip initialisation (weights come from a file)
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    return enc


@pytest.fixture(params=[False, True], ids=["sd-layout", "attention-in-a-level-too"])
def encoder(pack, request):
    return _encoder(request.param)


def _attention_blocks(encoder):
    return [m for m in encoder.modules() if hasattr(m, "optimized_attention")]


def _image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@torch.no_grad()
def test_the_packs_encode_is_the_encoders_own_forward(native, encoder):
    """With each block's own attention the pack's call path gives the host's forward bit for bit (every block,
    in its order); with torch's SDPA on the CPU, the same to float rounding."""
    assert {m.optimized_attention.__name__ for m in _attention_blocks(encoder)} == {"normal_attention"}  # the CPU default
    host = encoder(_image())
    assert torch.equal(native.run_vae_encoder(encoder, _image(), None), host)
    attention = native.vae_attention(torch.device("cpu"))
    assert attention is native.sdpa_over_pixels
    fused = native.run_vae_encoder(encoder, _image(), attention)
    assert (fused - host).abs().max() <= 1e-5 * host.abs().max()
    assert not torch.equal(fused, host)  # another attention did run


def test_sdpa_over_pixels_is_softmax_attention_over_the_pixels(native):
    """Independent of torch's kernel: softmax(q^T k / sqrt(C)) v with each pixel a token of C channels."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    qt, kt, vt = (t.reshape(2, 8, 15) for t in (q, k, v))
    weights = torch.softmax(qt.transpose(1, 2) @ kt / 8 ** 0.5, dim=-1)  # [B, query pixel, key pixel]
    expected = (vt @ weights.transpose(1, 2)).reshape(2, 8, 3, 5)
    assert torch.allclose(native.sdpa_over_pixels(q, k, v), expected, atol=1e-12)


def test_nothing_of_the_vae_is_rebound_before_during_or_after_the_encode(native, encoder):
    before = snapshot(encoder, "encoder")
    during = []

    def attention(q, k, v):
        during.append(snapshot(encoder, "encoder"))
        return native.sdpa_over_pixels(q, k, v)

    with torch.no_grad():
        native.run_vae_encoder(encoder, _image(), attention)
    assert during and all(changes(before, d) == [] for d in during), changes(before, during[0])
    assert changes(before, snapshot(encoder, "encoder")) == []

    def failing(q, k, v):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"), torch.no_grad():
        native.run_vae_encoder(encoder, _image(), failing)
    assert changes(before, snapshot(encoder, "encoder")) == []


def _spy_on_the_blocks_attention(encoder):
    """The (test's own) encoder's attention blocks run a spy around their attention: the calls it got."""
    calls = []
    for block in _attention_blocks(encoder):
        own = block.optimized_attention
        block.optimized_attention = lambda q, k, v, own=own: calls.append(q.shape) or own(q, k, v)
    return calls


@pytest.mark.parametrize("flag", ["use_split_cross_attention", "use_quad_cross_attention", "use_pytorch_cross_attention",
                                  "use_sage_attention", "use_flash_attention"])
def test_an_attention_the_user_chose_with_a_flag_is_kept(native, encoder, monkeypatch, flag):
    from comfy.cli_args import args
    from comfy.ldm.modules import attention

    monkeypatch.setattr(args, flag, True)
    assert native.user_chose_attention()
    assert native.vae_attention(torch.device("cpu")) is None
    calls = _spy_on_the_blocks_attention(encoder)
    with torch.no_grad():
        native.run_vae_encoder(encoder, _image(), native.vae_attention(torch.device("cpu")))
    assert len(calls) == len(_attention_blocks(encoder))
    assert native.feature_attention(torch.device("cpu")) is attention.optimized_attention


def test_off_the_cpu_the_host_choice_is_kept(native):
    from comfy.ldm.modules import attention

    assert not native.user_chose_attention()
    assert native.vae_attention(torch.device("cuda")) is None
    assert native.feature_attention(torch.device("cuda")) is attention.optimized_attention
    assert native.feature_attention(torch.device("cpu")) is attention.attention_pytorch


def test_a_wrapped_host_attention_does_not_turn_the_cpu_speed_up_off(native, encoder):
    """Another extension (or a newer host) wrapping the VAE's split attention: on the CPU the pack's encode
    still runs torch's SDPA, and the blocks keep the wrapper."""
    calls = _spy_on_the_blocks_attention(encoder)
    wrappers = [b.optimized_attention for b in _attention_blocks(encoder)]
    with torch.no_grad():
        native.run_vae_encoder(encoder, _image(), native.vae_attention(torch.device("cpu")))
    assert calls == []
    assert [b.optimized_attention for b in _attention_blocks(encoder)] == wrappers
