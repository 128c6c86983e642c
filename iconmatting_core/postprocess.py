"""Stage 6: alpha back at the original pixels, foreground colours for compositing, previews.

Foreground colours are estimated with blur-fusion (Forte & Pitie, "Approximate Fast Foreground
Colour Estimation", ICIP 2021: two passes with box filters of about 90 then 6 pixels; here windows
of radius 45 and 3, i.e. 91 and 7 pixels, averaged over the part inside the image at borders, where
their ``cv2.blur(x, (r, r))`` reflects; so approximately theirs): background colour that bleeds into
semi-transparent edge pixels is removed, so a cut-out composited on a new background shows no
halo of the old one.

The cost follows the matte's edges, not the photo's size: only pixels with 0 < alpha < 1 need an
estimate (alpha = 1 gives the image colour exactly; where alpha = 0 the colour is invisible and
the image colour is kept). The image is walked in strips of rows; a strip without such pixels is
skipped, otherwise the box filters run over the strip's edge columns plus the filters'
reach, in tiles of at most ``STRIP_ROWS x TILE_COLUMNS`` (running sums in float64; a strip's edge
columns are split into separate runs where they lie far apart, e.g. the two sides of an object),
and only the edge pixels are written. Extra memory is a few tile buffers (about 12 MB each,
whatever the photo's size) besides the output.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

STRIP_ROWS = 256
TILE_COLUMNS = 512
Box = Tuple[int, int, int, int]  # rows [y0, y1), columns [x0, x1)
_EPS = 1e-5  # blur-fusion's guard against a window without foreground or background


def _window_sums(x: torch.Tensor, out_lo: int, out_hi: int, src_lo: int, src_hi: int, radius: int) -> torch.Tensor:
    """Sums over [o - r, o + r] (clipped to the image) along the last axis of ``x``, which holds
    image positions [src_lo, src_hi), for outputs o in [out_lo, out_hi). Zeros stand in for the
    positions outside the image; a running sum makes every window two slices apart."""
    left, right = src_lo - (out_lo - radius), (out_hi + radius) - src_hi
    running = F.pad(x, (left + 1, right)).cumsum_(-1)
    n = out_hi - out_lo
    return running[..., 2 * radius + 1 : 2 * radius + 1 + n] - running[..., :n]


def _box_mean(src: torch.Tensor, src_box: Box, out_box: Box, radius: int, hw: Tuple[int, int]) -> torch.Tensor:
    """Box means (window clipped to the full image ``hw``) over ``out_box`` of an image, from
    ``src`` [C, h, w] holding the image's ``src_box``, which must contain ``out_box`` grown by
    ``radius`` (clipped to the image). Separable running sums along the contiguous axis: O(1)
    per pixel for any radius."""
    (sy0, sy1, sx0, sx1), (oy0, oy1, ox0, ox1) = src_box, out_box
    rows = _window_sums(src, ox0, ox1, sx0, sx1, radius).transpose(1, 2)  # [C, w_out, h_src]
    sums = _window_sums(rows, oy0, oy1, sy0, sy1, radius).transpose(1, 2)  # [C, h_out, w_out]
    dev = src.device
    ys, xs = torch.arange(oy0, oy1, device=dev), torch.arange(ox0, ox1, device=dev)
    height = (ys + radius + 1).clamp(max=hw[0]) - (ys - radius).clamp(min=0)
    width = (xs + radius + 1).clamp(max=hw[1]) - (xs - radius).clamp(min=0)
    return sums / (height[:, None] * width[None, :]).to(src.dtype)


def _grow(box: Box, radius: int, hw: Tuple[int, int]) -> Box:
    y0, y1, x0, x1 = box
    return max(0, y0 - radius), min(hw[0], y1 + radius), max(0, x0 - radius), min(hw[1], x1 + radius)


def _crop(x: torch.Tensor, outer: Box, inner: Box) -> torch.Tensor:
    """x [..., h, w] holding ``outer`` -> its part holding ``inner``."""
    return x[..., inner[0] - outer[0] : inner[1] - outer[0], inner[2] - outer[2] : inner[3] - outer[2]]


def _blur_fusion_region(image: torch.Tensor, alpha: torch.Tensor, box: Box, radii: Sequence[int]) -> torch.Tensor:
    """Blur-fusion foreground [3, h, w] (float64) over ``box`` of one image.

    image [H, W, 3], alpha [H, W] (full images, read only around ``box``). Each pass, with W the
    window of its radius around pixel p, I the image, F and B the previous pass's foreground and
    background (both I before the first pass):

        F~_p = mean_W(alpha F) / (mean_W(alpha) + eps)          the window's foreground colour
        B~_p = mean_W((1 - alpha) B) / (1 - mean_W(alpha) + eps)  and its background colour
        F_p  = clamp(F~_p + alpha_p (I_p - (alpha_p F~_p + (1 - alpha_p) B~_p)), 0, 1)

    i.e. what compositing the window's colours at alpha_p misses of the observed colour goes to the
    foreground in proportion to alpha_p (Forte & Pitie's update); B~ is the next pass's B. eps keeps a
    window without foreground (or without background) from dividing by zero. Pass k runs on the region
    the later passes need, grown by its own radius for its inputs.
    """
    hw = tuple(alpha.shape)
    regions: List[Box] = [box]
    for r in reversed(radii):
        regions.insert(0, _grow(regions[0], r, hw))

    def load(region: Box):
        y0, y1, x0, x1 = region
        return image[y0:y1, x0:x1].permute(2, 0, 1).double(), alpha[y0:y1, x0:x1][None].double()

    observed, a = load(regions[0])
    foreground = background = observed
    for k, r in enumerate(radii):
        src, dst = regions[k], regions[k + 1]
        means = _box_mean(torch.cat([a, a * foreground, (1 - a) * background]), src, dst, r, hw)
        coverage = means[:1]
        window_fg = means[1:4] / (coverage + _EPS)
        window_bg = means[4:] / (1 - coverage + _EPS)
        observed, a = _crop(observed, src, dst), _crop(a, src, dst)
        missed = observed - torch.lerp(window_bg, window_fg, a)
        foreground = (window_fg + a * missed).clamp_(0, 1)
        background = window_bg
    return foreground


@torch.no_grad()
def estimate_foreground(
    image: torch.Tensor, alpha: torch.Tensor, kernel_sizes=(90, 6), out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """image [B, H, W, 3] in [0, 1], alpha [B, H, W] -> foreground colours [B, H, W, 3] in [0, 1].

    Pixels with alpha 0 or 1 keep the image colour; the others get the blur-fusion estimate
    (see the module docstring). ``out``: optional [B, H, W, 3] tensor (a view is fine, e.g. the
    colour channels of an RGBA buffer) that receives the result instead of a new tensor.
    """
    radii = [k // 2 for k in kernel_sizes]
    if out is None:
        out = image.clone()
    else:
        out.copy_(image)
    h, w = alpha.shape[-2:]
    for b in range(image.shape[0]):
        a = alpha[b]
        for y0 in range(0, h, STRIP_ROWS):
            y1 = min(h, y0 + STRIP_ROWS)
            strip = a[y0:y1]
            edge = (strip > 0) & (strip < 1)
            for run0, run1 in _column_runs(edge.any(0), gap=2 * sum(radii) + 1):
                for x0 in range(run0, run1, TILE_COLUMNS):
                    x1 = min(run1, x0 + TILE_COLUMNS)
                    fg = _blur_fusion_region(image[b], a, (y0, y1, x0, x1), radii)
                    target = out[b, y0:y1, x0:x1]
                    keep = edge[:, x0:x1]
                    target[keep] = fg.permute(1, 2, 0)[keep].to(out.dtype)
    return out


def _column_runs(has_edge: torch.Tensor, gap: int) -> List[Tuple[int, int]]:
    """Columns holding edge pixels [W] -> [x0, x1) spans, split where more than ``gap`` columns
    without edge lie between (there the filters' reaches do not overlap, so nothing is shared)."""
    columns = has_edge.nonzero().flatten().tolist()
    runs: List[Tuple[int, int]] = []
    for x in columns:
        if runs and x - runs[-1][1] < gap:
            runs[-1] = (runs[-1][0], x + 1)
        else:
            runs.append((x, x + 1))
    return runs


def rgba_cutout(image: torch.Tensor, alpha: torch.Tensor, estimate_colors: bool = True) -> torch.Tensor:
    """[B, H, W, 3] + alpha [B, H, W] -> RGBA [B, H, W, 4] (straight, not premultiplied, alpha).

    The RGBA tensor is the only full-size allocation: colours are estimated into it in place.
    """
    rgba = torch.empty(*image.shape[:-1], 4, dtype=image.dtype, device=image.device)
    rgba[..., 3] = alpha
    if estimate_colors:
        estimate_foreground(image, alpha, out=rgba[..., :3])
    else:
        rgba[..., :3] = image
    return rgba


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


# --- compositing and previews (the nodes' math; pure torch) --------------------------------------------
PREVIEW_HEAT_WEIGHT = 0.6
"""Share of the heat map in a similarity preview (the rest is the target image)."""


def cover_crop(background: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A background [h, w, C] resized (bilinear) to cover ``height x width`` without distortion,
    then cropped at the centre -> [height, width, 3]. Only the first three channels are used."""
    bg = background[..., :3].permute(2, 0, 1)[None]
    scale = max(height / bg.shape[2], width / bg.shape[3])
    size = (max(height, round(bg.shape[2] * scale)), max(width, round(bg.shape[3] * scale)))
    bg = F.interpolate(bg, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return bg[0, :, top : top + height, left : left + width].permute(1, 2, 0)


def composite_over(rgba: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """A straight-alpha cut-out [H, W, 4] over a background [h, w, C] (cover-cropped to H x W)
    -> [H, W, 3]: ``rgb * alpha + background * (1 - alpha)``, clamped to [0, 1]."""
    h, w, _ = rgba.shape
    bg = cover_crop(background, h, w).to(rgba.device, rgba.dtype)
    alpha = rgba[..., 3:]
    return (rgba[..., :3] * alpha + bg * (1 - alpha)).clamp(0, 1)


def pair_backgrounds(n_cutouts: int, n_backgrounds: int) -> List[Tuple[int, int]]:
    """The composites to make, as (cut-out index, background index) in output order: one background for
    every cut-out, one cut-out over every background (a product on many backgrounds), or the i-th
    cut-out over the i-th background. Any other pairing is ambiguous and refused in one line."""
    if n_cutouts < 1 or n_backgrounds < 1:
        raise ValueError(f"Got {n_cutouts} cut-outs and {n_backgrounds} backgrounds. Connect at least one of each.")
    if n_backgrounds == 1:
        return [(i, 0) for i in range(n_cutouts)]
    if n_cutouts == 1:
        return [(0, j) for j in range(n_backgrounds)]
    if n_cutouts != n_backgrounds:
        raise ValueError(f"Got {n_cutouts} cut-outs and {n_backgrounds} backgrounds. Give 1 background for all cut-outs, "
                         "1 cut-out for all backgrounds, or one background per cut-out (in order).")
    return [(i, i) for i in range(n_cutouts)]


def similarity_preview(image: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """A target [H, W, C] and its similarity map [H, W] (any range) -> preview [H, W, 3]: the image
    blended with the min-max normalised map as a heat map (``PREVIEW_HEAT_WEIGHT`` of the heat map)."""
    heat = heatmap(normalise_map(similarity[None]))[0]
    rgb = image[..., :3].to(heat.device, heat.dtype)
    return (1 - PREVIEW_HEAT_WEIGHT) * rgb + PREVIEW_HEAT_WEIGHT * heat


def is_unpainted_mask(mask: torch.Tensor, image_hw: Tuple[int, int], placeholder: int = 64) -> bool:
    """True for the empty ``placeholder x placeholder`` mask an image loader gives when no mask was
    painted (an all-zero mask of that size for an image of another size). mask: [B, h, w] or [h, w]."""
    return (tuple(mask.shape[-2:]) == (placeholder, placeholder) and tuple(image_hw) != (placeholder, placeholder)
            and not bool(mask.any()))
