"""Template cards for ComfyUI's template browser: ``workflows/<name>.jpg``, one per workflow.

    python tools/template_cards.py          # writes every card (also run by
                                            # ``tests/support/frontend_harness.py templates``)

A card shows what its workflow produces: the reference with its mask, then the mattes and cut-outs
(or composites, or video frames, or a generated batch cut out). The pictures are generated here, not photographed: a figure drawn
over a background, whose exact alpha is known because the figure is drawn as that alpha. The
cut-outs and composites are made from that exact alpha with the pack's own code
(``iconmatting_core.postprocess.rgba_cutout``, the Composite node's ``composite``). So a card
illustrates the kind of output a workflow gives; it is not a measured result of the model (the tests
use tiny random-weight models, whose mattes are noise).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from iconmatting_core.postprocess import rgba_cutout  # noqa: E402

SIZE = 512
BACKDROP = (30, 32, 36)
INK = (230, 232, 236)
ACCENT = (255, 86, 86)
GREEN = (0, 177, 64)  # the video workflow's green screen (EmptyImage color 0x00B140)


# --- generated scenes with exact mattes ------------------------------------------------------------
def figure_alpha(h: int, w: int, cx: float, cy: float, scale: float, arm: float = 0.0) -> np.ndarray:
    """[h, w] alpha of a standing figure with fine hair strands (drawn 4x larger, then reduced: soft edges)."""
    k = 4
    img = Image.new("L", (w * k, h * k), 0)
    d = ImageDraw.Draw(img)
    s, x, y = scale * k, cx * k, cy * k
    d.ellipse([x - 0.16 * s, y - 0.78 * s, x + 0.16 * s, y - 0.42 * s], fill=255)  # head
    d.rounded_rectangle([x - 0.27 * s, y - 0.40 * s, x + 0.27 * s, y + 0.30 * s], radius=int(0.12 * s), fill=255)
    for side in (-1, 1):  # arms, legs
        d.line([x + side * 0.24 * s, y - 0.32 * s, x + side * (0.42 + arm) * s, y + (0.05 - arm) * s], fill=255,
               width=int(0.11 * s))
        d.line([x + side * 0.12 * s, y + 0.25 * s, x + side * 0.16 * s, y + 0.95 * s], fill=255, width=int(0.14 * s))
    rng = np.random.default_rng(int(cx * 7 + cy * 13))
    for _ in range(40):  # hair: strands a fraction of a pixel wide at the card's size
        a = rng.uniform(np.pi * 0.95, np.pi * 2.05)
        r0, r1 = 0.15 * s, rng.uniform(0.2, 0.3) * s
        cy_head = y - 0.6 * s
        d.line([x + r0 * np.cos(a), cy_head + r0 * np.sin(a), x + r1 * np.cos(a), cy_head + r1 * np.sin(a)],
               fill=255, width=max(1, k // 2))
    small = img.resize((w, h), Image.LANCZOS).filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(small, np.float32) / 255


def background(h: int, w: int, seed: int, top=(70, 110, 160), bottom=(190, 170, 120)) -> np.ndarray:
    """[h, w, 3] in [0, 1]: a gradient with blurred blobs (a scene, not flat)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, h)[:, None, None]
    bg = (np.array(top) * (1 - t) + np.array(bottom) * t) * np.ones((1, w, 1))
    blobs = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(blobs)
    for _ in range(14):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.18) * min(h, w)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(40, 220, 3)))
    blobs = np.asarray(blobs.filter(ImageFilter.GaussianBlur(min(h, w) / 14)), np.float32)
    return np.clip(0.65 * bg + 0.35 * blobs, 0, 255) / 255


def scene(h: int, w: int, seed: int, shirt, cx=0.5, scale=0.62, arm=0.0):
    """(image [h, w, 3], exact alpha [h, w]): a figure in ``shirt`` colour over a generated background."""
    rng = np.random.default_rng(seed + 100)
    alpha = figure_alpha(h, w, cx * w, 0.5 * h + 0.05 * h, scale * h, arm)
    fg = np.ones((h, w, 3)) * np.array(shirt) / 255
    yy = np.arange(h)[:, None] / h
    skin, hair = np.array([224, 180, 150]) / 255, np.array([60, 40, 30]) / 255
    fg[yy[:, 0] < 0.5 - 0.30 * scale] = skin  # head
    fg[yy[:, 0] < 0.5 - 0.48 * scale] = hair  # hair
    fg = np.clip(fg + rng.normal(0, 0.03, fg.shape), 0, 1)
    bg = background(h, w, seed)
    return fg * alpha[..., None] + bg * (1 - alpha[..., None]), alpha


# --- panels --------------------------------------------------------------------------------------
def to_image(x: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))


