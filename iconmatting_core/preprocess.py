"""Stage 1: bring user images and masks of any size to the model's square input and back.

Images enter as HxWxC (C = 1, 3 or 4; float in [0, 1] or uint8) or HxW grayscale, as numpy
arrays or torch tensors, singly or as a batch BxHxWxC. The model needs exactly
``image_size x image_size`` (its attention layers have that many tokens), so each image is
either letterboxed (``"pad"``: scaled to fit, padded with mid-grey at the right/bottom; the
default, no distortion, nothing cropped) or stretched (``"stretch"``). The reference
implementation centre-crops to a square instead, which loses the image's borders; both modes
here keep the whole image and map the alpha back to the original pixels exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]
RESIZE_MODES = ("pad", "stretch")


@dataclass(frozen=True)
class Placement:
    """Where an original image sits inside the square model input."""

    height: int
    width: int
    content_height: int
    content_width: int


FLOAT_IMAGE_MAX = 2.0  # resampling overshoots [0, 1] a little; 0-255 data in a float goes far past this


def _as_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a numpy array or torch tensor, got {type(x).__name__}")
    return x


def to_rgb(image: ArrayLike, what: str = "image") -> torch.Tensor:
    """One image -> float32 tensor [H, W, 3] in [0, 1].

    Accepts [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped); uint8 is scaled by 1/255,
    bool maps to {0, 1}, other floats are clamped to [0, 1] (a float image with values over
    FLOAT_IMAGE_MAX is refused: it is 0-255 data, which clamping would turn white).
    """
    t = _as_tensor(image, what)
    if t.ndim == 2:
        t = t[..., None]
    if t.ndim != 3 or t.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must have shape HxW or HxWxC with C in (1, 3, 4), got {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{what} is empty (size {t.shape[0]}x{t.shape[1]})")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.dtype == torch.bool:
        t = t.float()
    else:
        t = t.float()
        lo, hi = t.amin(), t.amax()  # NaN propagates into both; no image-sized temporary
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError(f"{what} contains NaN or infinite values")
        if hi > FLOAT_IMAGE_MAX:
            raise ValueError(f"{what} is a float image with values up to {float(hi):.4g}; float images must be in [0, 1] "
                             "(divide 0-255 data by 255, or pass uint8)")
        if lo < 0.0 or hi > 1.0:
            t = t.clamp(0.0, 1.0)
    if t.shape[-1] == 1:
        t = t.expand(-1, -1, 3)
    return t[..., :3].contiguous()


def to_mask(mask: ArrayLike, what: str = "mask") -> torch.Tensor:
    """One mask -> float32 tensor [H, W] in [0, 1]; accepts [H, W] or [H, W, 1], float/uint8/bool."""
    t = _as_tensor(mask, what)
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim != 2:
        raise ValueError(f"{what} must have shape HxW, got {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{what} is empty (size {t.shape[0]}x{t.shape[1]})")
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return t.clamp(0.0, 1.0)


def split_batch(images: Union[ArrayLike, Sequence[ArrayLike]], what: str, masks: bool = False) -> List[ArrayLike]:
    """A batch BxHxWxC array, a single HxW(xC) image, or a list of images -> list of images.

    masks: the values are masks, so a 3-D array is a batch BxHxW (unless its last axis is 1, an
    HxWx1 mask); for images a 3-D array is one HxWxC image. ``what`` only names them in errors.
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"no {what} given")
        return list(images)
    t = _as_tensor(images, what)
    if t.ndim == 4 or (t.ndim == 3 and masks and t.shape[-1] != 1):
        if t.shape[0] == 0:
            raise ValueError(f"no {what} given (batch of 0)")
        return list(t.unbind(0))
    return [t]


def placement_for(height: int, width: int, size: int, mode: str) -> Placement:
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode == "stretch":
        return Placement(height, width, size, size)
    scale = size / max(height, width)
    return Placement(height, width, max(1, round(height * scale)), max(1, round(width * scale)))


def content_cells(placement: Placement, size: int, grid: int) -> torch.Tensor:
    """Cells of a ``grid x grid`` map over the square input that hold image: bool [grid, grid].

    A cell (``size // grid`` model pixels square) holds image when it overlaps the content
    rectangle ``[0, content_height) x [0, content_width)`` by at least one model pixel; cells that
    are entirely letterbox padding are False. A partially padded edge cell counts as image (it may
    hold foreground). Stretched or square inputs: all True. Since the content is a top-left
    rectangle, the cells of a coarser grid that hold image are exactly those with a finer-grid
    child that does (max-pooling), at every resolution that divides the finer one.
    """
    stride = size // grid
    rows = -(-placement.content_height // stride)
    cols = -(-placement.content_width // stride)
    valid = torch.zeros(grid, grid, dtype=torch.bool)
    valid[:rows, :cols] = True
    return valid


def valid_cells(placements: Sequence[Placement], size: int, grid: int) -> torch.Tensor:
    """:func:`content_cells` of each target: bool [B, grid, grid]."""
    return torch.stack([content_cells(p, size, grid) for p in placements])


def _resize(x: torch.Tensor, hw, mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=hw, mode="nearest")
    antialias = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=antialias)


def prepare_image(image: torch.Tensor, size: int, mode: str = "pad"):
    """[H, W, 3] in [0, 1] -> ([3, size, size] in [-1, 1] (SD normalisation), Placement).

    Padding (mode "pad") is 0 in [-1, 1] space, i.e. mid-grey.
    """
    p = placement_for(image.shape[0], image.shape[1], size, mode)
    x = image.permute(2, 0, 1)[None].float()
    x = _resize(x, (p.content_height, p.content_width), "bilinear").clamp(0, 1) * 2.0 - 1.0
    x = F.pad(x, (0, size - p.content_width, 0, size - p.content_height), value=0.0)
    return x[0], p


def restore_alpha(alpha: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[1, size, size] model-space alpha -> [H, W] alpha at the original image's pixels."""
    a = alpha[None, :, : placement.content_height, : placement.content_width].float()
    a = _resize(a, (placement.height, placement.width), "bilinear")[0, 0]
    if a.untyped_storage().data_ptr() == alpha.untyped_storage().data_ptr():
        return a.clamp(0.0, 1.0)  # no resize happened: never write into the caller's tensor
    return a.clamp_(0.0, 1.0)  # in place: one full-size tensor, however large the photo


def restore_map(x: torch.Tensor, placement: Placement, size: int) -> torch.Tensor:
    """Low-res map [C, h, w] covering the square input -> [C, H, W] over the original image."""
    scale = x.shape[-1] / size
    ch = max(1, round(placement.content_height * scale))
    cw = max(1, round(placement.content_width * scale))
    crop = x[None, :, :ch, :cw].float()
    return F.interpolate(crop, size=(placement.height, placement.width), mode="bilinear", align_corners=False)[0]
