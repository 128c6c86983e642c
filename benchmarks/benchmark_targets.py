"""Cost of listing a folder of GIFs and WebPs, whose kind (image or clip) is read from each file
(not a test; the numbers are for this machine, files in the page cache).

    python benchmarks/benchmark_targets.py                 # 2000 files of each kind
    python benchmarks/benchmark_targets.py --files 10000

Each kind is one generated file hard-linked ``--files`` times into a temporary folder (the same
bytes, so the disk holds one copy): a 1024x768 photo as a still WebP, a still GIF and a PNG (whose
kind comes from its name: the cost of listing alone), and a 20-frame 320x240 animation as WebP and
GIF. Timed per file: ``list_targets`` on the folder (which decides every file's kind), and, for
comparison, opening each file with Pillow and asking ``n_frames`` (Pillow's WebP reader reads the
whole file when it opens it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iconmatting_core.job.targets import list_targets, split_targets  # noqa: E402


def _samples(folder: Path) -> dict:
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((768, 1024, 3)) * 255).astype(np.uint8))
    frames = [Image.fromarray((rng.random((240, 320, 3)) * 255).astype(np.uint8)) for _ in range(20)]
    paths = {k: folder / f"sample_{k}" for k in ("photo.png", "photo.webp", "photo.gif", "anim.webp", "anim.gif")}
    photo.save(paths["photo.png"])
    photo.save(paths["photo.webp"], quality=90)
    photo.save(paths["photo.gif"])
    frames[0].save(paths["anim.webp"], save_all=True, append_images=frames[1:], duration=80)
    frames[0].save(paths["anim.gif"], save_all=True, append_images=frames[1:], duration=80)
    return paths


def _pillow_frames(paths) -> int:
    clips = 0
    for p in paths:
        with Image.open(p) as im:
            clips += im.n_frames > 1
    return clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000, help="files of each kind")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        samples = _samples(Path(tmp))
        for kind, sample in samples.items():
            folder = Path(tmp) / kind
            folder.mkdir()
            for i in range(args.files):
                os.link(sample, folder / f"{i:06d}{sample.suffix}")
            files = sorted(folder.iterdir())
            _pillow_frames(files[:50])  # warm up
            start = time.perf_counter()
            images, clips = split_targets(list_targets([str(folder)]).targets)
            ours = (time.perf_counter() - start) / args.files
            start = time.perf_counter()
            pillow_clips = _pillow_frames(files)
            pillow = (time.perf_counter() - start) / args.files
            assert pillow_clips == len(clips), (kind, pillow_clips, len(clips))
            print(f"{kind:10s} ({sample.stat().st_size / 1e6:.2f} MB, {len(clips)} clips, {len(images)} images): "
                  f"list_targets {1e3 * ours:.3f} ms/file ({10_000 * ours:.1f} s per 10,000); "
                  f"Pillow n_frames {1e3 * pillow:.3f} ms/file; ratio {pillow / ours:.1f}x")


if __name__ == "__main__":
    main()
