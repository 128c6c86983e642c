"""The authors' training losses (tiny-smart/in-context-matting ``icm/criterion/loss_function.py``),
term by term with the same arithmetic, quirks included.

All inputs are [B, 1, H, W] float: ``unknown`` the unknown-region map (1 where the trimap is 0.5,
else 0), ``pred`` the predicted alpha, ``target`` the ground-truth alpha.

* Region terms are scaled by ``B * 262144 / (pixels of the region)`` (0 when the region is empty)
  and use the *mean* over all pixels of the masked maps, as the authors' code does.
* :func:`recipe_losses` (``LossFunction2``, training from scratch): per sample, an alpha that is
  all 0 or all 1 gets only the smooth-L1 known-region term, which is logged under the name
  ``known_l1_loss`` (their key); every other sample (also a binary, non-constant alpha) gets
  ``unknown_l1_loss + known_l1_loss + loss_pha_laplacian + loss_gradient_penalty``. Each term is
  **summed over the samples** of the batch.
* :func:`finetune_losses` (``LossFunction`` of ``finetune.yaml``): the four matting terms on the
  whole batch at once (region scales over the batch, means over the batch).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

REGION_PIXELS = 262144  # 512 x 512: the authors' normalisation of the region terms
MATTING_TERMS = ("unknown_l1_loss", "known_l1_loss", "loss_pha_laplacian", "loss_gradient_penalty")
LAPLACIAN_LEVELS = 5
_SOBEL_X = [[[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]]]
_SOBEL_Y = [[[[-1, -2, -1], [0, 0, 0], [1, 2, 1]]]]


def _scale(region: torch.Tensor):
    """B * 262144 / region pixels, or 0 for an empty region (a Python 0, as in the authors' code)."""
    total = torch.sum(region)
    return 0 if total == 0 else region.shape[0] * REGION_PIXELS / total


def _known(unknown: torch.Tensor) -> torch.Tensor:
    known = torch.zeros_like(unknown)
    known[unknown == 0] = 1
    return known


def unknown_l1(unknown, pred, target) -> torch.Tensor:
    return F.l1_loss(pred * unknown, target * unknown) * _scale(unknown)


def known_l1(unknown, pred, target) -> torch.Tensor:
    known = _known(unknown)
    return F.l1_loss(pred * known, target * known) * _scale(known)


def known_smooth_l1(unknown, pred, target) -> torch.Tensor:
    known = _known(unknown)
    return F.smooth_l1_loss(pred * known, target * known) * _scale(known)


def gradient_penalty(unknown, pred, target) -> torch.Tensor:
    """Sobel gradients of prediction and target compared in the unknown region, plus 0.01 times
    the mean absolute predicted gradient there."""
    scale = _scale(unknown)
    kx = torch.tensor(_SOBEL_X).type(dtype=pred.type())
    ky = torch.tensor(_SOBEL_Y).type(dtype=pred.type())
    px, tx = F.conv2d(pred, weight=kx, padding=1), F.conv2d(target, weight=kx, padding=1)
    py, ty = F.conv2d(pred, weight=ky, padding=1), F.conv2d(target, weight=ky, padding=1)
    return (F.l1_loss(px * unknown, tx * unknown) * scale
            + F.l1_loss(py * unknown, ty * unknown) * scale
            + 0.01 * torch.mean(torch.abs(px * unknown)) * scale
            + 0.01 * torch.mean(torch.abs(py * unknown)) * scale)


def _gauss_kernel(device, dtype) -> torch.Tensor:
    row = torch.tensor([1, 4, 6, 4, 1], device=device, dtype=dtype)
    return (torch.outer(row, row) / 256)[None, None]


def _blur(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    b, c, h, w = img.shape
    x = F.pad(img.reshape(b * c, 1, h, w), (2, 2, 2, 2), mode="reflect")
    return F.conv2d(x, kernel).reshape(b, c, h, w)


def laplacian_pyramid(img: torch.Tensor, levels: int = LAPLACIAN_LEVELS):
    """Band-pass levels [B, C, H/2^i, W/2^i] (odd sizes cropped to even first)."""
    kernel = _gauss_kernel(img.device, img.dtype)
    current, pyramid = img, []
    for _ in range(levels):
        h, w = current.shape[2:]
        current = current[:, :, : h - h % 2, : w - w % 2]
        down = _blur(current, kernel)[:, :, ::2, ::2]
        up = torch.zeros(down.shape[0], down.shape[1], down.shape[2] * 2, down.shape[3] * 2,
                         device=img.device, dtype=img.dtype)
        up[:, :, ::2, ::2] = down * 4
        pyramid.append(current - _blur(up, kernel))
        current = down
    return pyramid


def laplacian(pred, target, levels: int = LAPLACIAN_LEVELS) -> torch.Tensor:
    """sum_i 2^i * L1(level i) / levels over a 5-level Laplacian pyramid (images >= 64 px)."""
    loss = 0
    for i, (p, t) in enumerate(zip(laplacian_pyramid(pred, levels), laplacian_pyramid(target, levels))):
        loss += (2**i) * F.l1_loss(p, t)
    return loss / levels


def matting_terms(unknown, pred, target) -> Dict[str, torch.Tensor]:
    """The four matting terms on a batch (``LossFunction`` with the four losses)."""
    return {
        "unknown_l1_loss": unknown_l1(unknown, pred, target),
        "known_l1_loss": known_l1(unknown, pred, target),
        "loss_pha_laplacian": laplacian(pred, target),
        "loss_gradient_penalty": gradient_penalty(unknown, pred, target),
    }


def is_constant_alpha(target: torch.Tensor) -> bool:
    """The authors' test for the segmentation branch: every value 0, or every value 1."""
    return bool(torch.all(target == 0) or torch.all(target == 1))


def sample_terms(unknown, pred, target) -> Dict[str, torch.Tensor]:
    """One sample [1, 1, H, W] under ``LossFunction2``."""
    if is_constant_alpha(target):
        return {"known_l1_loss": known_smooth_l1(unknown, pred, target)}
    return matting_terms(unknown, pred, target)


def recipe_losses(unknown, pred, target) -> Dict[str, torch.Tensor]:
    """``LossFunction2``: per-sample terms, each summed over the batch (keys in first-seen order)."""
    out: Dict[str, torch.Tensor] = {}
    for i in range(pred.shape[0]):
        for key, value in sample_terms(unknown[i:i + 1], pred[i:i + 1], target[i:i + 1]).items():
            out[key] = out[key] + value if key in out else value
    return out


def finetune_losses(unknown, pred, target) -> Dict[str, torch.Tensor]:
    """``LossFunction`` of finetune.yaml: the four matting terms on the whole batch."""
    return matting_terms(unknown, pred, target)


LOSSES = {"recipe": recipe_losses, "finetune": finetune_losses}
