"""The pieces of a batch job shared by the command line's local and Ray engines: which targets,
where their outputs go, what is already done, progress with ETA, and the failures manifest."""
from __future__ import annotations

import glob
import io
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .video import VIDEO_EXTENSIONS, is_video
from .video import output_paths as video_output_paths

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MANIFEST_EXTENSIONS = {".txt", ".lst", ".list"}
TARGET_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
FAILURES_FILE = "failures.jsonl"


def read_image_uint8(path: Path) -> np.ndarray:
    """An image file -> [H, W, 3] uint8, turned upright by its EXIF orientation (as ComfyUI's loaders do)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def read_image(path: Path) -> np.ndarray:
    """An image file -> [H, W, 3] float32 in [0, 1], upright (EXIF orientation applied)."""
    return read_image_uint8(path).astype(np.float32) / 255.0


def read_mask(path: Path) -> np.ndarray:
    """A mask file (grey, or an image's alpha) -> [H, W] float32 in [0, 1], upright (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA"):
            im = im.getchannel("A")
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def read_manifest(path: Path) -> List[Path]:
    """One target path per line (blank lines and '#' comments skipped); relative paths are
    relative to the manifest's folder."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(p if p.is_absolute() else Path(path).parent / p)
    return out


def list_targets(specs: Sequence[str]) -> List[Path]:
    """Folders (their images and videos), globs, manifest files (.txt/.lst/.list) and files ->
    unique target paths, in the given order (folders and globs sorted). Manifest entries are kept
    as written, so a missing one is reported as a failure rather than dropped."""
    out: List[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in TARGET_EXTENSIONS)
        elif p.is_file() and p.suffix.lower() in MANIFEST_EXTENSIONS:
            out += read_manifest(p)
        elif p.is_file():
            out.append(p)
        else:
            out += sorted(Path(q) for q in glob.glob(spec) if Path(q).suffix.lower() in TARGET_EXTENSIONS)
    seen, unique = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def output_names(targets: Sequence[Path]) -> Dict[Path, str]:
    """Target -> the name its outputs start with: its file stem, unless another target of the run
    would write the same outputs (same stem, both images or both videos; compared case-blind for
    case-insensitive disks). Those are named by their folders relative to the folders' common
    parent (or their own folder's name), e.g. ``a/t0.png``, ``b/t0.png`` -> ``a_t0``, ``b_t0``,
    and by their extension when in one folder (``t0.png``, ``t0.jpg`` -> ``t0_png``, ``t0_jpg``).
    The same targets always get the same names, so a re-run resumes."""
    groups: Dict[tuple, List[Path]] = defaultdict(list)
    for t in targets:
        groups[(t.stem.casefold(), is_video(t))].append(t)
    names: Dict[Path, str] = {}
    renamed: List[Path] = []
    for group in groups.values():
        if len(group) == 1:
            names[group[0]] = group[0].stem
            continue
        folders = [t.absolute().parent for t in group]
        common = Path(os.path.commonpath(folders))
        for t, folder in zip(group, folders):
            parts = folder.relative_to(common).parts or (folder.name,)
            names[t] = "_".join(p for p in (*parts, t.stem) if p)
        counts = Counter(names[t].casefold() for t in group)
        for t in group:
            if counts[names[t].casefold()] > 1:
                names[t] += "_" + t.suffix.lstrip(".").lower()
        renamed += group
    # a made-up name that meets another target's: numbered, in target order
    taken = {(n.casefold(), is_video(t)) for t, n in names.items() if n == t.stem}
    for t in (t for t in targets if t in renamed):
        name, n = names[t], 1
        while (name.casefold(), is_video(t)) in taken:
            n += 1
            name = f"{names[t]}_{n}"
        taken.add((name.casefold(), is_video(t)))
        names[t] = name
    return names


def output_paths(out_dir: Path, target: Path, name: Optional[str] = None) -> Tuple[Path, Path]:
    """(alpha, rgba) PNG paths of an image target; ``name`` from :func:`output_names` (default: its stem)."""
    name = name or target.stem
    return out_dir / f"{name}_alpha.png", out_dir / f"{name}_rgba.png"


def is_done(out_dir: Path, target: Path, video_outputs: Sequence[str], name: Optional[str] = None) -> bool:
    if is_video(target):
        paths = video_output_paths(out_dir, target, video_outputs, name).values()
    else:
        paths = output_paths(out_dir, target, name)
    return all(p.exists() for p in paths)


def png_bytes(array: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def write_file(path: Path, data: bytes) -> None:
    """Write via a temporary name, so an interrupted run never leaves a half file that counts as done."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)


class Failures:
    """This run's failures: reported at the end and written to ``failures.jsonl`` in the output
    folder (one JSON object per line: path, error). The file is rewritten by every run, so it
    lists what is still failing; it is removed when nothing failed."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / FAILURES_FILE
        self.items: List[Tuple[str, str]] = []

    def add(self, target, error: str) -> None:
        self.items.append((str(target), error))

    def __len__(self) -> int:
        return len(self.items)

    def finish(self) -> None:
        if self.items:
            with open(self.path, "w", encoding="utf-8") as f:
                for path, error in self.items:
                    f.write(json.dumps({"path": path, "error": error}) + "\n")
        elif self.path.exists():
            self.path.unlink()


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Progress:
    """A progress bar with rate and ETA on stderr: tqdm when installed, plain lines otherwise.

    ``update(n, note)`` advances by n items; ``log(line)`` prints without breaking the bar.
    ``total`` may be None (unknown length: no ETA)."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "img"):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.started = time.time()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
            return
        elapsed = time.time() - self.started
        rate = elapsed / max(self.done, 1)
        if self.total:
            eta = rate * (self.total - self.done)
            head = f"{self.desc}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%)"
            tail = f"{rate:.2f}s/{self.unit}, ETA {eta:.0f}s"
        else:
            head, tail = f"{self.desc}: {self.done}", f"{rate:.2f}s/{self.unit}"
        print(f"{head} {note} [{tail}]".replace("  ", " "), file=sys.stderr, flush=True)

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def split_targets(targets: Iterable[Path]) -> Tuple[List[Path], List[Path]]:
    """(images, videos)."""
    images, videos = [], []
    for t in targets:
        (videos if is_video(t) else images).append(t)
    return images, videos
