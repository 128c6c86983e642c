"""Training data: two folder layouts, checked before any model work, sampled as the authors do.

Layouts (``--data DIR``):

* the evaluation layout (``iconmatting_core.eval``: ``DIR/image/``, ``DIR/alpha/``, optional
  ``DIR/trimap/`` and the group json, ``class-sub_class-HalfOrFull``), read by the same reader;
* one folder per group for a user's own photos::

      DIR/<group>/images/<stem>.jpg|png|...
      DIR/<group>/alphas/<stem>.png      # alpha matte, or a binary mask (white = foreground)
      DIR/<group>/trimaps/<stem>.png     # optional

  images and alphas are matched by file stem, extensions in any case (``IMG_0001.JPG``); hidden
  files and folders (``.cache/``, ``.DS_Store``, macOS's ``._IMG_0001.JPG``) are not data. An alpha
  file is read as ``image_io`` reads mattes (8-bit / 255, 16-bit / 65535), except an RGBA/LA
  cut-out whose alpha channel is not all opaque: its alpha channel.

Every file is hashed while it is checked: :meth:`TrainData.summary` carries a digest of the data's
content (each file's path in the folder, size and sha256, and each image's group), so a run knows
its data by what it holds, not by the folder's name (``state``: a resumed run with other data is
refused).

Trimaps: a trimap file (8-bit, or 16-bit scaled to 8 bits) is thresholded as the authors'
``ToTensor`` does (< 85 background, >= 170 foreground, else unknown). Without one, the unknown
region is derived from the alpha after the crop and resize: pixels with 0 < alpha < 1, and the
pixels within ``radius`` model pixels of the boundary between alpha = 0 and alpha = 1 (both
sides), where ``radius`` defaults to :data:`TRIMAP_RADIUS` at 768 px (scaled with the image size);
a hard mask thus gets a band around its edge.

Sampling (``icm/data/data_generator.py: InContextDataset``): sample ``p`` of the run (a global
position, the same whatever the number of processes) takes the target at ``p mod N`` of a seeded
per-epoch permutation; its reference is drawn uniformly from the target's group, the target
excluded when the group has more than two images (a group of one uses the target itself); both
are centre-square cropped and resized to the image size with an interpolation drawn at random
for each image and each alpha (nearest, bilinear, bicubic, Lanczos: Pillow's, whose bilinear and
bicubic antialias when shrinking, unlike OpenCV's); the trimap is resized nearest; the guidance is
the reference's alpha > 0.5. Every draw comes from a generator seeded by (seed, p), so a run
resumed at any step, or split over processes, sees the same samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..eval import DatasetError, centre_crop_box, draw_references, load_dataset
from ..image_io import ImageReadError, open_image, read_matte_image, read_trimap_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
TRIMAP_RADIUS = 10  # unknown band half-width in model pixels at 768 px
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class Item:
    name: str
    group: str
    image: Path
    alpha: Path
    trimap: Optional[Path] = None


@dataclass
class TrainData:
    """Checked items, their groups (indices into items), the files skipped as unreadable and, per
    file used (path relative to ``root``), its size and sha256."""

    root: Path
    layout: str
    items: List[Item]
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    files: Dict[str, Tuple[int, str]] = field(default_factory=dict)

    def __post_init__(self):
        self.groups: Dict[str, List[int]] = {}
        for i, item in enumerate(self.items):
            self.groups.setdefault(item.group, []).append(i)

    def __len__(self) -> int:
        return len(self.items)

    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def digest(self) -> str:
        """sha256 over each image's group and name and its files' relative paths, sizes and sha256."""
        entries = [[i.group, i.name] + [[self.relative(p), *self.files[self.relative(p)]] if p else None
                                        for p in (i.image, i.alpha, i.trimap)] for i in self.items]
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()

    def summary(self) -> dict:
        return {"root": self.root.name, "layout": self.layout, "images": len(self.items), "groups": len(self.groups),
                "trimaps": sum(i.trimap is not None for i in self.items), "skipped": [p for p, _ in self.skipped],
                "digest": self.digest()}


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _files_by_stem(folder: Path) -> Dict[str, Path]:
    out: Dict[str, Path] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and not _hidden(p) and p.suffix.lower() in IMAGE_SUFFIXES:
                out.setdefault(p.stem, p)
    return out


def _group_folders(root: Path) -> List[Path]:
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not _hidden(d)]


def _group_layout(root: Path) -> List[Item]:
    items: List[Item] = []
    groups = _group_folders(root)
    for g in groups:
        images, alphas, trimaps = (_files_by_stem(g / s) for s in ("images", "alphas", "trimaps"))
        if not (g / "images").is_dir() or not (g / "alphas").is_dir():
            raise DatasetError(
                f"{g} has no images/ and alphas/ folders; put each group's photos in {g}/images/ and their "
                "alpha mattes (or masks) with the same file names in alphas/")
        missing = [images[s] for s in images if s not in alphas]
        if missing:
            raise DatasetError(
                f"{missing[0]} has no alpha: expected {g / 'alphas' / missing[0].stem}.png"
                + (f" ({len(missing) - 1} more images lack theirs)" if len(missing) > 1 else ""))
        orphans = [alphas[s] for s in alphas if s not in images]
        if orphans:
            raise DatasetError(f"alpha {orphans[0]} has no image of the same name in {g / 'images'}")
        items += [Item(s, g.name, images[s], alphas[s], trimaps.get(s)) for s in sorted(images)]
    return items


def _layout(root: Path, json_path=None) -> Tuple[str, List[Item]]:
    if not root.is_dir():
        raise DatasetError(f"training data folder not found: {root}")
    if (root / "image").is_dir() or (root / "alpha").is_dir():
        ds = load_dataset(root, json_path)
        return "eval", [Item(s.name, s.group, s.image_path, s.alpha_path, s.trimap_path)
                        for members in ds.groups.values() for s in members]
    if any((d / "images").is_dir() for d in _group_folders(root)):
        return "groups", _group_layout(root)
    raise DatasetError(
        f"{root} is not a training data folder: expected DIR/image/, DIR/alpha/ and a group json (the eval "
        "layout), or one folder per group with images/ and alphas/ inside (DIR/<group>/images, DIR/<group>/alphas)")


def _check(path: Path) -> Tuple[Tuple[int, int], int, str]:
    """(width x height as stored, file size, sha256) of an image file; raises when it cannot be decoded."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        im.verify()
    return size, len(data), hashlib.sha256(data).hexdigest()


