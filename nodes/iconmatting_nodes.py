"""ComfyUI nodes (V3 schema): thin adapters between ComfyUI types and ``iconmatting_core``.

The nodes, by role: ``model_nodes`` (1 · Load), ``context_nodes`` (2 · Encode Reference, Save
Context, Load Context), ``target_nodes`` (3 · Load Image Folder, 4 · Match Targets),
``output_nodes`` (5 · Remove Background, 6 · Composite Cutouts); what they share is in ``common``.
Nodes sort in pipeline order in the node library (display names numbered 1 to 6).
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .common import register_model_folders
from .context_nodes import IconMattingEncodeReference, IconMattingLoadContext, IconMattingSaveContext
from .model_nodes import IconMattingLoad
from .output_nodes import IconMattingComposite, IconMattingDecodeAlpha
from .target_nodes import IconMattingLoadImageFolder, IconMattingMatchTargets

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
