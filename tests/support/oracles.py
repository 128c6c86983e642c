"""Earlier, simpler implementations the tests (and benchmarks/benchmark_cutout.py) compare the library with.

* Blur-fusion foreground colours over the whole image in float64 with integral images: what
  ``postprocess.estimate_foreground`` computed before it ran strip-wise (``old_*``).
* Cell selection on the mask first shrunk to the model's square input (:func:`prepare_mask`, then
  :func:`cell_mask`): what ``context.cell_selection`` computed before it decided on the original
  pixels; for a mask already at the model's size both agree.
"""
import torch
import torch.nn.functional as F

from iconmatting_core.context import POOLING_MODES
from iconmatting_core.preprocess import Placement, _resize


def old_box_blur(x, radius):
    b, c, h, w = x.shape
    pad = F.pad(x, (1, 0, 1, 0))
    integral = pad.cumsum(-1).cumsum(-2)
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    y0, y1 = (ys - radius).clamp(0, h), (ys + radius + 1).clamp(0, h)
    x0, x1 = (xs - radius).clamp(0, w), (xs + radius + 1).clamp(0, w)
    rows_hi, rows_lo = integral[:, :, y1], integral[:, :, y0]
    s = rows_hi[..., x1] - rows_hi[..., x0] - rows_lo[..., x1] + rows_lo[..., x0]
    area = ((y1 - y0)[:, None] * (x1 - x0)[None, :]).to(x.dtype)
    return s / area


def old_pass(image, fg, bg, alpha, radius):
    blurred_alpha = old_box_blur(alpha, radius)
    blurred_fg = old_box_blur(fg * alpha, radius) / (blurred_alpha + 1e-5)
    blurred_bg = old_box_blur(bg * (1 - alpha), radius) / ((1 - blurred_alpha) + 1e-5)
    fg = blurred_fg + alpha * (image - alpha * blurred_fg - (1 - alpha) * blurred_bg)
    return fg.clamp(0, 1), blurred_bg


def old_estimate_foreground(image, alpha, kernel_sizes=(90, 6)):
    img = image.permute(0, 3, 1, 2).double()
    a = alpha[:, None].double()
    fg, bg = img, img
    for k in kernel_sizes:
        fg, bg = old_pass(img, fg, bg, a, k // 2)
    return fg.permute(0, 2, 3, 1).to(image.dtype)


def prepare_mask(mask: torch.Tensor, placement: Placement, size: int) -> torch.Tensor:
    """[H, W] in [0, 1] -> binary [1, size, size] (threshold 0.5, as the reference), padding = 0."""
    if tuple(mask.shape) != (placement.height, placement.width):
        raise ValueError(
            f"mask size {tuple(mask.shape)} does not match its image size {(placement.height, placement.width)}"
        )
    m = _resize(mask[None, None].float(), (placement.content_height, placement.content_width), "bilinear")
    m = (m > 0.5).float()
    m = F.pad(m, (0, size - placement.content_width, 0, size - placement.content_height), value=0.0)
    return m[0]


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