def load_train_data(root, json_path=None, log=None) -> TrainData:
    """Index and check a training folder (sizes and readability of every file; no pixel is kept).

    Raises DatasetError (one line) for a wrong layout, an image without alpha, an alpha or trimap
    of another size, or no usable image; unreadable files are skipped, listed through ``log``."""
    log = log or (lambda line: print(line, file=sys.stderr))
    root = Path(root)
    layout, items = _layout(root, json_path)
    good, skipped, files = [], [], {}
    for item in items:
        sizes = {}
        for what in ("image", "alpha", "trimap"):
            path = getattr(item, what)
            if path is None:
                continue
            try:
                sizes[what], length, sha = _check(path)
                files[Path(path).relative_to(root).as_posix()] = (length, sha)
            except Exception as exc:  # noqa: BLE001 - any decoder failure: skip the file
                skipped.append((str(path), f"{type(exc).__name__}: {exc}"))
                break
        else:
            for what in ("alpha", "trimap"):
                if what in sizes and sizes[what] != sizes["image"]:
                    (w, h), (iw, ih) = sizes[what], sizes["image"]
                    raise DatasetError(f"{what} {getattr(item, what)} is {w}x{h} but its image {item.image} is "
                                       f"{iw}x{ih}; give the {what} the image's size")
            good.append(item)
    for path, why in skipped:
        log(f"skipping unreadable file {path} ({why})")
    if not good:
        raise DatasetError(f"no usable image with an alpha in {root}" + (" (all unreadable)" if skipped else ""))
    used = {Path(p).relative_to(root).as_posix() for i in good for p in (i.image, i.alpha, i.trimap) if p}
    return TrainData(root, layout, good, skipped, {k: v for k, v in files.items() if k in used})


# --------------------------------------------------------------------------- samples

def _read(path: Path, mode: str):
    """An image file upright as RGB (``mode`` "RGB"), a trimap as 8-bit levels ("L") or an alpha file
    as a float image in [0, 1] ("F"); 16-bit files as ``image_io`` reads them."""
    from PIL import Image

    try:
        im = open_image(path)
    except ImageReadError as exc:
        raise DatasetError(str(exc)) from None
    if mode == "RGB":
        return im.convert("RGB")
    if mode == "L":
        return Image.fromarray(read_trimap_image(im))
    if im.mode in ("RGBA", "LA") and im.getchannel("A").getextrema() != (255, 255):
        a = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0  # a cut-out: its alpha channel
    else:
        a = read_matte_image(im)
    return Image.fromarray(np.clip(a, 0, 1).astype(np.float32), mode="F")


def _resample(name: str):
    from PIL import Image

    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS}[name]


def _crop_resize(im, size: int, interpolation: str):
    y0, y1, x0, x1 = centre_crop_box(im.height, im.width)
    return im.crop((x0, y0, x1, y1)).resize((size, size), _resample(interpolation))


