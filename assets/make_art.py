"""Regenerate with: python assets/make_art.py. Icon (400x400) and banner (21:9) for the Comfy Registry:
a drawn scene -> its matte -> the cut-out on a transparency checkerboard, the reference mark as a dashed outline."""
import math
from pathlib import Path
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"

def scene(w, h, seed=0):
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    bg = np.stack([0.15 + 0.5 * x, 0.35 + 0.3 * y, 0.55 + 0.35 * (1 - x)], -1)
    rng = np.random.default_rng(seed)
    bg += rng.normal(0, 0.004, bg.shape)
    return np.clip(bg, 0, 1)

def subject_alpha(w, h, cx, cy, s):
    """A soft silhouette (head + shoulders) with a fuzzy hair edge: what matting is about."""
    im = Image.new("L", (w * 4, h * 4), 0)
    d = ImageDraw.Draw(im)
    S, X, Y = s * 4, cx * 4, cy * 4
    d.ellipse([X - 0.33 * S, Y - 0.95 * S, X + 0.33 * S, Y - 0.2 * S], fill=255)
    d.rounded_rectangle([X - 0.75 * S, Y - 0.15 * S, X + 0.75 * S, Y + 1.2 * S], radius=int(0.45 * S), fill=255)
    d.rectangle([X - 0.12 * S, Y - 0.35 * S, X + 0.12 * S, Y - 0.05 * S], fill=255)
    rng = np.random.default_rng(3)
    for i in range(160):  # hair strands
        a = math.pi * (1.05 + 0.9 * i / 160)
        r0 = 0.33 * S
        x0, y0 = X + r0 * math.cos(a), Y - 0.6 * S + 0.38 * S * math.sin(a)
        r1 = r0 + S * (0.08 + 0.1 * rng.random())
        x1, y1 = X + r1 * math.cos(a + 0.05 * rng.normal()), Y - 0.6 * S + (0.38 * S + S * 0.12 * rng.random()) * math.sin(a)
        d.line([x0, y0, x1, y1], fill=int(140 + 100 * rng.random()), width=3)
    im = im.filter(ImageFilter.GaussianBlur(3)).resize((w, h), Image.LANCZOS)
    return np.asarray(im, np.float32) / 255

def person_colors(w, h):
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    return np.stack([0.95 - 0.2 * y, 0.6 + 0.1 * x, 0.3 + 0.1 * y], -1)

def checker(w, h, n=16):
    y, x = np.mgrid[0:h, 0:w]
    c = ((x // n + y // n) % 2).astype(np.float32)
    return np.stack([0.82 + 0.12 * c] * 3, -1)

def compose(w, h, cx, cy, s, split):
    """Left of ``split`` (x pixel) the photo, right of it the cut-out over a checkerboard."""
    a = subject_alpha(w, h, cx, cy, s)[..., None]
    fg = person_colors(w, h)
    photo = fg * a + scene(w, h) * (1 - a)
    cut = fg * a + checker(w, h) * (1 - a)
    x = np.arange(w)[None, :, None]
    out = np.where(x < split, photo, cut)
    return Image.fromarray((out * 255).astype(np.uint8)), a[..., 0]

def icon(path):
    w = h = 400
    im, a = compose(w, h, 200, 215, 150, 200)
    d = ImageDraw.Draw(im)
    d.line([200, 0, 200, h], fill=(255, 255, 255), width=4)
    # the reference mark: a dashed outline on the photo half
    mask = Image.fromarray((a > 0.5).astype(np.uint8) * 255).filter(ImageFilter.FIND_EDGES)
    edge = np.asarray(mask) > 0
    ys, xs = np.nonzero(edge)
    for y, x in zip(ys, xs):
        if x < 196 and ((x + y) // 6) % 2 == 0:
            d.point((x, y), fill=(255, 255, 255))
    im.save(path, optimize=True)

def banner(path):
    w, h = 1260, 540
    im, a = compose(w, h, 930, 300, 185, 930)
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, 640, h], fill=(24, 28, 38))
    d.line([930, 0, 930, h], fill=(255, 255, 255), width=5)
    big, small = ImageFont.truetype(FONT, 78), ImageFont.truetype(FONT, 30)
    d.text((48, 150), "IconMatting", font=big, fill=(255, 255, 255))
    d.text((52, 260), "In-Context Matting for ComfyUI", font=small, fill=(200, 210, 230))
    d.text((52, 310), "mark the foreground once,", font=small, fill=(255, 190, 90))
    d.text((52, 352), "matte a whole folder", font=small, fill=(255, 190, 90))
    im.save(path, optimize=True)

if __name__ == "__main__":
    icon(Path(__file__).with_name("icon.png"))
    banner(Path(__file__).with_name("banner.png"))
