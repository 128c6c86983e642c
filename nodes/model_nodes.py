"""Node 1: IconMatting's head over the SD 2.1 MODEL, CLIP and VAE of a Load Checkpoint node."""
from __future__ import annotations

from typing import Optional, Tuple

import folder_paths
from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample
from comfy_api.latest import io

from ..iconmatting_core.checkpoint import CheckpointError
from ..iconmatting_core.precision import CHOICES as DTYPES
from .common import (CATEGORY, LOAD_NODE, MODEL_FOLDER, RELEASED_WEIGHTS, WEIGHTS_HINT, ModelType, advanced,
                     check_choice, full_path, missing_input, node_note, schema)
from .host_model import load_on_host
from .native_features import NotStableDiffusion2, unet_layout


def unet_up_channels(model) -> Optional[Tuple[int, int]]:
    """Channels of the outputs of up blocks 0 and 1 of a ComfyUI SD UNet (the head's inputs), read
    from their upsamplers; None when the MODEL is no such UNet (the extractor says why)."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is None or not hasattr(unet, "output_blocks"):
        return None
    _, up_ends = unet_layout(unet)
    channels = []
    for index in up_ends[:2]:
        ups = [m for m in unet.output_blocks[index].modules() if isinstance(m, Upsample)]
        channels.append(ups[-1].out_channels)
    return tuple(channels) if len(channels) == 2 else None


def head_fits_model(head_channels: Tuple[int, int], unet_channels: Optional[Tuple[int, int]], weights: str) -> None:
    """A head built for other UNet widths fails deep inside Match Targets: refuse it at Load."""
    if unet_channels is not None and tuple(head_channels) != tuple(unet_channels):
        raise ValueError(
            f"The IconMatting weights '{weights}' were built for UNet features of {tuple(head_channels)} channels, but the "
            f"MODEL's UNet gives {tuple(unet_channels)}. Connect SD 2.1 (v2-1_768-ema-pruned.safetensors) to the MODEL "
            "input, or choose weights made for this model."
        )


def patches_warning(model) -> Optional[str]:
    """The one text of the patched-MODEL warning (shown once per Load: on the node, in the log)."""
    patches = getattr(model, "patches", None)
    if not patches:
        return None
    return (f"The MODEL carries {len(patches)} weight patches (e.g. a LoRA). IconMatting was trained on plain SD 2.1 "
            "features: connect Load Checkpoint's MODEL directly for faithful mattes.")


class IconMattingLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        weights = folder_paths.get_filename_list(MODEL_FOLDER) or [RELEASED_WEIGHTS]
        return schema(
            node_id="IconMattingLoad",
            display_name=LOAD_NODE,
            category=CATEGORY,
            search_aliases=["iconmatting model", "load matting model", "matting weights", "icm.ckpt"],
            has_intermediate_output=True,  # newer hosts send its warning again when it is cached
            description="IconMatting on the SD 2.1 model of a Load Checkpoint node (v2-1_768-ema-pruned.safetensors): "
            "ComfyUI loads, offloads and optimises it as any model.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL output of Load Checkpoint with Stable Diffusion 2.1 (768-v): "
                               "the frozen feature extractor."),
                io.Clip.Input("clip", tooltip="CLIP output of the same Load Checkpoint: gives SD 2.1's empty-prompt conditioning."),
                io.Vae.Input("vae", tooltip="VAE output of the same Load Checkpoint."),
                io.Combo.Input("matting_model", options=weights, default=weights[0],
                               tooltip="IconMatting weights in ComfyUI/models/iconmatting: icm.ckpt as released, "
                               "or a .safetensors conversion."),
                advanced(io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                                        tooltip="Precision of the matting head. auto: bf16 where ComfyUI finds the device computes "
                                        "it natively (e.g. NVIDIA from Ampere on), else fp32; never fp16 unless chosen (it can "
                                        "overflow). The SD model keeps the precision ComfyUI loaded it in.")),
            ],
            outputs=[ModelType.Output("iconmatting_model", tooltip="IconMatting over the host's SD 2.1, for the nodes below.")],
        )

    @classmethod
    def validate_inputs(cls, matting_model=None):
        if not isinstance(matting_model, str) or not matting_model:
            return missing_input("matting_model", LOAD_NODE) + " " + WEIGHTS_HINT
        if not folder_paths.get_full_path(MODEL_FOLDER, matting_model):
            where = ", ".join(folder_paths.get_folder_paths(MODEL_FOLDER))
            return f"IconMatting weights '{matting_model}' are not in {where}. {WEIGHTS_HINT}"
        return True

    @classmethod
    def execute(cls, model, clip, vae, matting_model, dtype="auto"):
        check_choice("dtype", dtype, DTYPES)
        path = full_path(MODEL_FOLDER, matting_model, WEIGHTS_HINT)
        try:
            loaded = load_on_host(model, clip, vae, path, dtype)
            head_fits_model(loaded.model.config.unet_feature_channels, unet_up_channels(model), matting_model)
        except (CheckpointError, NotStableDiffusion2) as exc:
            raise ValueError(str(exc)) from exc
        warning = patches_warning(model)
        if warning:
            return io.NodeOutput(loaded, ui=node_note(warning, warning=True))
        return io.NodeOutput(loaded)
