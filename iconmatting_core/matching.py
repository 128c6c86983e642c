"""Stage 4: match targets against a reference context.

1. Inter-image similarity: every region token attends over the target's correspondence feature
   map (both layer-normed, scaled dot product, softmax over target positions); the attention
   rows are summed over tokens -> a similarity map [B, 1, S/16, S/16].
2. Intra-image propagation: for each attention resolution r, the similarity map is resized to
   r x r and weights the target's own self-attention: weighted[b, q, k] = sim[b, k] * A[b, q, k];
   a LayerNorm over k and a conv turn it into guidance features [B, C_attn, r, r].
3. Fusion of UNet features with that guidance -> the decoder input [B, C, S/16, S/16].

Letterbox padding never takes part in the guidance. ``valid`` (bool [B, S/16, S/16], or the
targets' Placements, see :func:`iconmatting_core.preprocess.content_cells`) marks the cells that
hold image: a cell of the S/16 grid (16 model pixels) that overlaps the content by at least one
pixel. The softmax of step 1 runs over those cells only (padded cells get similarity exactly 0,
and each token's attention sums to 1 over the image cells). In step 2 the guidance weight of a
key cell of the r x r attention grid (24 and 48 for 768: cells of 32 and 16 pixels) is exactly 0
unless that cell holds image, i.e. unless one of its S/16 children does (max-pooling of
``valid``, exact because the content is a top-left rectangle). Query rows are kept as they are (a
padded query only reaches image pixels through the 3x3 convolutions at the content border), and the
LayerNorm over keys still sees the r*r entries (zero for padded keys, as for any key the
similarity gives no weight). When every cell holds image (square input, "stretch"), the
computation is the original one, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange

from .features import ImageFeatures
from .matting_head import IconMattingHead
from .preprocess import Placement, valid_cells

Valid = Union[None, torch.Tensor, Sequence[Placement]]

TOKEN_CHUNK = 4096
"""Reference tokens per softmax batch in :func:`inter_image_similarity`: memory [B, chunk, h*w] floats."""


def max_token_magnitude(channels: int) -> float:
    """The largest |value| a reference token may hold for the head's token LayerNorm to stay
    finite in float32: the norm sums ``channels`` squared deviations from the mean, each at most
    (2 * bound)^2, so the sum stays below float32's largest value when the bound is
    sqrt(max / (4 * channels)). After the norm a token is bounded by the head's own weights
    (|y| <= sqrt(channels) * |gamma| + |beta|), so tokens within this bound give finite
    similarities, and tokens beyond it overflow with any weights (about 2.6e17 for SD's 1280
    channels; real features are many orders of magnitude smaller)."""
    return (torch.finfo(torch.float32).max / (4 * channels)) ** 0.5


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


def _padded_cells(valid: Optional[torch.Tensor], grid: int) -> Optional[torch.Tensor]:
    """valid [B, g, g] -> bool [B, grid, grid] of the cells that hold NO image, or None when every
    cell holds image (then the caller runs the unmasked computation)."""
    if valid is None or bool(valid.all()):
        return None
    v = valid[:, None].float()
    if v.shape[-1] != grid:
        v = F.adaptive_max_pool2d(v, grid)  # a coarse cell holds image when a child does
    return v[:, 0] == 0


def inter_image_similarity(
    head: IconMattingHead,
    tokens: torch.Tensor,
    correspondence: torch.Tensor,
    token_chunk: int = TOKEN_CHUNK,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """tokens [N, C], target features [B, C, h, w] -> summed token attention [B, 1, h, w] (float32).

    valid: optional bool [B, h, w], the cells that hold image; the softmax over target positions
    runs over them only and the other cells get exactly 0 (see the module docstring).
    """
    norm = head.similarity.token_norm
    b, c, h, w = correspondence.shape
    scale = c**-0.5
    padded = _padded_cells(valid, h)
    if padded is not None:
        padded = rearrange(padded.to(correspondence.device), "b h w -> b 1 (h w)")
    target = norm(rearrange(correspondence.float(), "b c h w -> b (h w) c").to(norm.weight.dtype)).float()
    out = torch.zeros(b, h * w, device=correspondence.device, dtype=torch.float32)
    for start in range(0, tokens.shape[0], token_chunk):
        ref = norm(tokens[start : start + token_chunk].to(correspondence.device, norm.weight.dtype)).float()
        sim = torch.einsum("nc,bpc->bnp", ref, target) * scale
        if padded is not None:
            sim = sim.masked_fill(padded, float("-inf"))
        out += sim.softmax(dim=-1).sum(dim=1)
    return rearrange(out, "b (h w) -> b 1 h w", h=h)


def intra_image_propagation(
    head: IconMattingHead,
    similarity: torch.Tensor,
    attention: Dict[int, torch.Tensor],
    valid: Optional[torch.Tensor] = None,
) -> List[torch.Tensor]:
    """similarity [B, 1, h, w], attention {r: [B, r*r, r*r]} -> guidance [B, C_attn, r, r] per r.

    valid: optional bool [B, h, w] (cells of the similarity grid that hold image); key cells of
    each r x r grid without image get guidance weight exactly 0.
    """
    out = []
    dtype = head.similarity.token_norm.weight.dtype
    for res, layer in head.guidance_layers().items():
        attn = attention[res]
        weights = F.interpolate(similarity, size=(res, res), mode="bilinear", align_corners=True)
        weights = rearrange(weights, "b 1 ky kx -> b 1 (ky kx)")  # one weight per key cell
        padded = _padded_cells(valid, res)
        if padded is not None:
            weights = weights.masked_fill(rearrange(padded.to(weights.device), "b ky kx -> b 1 (ky kx)"), 0.0)
        weighted = rearrange(attn * weights, "b (qy qx) k -> b qy qx k", qy=res)
        out.append(layer(weighted.to(dtype)))
    return out


def match_features(head: IconMattingHead, tokens: torch.Tensor, features: ImageFeatures, valid: Valid = None):
    """Target features -> (fused decoder input [B, C, S/16, S/16], similarity [B, 1, S/16, S/16]).

    valid: which cells of each target hold image: None (all of them), a bool tensor
    [B, S/16, S/16], or the targets' Placements (letterboxed inputs; see
    :func:`iconmatting_core.preprocess.content_cells`). Padding then gets no similarity and no
    guidance; inputs without padding give the same result as ``valid=None``, bit for bit.
    """
    correspondence = features.correspondence
    if valid is not None and not isinstance(valid, torch.Tensor):
        valid = valid_cells(list(valid), head.config.image_size, correspondence.shape[-1])
    if valid is not None and tuple(valid.shape) != (correspondence.shape[0], *correspondence.shape[-2:]):
        raise ValueError(
            f"valid must be a bool map [B, h, w] = {[correspondence.shape[0], *correspondence.shape[-2:]]} "
            f"of the target cells that hold image, got {list(valid.shape)}"
        )
    similarity = inter_image_similarity(head, tokens, correspondence, valid=valid)
    guidance = intra_image_propagation(head, similarity, features.attention, valid=valid)
    dtype = head.similarity.token_norm.weight.dtype
    fused = head.fusion([f.to(dtype) for f in features.up_features], guidance)
    return fused, similarity
