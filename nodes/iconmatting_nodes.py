"""ComfyUI nodes (V3 schema): thin adapters between ComfyUI types and ``iconmatting_core``.

Types passed between the nodes:
* ICONMATTING_MODEL: ``IconMattingOnHost`` (the head with its own patcher, over the host's SD 2.1
  MODEL/VAE from Load Checkpoint);
* ICONMATTING_CONTEXT: ``ReferenceContext`` (region tokens of the reference(s), on the CPU);
* ICONMATTING_MATCH: ``MatchResult`` (fused features per target, on ComfyUI's intermediate device).

Nodes sort in pipeline order in the node library (display names numbered 1 to 6).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from pathlib import Path
from typing import List

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import ComfyExtension, io

from ..iconmatting_core import preprocess as pre
from ..iconmatting_core.image_io import IMAGE_EXTENSIONS, read_image
from ..iconmatting_core.checkpoint import CheckpointError
from ..iconmatting_core.context import POOLING_MODES, ReferenceContext
from ..iconmatting_core.matching import MatchResult
from ..iconmatting_core.postprocess import heatmap, normalise_map
from .host_model import IconMattingOnHost
from .native_features import NotStableDiffusion2

log = logging.getLogger("IconMatting")

MODEL_FOLDER = "iconmatting"
CONTEXT_FOLDER = "iconmatting_contexts"
WEIGHT_EXTENSIONS = {".ckpt", ".safetensors", ".pth", ".pt"}
RELEASED_WEIGHTS = "icm.ckpt"
CATEGORY = "IconMatting"
WEIGHTS_HINT = (
    "Download icm.ckpt (the IconMatting release, linked from github.com/tiny-smart/in-context-matting) "
    "into ComfyUI/models/iconmatting/."
)
ALIASES = ["matting", "alpha", "alpha matte", "cutout", "remove background", "background removal", "in-context matting"]

ModelType = io.Custom("ICONMATTING_MODEL")
ContextType = io.Custom("ICONMATTING_CONTEXT")
MatchType = io.Custom("ICONMATTING_MATCH")


def register_model_folders() -> None:
    for name, exts in ((MODEL_FOLDER, WEIGHT_EXTENSIONS), (CONTEXT_FOLDER, {".safetensors"})):
        default = os.path.join(folder_paths.models_dir, name)
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([default], set(exts))
        else:
            paths, known = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            known.update(exts)


# --- compatibility: use newer schema features where the host has them ------------------------------
_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


def schema(**kwargs) -> io.Schema:
    """io.Schema without the fields this ComfyUI does not know (search_aliases: newer releases)."""
    return io.Schema(**{k: v for k, v in kwargs.items() if k in _SCHEMA_FIELDS})


def advanced(inp):
    """Mark an input as advanced (folded away by default) where the frontend supports it."""
    if "advanced" in inspect.signature(type(inp).__init__).parameters or hasattr(inp, "advanced"):
        inp.advanced = True
    else:
        inp.extra_dict["advanced"] = True
    return inp


def _progress(total: int):
    bar = comfy.utils.ProgressBar(total)

    def update(done: int, _total: int) -> None:
        bar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    return update


def _split(images) -> List[torch.Tensor]:
    """IMAGE batches (or a list of them, from a list input) -> one [H, W, C] tensor per image."""
    batches = images if isinstance(images, (list, tuple)) else [images]
    out = []
    for b in batches:
        out += list(b.unbind(0)) if b.ndim == 4 else [b]
    return out


def _one(value):
    """A list input's single value (list inputs arrive as lists, one item per upstream output)."""
    return value[0] if isinstance(value, (list, tuple)) else value


