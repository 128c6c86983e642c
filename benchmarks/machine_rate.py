"""How close IconMatting's stages come to the machine (not a test): the one home of this measuring, used by
benchmark.py, benchmark_native.py (through comfy_bench_script.py, inside ComfyUI) and benchmark_gpu.py.

* :func:`gemm_rate`: the device's own dense matrix-multiply rate in a dtype, measured in the same run (a square
  matmul large enough to saturate it, best of N), the yardstick: convolutions, linear layers and attention are
  that kind of work, so a stage's achieved FLOP/s over this rate says how much of the machine it uses.
* :class:`TargetStages`: one target's work split into the stages a target pays for -- VAE encode, the UNet pass up
  to its early stop, matching, the matting head -- each a call on the pipeline's own objects (either path: the
  core's diffusers modules or ComfyUI's). The first run of each stage, under ``FlopCounterMode``, counts its FLOPs
  (matmul, convolution and attention; norms and pointwise work are not counted, so the fractions slightly
  understate the work done) and warms it up; :meth:`TargetStages.time_once` times every stage once and keeps the
  best, so two paths' stages can be timed interleaved on a busy machine.
* :func:`stage_table`: the printed table -- per stage seconds, GFLOP, achieved GFLOP/s and its fraction of the
  GEMM rate.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

STAGES = ("vae", "unet", "matching", "head")
#: matmul side per device type: large enough to run at the device's full rate (on a 2-core CPU 2048 is
#: ~15% below 4096)
GEMM_SIZE = {"cpu": 4096, "cuda": 8192}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5,
              size: Optional[int] = None) -> float:
    """FLOP/s of a square matmul in ``dtype`` on ``device``, best of ``repeats`` after one warm-up. On a CPU a
    half dtype is measured at half the side: without native instructions it runs many times slower."""
    n = size or GEMM_SIZE.get(device.type, 4096)
    if device.type == "cpu" and dtype != torch.float32 and size is None:
        n //= 2
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            sync(device)
            t = time.perf_counter()
            torch.matmul(a, b)
            sync(device)
            if i:
                best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class GemmRates:
    """The device's matmul rate per dtype, measured at the start of a run and again at its end (:func:`gemm_rate`
    each time); the yardstick is the higher of the two. The rate of a shared or throttling machine drifts over a
    long run (on this project's 2-core machine 153 to 180 GFLOP/s in fp32 between runs 20 minutes apart), and one
    measurement taken in a slow minute makes every stage look closer to the machine than it is; the higher one
    gives the fractions as lower bounds, and both are printed so the drift is seen."""

    def __init__(self, device: torch.device, dtypes, size: Optional[int] = None):
        self.device, self.size = device, size
        self.start = {d: gemm_rate(device, d, size=size) for d in dtypes}
        self.end: Dict[torch.dtype, float] = {}

    def measure_end(self) -> None:
        self.end = {d: gemm_rate(self.device, d, size=self.size) for d in self.start}

    def __getitem__(self, dtype: torch.dtype) -> float:
        return max(self.start[dtype], self.end.get(dtype, 0.0))

    def measured(self, dtype: torch.dtype) -> list:
        """[at the start, at the end (None before it is measured)] in FLOP/s."""
        return [self.start[dtype], self.end.get(dtype)]

    def describe(self, dtype: torch.dtype) -> str:
        end = f"{self.end[dtype] / 1e9:.1f}" if dtype in self.end else "not measured"
        return f"{dtype} matmul best of 5, at the start {self.start[dtype] / 1e9:.1f} and at the end {end} GFLOP/s: the higher"


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Scaled-dot-product attention [..., Tq, D] x [..., Tk, D]: scores and the weighted sum, 2 FLOPs per
    multiply-add each (FlopCounterMode has formulas for the GPU kernels, not for the CPU one)."""
    *batch, tq, d = query
    tk, dv = key[-2], value[-1]
    heads = 1
    for s in batch:
        heads *= s
    return 2 * heads * tq * tk * d + 2 * heads * tq * tk * dv


def _custom_flops() -> dict:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _sdpa_flops}


