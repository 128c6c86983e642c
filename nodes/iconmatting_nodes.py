"""ComfyUI nodes (V1 API): thin adapters between ComfyUI types and ``iconmatting_core``.

Types passed between the nodes:
* ICONMATTING_MODEL: a ComfyUI ``ModelPatcher`` around ``IconMattingModel`` (memory-managed);
* ICONMATTING_CONTEXT: ``ReferenceContext`` (region tokens of the reference(s), on the CPU);
* ICONMATTING_MATCH: ``MatchResult`` (fused features per target, on ComfyUI's intermediate device).
"""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy.model_patcher import ModelPatcher

from ..iconmatting_core import preprocess as pre
from ..iconmatting_core.checkpoint import CheckpointError
from ..iconmatting_core.context import POOLING_MODES, ReferenceContext
from ..iconmatting_core.matching import MatchResult
from ..iconmatting_core.pipeline import IconMattingPipeline, estimate_inference_bytes, load_model
from ..iconmatting_core.postprocess import heatmap, normalise_map

log = logging.getLogger("IconMatting")

MODEL_FOLDER = "iconmatting"
WEIGHT_EXTENSIONS = {".ckpt", ".safetensors", ".pth", ".pt"}
DIFFUSERS_PREFIX = "[diffusers] "
DOWNLOAD_HINT = (
    "IconMatting needs two model files: the IconMatting weights (icm.ckpt from the authors' release, "
    "linked from github.com/tiny-smart/in-context-matting, or its .safetensors conversion) in "
    "ComfyUI/models/iconmatting/, and Stable Diffusion 2.1 (v2-1_768-ema-pruned.safetensors from "
    "stabilityai/stable-diffusion-2-1) in ComfyUI/models/checkpoints/ (or a diffusers folder in models/diffusers/)."
)
CATEGORY = "IconMatting"


def register_model_folder() -> None:
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    if MODEL_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = ([default], set(WEIGHT_EXTENSIONS))
    else:
        paths, exts = folder_paths.folder_names_and_paths[MODEL_FOLDER]
        if default not in paths:
            paths.append(default)
        exts.update(WEIGHT_EXTENSIONS)


def _diffusers_folders():
    out = []
    for base in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(base):
            for name in sorted(os.listdir(base)):
                if os.path.isfile(os.path.join(base, name, "unet", "config.json")):
                    out.append(DIFFUSERS_PREFIX + name)
    return out


def _sd_choices():
    return folder_paths.get_filename_list("checkpoints") + _diffusers_folders()


def _resolve_sd(name: str) -> str:
    if name.startswith(DIFFUSERS_PREFIX):
        sub = name[len(DIFFUSERS_PREFIX):]
        for base in folder_paths.get_folder_paths("diffusers"):
            path = os.path.join(base, sub)
            if os.path.isdir(path):
                return path
    else:
        path = folder_paths.get_full_path("checkpoints", name)
        if path:
            return path
    raise FileNotFoundError(f"Stable Diffusion model '{name}' not found. {DOWNLOAD_HINT}")


def _resolve_matting(name: str) -> str:
    path = folder_paths.get_full_path(MODEL_FOLDER, name)
    if not path:
        where = ", ".join(folder_paths.get_folder_paths(MODEL_FOLDER))
        raise FileNotFoundError(f"IconMatting weights '{name}' not found in {where}. {DOWNLOAD_HINT}")
    return path


def _pipeline(model: ModelPatcher, images_per_chunk: int = 1) -> IconMattingPipeline:
    """Ask ComfyUI's memory manager to put the model on its device (making room for one chunk's
    activations), then wrap it."""
    need = estimate_inference_bytes(model.model.config, model.model.dtype, images_per_chunk)
    mm.load_models_gpu([model], memory_required=need, force_full_load=True)
    devices = {p.device for p in model.model.parameters()}
    if len(devices) > 1:
        raise RuntimeError(
            "IconMatting's model was only partly loaded to the GPU (ComfyUI's --novram/--lowvram mode); it needs all "
            "its weights on one device. Start ComfyUI without --novram, or with --cpu."
        )
    return IconMattingPipeline(model.model)


def _progress(total: int):
    bar = comfy.utils.ProgressBar(total)

    def update(done: int, _total: int) -> None:
        bar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    return update


