"""image_io by hand-made files: which channel a mask is read from, what each grey mode's values mean,
and whether a GIF/WebP holds an animation, told from chunk and block bytes written out here."""
import struct

import numpy as np
import pytest
from PIL import Image

from iconmatting_core.image_io import is_animation, read_mask, read_matte_image


def test_a_grey_mask_with_alpha_is_read_from_its_alpha(tmp_path):
    """LA white with alpha 51: 0.2 (its alpha), not 1 (its grey)."""
    Image.fromarray(np.dstack([np.full((2, 2), 255, np.uint8), np.full((2, 2), 51, np.uint8)]), "LA").save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png") == pytest.approx(np.full((2, 2), 0.2))


def test_a_palette_mask_with_a_transparent_colour_is_read_from_its_transparency(tmp_path):
    """Palette: 0 white but transparent, 1 black opaque. Pixels [0, 1] are alpha [0, 1] (their grey would be [1, 0])."""
    im = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    im.putpalette([255, 255, 255, 0, 0, 0])
    im.save(tmp_path / "p.png", transparency=0)
    assert read_mask(tmp_path / "p.png").tolist() == [[0.0, 1.0]]


@pytest.mark.parametrize("mode, values, expected", [
    ("F", [0.25, 0.5], [0.25, 0.5]),  # a float image: already [0, 1]
    ("I", [51, 255], [0.2, 1.0]),  # 32-bit integers holding 8-bit values: / 255
    ("I", [0, 65535], [0.0, 1.0]),  # holding 16-bit values: / 65535
])
def test_grey_modes_are_scaled_by_the_range_their_values_hold(mode, values, expected):
    im = Image.fromarray(np.array([values], np.float32 if mode == "F" else np.int32), mode)
    assert read_matte_image(im) == pytest.approx(np.array([expected]))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def _webp(*chunks: bytes) -> bytes:
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_webp_frames_are_counted_past_an_odd_sized_chunk(tmp_path):
    """VP8X, an ICC profile of 3 bytes (stored with one pad byte), ANIM, then two ANMF frames: an animation."""
    path = tmp_path / "a.webp"
    path.write_bytes(_webp(_chunk(b"VP8X", bytes(10)), _chunk(b"ICCP", b"abc"), _chunk(b"ANIM", bytes(6)),
                           _chunk(b"ANMF", bytes(16)), _chunk(b"ANMF", bytes(16))))
    assert is_animation(path)


def test_a_webp_animation_of_one_frame_is_an_image(tmp_path):
    path = tmp_path / "one.webp"
    path.write_bytes(_webp(_chunk(b"VP8X", bytes(10)), _chunk(b"ANIM", bytes(6)), _chunk(b"ANMF", bytes(16))))
    assert not is_animation(path)


def _gif(table_bits: int, frames: int) -> bytes:
    """A GIF whose global colour table has 2^(table_bits + 1) entries (3 bytes each), then ``frames`` images
    of one 1-byte data sub-block each."""
    screen = struct.pack("<HHBBB", 1, 1, 0x80 | table_bits, 0, 0)
    table = bytes(3 << (table_bits + 1))
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02" + b"\x01\x44" + b"\x00"
    return b"GIF89a" + screen + table + image * frames + b"\x3b"


@pytest.mark.parametrize("table_bits", [0, 2, 7])
def test_gif_frames_are_counted_past_the_global_colour_table(tmp_path, table_bits):
    """Tables of 2, 8 and 256 colours (6, 24, 768 bytes): two images are an animation, one is not."""
    (tmp_path / "two.gif").write_bytes(_gif(table_bits, 2))
    (tmp_path / "one.gif").write_bytes(_gif(table_bits, 1))
    assert is_animation(tmp_path / "two.gif") and not is_animation(tmp_path / "one.gif")
    with Image.open(tmp_path / "two.gif") as two, Image.open(tmp_path / "one.gif") as one:  # Pillow reads them alike
        assert (two.n_frames, one.n_frames) == (2, 1)


def test_an_image_is_read_upright_by_its_exif_orientation(tmp_path):
    """Stored 2 rows x 3 columns [[0, 1, 2], [3, 4, 5]] (x40) with EXIF orientation 6 (shown turned 90 degrees
    clockwise): read as 3 rows x 2 columns [[3, 0], [4, 1], [5, 2]]."""
    from iconmatting_core.image_io import read_image_uint8

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3) * 40).save(tmp_path / "turned.png", exif=exif)
    assert read_image_uint8(tmp_path / "turned.png")[..., 0].tolist() == [[120, 0], [160, 40], [200, 80]]
