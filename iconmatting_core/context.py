"""Stage 3: the reference context, encoded once and reused for any number of targets.

A reference image's correspondence feature map (UNet up block 1, [C, S/16, S/16]) is reduced to
the feature vectors ("region tokens") of the cells that the user's mask marks as foreground.
Several references simply contribute more tokens to one context.

Cell selection (``pooling``):
* ``"mask"`` (the reference implementation's min-pooling): a 16x16-pixel cell counts only if the
  mask covers it entirely. Use for masks.
* ``"scribble"`` (max-pooling): a cell counts if the mask touches it. Use for strokes and points,
  which would otherwise select nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .config import IconMattingConfig

POOLING_MODES = ("mask", "scribble")


@dataclass
class ReferenceContext:
    """Everything matching needs from the references.

    tokens: [N, C] float32 region tokens of all references, concatenated.
    token_counts: tokens contributed by each reference image.
    """

    tokens: torch.Tensor
    token_counts: Tuple[int, ...]
    config: IconMattingConfig
    pooling: str = "mask"
    seed: int = 0
    reference_sizes: Tuple[Tuple[int, int], ...] = field(default_factory=tuple)

    @property
    def num_references(self) -> int:
        return len(self.token_counts)

    def to(self, device) -> "ReferenceContext":
        return replace(self, tokens=self.tokens.to(device))

    def merge(self, other: "ReferenceContext") -> "ReferenceContext":
        """One context holding the tokens of both (same model configuration required)."""
        if other.config != self.config:
            raise ValueError("cannot merge reference contexts built with different model configurations")
        return replace(
            self,
            tokens=torch.cat([self.tokens, other.tokens.to(self.tokens.device)]),
            token_counts=self.token_counts + other.token_counts,
            reference_sizes=self.reference_sizes + other.reference_sizes,
        )


def cell_mask(mask: torch.Tensor, grid: int, pooling: str) -> torch.Tensor:
    """Binary mask [1, S, S] -> boolean cell selection [grid, grid]."""
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    kernel = mask.shape[-1] // grid
    m = mask[None].float()
    if pooling == "mask":
        cells = -F.max_pool2d(-m, kernel, kernel)
    else:
        cells = F.max_pool2d(m, kernel, kernel)
    return cells[0, 0] > 0


def region_tokens(correspondence: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """correspondence [C, h, w] and binary mask [1, S, S] -> tokens [N, C] of the selected cells."""
    selected = cell_mask(mask, correspondence.shape[-1], pooling)
    return correspondence.flatten(1).t()[selected.flatten()]


def build_context(
    correspondences: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    config: IconMattingConfig,
    pooling: str = "mask",
    seed: int = 0,
    reference_sizes: Sequence[Tuple[int, int]] = (),
) -> ReferenceContext:
    """Reference features [C, h, w] and prepared masks [1, S, S] -> ReferenceContext.

    Raises ValueError naming the reference when its mask selects no cell.
    """
    tokens: List[torch.Tensor] = []
    for i, (feat, mask) in enumerate(zip(correspondences, masks)):
        t = region_tokens(feat.float(), mask.to(feat.device), pooling)
        if t.shape[0] == 0:
            stride = config.image_size // feat.shape[-1]
            hint = (
                " Draw a larger mask, or use pooling 'scribble' for strokes and points."
                if pooling == "mask"
                else " Draw a larger mask or scribble."
            )
            raise ValueError(
                f"reference mask {i} selects no {stride}x{stride}-pixel cell at the model's "
                f"{config.image_size}x{config.image_size} input (pooling {pooling!r}).{hint}"
            )
        tokens.append(t)
    return ReferenceContext(
        tokens=torch.cat(tokens),
        token_counts=tuple(t.shape[0] for t in tokens),
        config=config,
        pooling=pooling,
        seed=seed,
        reference_sizes=tuple(tuple(s) for s in reference_sizes),
    )