def _images_list(images: torch.Tensor):
    if images.ndim == 3:
        images = images[None]
    return list(images.unbind(0))


class IconMattingModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "matting_model": (folder_paths.get_filename_list(MODEL_FOLDER), {"tooltip": "IconMatting weights in models/iconmatting (icm.ckpt or .safetensors)."}),
                "sd_model": (_sd_choices(), {"tooltip": "Stable Diffusion 2.1 (768) checkpoint or diffusers folder: the frozen feature extractor."}),
                "dtype": (["auto", "fp16", "bf16", "fp32"], {"default": "auto"}),
            }
        }

    RETURN_TYPES = ("ICONMATTING_MODEL",)
    RETURN_NAMES = ("iconmatting_model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the IconMatting head and the frozen Stable Diffusion 2.1 feature extractor."

    @classmethod
    def VALIDATE_INPUTS(cls, matting_model, sd_model):
        if matting_model is None or sd_model is None:  # linked from another node: checked when loading
            return True
        if not folder_paths.get_full_path(MODEL_FOLDER, matting_model):
            return f"IconMatting weights '{matting_model}' not found. {DOWNLOAD_HINT}"
        if sd_model not in _sd_choices():
            return f"Stable Diffusion model '{sd_model}' not found. {DOWNLOAD_HINT}"
        return True

    def load(self, matting_model, sd_model, dtype):
        device = mm.get_torch_device()
        if dtype == "auto":  # half precision only where its attention kernels are known to be safe
            if device.type == "cuda" and mm.should_use_fp16(device):
                dtype = "fp16"
            elif device.type == "cuda" and mm.should_use_bf16(device):
                dtype = "bf16"
            else:
                dtype = "fp32"
        try:
            model = load_model(_resolve_matting(matting_model), _resolve_sd(sd_model), dtype)
        except CheckpointError as exc:
            raise RuntimeError(f"{exc} {DOWNLOAD_HINT}") from exc
        patcher = ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device(), size=mm.module_size(model))
        return (patcher,)


class IconMattingEncodeReference:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "iconmatting_model": ("ICONMATTING_MODEL",),
                "image": ("IMAGE", {"tooltip": "Reference image(s); several images build one context."}),
                "mask": ("MASK", {"tooltip": "Foreground on each reference (one mask per image, or one for all)."}),
                "guidance": (list(POOLING_MODES), {"default": "mask", "tooltip": "mask: filled masks (faithful to the paper). scribble: strokes or points."}),
                "resize_mode": (list(pre.RESIZE_MODES), {"default": "pad"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the diffusion noise used for features."}),
            }
        }

    RETURN_TYPES = ("ICONMATTING_CONTEXT",)
    RETURN_NAMES = ("context",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encodes the marked foreground of the reference image(s) once, for matching any number of targets."

    def encode(self, iconmatting_model, image, mask, guidance, resize_mode, seed):
        if mask.ndim == 2:
            mask = mask[None]
        if tuple(mask.shape[-2:]) == (64, 64) and tuple(image.shape[1:3]) != (64, 64) and not mask.any():
            raise ValueError(
                "The reference has no mask: Load Image gives an empty 64x64 mask when nothing is painted. "
                "Right-click the reference's Load Image node, choose 'Open in MaskEditor' and paint the foreground "
                "(or connect a mask from any mask node)."
            )
        pipe = _pipeline(iconmatting_model)
        ctx = pipe.encode_reference(_images_list(image), list(mask.unbind(0)), pooling=guidance, resize_mode=resize_mode, seed=seed)
        return (ctx,)


class IconMattingMatchTargets:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "iconmatting_model": ("ICONMATTING_MODEL",),
                "context": ("ICONMATTING_CONTEXT",),
                "images": ("IMAGE", {"tooltip": "Target images: any batch length."}),
                "resize_mode": (list(pre.RESIZE_MODES), {"default": "pad"}),
                "chunk_size": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Targets per UNet pass (each pass runs 4 noised copies)."}),
            }
        }

    RETURN_TYPES = ("ICONMATTING_MATCH", "IMAGE")
    RETURN_NAMES = ("match", "guidance_preview")
    FUNCTION = "match"
    CATEGORY = CATEGORY
    DESCRIPTION = "Finds the reference's kind of foreground in every target; the preview shows the inter-image similarity."

    def match(self, iconmatting_model, context, images, resize_mode, chunk_size):
        if not isinstance(context, ReferenceContext):
            raise TypeError("context must come from 'IconMatting Encode Reference'")
        pipe = _pipeline(iconmatting_model, chunk_size)
        targets = _images_list(images)
        result = pipe.match(context, targets, resize_mode=resize_mode, chunk_size=chunk_size,
                            progress=_progress(len(targets)), output_device=mm.intermediate_device())
        size = pipe.config.image_size
        sims = torch.cat([pre.restore_map(s, p, size) for s, p in zip(result.similarity, result.placements)])
        rgb = images[..., :3].to(sims.device)
        preview = 0.4 * rgb + 0.6 * heatmap(normalise_map(sims)).to(rgb.dtype)
        return (result, preview)


