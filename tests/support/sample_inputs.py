"""Inputs the tests (and benchmarks) build by hand: a reference image with its mask, target images,
the files a command-line test reads, a small H.264 clip. Seeded, so every run gets the same pixels."""
from fractions import Fraction

import numpy as np
import torch


def make_reference(h=100, w=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(h, w, 3, generator=g)
    mask = torch.zeros(h, w)
    mask[h // 5 : h * 4 // 5, w // 5 : w * 4 // 5] = 1
    return image, mask


def make_targets(n=3, h=90, w=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def save_reference_and_targets(tmp_path, n=2, folder="targets"):
    """ref.png + mask.png in tmp_path and n target PNGs in tmp_path/folder (returned), for command-line tests."""
    from PIL import Image

    def save(t, path):
        Image.fromarray((t.numpy() * 255).astype(np.uint8)).save(path)

    image, mask = make_reference()
    save(image, tmp_path / "ref.png")
    save(mask, tmp_path / "mask.png")
    targets = tmp_path / folder
    targets.mkdir()
    for i, t in enumerate(make_targets(n)):
        save(t, targets / f"t{i}.png")
    return targets


FPS, FRAMES, W, H = Fraction(12), 6, 64, 48


def write_clip(path, frames=FRAMES, width=W, height=H, fps=FPS):
    """A small H.264 clip of moving noise."""
    import av  # requirements-dev.txt

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray((rng.random((height, width, 3)) * 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
