"""Nodes 3 and 4: the targets -- a folder of photos of any sizes, matched against the reference."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

import torch
from PIL import Image

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io

from ..iconmatting_core import preprocess as pre
from ..iconmatting_core.context import ReferenceContext
from ..iconmatting_core.image_io import IMAGE_EXTENSIONS, read_image
from ..iconmatting_core.job.targets import Target, TargetError, list_targets, split_targets
from ..iconmatting_core.postprocess import similarity_preview
from .common import (CATEGORY, CONTEXT_FOLDER, LOAD_NODE, MODEL_FOLDER, RELEASED_WEIGHTS, Choice, ContextType, MatchType,
                     ModelType, advanced, check_choice, node_note, one, precision_hint, progress, schema, split_images)

FOLDER_NODE = "IconMatting 3 · Load Image Folder"
#: From this many images on, the node says that the command line is the tool: ComfyUI holds every image and
#: every result of a run in memory, the command line streams them and resumes an interrupted job.
COMMAND_LINE_FROM = 300
PACK_DIR = Path(__file__).resolve().parents[1]


def folder_path(folder) -> Path:
    """The folder ``folder`` names inside ComfyUI/input; any user error (no name, ComfyUI/input itself,
    outside it, missing) is a FileNotFoundError of one line."""
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
    return Path(base)


def _holds_an_image(base: Path, recursive: bool) -> bool:
    for _, _, files in os.walk(base, followlinks=True):
        if any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files):
            return True
        if not recursive:
            return False
    return False


def _no_images(folder, base: Path, recursive: bool) -> FileNotFoundError:
    if not recursive and _holds_an_image(base, True):
        return FileNotFoundError(f"Image folder '{folder}' holds no images at its top level, only in subfolders. "
                                 "Turn recursive on to load them.")
    return FileNotFoundError(f"Image folder '{folder}' holds no images. Put .png/.jpg/.webp target photos in it.")


@dataclass
class FolderImages:
    """The image files of a folder as the command line finds them (``job.targets``): in name order, subfolders
    searched unless told not to, each with the name its outputs get (its path under the folder without the
    extension: ``trip/x``; the extension kept where a sibling has the same stem: ``t0_png``)."""

    base: Path
    images: List[Target]
    other_types: List[Tuple[str, int]] = field(default_factory=list)  # (extension, files) left out
    problems: List[str] = field(default_factory=list)  # folder link loops, unreadable folders
    unsearched: int = 0  # subfolders not searched (recursive off)
    clips: List[str] = field(default_factory=list)  # videos and animated images left out, by their path under the folder


def _clips_left_out(clips: List[str]) -> str:
    """The clips a folder holds (by their path under it; the first five), and where they are matted."""
    names = "; ".join(clips[:5]) + (f"; and {len(clips) - 5} more" if len(clips) > 5 else "")
    return (f"{len(clips)} clip(s) (videos and animated GIF/WebP/PNG files, whose frames are not one photo): {names}. "
            "Matte them with Load Video (the video workflow) or the command line.")


def folder_images(folder, recursive: bool = True) -> FolderImages:
    """The images of ``folder`` (inside ComfyUI/input); FileNotFoundError of one line when there are none."""
    base = folder_path(folder)
    try:
        found = list_targets([str(base)], recursive=recursive)
    except TargetError as exc:
        if not _holds_an_image(base, recursive):
            raise _no_images(folder, base, recursive) from None
        raise ValueError(f"Image folder '{folder}': {exc}") from None
    images, videos = split_targets(found.targets)
    clips = [video.path.relative_to(base).as_posix() for video in videos]
    if not images and clips and (recursive or not _holds_an_image(base, True)):  # photos below: turn recursive on
        raise FileNotFoundError(f"Image folder '{folder}' holds no photos, only {_clips_left_out(clips)}")
    if not images:
        raise _no_images(folder, base, recursive)
    unsearched = 0 if recursive else sum(1 for p in base.iterdir() if p.is_dir())
    problems = [p.replace(str(base) + os.sep, "") for p in found.problems]  # the server's paths stay unsaid
    return FolderImages(base, images, sorted(found.skipped_types.items()), problems, unsearched, clips=clips)


def _reason(exc: Exception, path: Path) -> str:
    """Why a file could not be read, without the server's paths."""
    text = str(exc).removeprefix(f"cannot read {path}: ")
    return text.replace(str(path), path.name)


