"""Cost of the cut-out of a large photo, old vs new, as ratios measured in one run (not a test).

    python benchmarks/benchmark_cutout.py                       # 4000x3000, realistic matte
    python benchmarks/benchmark_cutout.py --matte soft          # worst case: every pixel 0 < alpha < 1

What is timed is what decoding does after the matting head: the 768^2 alpha brought back to the
photo's pixels (``restore_alpha``) and the RGBA cut-out with blur-fusion foreground colours
(``rgba_cutout``). "old" is a whole-image baseline: a clamped copy of the restored alpha, the tests'
blur-fusion oracle (``old_estimate_foreground``: numpy float64, every window summed from shifted
copies), then concatenated; "new" is the library's. Each runs in its own process, so the peak
resident set above the start (sampled every millisecond) is its own; the inputs (image, 768^2 alpha)
are allocated before the start.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests" / "support")]

from iconmatting_core.postprocess import rgba_cutout  # noqa: E402
from iconmatting_core.preprocess import Placement, placement_for, restore_alpha  # noqa: E402


# --- the whole-image baseline: the oracle of tests/unit/test_cutout.py (tests/support/oracles.py) ---
from oracles import old_estimate_foreground  # noqa: E402


def old_restore_alpha(alpha, placement):
    a = alpha[None, :, : placement.content_height, : placement.content_width].float()
    a = F.interpolate(a, size=(placement.height, placement.width), mode="bilinear", align_corners=False)
    return a[0, 0].clamp(0.0, 1.0)


def old_cutout(image, alpha_model, placement):
    alpha = old_restore_alpha(alpha_model, placement)
    fg = old_estimate_foreground(image[None], alpha[None])
    return torch.cat([fg, alpha[None, ..., None].to(fg.dtype)], dim=-1)[0]


def new_cutout(image, alpha_model, placement):
    alpha = restore_alpha(alpha_model, placement)
    return rgba_cutout(image[None], alpha[None])[0]


# --- measurement -------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def model_alpha(size: int, placement: Placement, matte: str) -> torch.Tensor:
    """A 768^2 model-space alpha: a soft-edged disc with hair-like speckles, or soft everywhere."""
    g = torch.Generator().manual_seed(0)
    if matte == "soft":
        return (0.05 + 0.9 * torch.rand(1, size, size, generator=g))
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    h, w = placement.content_height, placement.content_width
    d = torch.hypot(yy - 0.5 * h, xx - 0.5 * w) - 0.3 * min(h, w)
    alpha = (0.5 - d / 3.0).clamp(0, 1)
    hair = (d > 0) & (d < 25) & (torch.rand(size, size, generator=g) < 0.2)
    alpha[hair] = torch.rand(int(hair.sum()), generator=g)
    return alpha[None]


def worker(variant: str, height: int, width: int, matte: str, size: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    image = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(1))
    placement = placement_for(height, width, size, "pad")
    alpha_model = model_alpha(size, placement, matte)
    fn = {"old": old_cutout, "new": new_cutout}[variant]
    start_rss = _rss_bytes()
    peak = [start_rss]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    rgba = fn(image, alpha_model, placement)
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    a = rgba[..., 3]
    return {
        "seconds": seconds,
        "peak_extra_mb": (peak[0] - start_rss) / 2**20,
        "rgba_mb": rgba.numel() * rgba.element_size() / 2**20,
        "edge_fraction": float(((a > 0) & (a < 1)).float().mean()),
        "checksum": float(rgba.double().sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=3000)
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--matte", choices=["edge", "soft"], default="edge")
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady figures on a shared machine)")
    p.add_argument("--worker", choices=["old", "new"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.height, args.width, args.matte, args.image_size, args.threads)))
        return
    results = {}
    for variant in ("old", "new"):
        cmd = [sys.executable, __file__, "--worker", variant, "--height", str(args.height), "--width", str(args.width),
               "--matte", args.matte, "--image-size", str(args.image_size), "--threads", str(args.threads)]
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    old, new = results["old"], results["new"]
    print(f"cut-out of a {args.width}x{args.height} photo from a {args.image_size}^2 alpha, matte '{args.matte}' "
          f"({100 * new['edge_fraction']:.1f}% of pixels with 0 < alpha < 1), {args.threads} thread(s); "
          f"output RGBA float32 {new['rgba_mb']:.0f} MB")
    print(f"{'':6}{'seconds':>10}{'peak extra MB':>16}{'x RGBA size':>13}")
    for name, r in results.items():
        print(f"{name:6}{r['seconds']:>10.2f}{r['peak_extra_mb']:>16.0f}{r['peak_extra_mb'] / r['rgba_mb']:>13.2f}")
    print(f"old / new: time {old['seconds'] / new['seconds']:.1f}x, peak extra memory "
          f"{old['peak_extra_mb'] / max(new['peak_extra_mb'], 1e-9):.1f}x")


if __name__ == "__main__":
    main()
