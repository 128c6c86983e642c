"""Nodes 2: the reference context -- encode it from marked reference images, save it, load it."""
from __future__ import annotations

import os
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import List

import folder_paths
from comfy_api.latest import io

from ..iconmatting_core import preprocess as pre
from ..iconmatting_core.context import POOLING_MODES
from ..iconmatting_core.context_file import ContextFileError
from ..iconmatting_core.postprocess import is_unpainted_mask
from .common import (CATEGORY, CONTEXT_FOLDER, LOAD_NODE, Choice, ContextType, ModelType, advanced, check_choice,
                     full_path, missing_input, schema)

ENCODE_NODE = "IconMatting 2 · Encode Reference"
SAVE_NODE = "IconMatting 2 · Save Context"
CONTEXT_HINT = f"Encode the reference with {ENCODE_NODE} and save it with {SAVE_NODE}."
DEFAULT_CONTEXT_NAME = "reference_context"


def node_context_message(exc: ContextFileError) -> str:
    """A context-file error in the words of the nodes: the command line's ``encode`` hints become
    the nodes that make a context, and the exception's module path is not shown."""
    text = str(exc)
    text = re.sub(r"Make one with `[^`]*`\.?", CONTEXT_HINT, text)
    text = re.sub(r"Is it a context file written by `encode`\?", f"Is it a context file? {CONTEXT_HINT}", text)
    text = re.sub(r"make one with `encode`\.?", f"make one with {SAVE_NODE}.", text)
    text = re.sub(r"was not written by `encode`", f"was not written by {SAVE_NODE}", text)
    text = re.sub(r"([Ee])ncode the reference again(?: with these weights)?\.?|encode again\.?",
                  lambda m: f"{m.group(1) or 'e'}ncode the reference again ({ENCODE_NODE}, then {SAVE_NODE}).", text)
    return text


def context_name_parts(filename) -> List[str]:
    """The folders and stem of a Save Context file name (``sub/dir/x``, either slash), ``.safetensors`` dropped;
    a name that would leave the contexts folder (``..``, an absolute path) is a ValueError of one line."""
    name = filename.strip() if isinstance(filename, str) else ""
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        raise ValueError(f"The file name '{filename}' is an absolute path. Give a name inside "
                         "ComfyUI/models/iconmatting_contexts (e.g. products/shoe), not a path elsewhere.")
    parts = [p for p in re.split(r"[\\/]", name) if p not in ("", ".")]
    if name.endswith(("/", "\\")):  # a folder alone: the default name in it
        parts.append(DEFAULT_CONTEXT_NAME)
    if ".." in parts:
        raise ValueError(f"The file name '{filename}' leaves ComfyUI/models/iconmatting_contexts ('..'). Give a name "
                         "inside it (e.g. products/shoe).")
    if parts and parts[-1].endswith(".safetensors"):
        parts[-1] = parts[-1][: -len(".safetensors")]
    if not parts or not parts[-1]:
        parts = parts[:-1] + [DEFAULT_CONTEXT_NAME]
    return parts


def free_context_name(folder: str, filename: str) -> str:
    """``<filename>.safetensors`` under ``folder`` (its subfolders kept: ``sub/dir/x``), or, if taken, the first
    free ``<filename>_00001``... (as Save Image numbers its files): a saved context is never overwritten.
    Returned relative to ``folder``, with forward slashes (as Load Context lists it)."""
    *subfolders, stem = context_name_parts(filename)
    where = os.path.join(folder, *subfolders)
    name, counter = f"{stem}.safetensors", 0
    while os.path.lexists(os.path.join(where, name)):
        counter += 1
        name = f"{stem}_{counter:05d}.safetensors"
    return "/".join([*subfolders, name])


class IconMattingEncodeReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingEncodeReference",
            display_name=ENCODE_NODE,
            category=CATEGORY,
            search_aliases=["reference", "encode reference", "reference mask", "mark foreground"],
            description="Encodes the foreground marked on the reference image(s) once, for matching any number of targets.",
            inputs=[
                ModelType.Input("iconmatting_model", tooltip=f"From {LOAD_NODE}."),
                io.Image.Input("image", tooltip="Reference image(s); several images build one context."),
                io.Mask.Input("mask", tooltip="Foreground on each reference (one mask per image, or one for all): paint it in "
                              "Load Image's mask editor, or connect any mask."),
                Choice("guidance", options=list(POOLING_MODES), default="mask",
                       tooltip="mask: a filled mask of the foreground (the paper's setting). scribble: strokes or "
                       "clicks on the foreground; every cell they touch counts."),
                advanced(Choice("resize_mode", options=list(pre.RESIZE_MODES), default="pad",
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
        check_choice("guidance", guidance, POOLING_MODES)
        check_choice("resize_mode", resize_mode, pre.RESIZE_MODES)
        if is_unpainted_mask(mask, image.shape[1:3]):
            raise ValueError(
                "The reference has no mask painted (Load Image gives an empty 64x64 mask). "
                "Right-click the reference's Load Image node, choose 'Open in MaskEditor' and paint the foreground."
            )
        masks = mask[None] if mask.ndim == 2 else mask
        pipe = iconmatting_model.pipeline()
        ctx = pipe.encode_reference(list(image.unbind(0)), list(masks.unbind(0)), pooling=guidance,
                                    resize_mode=resize_mode, seed=seed)
        return io.NodeOutput(ctx)


class IconMattingSaveContext(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingSaveContext",
            display_name=SAVE_NODE,
            category=CATEGORY,
            search_aliases=["save reference", "save context", "reference context"],
            description="Saves an encoded reference to ComfyUI/models/iconmatting_contexts, for Load Context and the command "
            "line. An existing file is never overwritten: the name gets a number, as with Save Image.",
            is_output_node=True,
            inputs=[
                ModelType.Input("iconmatting_model", tooltip="The model the context was encoded with (its weights are fingerprinted)."),
                ContextType.Input("context", tooltip=f"From {ENCODE_NODE}."),
                io.String.Input("filename", default=DEFAULT_CONTEXT_NAME,
                                tooltip="File name in ComfyUI/models/iconmatting_contexts, or sub/folder/name to keep "
                                "contexts in folders there (.safetensors is added; if the name is taken, _00001, "
                                "_00002... is added)."),
            ],
            outputs=[],
        )

    @classmethod
    def validate_inputs(cls, filename=None):
        try:
            context_name_parts(filename)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, iconmatting_model, context, filename):
        from ..iconmatting_core.context_file import save_context

        folder = folder_paths.get_folder_paths(CONTEXT_FOLDER)[0]
        name = free_context_name(folder, filename)
        path = os.path.join(folder, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_context(path, context, iconmatting_model.model.fingerprint(), {"resize_mode": context.resize_mode})
        return io.NodeOutput(ui={"text": [f"Saved {name}"]})


def context_choices() -> List[str]:
    return folder_paths.get_filename_list(CONTEXT_FOLDER)


class IconMattingLoadContext(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        choices = context_choices()
        return schema(
            node_id="IconMattingLoadContext",
            display_name="IconMatting 2 · Load Context",
            category=CATEGORY,
            search_aliases=["load reference", "load context", "reference context"],
            description="Loads a reference context saved by Save Context or `python -m iconmatting_core encode`, "
            "instead of encoding the reference again.",
            inputs=[
                ModelType.Input("iconmatting_model", tooltip="Must hold the same weights the context was made with."),
                io.Combo.Input("context_file", options=choices or [f"{DEFAULT_CONTEXT_NAME}.safetensors"],
                               tooltip="A context in ComfyUI/models/iconmatting_contexts."),
            ],
            outputs=[ContextType.Output("context", tooltip="The saved reference context.")],
        )

    @classmethod
    def validate_inputs(cls, context_file=None):
        if not isinstance(context_file, str) or not context_file:
            return missing_input("context_file", "IconMatting 2 · Load Context")
        if not folder_paths.get_full_path(CONTEXT_FOLDER, context_file):
            return (f"Context file '{context_file}' is not in ComfyUI/models/iconmatting_contexts. "
                    f"Save one with {SAVE_NODE} first.")
        return True

    @classmethod
    def execute(cls, iconmatting_model, context_file):
        from ..iconmatting_core.context_file import load_context

        path = full_path(CONTEXT_FOLDER, context_file, f"Save one with {SAVE_NODE} first.")
        expected = iconmatting_model.model.fingerprint()
        try:
            return io.NodeOutput(load_context(path, expected_fingerprint=expected))
        except ContextFileError as exc:
            raise ValueError(node_context_message(exc)) from None