def count_flops(fn: Callable):
    """(fn(), its FLOPs) with ``fn`` run once under FlopCounterMode."""
    with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
        out = fn()
    return out, counter.get_total_flops()


class TargetStages:
    """One target's stages on ``pipe`` (an IconMattingPipeline of either path) with a reference ``context``.

    The pipeline's and the extractor's own modules supply the target preparation, the matching and the features'
    type (looked up from their classes, so that inside ComfyUI these are the pack's own copies, not a second import
    of the core)."""

    def __init__(self, pipe, context, image: torch.Tensor):
        module = sys.modules[type(pipe).__module__]
        ext, head = pipe.model.extractor, pipe.model.head
        features = sys.modules[next(c for c in type(ext).__mro__ if c.__name__ == "FeatureExtractor").__module__]
        self.device, self.dtype = pipe.model.device, ext.dtype
        batch, placements = module._prepare([image], pipe.config.image_size, "pad")
        x = batch.to(self.device)
        copies = pipe.config.ensemble_size
        holder = {}

        def vae():
            holder["latents"] = ext.noisy_latents(x, context.seed)

        def unet():
            ext.recorder.reset(1, copies)
            try:
                cond = ext.empty_prompt_embedding.expand(copies, -1, -1)
                ups = ext.unet_up_features(holder["latents"], cond, True)
                ups = tuple(u.float().view(1, copies, *u.shape[1:]).mean(dim=1) for u in ups)
                holder["features"] = features.ImageFeatures(up_features=ups, attention=ext.recorder.maps())
            finally:
                ext.recorder.reset(0, 1)

        def matching():
            holder["fused"] = module.match_features(head, context.tokens.to(self.device), holder["features"],
                                                    valid=placements)[0]

        def decode():
            head.detail(holder["fused"].to(self.device, pipe.model.dtype), x.to(pipe.model.dtype))

        self.calls = dict(zip(STAGES, (vae, unet, matching, decode)))
        self.flops: Dict[str, int] = {}
        self.seconds: Dict[str, float] = {}
        with torch.no_grad():
            for name, call in self.calls.items():  # counted once, and warmed up
                self.flops[name] = count_flops(call)[1]

    @torch.no_grad()
    def time_once(self) -> None:
        """Times every stage once (in order: each feeds the next), keeping each one's best."""
        for name, call in self.calls.items():
            sync(self.device)
            t = time.perf_counter()
            call()
            sync(self.device)
            took = time.perf_counter() - t
            self.seconds[name] = min(self.seconds.get(name, took), took)

    def summary(self, gemm: float, per_target: Optional[float] = None) -> dict:
        """{stage: {"gflop", "s", "gflops", "of_gemm"}} plus "stages" (their sum) and, given the timed
        per-target time of a whole matte, "matte" (all stages' FLOPs over that time)."""
        rows = {name: (self.flops[name], self.seconds[name]) for name in STAGES}
        rows["stages"] = (sum(self.flops.values()), sum(self.seconds.values()))
        if per_target is not None:
            rows["matte"] = (rows["stages"][0], per_target)
        return {name: {"gflop": f / 1e9, "s": s, "gflops": f / s / 1e9, "of_gemm": f / s / gemm}
                for name, (f, s) in rows.items()}


def stage_table(summaries: Dict[str, dict], gemm: Dict[str, float]) -> str:
    """The per-stage table of one or more paths: {path: TargetStages.summary(...)}, {path: its GEMM FLOP/s}."""
    lines = [f"{'path':>10} {'stage':>9} {'GFLOP':>8} {'s':>8} {'GFLOP/s':>8} {'of GEMM':>8}"]
    for path, summary in summaries.items():
        for name, r in summary.items():
            lines.append(f"{path:>10} {name:>9} {r['gflop']:>8.1f} {r['s']:>8.3f} {r['gflops']:>8.1f} "
                         f"{r['of_gemm']:>8.0%}")
        lines.append(f"{path:>10} {'GEMM':>9} {'':>8} {'':>8} {gemm[path] / 1e9:>8.1f} {1:>8.0%}")
    return "\n".join(lines)
