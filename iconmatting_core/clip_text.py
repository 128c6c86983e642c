"""The empty-prompt text embedding that conditions the UNet, without a tokenizer or transformers.

IconMatting always conditions SD on the empty prompt "", so only one fixed token sequence is ever
encoded: [BOS, EOS, PAD x 75]. This module runs the CLIP text transformer on it straight from a
state dict, in either key layout SD 2.x weights come in:

* ``"hf"``: diffusers folders (``text_encoder/``): ``text_model.encoder.layers.N.self_attn.q_proj...``
* ``"open_clip"``: single-file SD 2.x checkpoints: ``cond_stage_model.model.transformer.resblocks.N...``;
  as diffusers does for SD 2.x, the last residual block is dropped (the penultimate layer is used).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

BOS_TOKEN, EOS_TOKEN = 49406, 49407
OPEN_CLIP_PREFIX = "cond_stage_model.model."


def empty_prompt_tokens(length: int = 77, pad_token: int = 0) -> torch.Tensor:
    """Token ids of "" as the SD 2.x tokenizer pads it: [length] long."""
    ids = torch.full((length,), pad_token, dtype=torch.long)
    ids[0], ids[1] = BOS_TOKEN, EOS_TOKEN
    return ids


def _hf_layers(sd: Dict[str, torch.Tensor], num_layers: int):
    for i in range(num_layers):
        p = f"text_model.encoder.layers.{i}."
        yield {
            "ln1": (sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"]),
            "qkv_w": torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
            "qkv_b": torch.cat([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]),
            "out": (sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"]),
            "ln2": (sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"]),
            "fc1": (sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]),
            "fc2": (sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]),
        }


def _open_clip_layers(sd: Dict[str, torch.Tensor], num_layers: int):
    for i in range(num_layers):
        p = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{i}."
        yield {
            "ln1": (sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]),
            "qkv_w": sd[p + "attn.in_proj_weight"],
            "qkv_b": sd[p + "attn.in_proj_bias"],
            "out": (sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"]),
            "ln2": (sd[p + "ln_2.weight"], sd[p + "ln_2.bias"]),
            "fc1": (sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]),
            "fc2": (sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"]),
        }


def count_open_clip_layers(sd: Dict[str, torch.Tensor]) -> int:
    prefix = f"{OPEN_CLIP_PREFIX}transformer.resblocks."
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


@torch.no_grad()
def encode_empty_prompt(
    state_dict: Dict[str, torch.Tensor],
    layout: str,
    num_heads: Optional[int] = None,
    num_layers: Optional[int] = None,
    eps: float = 1e-5,
    pad_token: int = 0,
) -> torch.Tensor:
    """Last hidden state (after the final layer norm) of CLIP's text model for "": [1, 77, D] float32.

    ``num_layers`` defaults to all HF layers, or all but the last open_clip block. ``num_heads``
    defaults to D / 64 (true for every SD text encoder).
    """
    if layout == "hf" and "embeddings.token_embedding.weight" in state_dict:  # saved without the text_model. prefix
        state_dict = {"text_model." + k: v for k, v in state_dict.items()}
    prefix = "text_model." if layout == "hf" else OPEN_CLIP_PREFIX
    # only the text encoder is converted: state_dict may be a whole SD checkpoint
    sd = {k: v.float() for k, v in state_dict.items() if k.startswith(prefix)}
    if layout == "hf":
        tok = sd["text_model.embeddings.token_embedding.weight"]
        pos = sd["text_model.embeddings.position_embedding.weight"]
        final = (sd["text_model.final_layer_norm.weight"], sd["text_model.final_layer_norm.bias"])
        if num_layers is None:
            prefix = "text_model.encoder.layers."
            num_layers = 1 + max(int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix))
        layers = _hf_layers(sd, num_layers)
    elif layout == "open_clip":
        tok = sd[OPEN_CLIP_PREFIX + "token_embedding.weight"]
        pos = sd[OPEN_CLIP_PREFIX + "positional_embedding"]
        final = (sd[OPEN_CLIP_PREFIX + "ln_final.weight"], sd[OPEN_CLIP_PREFIX + "ln_final.bias"])
        if num_layers is None:
            num_layers = count_open_clip_layers(sd) - 1
        layers = _open_clip_layers(sd, num_layers)
    else:
        raise ValueError(f"unknown text encoder layout {layout!r}")

    length, dim = pos.shape
    heads = num_heads or dim // 64
    ids = empty_prompt_tokens(length, pad_token)
    x = (tok[ids] + pos)[None]  # [1, L, D]
    for layer in layers:
        h = F.layer_norm(x, (dim,), *layer["ln1"], eps=eps)
        q, k, v = F.linear(h, layer["qkv_w"], layer["qkv_b"]).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "1 t (h d) -> 1 h t d", h=heads) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + F.linear(rearrange(h, "1 h t d -> 1 t (h d)"), *layer["out"])
        h = F.layer_norm(x, (dim,), *layer["ln2"], eps=eps)
        x = x + F.linear(F.gelu(F.linear(h, *layer["fc1"])), *layer["fc2"])
    return F.layer_norm(x, (dim,), *final, eps=eps)
