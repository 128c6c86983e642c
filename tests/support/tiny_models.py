"""Tiny random-weight IconMatting models with the real architecture and key layouts, for tests and benchmarks.

Not part of the library (nothing here is needed at inference, and the wheel does not ship it): it lets tests
and benchmarks build the whole model (UNet, VAE, text encoder, head) with small channel counts and save it in
every on-disk layout the loaders accept. Import it with the repository root and ``tests/support/`` on ``sys.path``
(``tests/conftest.py`` and the benchmarks put them there). The SD 2.x single file that ComfyUI's own loader
also reads is built by ``tiny_sd2_checkpoint``, from diffusers weights renamed by ``ldm_keys``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from core_helpers import ours_to_reference
from iconmatting_core.config import IconMattingConfig, load_sd_config
from iconmatting_core.features import SelfAttentionLayer
from iconmatting_core.matting_head import IconMattingHead

TINY_IMAGE_SIZE = 128

#: SD 2.1's self-attention layers in run order (``features.UNetLayout``), from its architecture, which the tiny
#: UNets keep: three down blocks with two transformer blocks each (levels 0, 1, 2), a down block without, the
#: mid block's one (level 3), an up block without, then three up blocks with three each (levels 2, 1, 0), after
#: one, two and three up blocks have given their output
SD_SELF_ATTENTION_LAYOUT = (
    [SelfAttentionLayer(0, 0)] * 2 + [SelfAttentionLayer(1, 0)] * 2 + [SelfAttentionLayer(2, 0)] * 2
    + [SelfAttentionLayer(3, 0)] + [SelfAttentionLayer(2, 1)] * 3 + [SelfAttentionLayer(1, 2)] * 3 + [SelfAttentionLayer(0, 3)] * 3
)


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
    from iconmatting_core.clip_text import OPEN_CLIP_PREFIX as P

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
    from iconmatting_core.checkpoint import save_head

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
    from iconmatting_core.pipeline import IconMattingPipeline, load_model

    tmp_dir = Path(tmp_dir)
    sd_dir = save_tiny_sd_folder(tmp_dir / "sd", seed)
    head_path = save_tiny_head(tmp_dir / "head.safetensors", seed=seed)
    return IconMattingPipeline(load_model(head_path, sd_dir, dtype))
