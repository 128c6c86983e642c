"""Tiny random-weight IconMatting models with the real architecture and key layouts, for tests.

Nothing here is needed at inference; it lets tests and benchmarks build the whole model (UNet,
VAE, text encoder, head) with small channel counts and save it in every on-disk layout the
loaders accept.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from .checkpoint import ours_to_reference
from .config import IconMattingConfig, load_sd_config
from .matting_head import IconMattingHead

TINY_IMAGE_SIZE = 128


def tiny_unet_config() -> dict:
    cfg = load_sd_config("unet")
    cfg.update(block_out_channels=[32, 32, 64, 64], attention_head_dim=[1, 2, 2, 2], cross_attention_dim=32,
               norm_num_groups=8, sample_size=TINY_IMAGE_SIZE // 8)
    return cfg


def tiny_vae_config() -> dict:
    cfg = load_sd_config("vae")
    cfg.update(block_out_channels=[8, 8, 16, 16], norm_num_groups=4, layers_per_block=1, sample_size=TINY_IMAGE_SIZE)
    return cfg


TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, vocab_size=49408,
                 max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="gelu")


def tiny_config(**overrides) -> IconMattingConfig:
    cfg = dict(image_size=TINY_IMAGE_SIZE, ensemble_size=2, unet_feature_channels=(64, 64), attention_out_channels=8,
               fused_channels=(8, 8), detail_channels=(4, 4, 8), decoder_channels=(8, 8, 4, 4), alpha_head_channels=4)
    cfg.update(overrides)
    return IconMattingConfig(**cfg)


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct random values in every tensor (default init leaves norms at 1/0, hiding swapped keys)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
                elif name.endswith(("norm.weight", "ln.weight", "bn.weight")) or ".norm" in name and name.endswith("weight"):
                    t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
                else:
                    t.copy_(0.2 * torch.randn(t.shape, generator=gen))
    return module


def tiny_head(config: Optional[IconMattingConfig] = None, seed: int = 0) -> IconMattingHead:
    return randomise(IconMattingHead(config or tiny_config()), seed).eval()


def tiny_text_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random CLIP text weights in the transformers (diffusers folder) key layout."""
    gen = torch.Generator().manual_seed(seed)
    d, f, v, n = TINY_TEXT["hidden_size"], TINY_TEXT["intermediate_size"], TINY_TEXT["vocab_size"], TINY_TEXT["max_position_embeddings"]
    r = lambda *s: 0.2 * torch.randn(*s, generator=gen)  # noqa: E731
    sd = {"text_model.embeddings.token_embedding.weight": r(v, d), "text_model.embeddings.position_embedding.weight": r(n, d),
          "text_model.final_layer_norm.weight": 1 + r(d), "text_model.final_layer_norm.bias": r(d)}
    for i in range(TINY_TEXT["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("q", "k", "v", "out"):
            sd[p + f"self_attn.{proj}_proj.weight"], sd[p + f"self_attn.{proj}_proj.bias"] = r(d, d), r(d)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = 1 + r(d), r(d)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(f, d), r(f)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(d, f), r(d)
    return sd


def tiny_open_clip_text_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    """The tiny text encoder in the single-file SD 2.x (open_clip) key layout, plus one last block
    with other weights that SD 2.x never uses (it takes the penultimate layer)."""
    from .clip_text import OPEN_CLIP_PREFIX as P

    hf = tiny_text_state_dict(seed)
    d = TINY_TEXT["hidden_size"]
    oc = {P + "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
          P + "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
          P + "ln_final.weight": hf["text_model.final_layer_norm.weight"],
          P + "ln_final.bias": hf["text_model.final_layer_norm.bias"],
          P + "text_projection": torch.zeros(d, d), P + "logit_scale": torch.tensor(4.6)}
    unused = tiny_text_state_dict(seed + 99)
    layers = TINY_TEXT["num_hidden_layers"]
    for i in range(layers + 1):
        src, j = (hf, i) if i < layers else (unused, 0)
        p, q = f"text_model.encoder.layers.{j}.", f"{P}transformer.resblocks.{i}."
        oc[q + "attn.in_proj_weight"] = torch.cat([src[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        oc[q + "attn.in_proj_bias"] = torch.cat([src[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            oc[q + b + ".weight"], oc[q + b + ".bias"] = src[p + a + ".weight"], src[p + a + ".bias"]
    return {k: v.clone().contiguous() for k, v in oc.items()}


def save_tiny_sd_folder(root, seed: int = 0) -> Path:
    """Write a tiny diffusers SD folder (unet/, vae/, text_encoder/, tokenizer/) and return it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    root = Path(root)
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(tiny_unet_config()).save_pretrained(root / "unet")
    AutoencoderKL.from_config(tiny_vae_config()).save_pretrained(root / "vae")
    (root / "text_encoder").mkdir(parents=True, exist_ok=True)
    save_file(tiny_text_state_dict(seed), str(root / "text_encoder" / "model.safetensors"))
    (root / "text_encoder" / "config.json").write_text(json.dumps(TINY_TEXT))
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    return root


def save_tiny_head(path, config: Optional[IconMattingConfig] = None, seed: int = 0, layout: str = "ours") -> Path:
    """Random head weights as our .safetensors (layout "ours") or a Lightning-style .ckpt ("reference")."""
    from .checkpoint import save_head

    head = tiny_head(config, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "ours":
        save_head(head, path)
    elif layout == "reference":
        state = ours_to_reference(head.state_dict())
        torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.4.2", "state_dict": state}, path)
    else:
        raise ValueError(layout)
    return path


def tiny_pipeline(tmp_dir, seed: int = 0, dtype=torch.float32):
    """A ready IconMattingPipeline with tiny random weights loaded through the real loaders."""
    from .pipeline import IconMattingPipeline, load_model

    tmp_dir = Path(tmp_dir)
    sd_dir = save_tiny_sd_folder(tmp_dir / "sd", seed)
    head_path = save_tiny_head(tmp_dir / "head.safetensors", seed=seed)
    return IconMattingPipeline(load_model(head_path, sd_dir, dtype))


# --- a tiny SD 2.x single file that ComfyUI's stock checkpoint loader also loads ---------------
#
# ComfyUI recognises SD 2.x by key shapes and builds its modules with fixed assumptions: 32-group
# norms and 64-channel attention heads in the UNet, one fixed VAE architecture, a fixed json config
# for the text encoder. The tiny UNet keeps those (64/64/128/128 channels, 1/1/2/2 heads), the VAE is
# SD's real one, and the text encoder is TINY_TEXT (its hidden size is the UNet's context_dim).
# ComfyUI needs a model class with these sizes registered: tests/comfy_tiny_sd2.

def tiny_comfy_unet_config() -> dict:
    """Diffusers config of the UNet in :func:`save_tiny_comfy_sd2_checkpoint`: SD 2.1's with smaller sizes."""
    cfg = load_sd_config("unet")
    cfg.update(block_out_channels=[64, 64, 128, 128], attention_head_dim=[1, 1, 2, 2],
               cross_attention_dim=TINY_TEXT["hidden_size"], sample_size=TINY_IMAGE_SIZE // 8)
    return cfg


def tiny_comfy_vae_config() -> dict:
    """The VAE of :func:`save_tiny_comfy_sd2_checkpoint` is SD's real one (ComfyUI builds only that)."""
    return load_sd_config("vae")


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
    from .sd_loading import UNET_PREFIX

    return _to_ldm(state, _ldm_unet_rules(config), UNET_PREFIX)


def ldm_vae_state_dict(state: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the single-file layout (``first_stage_model.*``)."""
    from .sd_loading import VAE_PREFIX

    return _to_ldm(state, _ldm_vae_rules(config), VAE_PREFIX)


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
    CheckpointLoaderSimple (with tests/comfy_tiny_sd2 registered) and ``load_sd_components(path,
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
