"""The trainable part of IconMatting (all weights of the released checkpoint).

``IconMattingHead`` holds three groups of layers, used by three pipeline stages:

* ``similarity`` (stage "match"): the layer norm applied to correspondence features before the
  inter-image similarity, and one conv per attention resolution that turns propagated
  self-attention maps into guidance features;
* ``fusion`` (stage "match"): merges UNet features with that guidance, two scales -> one map at S/16;
* ``detail`` (stage "decode"): a ViTMatte-style detail-capture decoder that upsamples the fused map
  x16 with full-resolution image detail and predicts alpha through a sigmoid.

Module names differ from the reference code; ``checkpoint.py`` maps its keys onto these.

Layers are built from an ``operations`` namespace (``Conv2d``, ``LayerNorm``, ``BatchNorm2d``;
default :data:`TORCH_OPS`), so a host can substitute its own casting layers (ComfyUI's
``comfy.ops``) without changing any key or any computation.

Every BatchNorm of the head follows a convolution (in each ``ConvBNReLU`` and in the alpha head).
For inference a head can be built *folded* (``IconMattingHead(config, ops, folded=True)``): each of
those convolutions carries a bias and the BatchNorm after it is gone, its eval-mode affine map
y = (x - mean) / sqrt(var + eps) * gamma + beta merged into the convolution's weights
(:func:`fold_batch_norm`); its weights are :meth:`IconMattingHead.folded_state_dict` of the trained
head. A host then needs only convolutions and layer norms. Training keeps real BatchNorm: a folded
head cannot be put in training mode, and a head in training mode cannot be folded.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import IconMattingConfig


class TORCH_OPS:
    """Plain torch layers (the default ``operations``)."""

    Conv2d = nn.Conv2d
    LayerNorm = nn.LayerNorm
    BatchNorm2d = nn.BatchNorm2d


def fold_batch_norm(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """A convolution (``weight`` [O, I, kh, kw], ``bias`` [O] or None) followed by ``bn`` in eval mode, as
    one convolution: per output channel o, with s = gamma_o / sqrt(var_o + eps),
    weight'_o = weight_o * s and bias'_o = (bias_o - mean_o) * s + beta_o. Computed in float64,
    returned in ``weight``'s dtype."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    folded_bias = shift if bias is None else bias.double() * scale + shift
    return (weight.double() * scale[:, None, None, None]).to(weight.dtype), folded_bias.to(weight.dtype)


def _batch_norm(channels: int, ops, folded: bool) -> nn.Module:
    return nn.Identity() if folded else ops.BatchNorm2d(channels)


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias) -> BatchNorm -> ReLU; folded: 3x3 conv (with bias) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, ops=TORCH_OPS, folded: bool = False):
        super().__init__()
        self.conv = ops.Conv2d(in_channels, out_channels, 3, stride, 1, bias=folded)
        self.bn = _batch_norm(out_channels, ops, folded)
        self.relu = nn.ReLU(inplace=True)


class UpConcatConv(nn.Module):
    """x2 bilinear upsampling of a coarse map, concatenated after a finer map, then ConvBNReLU."""

    def __init__(self, in_channels: int, out_channels: int, ops=TORCH_OPS, folded: bool = False):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, ops=ops, folded=folded)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(torch.cat([fine, up], dim=1))


class AttentionPropagationConv(nn.Module):
    """Guidance-weighted attention [B, r, r, r*r] -> LayerNorm over keys -> ReLU -> 3x3 conv."""

    def __init__(self, tokens: int, out_channels: int, ops=TORCH_OPS):
        super().__init__()
        self.ln = ops.LayerNorm(tokens)
        self.conv = ops.Conv2d(tokens, out_channels, 3, 1, 1, bias=False)

    def forward(self, weighted: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(rearrange(self.ln(weighted), "b qy qx k -> b k qy qx")))  # keys become channels


class InContextSimilarityLayers(nn.Module):
    def __init__(self, config: IconMattingConfig, ops=TORCH_OPS):
        super().__init__()
        self.token_norm = ops.LayerNorm(config.unet_feature_channels[1])
        self.propagation = nn.ModuleList(
            AttentionPropagationConv(r * r, config.attention_out_channels, ops) for r in config.attention_resolutions
        )


