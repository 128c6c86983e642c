"""ComfyUI In-Context Matting (IconMatting): mark the foreground once, matte a whole batch.

A V3 node pack: ComfyUI finds ``comfy_entrypoint`` (and the node help pages under
``WEB_DIRECTORY``). Outside ComfyUI (e.g. when a test runner imports this folder as a package)
there is no ``comfy`` module and nothing to register; the model library is ``iconmatting_core``.
"""
import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
else:
    __all__ = ["WEB_DIRECTORY"]
