"""Diffusers -> original (LDM) single-file key layout for SD UNets and VAEs, for tests and benchmarks.

Not part of the library (see ``tiny_models``): the inverse of diffusers' ``convert_ldm_*_checkpoint``, used to
write single-file checkpoints from diffusers weights (``tiny_sd2_checkpoint``, benchmarks/comfy_bench_script.py).
"""
from __future__ import annotations

from typing import Dict

import torch

# Diffusers -> original (LDM) key layout. Each rule: (diffusers prefix, LDM prefix, renames of the
# first name(s) after the prefix).
_LDM_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_LDM_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_unet_rules(config: dict) -> list:
    n = config["layers_per_block"]
    rules = [("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
             ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
             ("mid_block.resnets.0.", "middle_block.0.", _LDM_UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", {}),
             ("mid_block.resnets.1.", "middle_block.2.", _LDM_UNET_RESNET)]
    for b in range(len(config["block_out_channels"])):
        for j in range(n):  # input block 0 is conv_in; then n (resnet, attention) pairs and a downsampler per level
            i = 1 + b * (n + 1) + j
            rules += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0.", _LDM_UNET_RESNET),
                      (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.", {})]
        rules.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{1 + b * (n + 1) + n}.0.op.", {}))
        for j in range(n + 1):  # n + 1 resnets per up level; the upsampler follows the last one's attention, if any
            i = b * (n + 1) + j
            rules += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0.", _LDM_UNET_RESNET),
                      (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.", {})]
        after = 2 if config["up_block_types"][b].startswith("CrossAttn") else 1
        rules.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{b * (n + 1) + n}.{after}.conv.", {}))
    return rules


def _ldm_vae_rules(config: dict) -> list:
    n, levels = config["layers_per_block"], len(config["block_out_channels"])
    rules = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in.", f"{part}.conv_in.", {}), (f"{part}.conv_out.", f"{part}.conv_out.", {}),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _LDM_VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _LDM_VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _LDM_VAE_ATTENTION)]
    for b in range(levels):
        up = levels - 1 - b  # the LDM decoder numbers its levels from full resolution down: reversed
        rules += [(f"encoder.down_blocks.{b}.resnets.{j}.", f"encoder.down.{b}.block.{j}.", _LDM_VAE_RESNET)
                  for j in range(n)]
        rules += [(f"decoder.up_blocks.{b}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _LDM_VAE_RESNET)
                  for j in range(n + 1)]
        rules += [(f"encoder.down_blocks.{b}.downsamplers.0.conv.", f"encoder.down.{b}.downsample.conv.", {}),
                  (f"decoder.up_blocks.{b}.upsamplers.0.conv.", f"decoder.up.{up}.upsample.conv.", {})]
    return rules


def _to_ldm(state: Dict[str, torch.Tensor], rules: list, prefix: str) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        matches = [rule for rule in rules if key.startswith(rule[0])]
        if len(matches) != 1:
            raise ValueError(f"{key}: {len(matches)} LDM conversion rules match (expected 1)")
        old_prefix, new_prefix, renames = matches[0]
        rest = key[len(old_prefix):]
        for old, new in renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
        if renames is _LDM_VAE_ATTENTION and value.ndim == 2:
            value = value[:, :, None, None]  # q/k/v/proj_out: diffusers' linear [C, C] is an LDM 1x1 conv [C, C, 1, 1]
        out[prefix + new_prefix + rest] = value.clone().contiguous()
    return out


def ldm_unet_state_dict(state: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in the single-file layout (``model.diffusion_model.*``);
    the inverse of diffusers' ``convert_ldm_unet_checkpoint`` for SD-style configs."""
    from iconmatting_core.sd_loading import UNET_PREFIX

    return _to_ldm(state, _ldm_unet_rules(config), UNET_PREFIX)


def ldm_vae_state_dict(state: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the single-file layout (``first_stage_model.*``)."""
    from iconmatting_core.sd_loading import VAE_PREFIX

    return _to_ldm(state, _ldm_vae_rules(config), VAE_PREFIX)
