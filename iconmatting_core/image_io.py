"""Reading images and masks from files: one place for the nodes, the command line and evaluation.

Every reader turns the image upright by its EXIF orientation (as ComfyUI's loaders do) and raises
:class:`ImageReadError` (a ValueError naming the file) when the file cannot be decoded.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file."""


def open_image(path: Path):
    """A PIL image, fully decoded and upright (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise ImageReadError(f"cannot read {path}: {exc}") from None


def read_image_uint8(path: Path) -> np.ndarray:
    """An image file -> [H, W, 3] uint8, upright."""
    return np.asarray(open_image(path).convert("RGB"))


def read_image(path: Path) -> np.ndarray:
    """An image file -> [H, W, 3] float32 in [0, 1], upright."""
    return read_image_uint8(path).astype(np.float32) / 255.0


def read_mask(path: Path) -> np.ndarray:
    """A mask file -> [H, W] float32 in [0, 1], upright: the alpha channel of an RGBA/LA/PA file,
    else its grey value (white = foreground)."""
    im = open_image(path)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        return np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
    return read_matte_image(im)


def read_matte_image(im) -> np.ndarray:
    """A PIL grey image -> [H, W] float32 in [0, 1] (8-bit / 255, 16-bit / 65535)."""
    if im.mode.startswith("I;16"):
        return np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
    if im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float32)
        return np.clip(a / (65535.0 if a.max() > 255 else 255.0 if a.max() > 1 else 1.0), 0, 1)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def read_matte(path: Path) -> np.ndarray:
    """A grey matte file -> [H, W] float32 in [0, 1] (8-bit / 255, 16-bit / 65535)."""
    return read_matte_image(open_image(path))


def read_trimap_image(im) -> np.ndarray:
    """A PIL trimap image -> [H, W] uint8 levels (0 / 128 / 255): 8-bit as stored, 16-bit scaled to
    8 bits like a matte (Pillow's own conversion would clip 32768, unknown, to 255, foreground)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return np.round(read_matte_image(im) * 255).astype(np.uint8)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def read_trimap(path: Path) -> np.ndarray:
    """A trimap file -> [H, W] uint8 (0 / 128 / 255); see :func:`read_trimap_image`."""
    return read_trimap_image(open_image(path))


def png_bytes(array: np.ndarray, mode: str) -> bytes:
    """[H, W] (mode "L") or [H, W, 4] (mode "RGBA") uint8 -> PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()
