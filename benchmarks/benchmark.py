"""Speed and memory of IconMatting, as ratios measured in one run (not a test).

    python benchmarks/benchmark.py                      # 768 px, batches 1 8 32, CUDA if present
    python benchmarks/benchmark.py --image-size 256 --batches 1 4 8   # what a 2-core CPU can do

Full-size SD 2.1 UNet + VAE and the full IconMatting head with random weights (same
architecture and cost as the real ones; no download). Prints per batch of targets, one reference:
  * per-target time of match + decode (best of --repeats), and its ratio to the floor: one bare UNet forward over the
    ensemble copies + one VAE encode of the same size (what any SD-feature method must pay);
  * the saving from reusing the reference context: the per-target time if the reference were
    encoded again for every target, over the time with the context reused;
  * peak memory (CUDA: max allocated; CPU: peak resident set above the start) per batch size,
    which must stay flat because targets are processed in chunks;
  * how close each stage of a target (VAE encode, UNet pass, matching, head) comes to the machine: its
    FLOPs, seconds, achieved GFLOP/s and fraction of the device's own matmul rate measured in the same
    run (benchmarks/machine_rate.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iconmatting_core.config import IconMattingConfig, load_sd_config  # noqa: E402
from iconmatting_core.matting_head import IconMattingHead  # noqa: E402
from iconmatting_core.pipeline import IconMattingPipeline, build_model, resolve_device  # noqa: E402
from iconmatting_core.precision import resolve_dtype  # noqa: E402
from iconmatting_core.sd_loading import SDComponents  # noqa: E402

from comfy_bench_script import PeakMemory  # noqa: E402  (benchmarks/: one memory meter for every benchmark)
from machine_rate import GemmRates, TargetStages, stage_table  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(image_size: int, ensemble: int, device, dtype) -> IconMattingPipeline:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = IconMattingConfig(image_size=image_size, ensemble_size=ensemble)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(load_sd_config("unet"))
    vae = AutoencoderKL.from_config(load_sd_config("vae"))
    prompt = torch.randn(1, 77, unet.config.cross_attention_dim)
    model = build_model(SDComponents(unet, vae, prompt), IconMattingHead(config))
    return IconMattingPipeline(model.to(device=device, dtype=dtype))


@torch.no_grad()
def floor_time(pipe: IconMattingPipeline, repeats: int) -> float:
    """One bare UNet forward over the ensemble copies + one VAE encode (no recording, no head)."""
    ext = pipe.model.extractor
    cfg = pipe.config
    x = torch.rand(1, 3, cfg.image_size, cfg.image_size, device=ext.device, dtype=ext.dtype) * 2 - 1
    lat = torch.randn(cfg.ensemble_size, 4, cfg.image_size // 8, cfg.image_size // 8, device=ext.device, dtype=ext.dtype)
    cond = ext.empty_prompt_embedding.to(ext.device, ext.dtype).expand(cfg.ensemble_size, -1, -1)
    times = []
    for _ in range(repeats + 1):  # the whole UNet, as a plain SD forward: the extractor's hooks act only in its own passes
        _sync(ext.device)
        t = time.perf_counter()
        ext.vae.encode(x)
        ext.unet(lat, cfg.timestep, encoder_hidden_states=cond)
        _sync(ext.device)
        times.append(time.perf_counter() - t)
    return min(times[1:])  # first run warms up


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--ensemble", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--chunk-size", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.set_grad_enabled(False)
    pipe = build(args.image_size, args.ensemble, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"IconMatting benchmark: {name}, {dtype}, {args.image_size}px, ensemble {args.ensemble}, chunk {args.chunk_size}")
    print(f"torch {torch.__version__}; full-size SD 2.1 UNet/VAE and head with random weights")

    s = args.image_size
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(s, s, 3, generator=gen)
    mask = torch.zeros(s, s)
    mask[s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1

    rates = GemmRates(device, {dtype})
    floor = floor_time(pipe, args.repeats)
    pipe.encode_reference(ref, mask)  # warm-up
    _sync(device)
    t = time.perf_counter()
    context = pipe.encode_reference(ref, mask)
    _sync(device)
    encode = time.perf_counter() - t
    pipe.matte(context, torch.rand(1, s, s, 3, generator=gen))  # warm-up

    print(f"floor (UNet forward x{args.ensemble} + VAE encode): {floor:.3f} s; reference encode: {encode:.3f} s")
    best_per_target = float("inf")
    print(f"{'targets':>8} {'s/target':>9} {'/floor':>7} {'recompute/reuse':>16} {'peak MB':>9}")
    for n in args.batches:
        targets = torch.rand(n, s, s, 3, generator=gen)
        per_target = float("inf")
        with PeakMemory(device) as mem:
            for _ in range(args.repeats):  # best of the repeats, like the floor and the stages
                _sync(device)
                t = time.perf_counter()
                pipe.matte(context, targets, chunk_size=args.chunk_size)
                _sync(device)
                per_target = min(per_target, (time.perf_counter() - t) / n)
        saving = (per_target + encode) / per_target
        print(f"{n:>8} {per_target:>9.3f} {per_target / floor:>7.2f} {saving:>16.2f} {mem.extra / 2**20:>9.0f}")
        best_per_target = min(best_per_target, per_target)

    stages = TargetStages(pipe, context, torch.rand(s, s, 3, generator=gen))
    for _ in range(args.repeats):
        stages.time_once()
    rates.measure_end()
    gemm = rates[dtype]
    print(f"per target, stage by stage (best of {args.repeats}); GEMM: {rates.describe(dtype)}")
    print(stage_table({"diffusers": stages.summary(gemm, best_per_target)}, {"diffusers": gemm}))


if __name__ == "__main__":
    main()
