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
"""
from __future__ import annotations

from typing import Dict, Sequence

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


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, ops=TORCH_OPS):
        super().__init__()
        self.conv = ops.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn = ops.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)


class UpConcatConv(nn.Module):
    """x2 bilinear upsampling of a coarse map, concatenated after a finer map, then ConvBNReLU."""

    def __init__(self, in_channels: int, out_channels: int, ops=TORCH_OPS):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, ops=ops)

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

    def __init__(self, config: IconMattingConfig, ops=TORCH_OPS):
        super().__init__()
        c = config.fused_channels
        self.feature_convs = nn.ModuleList(ConvBNReLU(i, o, ops=ops) for i, o in zip(config.unet_feature_channels, c))
        self.guided_convs = nn.ModuleList(ConvBNReLU(o + config.attention_out_channels, o, ops=ops) for o in c)
        self.scale_fusion = UpConcatConv(c[0] + c[1], c[0], ops)

    def forward(self, up_features: Sequence[torch.Tensor], guidance: Sequence[torch.Tensor]) -> torch.Tensor:
        """up_features/guidance: coarse (S/32) then fine (S/16) -> [B, fused_channels[0], S/16, S/16]."""
        scales = [
            guided(torch.cat([feat_conv(f), g], dim=1))
            for f, g, feat_conv, guided in zip(up_features, guidance, self.feature_convs, self.guided_convs)
        ]
        return self.scale_fusion(scales[0], scales[1])


class DetailCapture(nn.Module):
    """Image conv stream (/2, /4, /8) + four x2 fusion steps from S/16 to S + alpha head."""

    def __init__(self, config: IconMattingConfig, ops=TORCH_OPS):
        super().__init__()
        stream = (3, *config.detail_channels)
        self.image_convs = nn.ModuleList(ConvBNReLU(i, o, stride=2, ops=ops) for i, o in zip(stream[:-1], stream[1:]))
        ins = (config.fused_channels[0], *config.decoder_channels[:-1])
        self.fuse_blocks = nn.ModuleList(
            UpConcatConv(i + d, o, ops) for i, d, o in zip(ins, reversed(stream), config.decoder_channels)
        )
        mid = config.alpha_head_channels
        self.alpha_head = nn.Sequential(
            ops.Conv2d(config.decoder_channels[-1], mid, 3, 1, 1),
            ops.BatchNorm2d(mid),
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
    """All trainable IconMatting layers; see the module docstring."""

    def __init__(self, config: IconMattingConfig = IconMattingConfig(), operations=TORCH_OPS):
        super().__init__()
        self.config = config
        self.similarity = InContextSimilarityLayers(config, operations)
        self.fusion = GuidedFusion(config, operations)
        self.detail = DetailCapture(config, operations)
        self.eval()

    def guidance_layers(self) -> Dict[int, AttentionPropagationConv]:
        return dict(zip(self.config.attention_resolutions, self.similarity.propagation))
