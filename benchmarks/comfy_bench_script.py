"""Runs inside a booted ComfyUI (``run_comfy(..., scripts=[...])``): IconMatting's native path (the pack on
ComfyUI's own SD 2.1 objects) against the core's diffusers path, full-size SD 2.1 with random weights (or, with
``model_size`` "tiny", the same layouts with tiny channel counts: a smoke run of every step).

Used by benchmarks/benchmark_native.py (CPU, fp32, interleaved timing) and benchmarks/benchmark_gpu.py
(the host's GPU, fp16 and fp32). args: image_size, ensemble, targets, repeats, dtypes (["fp32", ...]),
work (a scratch folder), measure ("both", default; "time": no memory figures; "memory": only one target's
pass per path, no floor or timing), model_size ("full", default; "tiny": the UNet of
tests/support/tiny_sd2_checkpoint.py, which ComfyUI knows once tests/support/comfy_tiny_sd2 is loaded, its small
VAE and a tiny head). Returns, per dtype and path: floor (s: one VAE encode + one whole UNet forward over
the ensemble copies, on that path's modules), per_target (s, match + decode), extra_peak_bytes (a target's
pass: peak minus memory before it; max_memory_allocated on CUDA, process RSS sampled every ms on the CPU),
stages (a target's stages against the device's matmul rate ``gemm_flops``, benchmarks/machine_rate.py), alphas
compared between paths and between dtypes.
"""
import gc
import importlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # benchmarks/: machine_rate.py
    sys.path.append(str(Path(__file__).resolve().parent))


def _pack(suffix):
    name = next(n for n in list(sys.modules) if n.endswith(".nodes.host_model"))
    return importlib.import_module(name[: -len(".nodes.host_model")] + suffix)


def _test_helper(name):
    """A module of tests/support (``ldm_keys``: diffusers -> single-file key names; the tiny models): test helpers,
    not part of the pack, imported from this repository (its root and tests/support appended to ``sys.path``, so
    ComfyUI's own modules keep precedence)."""
    for path in (str(ROOT), str(ROOT / "tests" / "support")):
        if path not in sys.path:
            sys.path.append(path)
    return importlib.import_module(name)


