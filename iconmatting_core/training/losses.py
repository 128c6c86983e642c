"""Training losses of the IconMatting head, written from their definitions.

Inputs are [B, 1, H, W] float: ``pred`` the predicted alpha, ``target`` the ground-truth alpha and
``unknown`` the unknown region U (1 where the trimap is 0.5, else 0); the known region is
K = [U == 0]. The recipe's numbers (facts from the authors' training configuration, which our
fixtures check term by term) are: every term has weight 1; region terms are normalised to a
512 x 512 image; the pyramid has 5 levels; the penalty on the predicted gradient has weight 0.01.

Region mean. For a per-pixel error e and a 0/1 region R over the pixels p of one H x W image:

    mean_R(e) = (512 * 512 / (H * W)) * sum_p R_p e_p / sum_p R_p        (0 when R is empty)

i.e. the mean error inside the region, scaled as if the image had 512 x 512 pixels. The four
matting terms, with d = pred - target:

    unknown_l1_loss       = mean_U(|d|)
    known_l1_loss         = mean_K(|d|)
    loss_pha_laplacian    = (1/5) * sum_{l=0..4} 2^l * mean over pixels of |Lap_l(pred) - Lap_l(target)|
    loss_gradient_penalty = mean_U(|Sx*d| + |Sy*d| + 0.01 * (|Sx*pred| + |Sy*pred|))

where Sx, Sy are the 3 x 3 Sobel derivatives (zero padding) and Lap_l the l-th band of a Laplacian
pyramid (:func:`laplacian_bands`). Each Sobel response is taken of pred and of target separately,
so Sx*d above stands for Sx*pred - Sx*target.

Two recipes (``LOSSES``):

* ``recipe`` (training from scratch): each sample on its own. A sample whose alpha is constant
  (all 0 or all 1: a segmentation sample) gets only the smooth-L1 error in the known region,
  mean_K(huber(d)) with huber(x) = x^2 / 2 for |x| < 1 else |x| - 1/2, logged under the name
  ``known_l1_loss``; every other sample gets the four matting terms. Each term is summed over the
  samples (keys in the order the samples first produce them).
* ``finetune``: the four matting terms on the whole batch at once; the region means then pool the
  pixels of all samples (the sums run over the batch, the 512 x 512 scale stays per image).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

UNIT_IMAGE_PIXELS = 512 * 512
PYRAMID_LEVELS = 5
PREDICTED_GRADIENT_WEIGHT = 0.01
HUBER_BETA = 1.0  # where the smooth-L1 term turns from quadratic to linear
MATTING_TERMS = ("unknown_l1_loss", "known_l1_loss", "loss_pha_laplacian", "loss_gradient_penalty")


def region_mean(error: torch.Tensor, region: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """mean_R(e) of the module docstring: [B] (one per sample) or a scalar (pixels pooled over the batch).

    The count is clamped to 1: an empty region has a zero sum, so its mean is 0 (and so is its gradient).
    """
    dims = (1, 2, 3) if per_sample else (0, 1, 2, 3)
    height, width = error.shape[-2:]
    inside = (error * region).sum(dims) / region.sum(dims).clamp_min(1)
    return inside * (UNIT_IMAGE_PIXELS / (height * width))


def huber(x: torch.Tensor, beta: float = HUBER_BETA) -> torch.Tensor:
    """x^2 / (2 beta) where |x| < beta, else |x| - beta / 2 (continuous, with a continuous slope)."""
    size = x.abs()
    return torch.where(size < beta, size * size / (2 * beta), size - beta / 2)


def _sobel_pair(dtype, device) -> torch.Tensor:
    """[2, 1, 3, 3]: d/dx then d/dy, each a central difference [-1, 0, 1] along its axis smoothed by
    [1, 2, 1] across it (cross-correlation weights, as conv2d applies them)."""
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=dtype, device=device)
    slope = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype, device=device)
    d_dx = torch.outer(smooth, slope)  # rows smooth, columns differentiate
    return torch.stack([d_dx, d_dx.T])[:, None]


def sobel(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] -> [B, 2, H, W]: Sobel d/dx and d/dy with zero padding."""
    return F.conv2d(x, _sobel_pair(x.dtype, x.device), padding=1)