def band_radius(size: int, radius: Optional[int] = None) -> int:
    """The derived unknown band's half-width at model size ``size``: ``radius`` when given, else
    :data:`TRIMAP_RADIUS` scaled from 768 px (at least 1)."""
    return radius if radius is not None else max(1, round(TRIMAP_RADIUS * size / 768))


def derived_unknown(alpha: torch.Tensor, radius: int) -> torch.Tensor:
    """alpha [1, S, S] -> unknown map [1, S, S] (see the module docstring)."""
    k = 2 * radius + 1
    pool = lambda m: F.max_pool2d(m[None].float(), k, 1, radius)[0]  # noqa: E731
    soft = (alpha > 0) & (alpha < 1)
    edge = (pool(alpha >= 1) > 0) & (pool(alpha <= 0) > 0)
    return ((pool(soft) > 0) | edge).float()


def trimap_unknown(trimap: np.ndarray) -> torch.Tensor:
    """uint8 trimap [S, S] -> unknown map [1, S, S]: 1 where 85 <= t < 170 (the authors' 0.5)."""
    t = torch.from_numpy(trimap.astype(np.float32))
    return ((t >= 85) & (t < 170)).float()[None]


class TrainSamples(torch.utils.data.Dataset):
    """``dataset[p]`` = sample at global position p (see the module docstring): a dict of
    ``image`` [3, S, S] in [-1, 1], ``alpha`` [1, S, S], ``unknown`` [1, S, S], ``reference``
    [3, S, S], ``guidance`` [S, S] (0/1), ``position`` (int64). ``fixed=True`` (validation):
    bilinear resizing and the evaluation's seeded reference draw, sample p = item p."""

    def __init__(self, data: TrainData, size: int, seed: int, radius: Optional[int] = None, fixed: bool = False):
        self.data, self.size, self.seed, self.fixed = data, size, int(seed), fixed
        self.radius = band_radius(size, radius)
        self._perm: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.data) if self.fixed else 2**62

    def target_index(self, p: int) -> int:
        if self.fixed:
            return p
        epoch, k = divmod(p, len(self.data))
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.data))}
        return int(self._perm[epoch][k])

    def reference_index(self, target: int, rng) -> int:
        item = self.data.items[target]
        members = self.data.groups[item.group]
        if self.fixed:
            names = {self.data.items[i].name: i for i in members}
            return names[draw_references(list(names), item.name, 1, self.seed)[0]]
        candidates = [i for i in members if i != target] if len(members) > 2 else members
        return candidates[int(rng.integers(len(candidates)))]

    def _load(self, index: int, interp: Sequence[str], with_trimap: bool):
        item = self.data.items[index]
        image = _crop_resize(_read(item.image, "RGB"), self.size, interp[0])
        alpha_im = _read(item.alpha, "F")
        alpha = torch.from_numpy(np.asarray(_crop_resize(alpha_im, self.size, interp[1]), dtype=np.float32).copy())
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        alpha = alpha.clamp(0, 1)[None]
        if not with_trimap:
            return x, alpha, None
        if item.trimap is not None:
            tri = _read(item.trimap, "L")
            tri = np.asarray(_crop_resize(tri, self.size, "nearest"), dtype=np.uint8)
            unknown = trimap_unknown(tri)
        else:
            nearest = torch.from_numpy(np.asarray(_crop_resize(alpha_im, self.size, "nearest"), dtype=np.float32).copy())
            unknown = derived_unknown(nearest.clamp(0, 1)[None], self.radius)
        return x, alpha, unknown

    def __getitem__(self, p: int) -> dict:
        p = int(p)
        rng = np.random.default_rng([self.seed, p, 2])
        target = self.target_index(p)
        ref = self.reference_index(target, rng)
        interp = ["bilinear"] * 4 if self.fixed else [INTERPOLATIONS[int(i)] for i in rng.integers(4, size=4)]
        image, alpha, unknown = self._load(target, interp[:2], True)
        ref_image, ref_alpha, _ = self._load(ref, interp[2:], False)
        return {"image": image, "alpha": alpha, "unknown": unknown, "reference": ref_image,
                "guidance": (ref_alpha[0] > 0.5).float(), "position": torch.tensor(p, dtype=torch.int64)}


class StepSampler(torch.utils.data.Sampler):
    """Global positions for this process: step s, rank r of W, per-process batch B -> positions
    ``s*W*B + r*B ... + B - 1``, from ``start_step`` to ``steps``."""

    def __init__(self, start_step: int, steps: int, batch: int, rank: int = 0, world: int = 1):
        self.start, self.steps, self.batch, self.rank, self.world = start_step, steps, batch, rank, world

    def __iter__(self):
        for s in range(self.start, self.steps):
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.batch
