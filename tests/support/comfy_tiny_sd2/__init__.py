"""Test-only ComfyUI custom node module: teaches ComfyUI's stock checkpoint loader the tiny SD 2.x file.

``save_tiny_comfy_sd2_checkpoint`` (tests/support/tiny_sd2_checkpoint.py) writes an SD 2.x single file with tiny
sizes. ComfyUI picks a model class by matching the UNet config it reads off the key shapes against
``comfy.supported_models.models``; no stock class has these sizes, so importing this module (as a
custom node folder, e.g. ``run_comfy(..., extra_packs=[tests/support/comfy_tiny_sd2])``) inserts
:class:`TinySD2` first in that list. It registers no nodes.

``TinySD2`` is ComfyUI's ``SD20`` with sizes changed, nothing else:

* ``unet_config``: SD20's five keys with ``context_dim`` 1024 -> 32 and ``model_channels`` 320 -> 64,
  plus the block layout ComfyUI detects for the tiny UNet (channel_mult 1/1/2/2, 2 res blocks per
  level, one transformer block wherever SD 2.x has one, ``in_channels`` 4), so that it matches the
  tiny file only and never a real SD 2.x checkpoint. Everything else of SD20 is kept: 64-channel
  heads, float32 attention, SD latent format, v-prediction/eps detection, VAE and CLIP key handling.
* ``clip_target``: SD20's own classes (``SD2Tokenizer``, ``SD2ClipModel`` -> ``SD2ClipHModel`` ->
  ``SDClipModel``: penultimate layer, final layer norm, pad id 0) built with the tiny text sizes
  from ``tiny_comfy_clip_sizes()`` (hidden 32, 2 heads, MLP 64, 3 blocks in the file instead of
  1024/16/4096/24). The sizes are applied by ComfyUI's own per-model config override
  (``model_options["clip_h_model_config"]``, read by ``SDClipModel`` on top of the real
  ``sd2_clip_config.json``), so the code path is exactly SD 2.x's.
"""
import sys
from pathlib import Path

import comfy.supported_models
from comfy import supported_models_base
from comfy.text_encoders import sd2_clip

_SUPPORT = Path(__file__).resolve().parents[1]
for _path in (str(_SUPPORT.parents[1]), str(_SUPPORT)):  # the repository (iconmatting_core) and tests/support (tiny_sd2_checkpoint)
    if _path not in sys.path:
        sys.path.append(_path)  # appended: ComfyUI's own modules (e.g. nodes.py) keep precedence

from tiny_sd2_checkpoint import tiny_comfy_clip_sizes, tiny_comfy_unet_config  # noqa: E402

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}


def _detected_unet_config(config: dict) -> dict:
    """What ComfyUI's ``detect_unet_config`` reads off a file holding a UNet with diffusers ``config``."""
    channels, n = config["block_out_channels"], config["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    return {
        "in_channels": config["in_channels"],
        "model_channels": channels[0],
        "channel_mult": [c // channels[0] for c in channels],
        "num_res_blocks": [n] * len(channels),
        "transformer_depth": [int(a) for a in down_attn for _ in range(n)],
        # output blocks listed by resolution, highest first (the reverse of diffusers' up blocks)
        "transformer_depth_output": [int(a) for a in reversed(up_attn) for _ in range(n + 1)],
        "transformer_depth_middle": 1,
        "context_dim": config["cross_attention_dim"],
    }


class TinySD2ClipModel(sd2_clip.SD2ClipModel):
    """ComfyUI's SD 2.x text encoder with the tiny sizes (see the module docstring)."""

    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        sizes = {**tiny_comfy_clip_sizes(), **model_options.get("clip_h_model_config", {})}
        super().__init__(device=device, dtype=dtype, model_options={**model_options, "clip_h_model_config": sizes},
                         **kwargs)


class TinySD2(comfy.supported_models.SD20):
    """ComfyUI's SD20 for the tiny test checkpoint: sizes only differ (see the module docstring)."""

    unet_config = {**comfy.supported_models.SD20.unet_config, **_detected_unet_config(tiny_comfy_unet_config())}

    def clip_target(self, state_dict={}):
        return supported_models_base.ClipTarget(sd2_clip.SD2Tokenizer, TinySD2ClipModel)


if TinySD2 not in comfy.supported_models.models:
    comfy.supported_models.models.insert(0, TinySD2)
