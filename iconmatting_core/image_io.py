"""Reading images and masks from files: one place for the nodes, the command line and evaluation.

Every reader turns the image upright by its EXIF orientation (as ComfyUI's loaders do) and raises
:class:`ImageReadError` (a ValueError naming the file) when the file cannot be decoded.

A GIF, WebP or PNG (APNG) may hold an animation: :func:`is_animation` tells, cheaply, whether it holds more
than one frame (``job.targets`` then makes it a clip), and :func:`iter_animation` reads its frames.
"""
from __future__ import annotations

import io
import mmap
import struct
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
ANIMATED_EXTENSIONS = {".gif", ".webp", ".png"}  # image files that may hold an animation
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def is_animation(path: Path) -> bool:
    """Whether a GIF/WebP/PNG file holds more than one frame (told by its first bytes, not its name);
    False for any other file and for one that cannot be read (its reader then says why). Reads block
    headers, never pixels, and stops at the second frame: Pillow's WebP reader reads the whole file
    when it opens it, and its GIF reader steps through a still GIF several times slower
    (``benchmarks/benchmark_targets.py``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                return _webp_frames(f, at_most=2) > 1
            if head[:8] == PNG_SIGNATURE:
                f.seek(8)
                return _apng_frames(f) > 1
            if head[:6] in (b"GIF87a", b"GIF89a"):
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # only the pages looked at are read
                    return _gif_frames(data, at_most=2) > 1
    except (OSError, ValueError, IndexError):  # unreadable, empty or cut short: read (and reported) as an image
        pass
    return False


def _webp_frames(f, at_most: int) -> int:
    """Animation frame (``ANMF``) chunks of a WebP file read past its 12-byte RIFF header, counted up
    to ``at_most``: each chunk is a 4-byte type, a little-endian 32-bit size and its data, padded to
    an even length."""
    frames = 0
    while frames < at_most:
        header = f.read(8)
        if len(header) < 8:
            break
        size = struct.unpack("<I", header[4:])[0]
        frames += header[:4] == b"ANMF"
        f.seek(size + size % 2, 1)
    return frames


def _apng_frames(f) -> int:
    """The frame count an animated PNG states, read past its 8-byte signature: chunks are a big-endian 32-bit
    data length, a 4-byte type, the data and a 4-byte CRC; an animation's ``acTL`` chunk (its data starts
    with the frame count) comes before the first ``IDAT``. 1 for a PNG without one (a still image)."""
    while True:
        header = f.read(8)
        if len(header) < 8 or header[4:] in (b"IDAT", b"IEND"):
            return 1
        size = struct.unpack(">I", header[:4])[0]
        if header[4:] == b"acTL":
            data = f.read(4)
            return struct.unpack(">I", data)[0] if len(data) == 4 else 1
        f.seek(size + 4, 1)


def _colour_table(packed: int) -> int:
    """Bytes of the colour table a GIF descriptor's packed byte announces (flag 0x80, size bits 0-2)."""
    return 3 << ((packed & 7) + 1) if packed & 0x80 else 0


def _gif_frames(data, at_most: int) -> int:
    """Images in a GIF, counted up to ``at_most``. After the 6-byte signature, the 7-byte screen
    descriptor (byte 10 announces the global colour table) and that table come blocks: 0x2C an image
    (9 bytes, its own colour table, the LZW code size byte), 0x21 an extension (its label byte),
    each followed by data sub-blocks (a length byte and that many bytes; length 0 ends them); 0x3B ends
    the file."""
    i, frames = 13 + _colour_table(data[10]), 0
    while frames < at_most and i < len(data) and data[i] in (0x2C, 0x21):
        if data[i] == 0x2C:
            frames += 1
            i += 11 + _colour_table(data[i + 9])
        else:
            i += 2
        while data[i]:
            i += data[i] + 1
        i += 1
    return frames


def iter_animation(path: Path) -> Iterator[Tuple[np.ndarray, int]]:
    """(RGB frame [H, W, 3] uint8, upright, as the animation shows it; its stated duration in ms, 0
    when none) of each frame of a GIF/WebP/APNG, in order, one frame in memory at a time."""
    from PIL import Image, ImageOps, ImageSequence

    try:
        with Image.open(path) as im:
            # an APNG's default image (no fcTL chunk before its IDAT) is what viewers without animation show, not a
            # frame of the animation; Pillow gives it as frame 0
            hidden = 1 if im.info.get("default_image") else 0
            for index, frame in enumerate(ImageSequence.Iterator(im)):
                if index < hidden:
                    continue
                frame.load()
                duration = int(frame.info.get("duration") or 0)
                yield np.array(ImageOps.exif_transpose(frame.convert("RGB"))), duration
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


def png_info(text: dict | None):
    """Pillow's PngInfo holding ``text`` as tEXt chunks (before the pixels, so a reader finds them
    without decoding the image), or None."""
    if not text:
        return None
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info


def png_bytes(array: np.ndarray, mode: str, text: dict | None = None) -> bytes:
    """[H, W] (mode "L") or [H, W, 4] (mode "RGBA") uint8 -> PNG file bytes, with ``text`` chunks."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG", pnginfo=png_info(text))
    return buf.getvalue()