def _binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """5 x 5 binomial blur (weights C(4, i) C(4, j) / 256, i.e. 1 4 6 4 1 in each direction) of every
    channel, mirrored at the borders (reflect, edge pixel not repeated)."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    kernel = torch.outer(taps, taps)[None, None]
    b, c, h, w = x.shape
    flat = F.pad(x.reshape(b * c, 1, h, w), (2, 2, 2, 2), mode="reflect")
    return F.conv2d(flat, kernel).reshape(b, c, h, w)


def laplacian_bands(x: torch.Tensor, levels: int = PYRAMID_LEVELS):
    """The band-pass images of a Laplacian pyramid, finest first: ``levels`` tensors [B, C, h_l, w_l].

    Per level: crop the image to even height and width; its coarse version is the blurred image at
    every other pixel; the band is the image minus the coarse version brought back to its size (zeros
    between the coarse pixels, blurred, times 4 for the three zeros of every 2 x 2 cell); the coarse
    version is the next level's image. Needs sides of at least 2^(levels-1) * 4 pixels (64 px for 5).
    """
    bands = []
    for _ in range(levels):
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        coarse = _binomial_blur(x)[..., ::2, ::2]
        spread = torch.zeros_like(x)
        spread[..., ::2, ::2] = 4 * coarse
        bands.append(x - _binomial_blur(spread))
        x = coarse
    return bands


def _matting_terms(unknown, pred, target, per_sample: bool) -> Dict[str, torch.Tensor]:
    """The four matting terms: [B] each when ``per_sample``, else scalars over the pooled batch."""
    known = (unknown == 0).to(unknown.dtype)
    error = (pred - target).abs()
    both = sobel(torch.cat([pred, target]))
    slopes_pred, slopes_target = both[: len(pred)], both[len(pred):]
    slope_error = (slopes_pred - slopes_target).abs().sum(1, keepdim=True)
    steepness = slopes_pred.abs().sum(1, keepdim=True)
    bands = zip(laplacian_bands(pred), laplacian_bands(target))
    dims = (1, 2, 3) if per_sample else (0, 1, 2, 3)
    pyramid = sum(2**level * (p - t).abs().mean(dims) for level, (p, t) in enumerate(bands)) / PYRAMID_LEVELS
    return {
        "unknown_l1_loss": region_mean(error, unknown, per_sample),
        "known_l1_loss": region_mean(error, known, per_sample),
        "loss_pha_laplacian": pyramid,
        "loss_gradient_penalty": region_mean(slope_error + PREDICTED_GRADIENT_WEIGHT * steepness, unknown, per_sample),
    }


def is_constant_alpha(target: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B] bool: the sample's alpha is 0 everywhere or 1 everywhere (a segmentation sample)."""
    flat = target.flatten(1)
    return (flat == 0).all(1) | (flat == 1).all(1)


def recipe_losses(unknown, pred, target) -> Dict[str, torch.Tensor]:
    """The ``recipe`` loss (module docstring): per-sample terms, each summed over the samples."""
    constant = is_constant_alpha(target)
    terms = _matting_terms(unknown, pred, target, per_sample=True)
    known = (unknown == 0).to(unknown.dtype)
    segmentation_term = region_mean(huber(pred - target), known, per_sample=True)
    terms["known_l1_loss"] = torch.where(constant, segmentation_term, terms["known_l1_loss"])
    matting = ~constant
    out = {}
    if constant[0]:
        out["known_l1_loss"] = terms["known_l1_loss"].sum()
    if matting.any():
        for key in MATTING_TERMS:
            out[key] = terms[key].sum() if key == "known_l1_loss" else terms[key][matting].sum()
    return out


def finetune_losses(unknown, pred, target) -> Dict[str, torch.Tensor]:
    """The ``finetune`` loss (module docstring): the four matting terms over the whole batch."""
    return _matting_terms(unknown, pred, target, per_sample=False)


LOSSES = {"recipe": recipe_losses, "finetune": finetune_losses}
