"""Stage 3: the reference context, encoded once and reused for any number of targets.

A reference image's correspondence feature map (UNet up block 1, [C, S/16, S/16]) is reduced to
the feature vectors ("region tokens") of the cells that the user's mask marks as foreground.
Several references simply contribute more tokens to one context.

Cell selection (``pooling``, the user-facing "guidance"), decided on the ORIGINAL-resolution mask
(foreground = mask > 0.5): each cell of the S/16 grid (16 model pixels) covers, through the
image's :class:`~iconmatting_core.preprocess.Placement`, the original pixel rows
``[floor(y0 * H / content_height), ceil(y1 * H / content_height))`` for its model rows
``[y0, y1)`` clipped to the content (columns alike), so a pixel on a cell border belongs to both.

* ``"mask"`` (the reference implementation's min-pooling): a cell counts only if it lies
  entirely inside the image content and the mask covers every original pixel of it. Use for
  filled masks. For a mask that already has the model's square size this is exactly the
  reference's min-pooling of the binarised mask.
* ``"scribble"`` (max-pooling): a cell counts if it holds image and any original pixel of it is
  foreground, so 1-pixel strokes and single clicks on photos of any size select the cells they
  touch (a mask first shrunk to the model's input would lose them).

Cells that are entirely letterbox padding never become region tokens: they cover no original pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .config import IconMattingConfig
from .preprocess import Placement

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
    resize_mode: str = "pad"
    """How the references were brought to the model's input; targets should use the same."""

    @property
    def num_references(self) -> int:
        return len(self.token_counts)

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


def _cell_spans(original: int, content: int, stride: int, grid: int):
    """One axis: per cell, [start, end) in original pixels, whether it overlaps the content, and
    whether it lies entirely inside it (see the module docstring)."""
    lo = torch.arange(grid, dtype=torch.int64) * stride
    hi = (lo + stride).clamp(max=content)
    holds_image = lo < content
    inside = lo + stride <= content
    start = ((lo * original) // content).clamp(max=original)
    end = (-((-hi * original) // content)).clamp(min=0, max=original)
    return start.tolist(), end.tolist(), holds_image, inside


def cell_selection(mask: torch.Tensor, placement: Placement, size: int, grid: int, pooling: str) -> torch.Tensor:
    """Original-resolution mask [H, W] in [0, 1] -> boolean cell selection [grid, grid].

    Counts the foreground pixels (mask > 0.5) of each cell's original-pixel span (one slab of rows
    at a time, so no full-size temporary beyond the binarised mask).
    """
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    if tuple(mask.shape) != (placement.height, placement.width):
        raise ValueError(
            f"mask size {tuple(mask.shape)} does not match its image size {(placement.height, placement.width)}"
        )
    stride = size // grid
    r0, r1, row_image, row_inside = _cell_spans(placement.height, placement.content_height, stride, grid)
    c0, c1, col_image, col_inside = _cell_spans(placement.width, placement.content_width, stride, grid)
    fg = mask > 0.5
    counts = torch.zeros(grid, grid, dtype=torch.int64)
    col_start, col_end = torch.tensor(c0), torch.tensor(c1)
    for i in range(grid):
        if not row_image[i]:
            break
        per_column = fg[r0[i] : r1[i]].sum(dim=0, dtype=torch.int64).cpu()
        cumulative = F.pad(per_column.cumsum(0), (1, 0))
        counts[i] = cumulative[col_end] - cumulative[col_start]
    holds_image = row_image[:, None] & col_image[None, :]
    if pooling == "scribble":
        return holds_image & (counts > 0)
    area = (torch.tensor(r1) - torch.tensor(r0))[:, None] * (col_end - col_start)[None, :]
    return row_inside[:, None] & col_inside[None, :] & (counts == area) & (area > 0)


def region_tokens(
    correspondence: torch.Tensor, mask: torch.Tensor, placement: Placement, size: int, pooling: str
) -> torch.Tensor:
    """correspondence [C, h, w] and the original-resolution mask [H, W] of an image placed by
    ``placement`` in the model's ``size`` input -> tokens [N, C] of the cells :func:`cell_selection` picks."""
    selected = cell_selection(mask, placement, size, correspondence.shape[-1], pooling)
    cells = rearrange(correspondence, "c h w -> (h w) c")
    return cells[rearrange(selected, "h w -> (h w)").to(correspondence.device)]


def build_context(
    correspondences: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    placements: Sequence[Placement],
    config: IconMattingConfig,
    pooling: str = "mask",
    seed: int = 0,
    resize_mode: str = "pad",
) -> ReferenceContext:
    """Reference features [C, h, w], original-resolution masks [H, W] in [0, 1] and the references'
    placements (one each) -> ReferenceContext.

    Raises ValueError naming the reference when its mask selects no cell.
    """
    if not len(correspondences) == len(masks) == len(placements):
        raise ValueError(f"got {len(correspondences)} references, {len(masks)} masks and {len(placements)} placements")
    tokens: List[torch.Tensor] = []
    for i, (feat, mask, placement) in enumerate(zip(correspondences, masks, placements)):
        t = region_tokens(feat.float(), mask, placement, config.image_size, pooling)
        if t.shape[0] == 0:
            stride = config.image_size // feat.shape[-1]
            hint = (
                " Draw a larger mask, or use guidance 'scribble' for strokes and points."
                if pooling == "mask"
                else " Draw a larger mask or scribble."
            )
            raise ValueError(
                f"reference mask {i} selects no {stride}x{stride}-pixel cell at the model's "
                f"{config.image_size}x{config.image_size} input (guidance {pooling!r}).{hint}"
            )
        tokens.append(t)
    return ReferenceContext(
        tokens=torch.cat(tokens),
        token_counts=tuple(t.shape[0] for t in tokens),
        config=config,
        pooling=pooling,
        seed=seed,
        reference_sizes=tuple((p.height, p.width) for p in placements),
        resize_mode=resize_mode,
    )
