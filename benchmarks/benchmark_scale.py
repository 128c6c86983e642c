"""Batch at scale on Ray, measured in one run and printed as ratios (tiny random-weight models, so
the figures are about the job's machinery, not the network's speed):

* a worker's memory on a clip: the peak RSS of the Ray worker that mattes a clip of 150 vs 1,500
  frames at the same size (each clip its own job, so each its own fresh worker process), in total
  and above the worker's RSS once its model is loaded. Flat memory = ratio ~1 (target <= 1.2).
* clip throughput: clips per second of Ray with 1 vs 2 workers on a local Ray (2 CPUs, one per
  worker) over a folder of short clips, over the second half of the results (worker start-up and
  model loading excluded).
* image throughput: images per second of the local engine (``--threads 1``) and of Ray with 1 vs 2
  workers, over the second half of the results.

    python benchmarks/benchmark_scale.py [--frames 150 1500] [--size 320x180] [--clips 8] [--clip-frames 24]
                                         [--images 32] [--skip-video] [--skip-images]
"""
from __future__ import annotations

import argparse
import resource
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


class _Timed:
    """Completion times of the targets a job reports (its progress updates) and the rows its workers
    sent back, patched into the engines for one run of the benchmark."""

    def __init__(self):
        import iconmatting_core.job.local as local_engine
        import iconmatting_core.job.ray_engine as ray_engine

        self.stamps, self.rows = [], []
        timed = self

        class TimedProgress(ray_engine.Progress):
            def update(self, n=1, note=""):
                timed.stamps.extend([time.perf_counter()] * n)
                super().update(n, note)

        real_finish = ray_engine._finish

        def finish(row, *args):
            timed.rows.append({k: v for k, v in row.items() if k not in ("alpha", "rgba")})
            return real_finish(row, *args)

        class MeasuredWorker(ray_engine.Worker):
            """Reports its process's RSS when a clip starts (model loaded) and its peak when it ends."""

            def matte_clip(self, *args):
                loaded = _rss_mb()
                row = super().matte_clip(*args)
                return {**row, "rss_loaded_mb": loaded, "peak_mb": _peak_mb()}

        ray_engine.Progress = local_engine.Progress = TimedProgress
        ray_engine._finish, ray_engine.Worker = finish, MeasuredWorker

    def rate(self) -> float:
        """Targets per second over the second half of the results (every worker is up by then)."""
        half = len(self.stamps) // 2
        return (len(self.stamps) - 1 - half) / max(self.stamps[-1] - self.stamps[half], 1e-6)


def bench_video(work: Path, timed: _Timed, counts, width: int, height: int) -> None:
    from sample_inputs import write_clip

    from iconmatting_core.__main__ import main

    models, ref = _models(work), _reference(work)
    results = []
    for n in counts:
        clip = write_clip(work / f"clip{n}.mp4", frames=n, width=width, height=height)
        timed.rows.clear()
        started = time.perf_counter()
        assert main(["matte", *ref, "--targets", str(clip), "--out", str(work / f"out{n}"), "--engine", "ray",
                     "--workers", "1", "--cpus-per-worker", "2", *models]) == 0
        (row,) = timed.rows
        results.append({**row, "frames": n, "seconds": time.perf_counter() - started})
    print(f"\na Ray worker's memory on one clip ({width}x{height}, tiny model, alpha + RGBA videos; each clip a fresh worker):")
    print("| frames | s/frame (job) | worker RSS loaded MB | worker peak RSS MB | peak above loaded MB |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['frames']} | {r['seconds'] / r['frames']:.3f} | {r['rss_loaded_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] - r['rss_loaded_mb']:.0f} |")
    a, b = results[0], results[-1]
    print(f"worker peak RSS ratio {b['frames']} / {a['frames']} frames: {b['peak_mb'] / a['peak_mb']:.3f} "
          f"(above loaded: {(b['peak_mb'] - b['rss_loaded_mb']) / max(a['peak_mb'] - a['rss_loaded_mb'], 1):.3f}); "
          f"worker pids {a['pid']}, {b['pid']} (driver {__import__('os').getpid()})")


def bench_clips(work: Path, timed: _Timed, clips: int, frames: int, width: int, height: int) -> None:
    from sample_inputs import write_clip

    from iconmatting_core.__main__ import main

    models, ref = _models(work), _reference(work)
    folder = work / "clips"
    folder.mkdir(exist_ok=True)
    for i in range(clips):
        write_clip(folder / f"c{i:02d}.mp4", frames=frames, width=width, height=height)
    rates = {}
    for workers in (1, 2):
        timed.stamps.clear()
        timed.rows.clear()
        started = time.perf_counter()
        assert main(["matte", *ref, "--targets", str(folder), "--out", str(work / f"clips_out_{workers}"),
                     "--engine", "ray", "--workers", str(workers), *models]) == 0
        rates[workers] = timed.rate()
        pids = sorted({r["pid"] for r in timed.rows})
        print(f"ray, {workers} worker(s): {time.perf_counter() - started:.1f} s in all for {clips} clips of {frames} frames "
              f"({width}x{height}), {rates[workers]:.3f} clips/s over the second half; clips matted by worker pids {pids}")
    print(f"ray clip throughput ratio 2 / 1 workers: {rates[2] / rates[1]:.2f}")


def bench_ray(work: Path, timed: _Timed, images: int) -> None:
    import numpy as np
    from PIL import Image

    from iconmatting_core.__main__ import main

    models, ref = _models(work), _reference(work)
    rng = np.random.default_rng(1)
    folder = work / "images"
    folder.mkdir(exist_ok=True)
    for i in range(images):
        Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")

    timed.stamps.clear()
    started = time.perf_counter()
    assert main(["matte", *ref, "--targets", str(folder), "--out", str(work / "local_out"), "--threads", "1", *models]) == 0
    local = timed.rate()
    print(f"\nlocal engine, 1 thread: {timed.stamps[-1] - started:.1f} s in all for {images} images, {local:.2f} images/s "
          "over the second half")
    rates = {}
    for workers in (1, 2):
        timed.stamps.clear()
        started = time.perf_counter()
        assert main(["matte", *ref, "--targets", str(folder), "--out", str(work / f"ray_out_{workers}"),
                     "--engine", "ray", "--workers", str(workers), "--chunk-size", "1", *models]) == 0
        rates[workers] = timed.rate()
        print(f"ray, {workers} worker(s): {timed.stamps[-1] - started:.1f} s in all for {images} images, "
              f"{rates[workers]:.2f} images/s over the second half")
    print(f"ray image throughput ratio 2 / 1 workers: {rates[2] / rates[1]:.2f}; ray 1 worker / local: {rates[1] / local:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs=2, default=[150, 1500], help="memory: a short and a long clip")
    parser.add_argument("--size", default="320x180", help="clips' size")
    parser.add_argument("--clips", type=int, default=8, help="clip throughput: clips per run (0: not measured)")
    parser.add_argument("--clip-frames", type=int, default=24, help="clip throughput: frames per clip")
    parser.add_argument("--images", type=int, default=32, help="image throughput: images per run")
    parser.add_argument("--skip-video", action="store_true", help="no clips (memory, clips/s)")
    parser.add_argument("--skip-images", action="store_true")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _models(work)
        timed = _Timed()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            if not args.skip_video:
                bench_video(work, timed, args.frames, width, height)
            if not args.skip_video and args.clips:
                print()
                bench_clips(work, timed, args.clips, args.clip_frames, width, height)
            if not args.skip_images:
                bench_ray(work, timed, args.images)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
