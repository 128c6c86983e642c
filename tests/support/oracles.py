"""Earlier, simpler implementations the tests (and benchmarks/benchmark_cutout.py) compare the library with.

* Box means with integral images (``old_box_blur``): the library's box filter before it ran strip-wise.
* Blur-fusion foreground colours over the whole image, straight from the definition in plain numpy
  float64 (``old_estimate_foreground``; the benchmark's whole-image baseline).
* Cell selection on the mask first shrunk to the model's square input (:func:`prepare_mask`, then
  :func:`cell_mask`): what ``context.cell_selection`` computed before it decided on the original
  pixels; for a mask already at the model's size both agree.
"""
import numpy as np
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


def window_sum(x, radius):
    """x [H, W, C] -> the sum over the (2r+1) x (2r+1) window around each pixel; pixels outside the
    image add nothing. Shifted copies added up, down the rows, then across the columns."""
    h, w = x.shape[:2]
    padded = np.pad(x, ((radius, radius), (radius, radius), (0, 0)))
    down = sum(padded[dy : dy + h] for dy in range(2 * radius + 1))
    return sum(down[:, dx : dx + w] for dx in range(2 * radius + 1))


def old_estimate_foreground(image, alpha, kernel_sizes=(90, 6)):
    """Forte & Pitie's blur-fusion, one image at a time: image [B, H, W, 3], alpha [B, H, W] (torch)
    -> foreground [B, H, W, 3]. Per pass (radius k // 2), with means over the window inside the image:
    fg_w = mean(alpha * fg) / (mean(alpha) + 1e-5), bg_w = mean((1 - alpha) * bg) / (1 - mean(alpha) + 1e-5),
    then fg = clip(fg_w + alpha * (image - alpha * fg_w - (1 - alpha) * bg_w)) and bg = bg_w; the first
    pass starts from fg = bg = image. (The benchmark times this as the whole-image baseline, "old".)"""
    out = []
    for photo, matte in zip(image.double().numpy(), alpha.double().numpy()):
        a = matte[..., None]
        fg = bg = photo
        for size in kernel_sizes:
            r = size // 2
            pixels = window_sum(np.ones_like(a), r)
            mean_alpha = window_sum(a, r) / pixels
            fg_w = window_sum(a * fg, r) / pixels / (mean_alpha + 1e-5)
            bg_w = window_sum((1 - a) * bg, r) / pixels / (1 - mean_alpha + 1e-5)
            composite = a * fg_w + (1 - a) * bg_w
            fg, bg = np.clip(fg_w + a * (photo - composite), 0, 1), bg_w
        out.append(torch.from_numpy(fg))
    return torch.stack(out).to(image.dtype)


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
