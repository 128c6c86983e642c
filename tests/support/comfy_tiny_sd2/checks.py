"""In-process checks for tests/host/test_tiny_sd2.py: run inside a booted ComfyUI by ``run_comfy(...,
scripts=[{"path": this file, "args": {"checkpoint": NAME, "repo_root": ROOT}}])``.

The tiny SD 2.x file ``models/checkpoints/NAME`` is loaded twice: by ComfyUI's stock nodes in a real
prompt (Load Checkpoint -> CLIP Text Encode of "") and by our core's ``load_sd_components``. Returns
how ComfyUI loaded it and the max abs differences of UNet, VAE encoder and text conditioning.
"""
import sys

import torch

BATCH, LATENT, TIMESTEP = 2, 16, 200.0


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() - b.float()).abs().max().item()


def load_report(ctx, name: str) -> dict:
    """Load Checkpoint + CLIP Text Encode ("") as a prompt; what ComfyUI logged and built."""
    import comfy.model_detection
    import comfy.supported_models

    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}  # an output node, so it runs
    with ctx.capture_log() as log:
        entry = ctx.run_prompt(prompt)
    if not (entry["execution"] and entry["execution"]["success"]):
        raise RuntimeError(f"the Load Checkpoint prompt failed: {entry['validation']} {entry['execution']}")
    model, clip, vae = (slot[0] for slot in ctx.node_outputs("1"))
    tiny = comfy.supported_models.models[0]
    sd21 = {**tiny.unet_config, "context_dim": 1024, "model_channels": 320, "channel_mult": [1, 2, 4, 4]}
    return {
        "log": log,
        "model_config": type(model.model.model_config).__name__,
        "model_type": model.model.model_type.name,
        "unet_dtype": str(next(model.model.diffusion_model.parameters()).dtype),
        "clip_model": type(clip.cond_stage_model).__name__,
        "clip_dtypes": sorted({str(p.dtype) for p in clip.cond_stage_model.parameters()}),
        "vae_dtype": str(vae.vae_dtype),
        "sd21_config_matches": type(comfy.model_detection.model_config_from_unet_config(sd21)).__name__,
        "control_log": control_log(ctx, name),
    }, (model, clip, vae)


def control_log(ctx, name: str) -> list:
    """The log of a load that leaves the VAE and text encoder keys over: proves the log is captured."""
    import comfy.sd

    with ctx.capture_log() as log:
        comfy.sd.load_checkpoint_guess_config(str(ctx.models_dir / "checkpoints" / name), output_vae=False,
                                              output_clip=False)
    return [line[:300] for line in log]


@torch.no_grad()
def run(ctx) -> dict:
    for path in (ctx.args["repo_root"], ctx.args["repo_root"] + "/tests/support"):  # iconmatting_core, tiny_sd2_checkpoint
        if path not in sys.path:
            sys.path.append(path)
    from iconmatting_core.sd_loading import load_sd_components
    from tiny_sd2_checkpoint import tiny_comfy_sd2_configs

    name = ctx.args["checkpoint"]
    report, (model, clip, vae) = load_report(ctx, name)
    ours = load_sd_components(ctx.models_dir / "checkpoints" / name, **tiny_comfy_sd2_configs())
    gen = torch.Generator().manual_seed(0)

    # (b) UNet: ComfyUI's UNetModel(x, t, context) vs diffusers' UNet2DConditionModel.
    x = torch.randn(BATCH, 4, LATENT, LATENT, generator=gen)
    context = torch.randn(BATCH, 77, ours.empty_prompt_embedding.shape[-1], generator=gen)
    t = torch.full((BATCH,), TIMESTEP)
    comfy_eps = model.model.diffusion_model(x, timesteps=t, context=context)
    ours_eps = ours.unet(x, t, encoder_hidden_states=context).sample
    report["unet_max_diff"] = _max_diff(comfy_eps, ours_eps)
    report["unet_out_abs_max"] = ours_eps.abs().max().item()

    # (c) VAE encoder: moments of ComfyUI's encoder + quant_conv vs diffusers' latent_dist; and the
    # VAE Encode node's API (pixels in [0, 1], mode of the posterior) vs the diffusers mean.
    image = torch.rand(1, 64, 64, 3, generator=gen)
    pixels = image.movedim(-1, 1) * 2 - 1
    first_stage = vae.first_stage_model
    mean, logvar = first_stage.quant_conv(first_stage.encoder(pixels)).chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    dist = ours.vae.encode(pixels).latent_dist
    report["vae_mean_max_diff"] = _max_diff(mean, dist.mean)
    report["vae_std_max_diff"] = _max_diff(std, dist.std)
    report["vae_encode_max_diff"] = _max_diff(vae.encode(image), dist.mean)
    report["vae_mean_abs_max"] = dist.mean.abs().max().item()

    # (d) Text: ComfyUI's SD 2.x CLIP conditioning of "" vs the core's empty-prompt embedding.
    cond_api = clip.encode_from_tokens(clip.tokenize(""))
    cond_node = ctx.node_outputs("2")[0][0][0][0]
    report["clip_api_max_diff"] = _max_diff(cond_api, ours.empty_prompt_embedding)
    report["clip_node_max_diff"] = _max_diff(cond_node, ours.empty_prompt_embedding)
    report["clip_abs_max"] = ours.empty_prompt_embedding.abs().max().item()
    return report
