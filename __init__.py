"""ComfyUI In-Context Matting (IconMatting): mark the foreground once, matte a whole batch.

Outside ComfyUI (e.g. when a test runner imports this folder as a package) there is no
``comfy`` module and no node to register; the model library is ``iconmatting_core``.
"""
import importlib.util

if importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
