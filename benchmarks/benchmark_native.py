"""IconMatting on ComfyUI's own SD 2.1 objects vs the core's diffusers path, side by side in one run (not a test).

    python benchmarks/benchmark_native.py --image-size 384 --targets 2     # what a 2-core CPU can do

Boots the test ComfyUI (0.3.75, from tests/comfy_harness.py) and, inside it, builds a full-size SD 2.1
UNet + VAE with random weights once, loaded twice: by ComfyUI (from the original single-file key layout,
through its own model detection and patcher) and by diffusers, plus one full-size head. Prints per path:
the floor (one bare UNet forward over the ensemble copies + one VAE encode, on that path's own modules),
the per-target time of match + decode, its ratio to the floor, and native / diffusers per-target.
The test harness starts ComfyUI with --cpu; GPU figures for the diffusers path: benchmarks/benchmark.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SCRIPT = '''
import sys, time, importlib
import torch

def _sync(d):
    if d.type == "cuda":
        torch.cuda.synchronize()

def run(ctx):
    import comfy.model_management as mm
    import comfy.sd
    pkg = next(n[: -len(".nodes.host_model")] for n in list(sys.modules) if n.endswith(".nodes.host_model"))
    host = importlib.import_module(pkg + ".nodes.host_model")
    core = lambda m: importlib.import_module(pkg + ".iconmatting_core." + m)
    cfgmod, testing, pipeline, checkpoint, head_mod, sd_loading = (core(m) for m in
        ("config", "testing", "pipeline", "checkpoint", "matting_head", "sd_loading"))
    from diffusers import AutoencoderKL, UNet2DConditionModel
    a = ctx.args
    size, ens, n, repeats = a["image_size"], a["ensemble"], a["targets"], a["repeats"]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a["dtype"]]
    config = cfgmod.IconMattingConfig(image_size=size, ensemble_size=ens)
    torch.manual_seed(0)
    unet_cfg, vae_cfg = cfgmod.load_sd_config("unet"), cfgmod.load_sd_config("vae")
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(vae_cfg)
    sd = testing.ldm_unet_state_dict(unet.state_dict(), unet_cfg)
    sd.update(testing.ldm_vae_state_dict(vae.state_dict(), vae_cfg))
    model, _, cvae = comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=False)[:3]
    del sd
    prompt = torch.randn(1, 77, 1024)
    head = head_mod.IconMattingHead(config)
    head_path = a["work"] + "/head.safetensors"
    checkpoint.save_head(head, head_path, prompt)
    native = host.IconMattingOnHost(model, None, cvae, head_path, a["dtype"])
    device = native.model.device
    reference = pipeline.IconMattingPipeline(pipeline.build_model(sd_loading.SDComponents(unet, vae, prompt), head)
                                             .to(device=device, dtype=dtype))

    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(size, size, 3, generator=gen)
    mask = torch.zeros(size, size)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    targets = torch.rand(n, size, size, 3, generator=gen)
    x = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    lat = torch.randn(ens, 4, size // 8, size // 8, generator=gen)
    from comfy.ldm.modules import attention as comfy_attention
    out = {"device": str(device), "dtype": str(dtype), "host_attention": comfy_attention.optimized_attention.__name__}

    def floor_native():
        ext = native.extractor
        ext.load_all(0)
        base = ext.patcher.model
        _sync(device); t = time.perf_counter()
        ext.posterior(x)
        base.diffusion_model(lat.to(device, ext.dtype), torch.full((ens,), 200.0, device=device),
                             context=prompt.expand(ens, -1, -1).to(device, ext.dtype))
        _sync(device)
        return time.perf_counter() - t

    def floor_diffusers():
        ext = reference.model.extractor
        ext._stop_after = 99  # the whole UNet, as a plain SD forward
        try:
            _sync(device); t = time.perf_counter()
            ext.posterior(x)
            ext.unet(lat.to(device, dtype), 200, encoder_hidden_states=prompt.expand(ens, -1, -1).to(device, dtype))
            _sync(device)
            return time.perf_counter() - t
        finally:
            ext._stop_after = 2

    with torch.no_grad():
        paths = {"native": (floor_native, native.pipeline), "diffusers": (floor_diffusers, lambda: reference)}
        contexts, results = {}, {}
        for name, (floor, get_pipe) in paths.items():  # warm-up, and the reference encoded once per path
            floor()
            pipe = get_pipe()
            contexts[name] = pipe.encode_reference(ref, mask)
            pipe.matte(contexts[name], targets[:1])
        for _ in range(repeats):  # interleaved, so that a busy machine slows both paths alike
            for name, (floor, get_pipe) in paths.items():
                f = floor()
                pipe = get_pipe()
                _sync(device); t = time.perf_counter()
                alphas = pipe.matte(contexts[name], targets)
                _sync(device)
                per_target = (time.perf_counter() - t) / n
                best = results.get(name, {"floor": f, "per_target": per_target})
                results[name] = {"floor": min(best["floor"], f), "per_target": min(best["per_target"], per_target)}
                out[name + "_alpha"] = alphas
        out.update(results)
        out["alpha_max_diff"] = max(float((p - q).abs().max()) for p, q in zip(out.pop("native_alpha"), out.pop("diffusers_alpha")))
    return out
'''


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

    from comfy_harness import run_comfy

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "bench.py"
        script.write_text(SCRIPT)
        result = run_comfy(ROOT, [], pack_name="comfyui-iconmatting", timeout=3600, comfy_args=args.comfy_arg,
                           scripts=[{"path": str(script), "args": {"image_size": args.image_size, "ensemble": args.ensemble,
                                                                   "targets": args.targets, "repeats": args.repeats,
                                                                   "dtype": args.dtype, "work": tmp}}])
    entry = result["scripts"][0]
    if entry.get("error"):
        print(entry["error"], file=sys.stderr)
        return 1
    out = entry["result"]
    print(f"IconMatting native (ComfyUI {result.get('comfyui_version')} {' '.join(args.comfy_arg)}) vs diffusers: "
          f"{out['device']}, {out['dtype']}, {args.image_size}px, ensemble {args.ensemble}, {args.targets} targets, "
          f"host attention {out['host_attention']}")
    print(f"{'path':>10} {'floor s':>8} {'s/target':>9} {'/floor':>7}")
    for name in ("native", "diffusers"):
        r = out[name]
        print(f"{name:>10} {r['floor']:>8.2f} {r['per_target']:>9.2f} {r['per_target'] / r['floor']:>7.2f}")
    print(f"native / diffusers per target: {out['native']['per_target'] / out['diffusers']['per_target']:.2f}; "
          f"alpha max |native - diffusers|: {out['alpha_max_diff']:.2e}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