def command_line_hint(base: Path, count: int) -> str:
    contexts = folder_paths.get_folder_paths(CONTEXT_FOLDER)[0]
    checkpoints = folder_paths.get_folder_paths("checkpoints")[0]
    weights = folder_paths.get_folder_paths(MODEL_FOLDER)[0]
    out = os.path.join(folder_paths.get_output_directory(), "iconmatting")
    return (f"{count} images: for a folder this size the command line is the tool (it streams the photos in flat memory "
            "and resumes an interrupted job). Save the reference with IconMatting 2 · Save Context, then run (with the "
            f"packages of requirements-cli.txt): python {PACK_DIR / 'iconmatting.py'} matte --context "
            f"{os.path.join(contexts, 'reference_context.safetensors')} --targets {base} --out {out} --sd "
            f"{os.path.join(checkpoints, 'v2-1_768-ema-pruned.safetensors')} --matting-weights "
            f"{os.path.join(weights, RELEASED_WEIGHTS)}")


def folder_note(folder, found: FolderImages, loaded: int, unreadable: List[str]) -> Tuple[str, bool]:
    """What Load Image Folder says on itself: how many images it found and loaded, what it skipped and why;
    and whether that is a warning (files skipped, or a folder for the command line)."""
    in_subfolders = sum("/" in t.name for t in found.images)
    where = f" ({in_subfolders} in subfolders)" if in_subfolders else ""
    parts = [f"Found {len(found.images)} image(s) in '{folder}'{where}; loaded {loaded}."]
    if unreadable:
        parts.append(f"Skipped {len(unreadable)} unreadable file(s): {'; '.join(unreadable)}.")
    if found.other_types:
        kinds = ", ".join(f"{ext or '(none)'} x{n}" for ext, n in found.other_types)
        parts.append(f"Left out {sum(n for _, n in found.other_types)} file(s) that are not images: {kinds}.")
    if found.clips:
        parts.append(f"Left out {_clips_left_out(found.clips)}")
    parts += [f"Skipped {problem}." for problem in found.problems]
    if found.unsearched:
        parts.append(f"{found.unsearched} subfolder(s) not searched (recursive is off).")
    if loaded >= COMMAND_LINE_FROM:
        parts.append(command_line_hint(found.base, loaded))
    return " ".join(parts), bool(unreadable or found.clips or found.problems or loaded >= COMMAND_LINE_FROM)


class IconMattingLoadImageFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingLoadImageFolder",
            display_name=FOLDER_NODE,
            category=CATEGORY,
            search_aliases=["load images", "image folder", "load folder", "batch of images"],
            has_intermediate_output=True,  # newer hosts send its note again when it is cached (a new page, a new graph)
            description="Loads every image of a folder and its subfolders as a list, each at its own size (a batch would "
            "stretch them to one size). Says on itself how many it found, and which files it skipped and why. The images "
            f"and their results stay in memory: for folders of {COMMAND_LINE_FROM} photos and more use the command line.",
            inputs=[
                io.String.Input("folder", default="iconmatting_targets",
                                tooltip="Folder of images inside ComfyUI/input (a name like iconmatting_targets, or a "
                                "sub/folder). Link a folder there to matte photos kept elsewhere."),
                io.Boolean.Input("recursive", default=True,
                                 tooltip="Also load the images of its subfolders (as the command line does). Names keep "
                                 "the subfolder: trip/x."),
            ],
            outputs=[
                io.Image.Output("images", is_output_list=True, tooltip="One image per file, in name order, each at its own size."),
                io.String.Output("names", is_output_list=True,
                                 tooltip="Each image's path under the folder without extension (trip/x), as the command line "
                                 "names its outputs: distinct for every image, usable as a Save Image filename_prefix."),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder=None):
        try:
            base = folder_path(folder)
        except FileNotFoundError as exc:
            return str(exc)
        if not _holds_an_image(base, True):
            return str(_no_images(folder, base, True))
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, recursive=True):
        try:
            return [(t.name, t.path.stat().st_mtime_ns, t.path.stat().st_size) for t in folder_images(folder, recursive).images]
        except (OSError, ValueError):
            return float("nan")

    @classmethod
    def execute(cls, folder, recursive=True):
        found = folder_images(folder, bool(recursive))
        images, names, unreadable = [], [], []
        for target in found.images:
            try:
                rgb = read_image(target.path)  # upright (EXIF), as the command line reads it
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                unreadable.append(f"{target.path.relative_to(found.base).as_posix()} ({_reason(exc, target.path)})")
                continue
            images.append(torch.from_numpy(rgb)[None])
            names.append(target.name)
        if not images:
            raise ValueError(f"No image in folder '{folder}' could be read: {'; '.join(unreadable)}. Replace the files.")
        note, warning = folder_note(folder, found, len(images), unreadable)
        return io.NodeOutput(images, names, ui=node_note(note, warning))


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