class IconMattingDecodeAlpha:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "iconmatting_model": ("ICONMATTING_MODEL",),
                "match": ("ICONMATTING_MATCH",),
                "estimate_foreground": ("BOOLEAN", {"default": True, "tooltip": "Clean edge colours of the cut-out (no halo when composited)."}),
                "chunk_size": ("INT", {"default": 4, "min": 1, "max": 64}),
            }
        }

    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("alpha", "rgba")
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Predicts the alpha matte of every matched target at its original resolution, and the RGBA cut-out."

    def decode(self, iconmatting_model, match, estimate_foreground, chunk_size):
        if not isinstance(match, MatchResult):
            raise TypeError("match must come from 'IconMatting Match Targets'")
        pipe = _pipeline(iconmatting_model)
        n = len(match)
        alphas = torch.stack(pipe.decode(match, chunk_size=chunk_size, progress=_progress(n),
                                         output_device=mm.intermediate_device()))
        cutouts = []
        for i, src in enumerate(match.sources):
            mm.throw_exception_if_processing_interrupted()
            cutouts.append(pipe.cutout(src.to(alphas.device), alphas[i], estimate_foreground))
        rgba = torch.stack(cutouts)
        return (alphas, rgba)


class IconMattingComposite:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "rgba": ("IMAGE", {"tooltip": "Cut-outs from 'IconMatting Decode Alpha'."}),
                "background": ("IMAGE", {"tooltip": "New background; resized to cover each cut-out (one for all, or one per cut-out)."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "composite"
    CATEGORY = CATEGORY
    DESCRIPTION = "Places RGBA cut-outs over a new background."

    def composite(self, rgba, background):
        if rgba.shape[-1] != 4:
            raise ValueError(f"rgba must have 4 channels (RGBA from Decode Alpha), got {rgba.shape[-1]}")
        n, h, w, _ = rgba.shape
        if background.shape[0] not in (1, n):
            raise ValueError(f"background batch is {background.shape[0]}; give 1 background or one per cut-out ({n})")
        bg = background[..., :3].permute(0, 3, 1, 2)
        scale = max(h / bg.shape[2], w / bg.shape[3])
        size = (max(h, round(bg.shape[2] * scale)), max(w, round(bg.shape[3] * scale)))
        bg = torch.nn.functional.interpolate(bg, size=size, mode="bilinear", align_corners=False)
        top, left = (size[0] - h) // 2, (size[1] - w) // 2
        bg = bg[:, :, top : top + h, left : left + w].permute(0, 2, 3, 1).to(rgba.device, rgba.dtype)
        alpha = rgba[..., 3:]
        return ((rgba[..., :3] * alpha + bg * (1 - alpha)).clamp(0, 1),)


NODE_CLASS_MAPPINGS = {
    "IconMattingModelLoader": IconMattingModelLoader,
    "IconMattingEncodeReference": IconMattingEncodeReference,
    "IconMattingMatchTargets": IconMattingMatchTargets,
    "IconMattingDecodeAlpha": IconMattingDecodeAlpha,
    "IconMattingComposite": IconMattingComposite,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IconMattingModelLoader": "Load IconMatting",
    "IconMattingEncodeReference": "IconMatting Encode Reference",
    "IconMattingMatchTargets": "IconMatting Match Targets",
    "IconMattingDecodeAlpha": "IconMatting Decode Alpha",
    "IconMattingComposite": "IconMatting Composite",
}
