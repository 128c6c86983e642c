from .iconmatting_nodes import NODES, comfy_entrypoint, register_model_folders

register_model_folders()

__all__ = ["NODES", "comfy_entrypoint"]
