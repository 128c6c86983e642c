"""The tiny SD 2.x single file that ComfyUI's stock checkpoint loader also loads, for tests and benchmarks.

Not part of the library (see ``tiny_models``). ComfyUI recognises SD 2.x by key shapes and builds its modules
with fixed assumptions: 32-group norms and 64-channel attention heads in the UNet, one fixed VAE architecture,
a fixed json config for the text encoder. The tiny UNet keeps those (64/64/128/128 channels, 1/1/2/2 heads),
the VAE is SD's real one, and the text encoder is ``TINY_TEXT`` (its hidden size is the UNet's context_dim).
ComfyUI needs a model class with these sizes registered: tests/support/comfy_tiny_sd2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch

from iconmatting_core.config import load_sd_config
from ldm_keys import ldm_unet_state_dict, ldm_vae_state_dict
from tiny_models import TINY_IMAGE_SIZE, TINY_TEXT, tiny_open_clip_text_state_dict


def tiny_comfy_unet_config() -> dict:
    """Diffusers config of the UNet in :func:`save_tiny_comfy_sd2_checkpoint`: SD 2.1's with smaller sizes."""
    cfg = load_sd_config("unet")
    cfg.update(block_out_channels=[64, 64, 128, 128], attention_head_dim=[1, 1, 2, 2],
               cross_attention_dim=TINY_TEXT["hidden_size"], sample_size=TINY_IMAGE_SIZE // 8)
    return cfg


def tiny_comfy_vae_config() -> dict:
    """The VAE of :func:`save_tiny_comfy_sd2_checkpoint` is SD's real one (ComfyUI builds only that)."""
    return load_sd_config("vae")


def small_comfy_vae_configs() -> Tuple[dict, dict]:
    """A small SD-style VAE, (diffusers config, ComfyUI ``comfy.sd.VAE`` config): 32/32/64/64 channels, one
    resnet per level (ComfyUI's VAE blocks use 32-group norms, so 32 channels is the least). ComfyUI's checkpoint
    loader detects only the real VAE's sizes, so ComfyUI builds this one from its config
    (``comfy.sd.VAE(sd=..., config=...)``, as its loaders of other VAE families do); for benchmark smoke runs,
    where the real VAE in bfloat16 takes minutes per encode on a CPU without bfloat16 arithmetic."""
    cfg = load_sd_config("vae")
    channels = [32, 32, 64, 64]
    cfg.update(block_out_channels=channels, layers_per_block=1, norm_num_groups=32, sample_size=TINY_IMAGE_SIZE)
    ddconfig = {"double_z": True, "z_channels": cfg["latent_channels"], "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": channels[0], "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": 1,
                "attn_resolutions": [], "dropout": 0.0}
    return cfg, {"params": {"ddconfig": ddconfig, "embed_dim": cfg["latent_channels"]}}


def tiny_comfy_text_encoder_config() -> dict:
    """Our core's text encoder config for it; like the shipped SD 2.1 one, ``num_hidden_layers`` counts
    the layers used (the file holds one more, which SD 2.x skips)."""
    cfg = load_sd_config("text_encoder")
    sizes = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
    cfg.update({k: TINY_TEXT[k] for k in sizes})
    return cfg


def tiny_comfy_clip_sizes() -> dict:
    """The keys of ComfyUI's ``sd2_clip_config.json`` that differ for the tiny text encoder; like the
    real one (24), ``num_hidden_layers`` counts every block in the file."""
    return dict(hidden_size=TINY_TEXT["hidden_size"], intermediate_size=TINY_TEXT["intermediate_size"],
                num_attention_heads=TINY_TEXT["num_attention_heads"],
                num_hidden_layers=TINY_TEXT["num_hidden_layers"] + 1, projection_dim=TINY_TEXT["hidden_size"])


def tiny_comfy_sd2_configs() -> dict:
    """``load_sd_components`` keyword arguments for a file from :func:`save_tiny_comfy_sd2_checkpoint`."""
    return dict(unet_config=tiny_comfy_unet_config(), vae_config=tiny_comfy_vae_config(),
                text_encoder_config=tiny_comfy_text_encoder_config())


def _fan_in_random(shapes: Dict[str, torch.Size], gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Random weights that keep activations of order 1 through a deep net: weights ~ N(0, 1/fan_in),
    norm scales 1 + N(0, 0.1^2), biases N(0, 0.2^2)."""
    out = {}
    for name, shape in shapes.items():
        if len(shape) >= 2:
            out[name] = torch.randn(shape, generator=gen) / (shape.numel() // shape[0]) ** 0.5
        elif name.endswith("weight"):  # every 1-d weight is a norm's scale
            out[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.2 * torch.randn(shape, generator=gen)
    return out


def save_tiny_comfy_sd2_checkpoint(path, seed: int = 0) -> Path:
    """Write a random-weight SD 2.x single file (original key layout) loadable by both ComfyUI's
    CheckpointLoaderSimple (with tests/support/comfy_tiny_sd2 registered) and ``load_sd_components(path,
    **tiny_comfy_sd2_configs())``; return ``path``.

    UNet (``model.diffusion_model.*``, float32): :func:`tiny_comfy_unet_config`; its transformer norm
    biases have std 0.2, so ComfyUI's SD 2.x check calls it a v-prediction model like SD 2.1 768.
    VAE (``first_stage_model.*``, float16 to halve the file, ~84M weights): SD's real architecture.
    Text encoder (``cond_stage_model.model.*``, open_clip layout): :func:`tiny_open_clip_text_state_dict`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    unet_config, vae_config = tiny_comfy_unet_config(), tiny_comfy_vae_config()
    with torch.device("meta"):  # shapes only; the weights are drawn below
        unet_shapes = {k: v.shape for k, v in UNet2DConditionModel.from_config(unet_config).state_dict().items()}
        vae_shapes = {k: v.shape for k, v in AutoencoderKL.from_config(vae_config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = ldm_unet_state_dict(_fan_in_random(unet_shapes, gen), unet_config)
    state.update({k: v.half() for k, v in ldm_vae_state_dict(_fan_in_random(vae_shapes, gen), vae_config).items()})
    state.update(tiny_open_clip_text_state_dict(seed))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