def _models(cfgmod, size, ens, model_size):
    """(UNet config, VAE config, ComfyUI VAE config or None, head config): SD 2.1's and the authors' sizes, or
    ``model_size`` "tiny": the tiny layouts (ComfyUI builds the small VAE from its config)."""
    if model_size == "full":
        config = cfgmod.IconMattingConfig(image_size=size, ensemble_size=ens)
        return cfgmod.load_sd_config("unet"), cfgmod.load_sd_config("vae"), None, config
    tiny_sd2, tiny_models = _test_helper("tiny_sd2_checkpoint"), _test_helper("tiny_models")
    vae_cfg, comfy_vae = tiny_sd2.small_comfy_vae_configs()
    config = tiny_models.tiny_config(image_size=size, ensemble_size=ens, unet_feature_channels=(128, 128))
    return tiny_sd2.tiny_comfy_unet_config(), vae_cfg, comfy_vae, config


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _kernel_peak_rss() -> Optional[int]:
    """The kernel's high-water mark of this process's resident set (Linux ``VmHWM``), None where there is none."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def _reset_kernel_peak_rss() -> bool:
    """Set the high-water mark back to the resident set now (``/proc/self/clear_refs``, Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _kernel_peak_rss() is not None
    except OSError:
        return False


class PeakMemory:
    """Extra peak memory of a block: CUDA max_memory_allocated; on the CPU the process's peak resident set, from
    the kernel's high-water mark where it can be reset (Linux), else sampled every ms by a thread.

    Not the sampling thread where the kernel keeps the peak: a thread that wakes a thousand times a second takes
    the cores from the OpenMP threads of the work being timed in the same block (measured at 768 px on 2 cores:
    a whole matte() 67.2 s inside it against 62.7 s for its stages timed outside)."""

    def __init__(self, device: torch.device):
        self.device, self.extra = device, 0

    def __enter__(self):
        gc.collect()
        self.thread = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = _rss()
            if not _reset_kernel_peak_rss():
                self.running = True
                self.thread = threading.Thread(target=self._sample, daemon=True)
                self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.thread is not None:
            self.running = False
            self.thread.join()
            self.extra = max(self.peak, _rss()) - self.base
        else:
            self.extra = max(_kernel_peak_rss() or 0, _rss()) - self.base
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_diff(a, b):
    return max(float((p.float() - q.float()).abs().max()) for p, q in zip(a, b))


def run(ctx):
    import comfy.model_management as mm
    from comfy.ldm.modules import attention as comfy_attention
    from diffusers import AutoencoderKL, UNet2DConditionModel

    native_features = _pack(".nodes.native_features")
    cfgmod, checkpoint, head_mod = (_pack(".iconmatting_core." + m) for m in ("config", "checkpoint", "matting_head"))
    ldm_keys = _test_helper("ldm_keys")
    a = ctx.args
    size, ens, n = a["image_size"], a["ensemble"], a["targets"]
    unet_cfg, vae_cfg, comfy_vae, config = _models(cfgmod, size, ens, a.get("model_size", "full"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_cfg).eval()
    vae = AutoencoderKL.from_config(vae_cfg).eval()
    # the single-file layout over the same UNet tensors (the converter copies; it renames meta tensors here)
    weights = unet.state_dict()
    keys = list(ldm_keys.ldm_unet_state_dict({k: v.to("meta") for k, v in weights.items()}, unet_cfg))
    assert len(keys) == len(weights)
    sd = dict(zip(keys, weights.values()))
    sd.update(ldm_keys.ldm_vae_state_dict(vae.state_dict(), vae_cfg))
    prompt = torch.randn(1, 77, unet_cfg["cross_attention_dim"])
    head_path = a["work"] + "/head.safetensors"
    checkpoint.save_head(head_mod.IconMattingHead(config), head_path, prompt)
    device = mm.get_torch_device()
    out = {"device": str(device), "torch": torch.__version__, "model_size": a.get("model_size", "full"),
           "host_attention": native_features.attention_name(
        comfy_attention.optimized_attention), "feature_attention": native_features.attention_name(
        native_features.feature_attention(device)), "runs": {}}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)

    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(size, size, 3, generator=gen)
    mask = torch.zeros(size, size)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    targets = torch.rand(n, size, size, 3, generator=gen)
    x = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    lat = torch.randn(ens, 4, size // 8, size // 8, generator=gen)
    alphas = {}
    inputs = (ref, mask, targets, x, lat, prompt, head_path, comfy_vae)
    for dtype_name in a["dtypes"]:
        out["runs"][dtype_name] = _run_dtype(dtype_name, unet, vae, sd, inputs, a, device, alphas)
        mm.unload_all_models()
        mm.soft_empty_cache()
        gc.collect()
    for half in ("fp16", "bf16"):
        if half in a["dtypes"] and "fp32" in a["dtypes"]:
            out[half + "_vs_fp32_alpha_max_diff"] = {p: _max_diff(alphas[(p, half)], alphas[(p, "fp32")])
                                                     for p in ("native", "diffusers")}
    out["process_peak_rss_bytes"] = _peak_rss()
    return out


def _copy_to(module, device, dtype):
    """The module itself when already there; else a copy built tensor by tensor (never a second fp32 copy in RAM)."""
    p = next(module.parameters())
    if p.device == device and p.dtype == dtype:
        return module
    with torch.device("meta"):
        twin = type(module).from_config(module.config)
    twin.load_state_dict({k: v.to(device, dtype) for k, v in module.state_dict().items()}, assign=True)
    return twin.eval()


def _run_dtype(dtype_name, unet, vae, sd, inputs, a, device, alphas):
    """Both paths in one dtype: builds them, times them interleaved, measures a target's pass; frees them on return."""
    import comfy.sd
    import machine_rate

    host = _pack(".nodes.host_model")
    pipeline, checkpoint, sd_loading, precision = (_pack(".iconmatting_core." + m)
                                                   for m in ("pipeline", "checkpoint", "sd_loading", "precision"))
    ref, mask, targets, x, lat, prompt, head_path, comfy_vae = inputs
    ens, n, repeats, measure = a["ensemble"], a["targets"], a["repeats"], a.get("measure", "both")
    dtype = precision.DTYPES[dtype_name]
    model, _, cvae = comfy.sd.load_state_dict_guess_config(dict(sd), output_vae=comfy_vae is None, output_clip=False,
                                                           model_options={"dtype": dtype})[:3]
    if comfy_vae is not None:  # the small VAE: ComfyUI's loader detects only the real one's sizes
        cvae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")},
                            config=comfy_vae)
    native = host.load_on_host(model, None, cvae, head_path, dtype_name)
    sdc = sd_loading.SDComponents(_copy_to(unet, device, dtype), _copy_to(vae, device, dtype), prompt)
    reference = pipeline.IconMattingPipeline(
        pipeline.build_model(sdc, checkpoint.load_head(head_path)[0]).to(device=device, dtype=dtype))
    del sdc
    ext_n, ext_d = native.extractor, reference.model.extractor
    run = {"native_unet_dtype": str(ext_n.dtype), "native_vae_dtype": str(cvae.vae_dtype), "diffusers_dtype": str(dtype)}
    if measure != "memory":  # the yardstick of each path's stages: the matmul rate in the dtype it computes in
        gemm_size = 512 if a.get("model_size", "full") == "tiny" else None
        rates = machine_rate.GemmRates(device, {ext_n.dtype, dtype}, size=gemm_size)

    def floor_native():
        ext_n.load_all(ext_n.pass_bytes(ens, False))
        _sync(device)
        t = time.perf_counter()
        ext_n.posterior(x)
        ext_n.patcher.model.diffusion_model(lat.to(device, ext_n.dtype), torch.full((ens,), 200.0, device=device),
                                            context=prompt.expand(ens, -1, -1).to(device, ext_n.dtype))
        _sync(device)
        return time.perf_counter() - t

    def floor_diffusers():  # the whole UNet, as a plain SD forward: the extractor's hooks act only in its own passes
        _sync(device)
        t = time.perf_counter()
        ext_d.posterior(x)
        ext_d.unet(lat.to(device, dtype), 200, encoder_hidden_states=prompt.expand(ens, -1, -1).to(device, dtype))
        _sync(device)
        return time.perf_counter() - t

    with torch.no_grad():
        paths = {"native": (floor_native, native.pipeline), "diffusers": (floor_diffusers, lambda: reference)}
        contexts, stages = {}, {}
        for name, (floor, get_pipe) in paths.items():  # warm-up, and the reference encoded once per path
            if measure != "memory":
                floor()
            pipe = get_pipe()
            contexts[name] = pipe.encode_reference(ref, mask)
            with PeakMemory(device) as peak:  # one target's pass, alone
                result = pipe.matte(contexts[name], targets[:1])
            run[name] = {} if measure == "time" else {"extra_peak_bytes": peak.extra}
            alphas[(name, dtype_name)] = [t_.float().cpu() for t_ in result]
            if measure != "memory":  # FLOPs counted, stages warmed up
                stages[name] = machine_rate.TargetStages(pipe, contexts[name], targets[0])
        # interleaved, so that a busy machine slows both paths alike, each path first in every other repeat; the
        # floors in their own rounds, so that no timed matte follows the other path's floor (its allocations)
        order = [name for repeat in range(repeats if measure != "memory" else 0)
                 for name in list(paths)[:: 1 if repeat % 2 == 0 else -1]]
        for name in order:
            f = paths[name][0]()
            run[name]["floor"] = min(run[name].get("floor", f), f)
        for name in order:
            stages[name].time_once()
        for name in order:
            pipe = paths[name][1]()
            _sync(device)
            t = time.perf_counter()
            result = pipe.matte(contexts[name], targets)
            _sync(device)
            per_target = (time.perf_counter() - t) / n
            run[name]["per_target"] = min(run[name].get("per_target", per_target), per_target)
            alphas[(name, dtype_name)] = [t_.float().cpu() for t_ in result]
        if measure != "memory":
            rates.measure_end()
            run["gemm_flops"] = {"native": rates[ext_n.dtype], "diffusers": rates[dtype]}
            run["gemm"] = {"native": rates.describe(ext_n.dtype), "diffusers": rates.describe(dtype)}
            run["gemm_measured"] = {"native": rates.measured(ext_n.dtype), "diffusers": rates.measured(dtype)}
        for name in paths:
            if measure != "memory":
                run[name]["targets_per_s"] = 1.0 / run[name]["per_target"]
                run[name]["stages"] = stages[name].summary(run["gemm_flops"][name], run[name]["per_target"])
    run["alpha_max_diff"] = _max_diff(alphas[("native", dtype_name)], alphas[("diffusers", dtype_name)])
    return run


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        return 0