# --- 1. model -----------------------------------------------------------------------------------------
class IconMattingLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        weights = folder_paths.get_filename_list(MODEL_FOLDER) or [RELEASED_WEIGHTS]
        return schema(
            node_id="IconMattingLoad",
            display_name="IconMatting 1 · Load",
            category=CATEGORY,
            search_aliases=ALIASES,
            description="IconMatting on the SD 2.1 model of a Load Checkpoint node (v2-1_768-ema-pruned.safetensors): "
            "ComfyUI loads, offloads and optimises it as any model.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL output of Load Checkpoint with Stable Diffusion 2.1 (768-v): the frozen feature extractor."),
                io.Clip.Input("clip", tooltip="CLIP output of the same Load Checkpoint: gives SD 2.1's empty-prompt conditioning."),
                io.Vae.Input("vae", tooltip="VAE output of the same Load Checkpoint."),
                io.Combo.Input("matting_model", options=weights, default=weights[0],
                               tooltip="IconMatting weights in ComfyUI/models/iconmatting: icm.ckpt as released, or a .safetensors conversion."),
                advanced(io.Combo.Input("dtype", options=["auto", "fp32", "fp16", "bf16"], default="auto",
                                        tooltip="Precision of the matting head. auto: fp32 on the CPU; on a GPU the half precision "
                                        "ComfyUI picks for it (fp16 or bf16). The SD model keeps the precision ComfyUI loaded it in.")),
            ],
            outputs=[ModelType.Output("iconmatting_model", tooltip="IconMatting over the host's SD 2.1, for the nodes below.")],
        )

    @classmethod
    def validate_inputs(cls, matting_model):
        if matting_model is None:
            return True
        if not folder_paths.get_full_path(MODEL_FOLDER, matting_model):
            where = ", ".join(folder_paths.get_folder_paths(MODEL_FOLDER))
            return f"IconMatting weights '{matting_model}' are not in {where}. {WEIGHTS_HINT}"
        return True

    @classmethod
    def execute(cls, model, clip, vae, matting_model, dtype="auto"):
        path = folder_paths.get_full_path(MODEL_FOLDER, matting_model)
        if not path:
            raise FileNotFoundError(f"IconMatting weights '{matting_model}' not found. {WEIGHTS_HINT}")
        try:
            loaded = IconMattingOnHost(model, clip, vae, path, dtype)
        except (CheckpointError, NotStableDiffusion2) as exc:
            raise ValueError(str(exc)) from exc
        return io.NodeOutput(loaded)


# --- 2. reference context ----------------------------------------------------------------------------
class IconMattingEncodeReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingEncodeReference",
            display_name="IconMatting 2 · Encode Reference",
            category=CATEGORY,
            search_aliases=ALIASES,
            description="Encodes the foreground marked on the reference image(s) once, for matching any number of targets.",
            inputs=[
                ModelType.Input("iconmatting_model", tooltip="From IconMatting 1 · Load."),
                io.Image.Input("image", tooltip="Reference image(s); several images build one context."),
                io.Mask.Input("mask", tooltip="Foreground on each reference (one mask per image, or one for all): paint it in "
                              "Load Image's mask editor, or connect any mask."),
                io.Combo.Input("guidance", options=list(POOLING_MODES), default="mask",
                               tooltip="mask: a filled mask of the foreground (the paper's setting). scribble: strokes or "
                               "clicks on the foreground; every cell they touch counts."),
                advanced(io.Combo.Input("resize_mode", options=list(pre.RESIZE_MODES), default="pad",
                                        tooltip="How the image is brought to the model's square input. pad: letterbox, no distortion "
                                        "(padding takes no part in matching). stretch: squash to the square. Use the same mode for "
                                        "the reference and the targets.")),
                advanced(io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                                      tooltip="Seed of the diffusion noise added before feature extraction.")),
            ],
            outputs=[ContextType.Output("context", tooltip="The reference's region tokens; reuse it for any number of targets.")],
        )

    @classmethod
    def execute(cls, iconmatting_model, image, mask, guidance, resize_mode="pad", seed=0):
        if mask.ndim == 2:
            mask = mask[None]
        if tuple(mask.shape[-2:]) == (64, 64) and tuple(image.shape[1:3]) != (64, 64) and not mask.any():
            raise ValueError(
                "The reference has no mask painted (Load Image gives an empty 64x64 mask). "
                "Right-click the reference's Load Image node, choose 'Open in MaskEditor' and paint the foreground."
            )
        pipe = iconmatting_model.pipeline()
        ctx = pipe.encode_reference(list(image.unbind(0)), list(mask.unbind(0)), pooling=guidance,
                                    resize_mode=resize_mode, seed=seed)
        return io.NodeOutput(ctx)


