"""Stage 4: match targets against a reference context.

1. Inter-image similarity: every region token attends over the target's correspondence feature
   map (both layer-normed, scaled dot product, softmax over target positions); the attention
   rows are summed over tokens -> a similarity map [B, 1, S/16, S/16].
2. Intra-image propagation: for each attention resolution r, the similarity map is resized to
   r x r and weights the target's own self-attention: weighted[b, q, k] = sim[b, k] * A[b, q, k];
   a LayerNorm over k and a conv turn it into guidance features [B, C_attn, r, r].
3. Fusion of UNet features with that guidance -> the decoder input [B, C, S/16, S/16].
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from .features import ImageFeatures
from .matting_head import IconMattingHead
from .preprocess import Placement


@dataclass
class MatchResult:
    """Matched targets, ready for alpha decoding.

    fused: [B, C, S/16, S/16] decoder input. similarity: [B, 1, S/16, S/16] inter-image similarity
    (preview). sources: the target images as given (kept by reference, not copied; decoding
    prepares them again, so a long batch holds only the small fused maps). placements: where
    each target sits in the model input; resize_mode: how it was brought there.
    """

    fused: torch.Tensor
    similarity: torch.Tensor
    sources: List[Any]
    placements: List[Placement]
    resize_mode: str = "pad"

    def __len__(self) -> int:
        return self.fused.shape[0]

    @staticmethod
    def concat(parts: List["MatchResult"]) -> "MatchResult":
        if not parts:
            raise ValueError("no match results to concatenate")
        if len({p.resize_mode for p in parts}) > 1:
            raise ValueError("cannot concatenate match results made with different resize modes")
        return MatchResult(
            fused=torch.cat([p.fused for p in parts]),
            similarity=torch.cat([p.similarity for p in parts]),
            sources=[s for p in parts for s in p.sources],
            placements=[pl for p in parts for pl in p.placements],
            resize_mode=parts[0].resize_mode,
        )

    def to(self, device, dtype=None) -> "MatchResult":
        return replace(self, fused=self.fused.to(device, dtype), similarity=self.similarity.to(device))

    def slice(self, start: int, stop: int) -> "MatchResult":
        return replace(
            self,
            fused=self.fused[start:stop],
            similarity=self.similarity[start:stop],
            sources=self.sources[start:stop],
            placements=self.placements[start:stop],
        )


def inter_image_similarity(
    head: IconMattingHead, tokens: torch.Tensor, correspondence: torch.Tensor, token_chunk: int = 4096
) -> torch.Tensor:
    """tokens [N, C], target features [B, C, h, w] -> summed token attention [B, 1, h, w] (float32)."""
    norm = head.similarity.token_norm
    b, c, h, w = correspondence.shape
    scale = c**-0.5
    target = norm(correspondence.float().flatten(2).transpose(1, 2).to(norm.weight.dtype)).float()  # [B, hw, C]
    out = torch.zeros(b, h * w, device=correspondence.device, dtype=torch.float32)
    for start in range(0, tokens.shape[0], token_chunk):
        ref = norm(tokens[start : start + token_chunk].to(correspondence.device, norm.weight.dtype)).float()
        sim = torch.einsum("nc,bpc->bnp", ref, target) * scale
        out += sim.softmax(dim=-1).sum(dim=1)
    return out.view(b, 1, h, w)


def intra_image_propagation(
    head: IconMattingHead, similarity: torch.Tensor, attention: Dict[int, torch.Tensor]
) -> List[torch.Tensor]:
    """similarity [B, 1, h, w], attention {r: [B, r*r, r*r]} -> guidance [B, C_attn, r, r] per r."""
    out = []
    dtype = head.similarity.token_norm.weight.dtype
    for res, layer in head.guidance_layers().items():
        attn = attention[res]
        b = attn.shape[0]
        weights = F.interpolate(similarity, size=(res, res), mode="bilinear", align_corners=True).view(b, 1, res * res)
        weighted = (attn * weights).view(b, res, res, res * res)  # [b, q_y, q_x, k]
        out.append(layer(weighted.to(dtype)))
    return out


def match_features(head: IconMattingHead, tokens: torch.Tensor, features: ImageFeatures):
    """Target features -> (fused decoder input [B, C, S/16, S/16], similarity [B, 1, S/16, S/16])."""
    similarity = inter_image_similarity(head, tokens, features.correspondence)
    guidance = intra_image_propagation(head, similarity, features.attention)
    dtype = head.similarity.token_norm.weight.dtype
    fused = head.fusion([f.to(dtype) for f in features.up_features], guidance)
    return fused, similarity
