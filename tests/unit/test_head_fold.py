"""The inference head with each BatchNorm folded into the convolution before it (``matting_head``), as the ComfyUI
pack loads it: the fold against torch's own convolution then BatchNorm in eval mode, and a folded head against
the trained one. Training keeps real BatchNorm."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iconmatting_core.matting_head import IconMattingHead, fold_batch_norm
from tiny_models import tiny_config, tiny_head


def _batch_norm(channels, eps, gen):
    """A BatchNorm in eval mode with statistics and affine parameters far from their defaults: means around
    +-2, variances from 1e-4 (where eps matters) to 4, negative and positive scales, shifts."""
    bn = nn.BatchNorm2d(channels, eps=eps)
    with torch.no_grad():
        bn.running_mean.copy_(2 * torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.cat([torch.tensor([1e-4, 4.0]), torch.rand(channels - 2, generator=gen) * 3 + 0.01]))
        bn.weight.copy_(torch.randn(channels, generator=gen))
        bn.bias.copy_(torch.randn(channels, generator=gen))
    return bn.eval()


@pytest.mark.parametrize("bias", [False, True], ids=["conv-without-bias", "conv-with-bias"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_a_folded_convolution_equals_the_convolution_then_batch_norm_in_eval_mode(bias, stride, eps):
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(5, 6, 3, stride, 1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        if bias:
            conv.bias.copy_(torch.randn(6, generator=gen))
    bn = _batch_norm(6, eps, gen)
    x = torch.randn(2, 5, 9, 9, generator=gen)
    with torch.no_grad():
        expected = bn(conv(x))  # torch's own layers: the oracle
        weight, folded_bias = fold_batch_norm(conv.weight, conv.bias, bn)
        got = F.conv2d(x, weight, folded_bias, stride, 1)
    assert weight.dtype == folded_bias.dtype == torch.float32 and folded_bias.shape == (6,)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def _inputs(config, gen):
    s16, s32 = config.image_size // 16, config.image_size // 32
    ups = [torch.randn(2, c, s, s, generator=gen) for c, s in zip(config.unet_feature_channels, (s32, s16))]
    guidance = [torch.randn(2, config.attention_out_channels, s, s, generator=gen) for s in (s32, s16)]
    images = torch.rand(2, 3, config.image_size, config.image_size, generator=gen) * 2 - 1
    return ups, guidance, images


@torch.no_grad()
def test_a_folded_head_computes_what_the_trained_head_computes_in_eval_mode():
    config = tiny_config()
    trained = tiny_head(config, seed=4)  # every BatchNorm with random statistics and affine parameters
    folded = IconMattingHead(config, folded=True)
    folded.load_state_dict(trained.folded_state_dict(), strict=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    convs = [m for m in trained.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len([m for m in folded.modules() if isinstance(m, nn.Conv2d)])
    ups, guidance, images = _inputs(config, torch.Generator().manual_seed(1))
    fused, fused_folded = trained.fusion(ups, guidance), folded.fusion(ups, guidance)
    assert (fused - fused_folded).abs().max() <= 1e-5 * fused.abs().max()
    alpha, alpha_folded = trained.detail(fused, images), folded.detail(fused, images)
    assert (alpha - alpha_folded).abs().max() <= 1e-5
    # the layers without BatchNorm are the trained head's tensors as they are
    for name, value in folded.state_dict().items():
        if name.startswith("similarity."):
            assert torch.equal(value, trained.state_dict()[name]), name


def test_training_keeps_real_batch_norm():
    config = tiny_config()
    head = IconMattingHead(config).train()
    # ConvBNReLU: fusion 2 + 2 + 1, detail 3 image convs + 4 fuse blocks; and the alpha head's
    assert sum(isinstance(m, nn.BatchNorm2d) for m in head.modules()) == 13
    with pytest.raises(RuntimeError, match="only an unfolded IconMattingHead in eval mode can be folded"):
        head.folded_state_dict()
    folded = IconMattingHead(config, folded=True)
    with pytest.raises(RuntimeError, match="a folded IconMattingHead is for inference only"):
        folded.train()
    with pytest.raises(RuntimeError, match="only an unfolded"):
        folded.folded_state_dict()
    assert folded.eval() is folded


def test_a_batch_norm_that_follows_no_convolution_is_refused():
    head = tiny_head()
    head.detail.alpha_head[0] = nn.ReLU()
    with pytest.raises(TypeError, match=r"^detail\.alpha_head\.1: a BatchNorm that does not follow a convolution"):
        head.folded_state_dict()
