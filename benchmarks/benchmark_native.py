"""IconMatting on ComfyUI's own SD 2.1 objects vs the core's diffusers path, side by side in one run (not a test).

    python benchmarks/benchmark_native.py --image-size 384 --targets 2     # what a 2-core CPU can do

Boots the test ComfyUI (0.3.75, from tests/support/comfy_harness.py) and, inside it, builds a full-size SD 2.1
UNet + VAE with random weights once, loaded twice: by ComfyUI (from the original single-file key layout,
through its own model detection and patcher) and by diffusers, plus one full-size head. Prints per path:
the floor (one bare UNet forward over the ensemble copies + one VAE encode, on that path's own modules),
the per-target time of match + decode, its ratio to the floor, native / diffusers per-target, and the
extra peak memory of one target's pass (process RSS sampled every ms, in a second ComfyUI process whose
allocator returns freed tensors at once; max_memory_allocated on CUDA) as JSON fields
(``runs.<dtype>.<path>.extra_peak_bytes``), with the host's attention and the one the pack uses for the
layers it does not record, and per path a target's stages (VAE encode, UNet pass, matching, head) against the
device's matmul rate measured in the same run: seconds, GFLOP/s, fraction (benchmarks/machine_rate.py). The test
harness starts ComfyUI with --cpu; on a GPU: benchmarks/benchmark_gpu.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

SCRIPT = Path(__file__).with_name("comfy_bench_script.py")

from machine_rate import stage_table  # noqa: E402  (benchmarks/, this script's folder)


def run_benchmark(image_size, ensemble, targets, repeats, dtypes, comfy_args=(), cpu=True, one_process=False,
                  model_size="full"):
    """Boots the test ComfyUI and runs comfy_bench_script.py in it; returns (its result, ComfyUI version).

    On the CPU, twice: times in a ComfyUI with glibc's default allocator (what users run), then the extra
    peak memory in another, where every allocation of 1 MiB or more is its own mapping, returned on free, so
    that process RSS follows the live tensors (glibc's default keeps freed blocks up to 32 MiB in its heap,
    hiding or inflating peaks; the mapping and page faults would slow allocation-heavy code). Each ratio is
    measured in one process. On CUDA, once: max_memory_allocated needs no help. ``one_process``: on the CPU
    too (a smoke run: times then come from the allocator set up for memory figures). ``model_size`` "tiny": the
    models with tiny channel counts (comfy_bench_script.py; ComfyUI learns the tiny UNet from
    tests/support/comfy_tiny_sd2)."""
    mmap = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
    sizes = (image_size, ensemble, targets, repeats, dtypes, model_size)
    if not cpu or one_process:
        return _run_script(sizes, comfy_args, cpu, "both", mmap if cpu else {})
    timed, version = _run_script(sizes, comfy_args, cpu, "time", {})
    measured, _ = _run_script(sizes, comfy_args, cpu, "memory", mmap)
    for dtype, run in timed["runs"].items():
        for name in ("native", "diffusers"):
            run[name]["extra_peak_bytes"] = measured["runs"][dtype][name]["extra_peak_bytes"]
    timed["process_peak_rss_bytes"] = max(timed["process_peak_rss_bytes"], measured["process_peak_rss_bytes"])
    return timed, version


def _run_script(sizes, comfy_args, cpu, measure, env):
    from comfy_harness import run_comfy

    image_size, ensemble, targets, repeats, dtypes, model_size = sizes
    extra_packs = [ROOT / "tests" / "support" / "comfy_tiny_sd2"] if model_size == "tiny" else []
    with tempfile.TemporaryDirectory() as tmp:
        result = run_comfy(ROOT, [], pack_name="comfyui-iconmatting", timeout=3600, comfy_args=list(comfy_args), cpu=cpu,
                           extra_env=env, extra_packs=extra_packs, scripts=[{"path": str(SCRIPT), "args": {
                               "image_size": image_size, "ensemble": ensemble, "targets": targets, "repeats": repeats,
                               "dtypes": list(dtypes), "work": tmp, "measure": measure, "model_size": model_size}}])
    entry = result["scripts"][0]
    if entry.get("error") or "result" not in entry:
        raise RuntimeError(entry.get("error") or f"the benchmark did not run (ComfyUI exit status {result.get('returncode')}; "
                           f"-9: killed, e.g. out of memory): {result.get('stderr_tail', '')[-2000:]}")
    return entry["result"], result.get("comfyui_version")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--ensemble", type=int, default=4)
    p.add_argument("--targets", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--comfy-arg", action="append", default=[],
                   help="a ComfyUI command-line flag, e.g. --comfy-arg=--use-pytorch-cross-attention")
    args = p.parse_args(argv)
    try:
        out, version = run_benchmark(args.image_size, args.ensemble, args.targets, args.repeats, [args.dtype], args.comfy_arg)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    run = out["runs"][args.dtype]
    print(f"IconMatting native (ComfyUI {version} {' '.join(args.comfy_arg)}) vs diffusers: "
          f"{out['device']}, {args.dtype}, {args.image_size}px, ensemble {args.ensemble}, {args.targets} targets; "
          f"host attention {out['host_attention']}, the pack's for unrecorded layers {out['feature_attention']}")
    print(f"{'path':>10} {'floor s':>8} {'s/target':>9} {'/floor':>7} {'extra peak GB':>14}")
    for name in ("native", "diffusers"):
        r = run[name]
        print(f"{name:>10} {r['floor']:>8.2f} {r['per_target']:>9.2f} {r['per_target'] / r['floor']:>7.2f} "
              f"{r['extra_peak_bytes'] / 2**30:>14.2f}")
    n, d = run["native"], run["diffusers"]
    print(f"native / diffusers per target: {n['per_target'] / d['per_target']:.2f}; extra peak memory: "
          f"{n['extra_peak_bytes'] / max(1, d['extra_peak_bytes']):.2f}; alpha max |native - diffusers|: {run['alpha_max_diff']:.2e}")
    print(f"per target, stage by stage (best of {args.repeats}, the paths interleaved); GEMM: {run['gemm']['diffusers']}")
    print(stage_table({name: run[name]["stages"] for name in ("native", "diffusers")}, run["gemm_flops"]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