class GuidedFusion(nn.Module):
    """Per scale: UNet feature -> ConvBNReLU, concat guidance, ConvBNReLU; then coarse+fine -> S/16."""

    def __init__(self, config: IconMattingConfig, ops=TORCH_OPS, folded: bool = False):
        super().__init__()
        c = config.fused_channels
        self.feature_convs = nn.ModuleList(
            ConvBNReLU(i, o, ops=ops, folded=folded) for i, o in zip(config.unet_feature_channels, c)
        )
        self.guided_convs = nn.ModuleList(ConvBNReLU(o + config.attention_out_channels, o, ops=ops, folded=folded) for o in c)
        self.scale_fusion = UpConcatConv(c[0] + c[1], c[0], ops, folded)

    def forward(self, up_features: Sequence[torch.Tensor], guidance: Sequence[torch.Tensor]) -> torch.Tensor:
        """up_features/guidance: coarse (S/32) then fine (S/16) -> [B, fused_channels[0], S/16, S/16]."""
        scales = [
            guided(torch.cat([feat_conv(f), g], dim=1))
            for f, g, feat_conv, guided in zip(up_features, guidance, self.feature_convs, self.guided_convs)
        ]
        return self.scale_fusion(scales[0], scales[1])


class DetailCapture(nn.Module):
    """Image conv stream (/2, /4, /8) + four x2 fusion steps from S/16 to S + alpha head."""

    def __init__(self, config: IconMattingConfig, ops=TORCH_OPS, folded: bool = False):
        super().__init__()
        stream = (3, *config.detail_channels)
        self.image_convs = nn.ModuleList(
            ConvBNReLU(i, o, stride=2, ops=ops, folded=folded) for i, o in zip(stream[:-1], stream[1:])
        )
        ins = (config.fused_channels[0], *config.decoder_channels[:-1])
        self.fuse_blocks = nn.ModuleList(
            UpConcatConv(i + d, o, ops, folded) for i, d, o in zip(ins, reversed(stream), config.decoder_channels)
        )
        mid = config.alpha_head_channels
        self.alpha_head = nn.Sequential(
            ops.Conv2d(config.decoder_channels[-1], mid, 3, 1, 1),
            _batch_norm(mid, ops, folded),
            nn.ReLU(inplace=True),
            ops.Conv2d(mid, 1, 1, 1, 0),
        )

    def forward(self, fused: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """fused [B, C, S/16, S/16], images [B, 3, S, S] in [-1, 1] -> alpha [B, 1, S, S] in [0, 1]."""
        details = [images]
        for conv in self.image_convs:
            details.append(conv(details[-1]))
        x = fused
        for block, detail in zip(self.fuse_blocks, reversed(details)):
            x = block(x, detail)
        return torch.sigmoid(self.alpha_head(x))


class IconMattingHead(nn.Module):
    """All trainable IconMatting layers; see the module docstring (``folded``: built for inference, with
    each BatchNorm folded into the convolution before it)."""

    def __init__(self, config: IconMattingConfig = IconMattingConfig(), operations=TORCH_OPS, folded: bool = False):
        super().__init__()
        self.config = config
        self.folded = folded
        self.similarity = InContextSimilarityLayers(config, operations)
        self.fusion = GuidedFusion(config, operations, folded)
        self.detail = DetailCapture(config, operations, folded)
        self.eval()

    def train(self, mode: bool = True) -> "IconMattingHead":
        if mode and self.folded:
            raise RuntimeError("a folded IconMattingHead is for inference only: train an unfolded one (real BatchNorm)")
        return super().train(mode)

    def folded_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights of ``IconMattingHead(self.config, folded=True)`` that compute what this head computes
        in eval mode: each BatchNorm folded into the convolution before it (:func:`fold_batch_norm`)."""
        if self.training or self.folded:
            raise RuntimeError("only an unfolded IconMattingHead in eval mode can be folded (BatchNorm then uses its "
                               "running statistics)")
        state = self.state_dict()
        for prefix, parent in self.named_modules():
            children = list(parent.named_children())
            for i, (name, child) in enumerate(children):
                if not isinstance(child, nn.BatchNorm2d):
                    continue
                bn_at = f"{prefix}.{name}." if prefix else f"{name}."
                conv_name, conv = children[i - 1] if i > 0 and isinstance(parent, nn.Sequential) else (None, None)
                if not isinstance(conv, nn.Conv2d):
                    raise TypeError(f"{bn_at[:-1]}: a BatchNorm that does not follow a convolution cannot be folded")
                conv_at = f"{prefix}.{conv_name}." if prefix else f"{conv_name}."
                state[conv_at + "weight"], state[conv_at + "bias"] = fold_batch_norm(conv.weight, conv.bias, child)
                for key in [k for k in state if k.startswith(bn_at)]:
                    del state[key]
        return state

    def guidance_layers(self) -> Dict[int, AttentionPropagationConv]:
        return dict(zip(self.config.attention_resolutions, self.similarity.propagation))
