"""Batch at scale, measured in one run and printed as ratios (tiny random-weight models, so the
figures are about the job's machinery, not the network's speed):

* video memory: peak RSS of `matte --engine ray` (clips run on the driver's local engine, streamed)
  on a clip of 150 vs 1,500 frames at the same size (each in a fresh process), in total and above
  the RSS once the model is loaded. Flat memory = ratio ~1 (target <= 1.2).
* throughput: images per second of the local engine (``--threads 1``) and of Ray with 1 vs 2 actor
  workers on a local Ray (2 CPUs, one per worker), over the second half of the results, so worker
  startup and model loading are excluded.

    python benchmarks/benchmark_scale.py [--frames 150 1500] [--size 320x180] [--images 32] [--skip-ray]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]  # iconmatting_core; tiny_models and sample_inputs (test helpers)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _models(work: Path):
    from tiny_models import save_tiny_head, save_tiny_sd_folder

    if not (work / "head.safetensors").exists():
        save_tiny_sd_folder(work / "sd")
        save_tiny_head(work / "head.safetensors")
    return ["--matting-weights", str(work / "head.safetensors"), "--sd", str(work / "sd"), "--device", "cpu"]


def _reference(work: Path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((120, 160, 3)) * 255).astype(np.uint8)).save(work / "ref.png")
    mask = np.zeros((120, 160), np.uint8)
    mask[30:90, 40:120] = 255
    Image.fromarray(mask).save(work / "mask.png")
    return ["--reference", str(work / "ref.png"), "--mask", str(work / "mask.png")]


def video_child(work: Path, frames: int, width: int, height: int) -> dict:
    """In a fresh process: write a clip, load the model, matte the clip; report memory."""
    import torch

    torch.set_num_threads(2)
    from sample_inputs import write_clip

    from iconmatting_core.__main__ import main
    from iconmatting_core.pipeline import load_pipeline

    models = _models(work)
    clip = write_clip(work / f"clip{frames}.mp4", frames=frames, width=width, height=height)
    pipe = load_pipeline(models[1], models[3], device="cpu")
    before = _rss_mb()
    started = time.time()
    code = main(["matte", *_reference(work), "--targets", str(clip), "--out", str(work / f"out{frames}"),
                 "--engine", "ray", "--threads", "2"], pipe_factory=lambda: pipe)
    return {"code": code, "frames": frames, "rss_loaded_mb": before, "peak_mb": _peak_mb(), "seconds": time.time() - started}


def bench_video(work: Path, counts, width: int, height: int) -> None:
    results = []
    for n in counts:
        out = subprocess.run([sys.executable, __file__, "_video_child", str(work), str(n), str(width), str(height)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nvideo memory ({width}x{height}, tiny model, alpha + RGBA videos):")
    print("| frames | s/frame | RSS loaded MB | peak RSS MB | peak above loaded MB |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        assert r["code"] == 0, r
        print(f"| {r['frames']} | {r['seconds'] / r['frames']:.3f} | {r['rss_loaded_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] - r['rss_loaded_mb']:.0f} |")
    a, b = results[0], results[-1]
    print(f"peak RSS ratio {b['frames']} / {a['frames']} frames: {b['peak_mb'] / a['peak_mb']:.3f} "
          f"(above loaded: {(b['peak_mb'] - b['rss_loaded_mb']) / max(a['peak_mb'] - a['rss_loaded_mb'], 1):.3f})")


def bench_ray(work: Path, images: int) -> None:
    import numpy as np
    import ray
    from PIL import Image

    import iconmatting_core.job.local as local_engine
    import iconmatting_core.job.ray_engine as ray_engine
    from iconmatting_core.__main__ import main

    models, ref = _models(work), _reference(work)
    rng = np.random.default_rng(1)
    folder = work / "images"
    folder.mkdir(exist_ok=True)
    for i in range(images):
        Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")

    stamps = []

    class TimedProgress(ray_engine.Progress):
        def update(self, n=1, note=""):
            stamps.extend([time.perf_counter()] * n)
            super().update(n, note)

    ray_engine.Progress = local_engine.Progress = TimedProgress
    stamps.clear()
    started = time.perf_counter()
    assert main(["matte", *ref, "--targets", str(folder), "--out", str(work / "local_out"), "--threads", "1", *models]) == 0
    half = len(stamps) // 2
    local = (len(stamps) - 1 - half) / max(stamps[-1] - stamps[half], 1e-6)
    print(f"local engine, 1 thread: {stamps[-1] - started:.1f} s in all for {images} images, {local:.2f} images/s "
          "over the second half")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rates = {}
        for workers in (1, 2):
            stamps.clear()
            started = time.perf_counter()
            assert main(["matte", *ref, "--targets", str(folder), "--out", str(work / f"ray_out_{workers}"),
                         "--engine", "ray", "--workers", str(workers), "--chunk-size", "1", *models]) == 0
            half = len(stamps) // 2  # the second half: every worker is up, startup excluded
            rates[workers] = (len(stamps) - 1 - half) / max(stamps[-1] - stamps[half], 1e-6)
            print(f"ray, {workers} worker(s): {stamps[-1] - started:.1f} s in all for {images} images, "
                  f"{rates[workers]:.2f} images/s over the second half")
        print(f"ray throughput ratio 2 / 1 workers: {rates[2] / rates[1]:.2f}; ray 1 worker / local: {rates[1] / local:.2f}")
    finally:
        ray.shutdown()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_video_child":
        work, n, w, h = Path(sys.argv[2]), *map(int, sys.argv[3:6])
        print(json.dumps(video_child(work, n, w, h)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs=2, default=[150, 1500])
    parser.add_argument("--size", default="320x180")
    parser.add_argument("--images", type=int, default=32, help="Ray: images per run")
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _models(work)
        if not args.skip_video:
            bench_video(work, args.frames, width, height)
        if not args.skip_ray:
            bench_ray(work, args.images)


if __name__ == "__main__":
    main()
