"""What every IconMatting node shares: the ComfyUI types passed between them, model folders, schema
compatibility across ComfyUI releases, and the small adapters between ComfyUI values and the core.

Types passed between the nodes:
* ICONMATTING_MODEL: ``IconMattingOnHost`` (the head with its own patcher, over the host's SD 2.1
  MODEL/VAE from Load Checkpoint);
* ICONMATTING_CONTEXT: ``ReferenceContext`` (region tokens of the reference(s), on the CPU);
* ICONMATTING_MATCH: ``MatchResult`` (fused features per target, on ComfyUI's intermediate device).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import List

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

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
#: The words users type for the task, carried by the one node that does it (Remove Background). Every node's
#: ``search_aliases`` hold only the words of its own job, so a search for the task lists that node, not the
#: whole pack (hosts with ``search_aliases``, newer ComfyUI; older frontends search only node ids and display
#: names, so the display names carry the main words too).
TASK_WORDS = ["matting", "alpha", "alpha matte", "cutout", "cut out", "remove background", "background removal",
              "background remover", "transparent background", "in-context matting"]
LOAD_NODE = "IconMatting 1 · Load"

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


def full_path(folder: str, name: str, hint: str) -> str:
    """The file ``name`` of a model folder; a missing one is a one-line error ending with ``hint``."""
    try:
        return folder_paths.get_full_path_or_raise(folder, name)
    except FileNotFoundError:
        where = ", ".join(folder_paths.get_folder_paths(folder))
        raise FileNotFoundError(f"'{name}' is not in {where}. {hint}") from None


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


#: Hosts with dynamic V3 inputs (0.28.2: ``io.DynamicCombo``) parse every V3 input's type, which must then be a
#: name, and check V3 combo values themselves; older hosts (0.3.75) check only combos typed by their options.
HOST_CHECKS_V3_COMBOS = hasattr(io, "DynamicCombo")


class Choice(io.Combo.Input):
    """A combo of fixed options whose value the host checks when a prompt is queued, reporting a wrong one once,
    under its own input. (A node's ``validate_inputs`` cannot: the host reports its message under every input the
    function names.) Where the host does not check V3 combos (``HOST_CHECKS_V3_COMBOS`` false), this combo's type
    is its list of options, the V1 form that host checks; the frontends draw both forms as the same dropdown."""

    def get_io_type(self):
        return super().get_io_type() if HOST_CHECKS_V3_COMBOS else list(self.options)


def check_choice(name: str, value, options) -> None:
    """A choice given to ``execute`` directly (the host checks prompts: :class:`Choice`)."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(str, options))}; got {value!r}.")


def missing_input(name: str, node: str) -> str:
    return f"The input '{name}' of {node} is empty. Choose a value (API clients: send it in the prompt)."


def precision_hint(exc: Exception) -> str:
    return f"{exc} The head's precision is the dtype input of {LOAD_NODE} (advanced inputs)."


def progress(total: int):
    bar = comfy.utils.ProgressBar(total)

    def update(done: int, _total: int) -> None:
        bar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    return update


def split_images(images) -> List[torch.Tensor]:
    """IMAGE batches (or a list of them, from a list input) -> one [H, W, C] tensor per image."""
    batches = images if isinstance(images, (list, tuple)) else [images]
    out = []
    for b in batches:
        out += list(b.unbind(0)) if b.ndim == 4 else [b]
    return out


def one(value):
    """A list input's single value (list inputs arrive as lists, one item per upstream output)."""
    return value[0] if isinstance(value, (list, tuple)) else value


#: The ui output key of a note that is a warning (the pack's web extension also shows it in a toast).
WARNING_KEY = "iconmatting_warning"


def node_note(text: str, warning: bool = False) -> dict:
    """The one way a node tells the user about its run; returns the ``ui`` of its ``io.NodeOutput``.

    The text goes out as the node's ui ``text``: the pack's web extension (``web/iconmatting_notes.js``)
    writes it on the node, in both renderers (litegraph and the Vue "Nodes 2.0") of every frontend tested
    (1.32.9, 1.45.21, 1.58.1), and a warning (``WARNING_KEY``) also in a toast; API clients read it in the
    prompt's history. (The host's progress text is not used: frontend 1.58 removes it when the run ends.)
    The log gets it once, at WARNING level for a warning, else INFO."""
    log.log(logging.WARNING if warning else logging.INFO, "IconMatting: %s", text)
    return {"text": [text], WARNING_KEY: [warning]}
