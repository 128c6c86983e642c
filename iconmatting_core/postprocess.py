"""Stage 6: alpha back at the original pixels, foreground colours for compositing, previews.

Foreground colours are estimated with blur-fusion (Forte & Pitie, "Approximate Fast Foreground
Colour Estimation", ICIP 2021: two passes, box filters of 90 then 6 pixels, i.e. radii 45 and 3
here, as their ``cv2.blur(x, (r, r))``): background colour that bleeds into
semi-transparent edge pixels is removed, so a cut-out composited on a new background shows no
halo of the old one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def box_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window clipped to the image, via integral images. x: [B, C, H, W]."""
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


def _blur_fusion_pass(image, fg, bg, alpha, radius):
    blurred_alpha = box_blur(alpha, radius)
    blurred_fg = box_blur(fg * alpha, radius) / (blurred_alpha + 1e-5)
    blurred_bg = box_blur(bg * (1 - alpha), radius) / ((1 - blurred_alpha) + 1e-5)
    fg = blurred_fg + alpha * (image - alpha * blurred_fg - (1 - alpha) * blurred_bg)
    return fg.clamp(0, 1), blurred_bg


@torch.no_grad()
def estimate_foreground(image: torch.Tensor, alpha: torch.Tensor, kernel_sizes=(90, 6)) -> torch.Tensor:
    """image [B, H, W, 3] in [0, 1], alpha [B, H, W] -> foreground colours [B, H, W, 3] in [0, 1]."""
    img = image.permute(0, 3, 1, 2).double()
    a = alpha[:, None].double()
    fg, bg = img, img
    for k in kernel_sizes:
        fg, bg = _blur_fusion_pass(img, fg, bg, a, k // 2)
    return fg.permute(0, 2, 3, 1).to(image.dtype)


def rgba_cutout(image: torch.Tensor, alpha: torch.Tensor, estimate_colors: bool = True) -> torch.Tensor:
    """[B, H, W, 3] + alpha [B, H, W] -> RGBA [B, H, W, 4] (straight, not premultiplied, alpha)."""
    fg = estimate_foreground(image, alpha) if estimate_colors else image
    return torch.cat([fg, alpha[..., None].to(fg.dtype)], dim=-1)


def normalise_map(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of a batch [B, ...] to [0, 1] (constant maps -> 0)."""
    flat = x.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(x)


def heatmap(values: torch.Tensor) -> torch.Tensor:
    """Maps [B, H, W] in [0, 1] -> RGB [B, H, W, 3] with a blue-cyan-yellow-red ramp."""
    stops = torch.tensor(
        [[0.0, 0.0, 0.3], [0.0, 0.5, 1.0], [0.2, 1.0, 0.8], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
        dtype=values.dtype, device=values.device,
    )
    pos = values.clamp(0, 1) * (len(stops) - 1)
    lo = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - lo)[..., None]
    return stops[lo] * (1 - frac) + stops[lo + 1] * frac
