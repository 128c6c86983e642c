"""Nodes 3 and 4: the targets -- a folder of photos of any sizes, matched against the reference."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

import torch
from PIL import Image

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io

from ..iconmatting_core import preprocess as pre
from ..iconmatting_core.image_io import IMAGE_EXTENSIONS, read_image
from ..iconmatting_core.context import ReferenceContext
from ..iconmatting_core.postprocess import similarity_preview
from .common import (precision_hint, CATEGORY, LOAD_NODE, Choice, ContextType, MatchType, ModelType, advanced, check_choice, one,
                     progress, schema, show_on_node, split_images)

FOLDER_NODE = "IconMatting 3 · Load Image Folder"


def folder_images(folder) -> List[Path]:
    """The image files of ``folder`` (a folder inside ComfyUI/input), in name order; any user error
    (no name, outside the input folder, missing, no images) is a FileNotFoundError of one line."""
    if not isinstance(folder, str) or not folder.strip():
        raise FileNotFoundError(
            "No image folder given. Type the name of a folder inside ComfyUI/input (e.g. iconmatting_targets)."
        )
    root = os.path.abspath(folder_paths.get_input_directory())
    base = os.path.abspath(os.path.join(root, folder.strip()))
    if base == root:
        raise FileNotFoundError(
            f"Image folder '{folder}' is ComfyUI/input itself. Put the target photos in a folder inside it and give its name."
        )
    if os.path.commonpath([root, base]) != root:  # an API client must not read the server's other folders
        raise FileNotFoundError(
            f"Image folder '{folder}' is outside ComfyUI's input folder. Put the photos in a folder inside "
            "ComfyUI/input (or link one there) and give its name."
        )
    if not os.path.isdir(base):
        raise FileNotFoundError(f"Image folder '{folder}' not found in ComfyUI/input. Create it and put the target photos in it.")
    files = sorted(p for p in Path(base).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"Image folder '{folder}' holds no images. Put .png/.jpg/.webp target photos in it.")
    return files


class IconMattingLoadImageFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingLoadImageFolder",
            display_name=FOLDER_NODE,
            category=CATEGORY,
            search_aliases=["load images", "image folder", "load folder", "batch of images"],
            description="Loads every image of a folder as a list, each at its own size (a batch would stretch them to one size). "
            "Files that cannot be read are skipped and named on the node. The images and their results stay in memory: "
            "for catalogues of hundreds of photos use the command line.",
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
    def validate_inputs(cls, folder=None):
        try:
            folder_images(folder)
        except FileNotFoundError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder):
        try:
            return [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder_images(folder)]
        except FileNotFoundError:
            return float("nan")

    @classmethod
    def execute(cls, folder):
        images, names, skipped = [], [], []
        for path in folder_images(folder):
            try:
                rgb = read_image(path)  # upright (EXIF), as the command line reads it
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                skipped.append(f"{path.name} ({exc})")
                continue
            images.append(torch.from_numpy(rgb)[None])
            names.append(path.stem)
        if not images:
            raise ValueError(f"No image in folder '{folder}' could be read: {'; '.join(skipped)}. Replace the files.")
        if skipped:
            note = f"Skipped {len(skipped)} unreadable file(s) in '{folder}': {'; '.join(skipped)}"
            show_on_node(note)
            return io.NodeOutput(images, names, ui={"text": [note]})
        return io.NodeOutput(images, names)


class IconMattingMatchTargets(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingMatchTargets",
            display_name="IconMatting 4 · Match Targets",
            category=CATEGORY,
            search_aliases=["match targets", "targets", "similarity", "guidance"],
            description="Finds the reference's kind of foreground in every target; the preview shows the inter-image similarity.",
            is_input_list=True,
            inputs=[
                ModelType.Input("iconmatting_model", tooltip=f"From {LOAD_NODE}."),
                ContextType.Input("context", tooltip="From Encode Reference or Load Context; several contexts are merged."),
                io.Image.Input("images", tooltip="Targets: a batch, or a list of images of different sizes (e.g. from "
                               "Load Image Folder); each keeps its own size."),
                advanced(Choice("resize_mode", options=list(pre.RESIZE_MODES), default="pad",
                                tooltip="pad: letterbox, no distortion (padding takes no part in matching). "
                                "stretch: squash to the square. Use the reference's mode.")),
                advanced(io.Int.Input("chunk_size", default=1, min=1, max=16,
                                      tooltip="Targets per UNet pass (each pass runs 4 noised copies). Larger is faster "
                                      "on a big GPU and needs more memory.")),
            ],
            outputs=[
                MatchType.Output("match", tooltip="Matched targets, for IconMatting 5 · Remove Background."),
                io.Image.Output("guidance_preview", is_output_list=True,
                                tooltip="Each target with its inter-image similarity as a heat map."),
            ],
        )

    @classmethod
    def execute(cls, iconmatting_model, context, images, resize_mode=("pad",), chunk_size=(1,)):
        model, resize_mode, chunk_size = one(iconmatting_model), one(resize_mode), int(one(chunk_size))
        check_choice("resize_mode", resize_mode, pre.RESIZE_MODES)
        contexts = context if isinstance(context, (list, tuple)) else [context]
        if not all(isinstance(c, ReferenceContext) for c in contexts):
            raise TypeError("context must come from IconMatting 2 · Encode Reference or Load Context.")
        merged = contexts[0]
        for other in contexts[1:]:  # several references (e.g. a list of images encoded one by one): one context
            merged = merged.merge(other)
        targets = split_images(images)
        pipe = model.pipeline()
        try:
            result = pipe.match(merged, targets, resize_mode=resize_mode, chunk_size=chunk_size,
                                progress=progress(len(targets)), output_device=mm.intermediate_device())
        except FloatingPointError as exc:
            raise FloatingPointError(precision_hint(exc)) from None
        size = pipe.config.image_size
        previews = [similarity_preview(src, pre.restore_map(sim, placement, size)[0])[None]
                    for src, sim, placement in zip(targets, result.similarity, result.placements)]
        return io.NodeOutput(result, previews)