def _context_choices() -> List[str]:
    return folder_paths.get_filename_list(CONTEXT_FOLDER)


class IconMattingSaveContext(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingSaveContext",
            display_name="IconMatting 2 · Save Context",
            category=CATEGORY,
            search_aliases=ALIASES + ["save reference"],
            description="Saves an encoded reference to ComfyUI/models/iconmatting_contexts, for Load Context and the command line.",
            is_output_node=True,
            inputs=[
                ModelType.Input("iconmatting_model", tooltip="The model the context was encoded with (its weights are fingerprinted)."),
                ContextType.Input("context", tooltip="From IconMatting 2 · Encode Reference."),
                io.String.Input("filename", default="reference_context",
                                tooltip="File name in ComfyUI/models/iconmatting_contexts (.safetensors is added)."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, iconmatting_model, context, filename):
        from ..iconmatting_core.context_file import model_fingerprint, save_context

        name = Path(filename.strip() or "reference_context").name
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        folder = folder_paths.get_folder_paths(CONTEXT_FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        path = save_context(os.path.join(folder, name), context,
                            model_fingerprint(iconmatting_model.model.head, iconmatting_model.extractor),
                            {"resize_mode": context.resize_mode})
        log.info("IconMatting context saved to %s", path)
        return io.NodeOutput(ui={"text": [str(path)]})


class IconMattingLoadContext(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        choices = _context_choices()
        return schema(
            node_id="IconMattingLoadContext",
            display_name="IconMatting 2 · Load Context",
            category=CATEGORY,
            search_aliases=ALIASES + ["load reference"],
            description="Loads a reference context saved by Save Context or `python -m iconmatting_core encode`, "
            "instead of encoding the reference again.",
            inputs=[
                ModelType.Input("iconmatting_model", tooltip="Must hold the same weights the context was made with."),
                io.Combo.Input("context_file", options=choices or ["reference_context.safetensors"],
                               tooltip="A context in ComfyUI/models/iconmatting_contexts."),
            ],
            outputs=[ContextType.Output("context", tooltip="The saved reference context.")],
        )

    @classmethod
    def validate_inputs(cls, context_file):
        if context_file is not None and not folder_paths.get_full_path(CONTEXT_FOLDER, context_file):
            return (f"Context file '{context_file}' is not in ComfyUI/models/iconmatting_contexts. "
                    "Save one with IconMatting 2 · Save Context first.")
        return True

    @classmethod
    def execute(cls, iconmatting_model, context_file):
        from ..iconmatting_core.context_file import load_context, model_fingerprint

        path = folder_paths.get_full_path(CONTEXT_FOLDER, context_file)
        expected = model_fingerprint(iconmatting_model.model.head, iconmatting_model.extractor)
        return io.NodeOutput(load_context(path, expected_fingerprint=expected))


# --- 3. targets ----------------------------------------------------------------------------------------
class IconMattingLoadImageFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingLoadImageFolder",
            display_name="IconMatting 3 · Load Image Folder",
            category=CATEGORY,
            search_aliases=ALIASES + ["load images", "folder", "batch"],
            description="Loads every image of a folder as a list, each at its own size (a batch would stretch them to one size). "
            "The images and their results stay in memory: for catalogues of hundreds of photos use the command line.",
            inputs=[
                io.String.Input("folder", default="iconmatting_targets",
                                tooltip="Folder of images inside ComfyUI/input (a name like iconmatting_targets, or a "
                                "sub/folder). Link a folder there to matte photos kept elsewhere."),
            ],
            outputs=[
                io.Image.Output("images", is_output_list=True, tooltip="One image per file, in name order, each at its own size."),
                io.String.Output("names", is_output_list=True, tooltip="File names without extension."),
            ],
        )

    @classmethod
    def _files(cls, folder: str) -> List[Path]:
        root = os.path.abspath(folder_paths.get_input_directory())
        base = os.path.abspath(os.path.join(root, folder.strip()))
        if os.path.commonpath([root, base]) != root:  # an API client must not read the server's other folders
            raise FileNotFoundError(
                f"Image folder '{folder}' is outside ComfyUI's input folder. Put the photos in a folder inside "
                "ComfyUI/input (or link one there) and give its name."
            )
        if not os.path.isdir(base):
            raise FileNotFoundError(f"Image folder '{folder}' not found in ComfyUI/input. Create it and put the target photos in it.")
        files = sorted(p for p in Path(base).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"Image folder '{folder}' holds no images. Put .png/.jpg/.webp target photos in it.")
        return files

    @classmethod
    def validate_inputs(cls, folder):
        if folder is None:
            return True
        try:
            cls._files(folder)
        except FileNotFoundError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder):
        try:
            return [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in cls._files(folder)]
        except FileNotFoundError:
            return float("nan")

    @classmethod
    def execute(cls, folder):
        images, names = [], []
        for path in cls._files(folder):
            try:
                rgb = read_image(path)  # upright (EXIF), as the command line reads it
            except OSError as exc:
                raise ValueError(f"Cannot read image {path} ({exc}). Remove or replace the file.") from exc
            images.append(torch.from_numpy(rgb)[None])
            names.append(path.stem)
        return io.NodeOutput(images, names)


class IconMattingMatchTargets(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingMatchTargets",
            display_name="IconMatting 4 · Match Targets",
            category=CATEGORY,
            search_aliases=ALIASES,
            description="Finds the reference's kind of foreground in every target; the preview shows the inter-image similarity.",
            is_input_list=True,
            inputs=[
                ModelType.Input("iconmatting_model", tooltip="From IconMatting 1 · Load."),
                ContextType.Input("context", tooltip="From Encode Reference or Load Context."),
                io.Image.Input("images", tooltip="Targets: a batch, or a list of images of different sizes (e.g. from "
                               "Load Image Folder); each keeps its own size."),
                advanced(io.Combo.Input("resize_mode", options=list(pre.RESIZE_MODES), default="pad",
                                        tooltip="pad: letterbox, no distortion (padding takes no part in matching). "
                                        "stretch: squash to the square. Use the reference's mode.")),
                advanced(io.Int.Input("chunk_size", default=1, min=1, max=16,
                                      tooltip="Targets per UNet pass (each pass runs 4 noised copies). Larger is faster "
                                      "on a big GPU and needs more memory.")),
            ],
            outputs=[
                MatchType.Output("match", tooltip="Matched targets, for Decode Alpha."),
                io.Image.Output("guidance_preview", is_output_list=True,
                                tooltip="Each target with its inter-image similarity as a heat map."),
            ],
        )

    @classmethod
    def execute(cls, iconmatting_model, context, images, resize_mode=("pad",), chunk_size=(1,)):
        model, resize_mode, chunk_size = _one(iconmatting_model), _one(resize_mode), int(_one(chunk_size))
        contexts = context if isinstance(context, (list, tuple)) else [context]
        if not all(isinstance(c, ReferenceContext) for c in contexts):
            raise TypeError("context must come from IconMatting 2 · Encode Reference or Load Context.")
        context = contexts[0]
        for other in contexts[1:]:  # several references (e.g. a list of images encoded one by one): one context
            context = context.merge(other)
        targets = _split(images)
        pipe = model.pipeline()
        result = pipe.match(context, targets, resize_mode=resize_mode, chunk_size=chunk_size,
                            progress=_progress(len(targets)), output_device=mm.intermediate_device())
        size = pipe.config.image_size
        previews = []
        for src, sim, placement in zip(targets, result.similarity, result.placements):
            heat = heatmap(normalise_map(pre.restore_map(sim, placement, size)))
            rgb = src[..., :3].to(heat.device, heat.dtype)
            previews.append((0.4 * rgb + 0.6 * heat[0])[None])
        return io.NodeOutput(result, previews)


# --- 5. alpha -------------------------------------------------------------------------------------------
class IconMattingDecodeAlpha(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingDecodeAlpha",
            display_name="IconMatting 5 · Decode Alpha",
            category=CATEGORY,
            search_aliases=ALIASES,
            description="Predicts each matched target's alpha matte at its own resolution, and its RGBA cut-out.",
            inputs=[
                ModelType.Input("iconmatting_model", tooltip="From IconMatting 1 · Load."),
                MatchType.Input("match", tooltip="From IconMatting 4 · Match Targets."),
                io.Boolean.Input("estimate_foreground", default=True,
                                 tooltip="Clean the colours of semi-transparent edges, so the cut-out shows no halo of the old "
                                 "background when composited."),
                advanced(io.Int.Input("chunk_size", default=4, min=1, max=64,
                                      tooltip="Targets decoded at once. Larger is faster on a big GPU and needs more memory.")),
            ],
            outputs=[
                io.Mask.Output("alpha", is_output_list=True, tooltip="One alpha matte per target, at its own size."),
                io.Image.Output("rgba", is_output_list=True, tooltip="One RGBA cut-out per target (straight alpha)."),
            ],
        )

    @classmethod
    def execute(cls, iconmatting_model, match, estimate_foreground, chunk_size=4):
        if not isinstance(match, MatchResult):
            raise TypeError("match must come from IconMatting 4 · Match Targets.")
        pipe = iconmatting_model.pipeline(features=False)
        n = len(match)
        alphas = pipe.decode(match, chunk_size=chunk_size, progress=_progress(n), output_device=mm.intermediate_device())
        cutouts = []
        for src, alpha in zip(match.sources, alphas):
            mm.throw_exception_if_processing_interrupted()
            cutouts.append(pipe.cutout(src.to(alpha.device), alpha, estimate_foreground)[None])
        return io.NodeOutput([a[None] for a in alphas], cutouts)


# --- 6. composite ---------------------------------------------------------------------------------------
class IconMattingComposite(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingComposite",
            display_name="IconMatting 6 · Composite",
            category=CATEGORY,
            search_aliases=ALIASES + ["composite", "replace background"],
            description="Places RGBA cut-outs over a new background (resized to cover each cut-out). Cut-outs and "
            "backgrounds may be batches or lists (e.g. from Decode Alpha and Load Image Folder): one background for all, "
            "or the i-th background for the i-th cut-out.",
            is_input_list=True,
            inputs=[
                io.Image.Input("rgba", tooltip="RGBA cut-outs from IconMatting 5 · Decode Alpha."),
                io.Image.Input("background", tooltip="New background: one for all cut-outs, or one per cut-out (in order)."),
            ],
            outputs=[io.Image.Output("image", is_output_list=True, tooltip="Each cut-out over its background, at the cut-out's size.")],
        )

    @classmethod
    def execute(cls, rgba, background):
        cutouts, backgrounds = _split(rgba), _split(background)
        if any(c.shape[-1] != 4 for c in cutouts):
            raise ValueError("rgba must have 4 channels. Connect the rgba output of IconMatting 5 · Decode Alpha.")
        if len(backgrounds) not in (1, len(cutouts)):
            raise ValueError(f"Got {len(backgrounds)} backgrounds for {len(cutouts)} cut-outs. Give 1 background, or one per cut-out.")
        out = []
        for i, cut in enumerate(cutouts):
            out.append(composite(cut, backgrounds[i if len(backgrounds) > 1 else 0])[None])
        return io.NodeOutput(out)


def composite(rgba: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """One cut-out [H, W, 4] over a background [h, w, C] resized to cover it (centre crop) -> [H, W, 3]."""
    h, w, _ = rgba.shape
    bg = background[..., :3].permute(2, 0, 1)[None]
    scale = max(h / bg.shape[2], w / bg.shape[3])
    size = (max(h, round(bg.shape[2] * scale)), max(w, round(bg.shape[3] * scale)))
    bg = torch.nn.functional.interpolate(bg, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    bg = bg[0, :, top : top + h, left : left + w].permute(1, 2, 0).to(rgba.device, rgba.dtype)
    alpha = rgba[..., 3:]
    return (rgba[..., :3] * alpha + bg * (1 - alpha)).clamp(0, 1)


NODES = [
    IconMattingLoad,
    IconMattingEncodeReference,
    IconMattingLoadContext,
    IconMattingSaveContext,
    IconMattingLoadImageFolder,
    IconMattingMatchTargets,
    IconMattingDecodeAlpha,
    IconMattingComposite,
]


class IconMattingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> IconMattingExtension:
    register_model_folders()
    return IconMattingExtension()