def with_mask(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The reference as the mask editor shows it: the painted foreground tinted, with its outline."""
    m = (mask > 0.5)[..., None]
    tinted = np.where(m, 0.55 * image + 0.45 * np.array(ACCENT) / 255, image)
    edge = np.asarray(Image.fromarray((m[..., 0] * 255).astype(np.uint8)).filter(ImageFilter.FIND_EDGES)) > 0
    tinted[edge] = np.array(ACCENT) / 255
    return to_image(tinted)


def checker(h: int, w: int, cell: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w] // cell
    return np.where(((yy + xx) % 2 == 0)[..., None], 0.8, 0.6) * np.ones((1, 1, 3))


def cutout(image: np.ndarray, alpha: np.ndarray, under: np.ndarray = None) -> Image.Image:
    """The pack's RGBA cut-out (estimated foreground colours) over ``under`` (default: a checkerboard)."""
    rgba = rgba_cutout(torch.from_numpy(image).float(), torch.from_numpy(alpha).float()).numpy()
    under = checker(*alpha.shape) if under is None else under
    return to_image(rgba[..., :3] * rgba[..., 3:] + under * (1 - rgba[..., 3:]))


def grey(alpha: np.ndarray) -> Image.Image:
    return to_image(np.repeat(alpha[..., None], 3, -1))


class Card:
    def __init__(self):
        self.img = Image.new("RGB", (SIZE, SIZE), BACKDROP)
        self.draw = ImageDraw.Draw(self.img)
        self.font = ImageFont.load_default(size=17)

    def paste(self, panel: Image.Image, x: int, y: int, h: int, label: str = "") -> int:
        """Paste ``panel`` scaled to height ``h`` at (x, y); returns its width."""
        w = round(panel.width * h / panel.height)
        self.img.paste(panel.resize((w, h), Image.LANCZOS), (x, y))
        self.draw.rectangle([x - 1, y - 1, x + w, y + h], outline=(90, 94, 100))
        if label:
            self.draw.text((x + w / 2, y + h + 6), label, fill=INK, font=self.font, anchor="ma")
        return w

    def arrow(self, x0: int, y0: int, x1: int, y1: int) -> None:
        self.draw.line([x0, y0, x1, y1], fill=INK, width=4)
        v = np.array([x1 - x0, y1 - y0], float)
        v /= np.linalg.norm(v)
        n = np.array([-v[1], v[0]])
        tip = np.array([x1, y1])
        self.draw.polygon([tuple(tip), tuple(tip - 14 * v + 8 * n), tuple(tip - 14 * v - 8 * n)], fill=INK)

    def save(self, path: Path) -> None:
        self.img.save(path, "JPEG", quality=88, optimize=True)


# --- one card per workflow ------------------------------------------------------------------------
TARGETS = [((150, 110), 11, (40, 90, 200), 0.5, 0.62, 0.1), ((120, 160), 12, (200, 60, 60), 0.45, 0.55, -0.05),
           ((170, 130), 13, (240, 180, 40), 0.55, 0.6, 0.15)]  # (h, w), seed, shirt, cx, scale, arm


def targets():
    return [scene(h, w, seed, shirt, cx, scale, arm) for (h, w), seed, shirt, cx, scale, arm in TARGETS]


def card_folder(path: Path, word: bool = False) -> None:
    card = Card()
    ref, mask = scene(220, 180, 1, (60, 160, 90), arm=0.05)
    if word:
        card.paste(to_image(ref), 24, 22, 190, "reference photo")
        chip = [228, 70, 330, 104]
        card.draw.rounded_rectangle(chip, radius=14, fill=(60, 64, 72), outline=ACCENT, width=2)
        card.draw.text(((chip[0] + chip[2]) / 2, (chip[1] + chip[3]) / 2), '"person"', fill=INK, font=card.font, anchor="mm")
        card.draw.text((279, 116), "SAM 3", fill=INK, font=card.font, anchor="ma")
        card.arrow(246, 150, 330, 150)
        card.paste(with_mask(ref, mask), 340, 22, 190, "its mask")
    else:
        w = card.paste(with_mask(ref, mask), 24, 22, 190, "reference + mask")
        card.arrow(24 + w + 16, 117, 24 + w + 70, 117)
        x = 24 + w + 86
        x0 = x
        for image, alpha in targets()[:2]:
            x += card.paste(grey(alpha), x, 50, 112) + 10
        card.draw.text(((x0 + x) / 2, 190), "alpha mattes", fill=INK, font=card.font, anchor="ma")
    card.arrow(SIZE // 2, 238, SIZE // 2, 268)
    panels = [cutout(image, alpha) for image, alpha in targets()]
    h = min(170, int((SIZE - 48 - 14 * (len(panels) - 1)) / sum(p.width / p.height for p in panels)))
    widths = [round(p.width * h / p.height) for p in panels]
    x = (SIZE - sum(widths) - 14 * (len(panels) - 1)) // 2
    for panel in panels:
        x += card.paste(panel, x, 290, h) + 14
    card.draw.text((SIZE // 2, 476), "cut-outs, each at its photo's size", fill=INK, font=card.font, anchor="ma")
    card.save(path)


def card_composite(path: Path) -> None:
    card = Card()
    ref, mask = scene(220, 180, 1, (60, 160, 90), arm=0.05)
    (image, alpha) = targets()[2]
    w = card.paste(with_mask(ref, mask), 24, 22, 190, "reference + mask")
    card.arrow(24 + w + 14, 117, 24 + w + 60, 117)
    card.paste(to_image(image), 24 + w + 74, 22, 190, "target")
    card.arrow(SIZE // 2, 246, SIZE // 2, 276)
    h, wt = alpha.shape
    beach = background(h, wt, 5, top=(120, 190, 240), bottom=(240, 220, 160))
    x = SIZE // 2 - round(220 * wt / h) - 10
    card.paste(cutout(image, alpha), x, 286, 190, "cut-out")
    card.paste(cutout(image, alpha, beach), SIZE // 2 + 10, 286, 190, "new background")
    card.save(path)


def card_video(path: Path) -> None:
    card = Card()
    frames = [scene(120, 96, 21, (40, 90, 200), cx=0.35 + 0.1 * k, arm=0.12 * (k % 2)) for k in range(4)]
    rows = [("clip (first frame: reference + mask)", lambda i, f: with_mask(*f) if i == 0 else to_image(f[0])),
            ("alpha video", lambda i, f: grey(f[1])),
            ("composited video, same frame rate", lambda i, f: cutout(f[0], f[1], np.ones_like(f[0]) * np.array(GREEN) / 255))]
    y = 14
    for label, panel in rows:
        x = 24
        for i, frame in enumerate(frames):
            x += card.paste(panel(i, frame), x, y, 128) + 10
        card.draw.text((SIZE // 2, y + 132), label, fill=INK, font=card.font, anchor="ma")
        y += 166
    card.save(path)


def card_generate(path: Path) -> None:
    card = Card()
    shirts = [(40, 90, 200), (200, 60, 60), (240, 180, 40), (60, 160, 90)]
    batch = [scene(150, 150, 31 + k, shirt, cx=0.42 + 0.05 * k, scale=0.6, arm=0.12 * (k % 3) - 0.05)
             for k, shirt in enumerate(shirts)]
    chip = [24, 14, 226, 46]
    card.draw.rounded_rectangle(chip, radius=14, fill=(60, 64, 72), outline=INK, width=2)
    card.draw.text(((chip[0] + chip[2]) / 2, (chip[1] + chip[3]) / 2), "prompt, batch of 4", fill=INK, font=card.font,
                   anchor="mm")
    for k, (image, _) in enumerate(batch):  # the generated batch, 2 x 2
        card.paste(to_image(image), 24 + 106 * (k % 2), 58 + 106 * (k // 2), 96)
    card.draw.text((125, 270), "generated", fill=INK, font=card.font, anchor="ma")
    word = [250, 64, 346, 98]
    card.draw.rounded_rectangle(word, radius=14, fill=(60, 64, 72), outline=ACCENT, width=2)
    card.draw.text(((word[0] + word[2]) / 2, (word[1] + word[3]) / 2), '"person"', fill=INK, font=card.font, anchor="mm")
    card.draw.text((298, 108), "SAM 3", fill=INK, font=card.font, anchor="ma")
    card.arrow(246, 160, 340, 160)
    image, alpha = batch[0]
    card.paste(with_mask(image, alpha), 352, 80, 140, "image 1 + its mask")
    card.arrow(SIZE // 2, 280, SIZE // 2, 306)
    beach = background(150, 150, 5, top=(120, 190, 240), bottom=(240, 220, 160))
    x = (SIZE - 4 * 110 - 3 * 12) // 2
    for image, alpha in batch:
        x += card.paste(cutout(image, alpha, beach), x, 318, 110) + 12
    card.draw.text((SIZE // 2, 440), "every image cut out, on a new background", fill=INK, font=card.font, anchor="ma")
    card.save(path)


CARDS = {
    "Matte a folder of photos (IconMatting)": card_folder,
    "Matte a folder from a word (IconMatting, SAM 3)": lambda p: card_folder(p, word=True),
    "Cut out and composite (IconMatting)": card_composite,
    "Matte a video clip (IconMatting)": card_video,
    "Generate a batch and cut it out (IconMatting, SAM 3)": card_generate,
}


def write_cards(workflows_dir: Path = ROOT / "workflows") -> list:
    written = []
    for name, make in CARDS.items():
        path = workflows_dir / f"{name}.jpg"
        make(path)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_cards():
        print(p.relative_to(ROOT))
