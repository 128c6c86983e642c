"""Runs inside a booted ComfyUI: what a new user without any IconMatting weights sees on Load IconMatting.

args: ``empty`` (a folder to use as the only models/iconmatting folder), ``prompt`` (a workflow naming
icm.ckpt, validated through ComfyUI's own /prompt handler). Returns the matting_model
combo's options and default, the validation message for that default, and the pack's web folder as
ComfyUI registered it (node help pages under docs/).
"""
import sys
from pathlib import Path


def run(ctx):
    import folder_paths

    nodes_mod = next(m for n, m in sys.modules.items() if n.endswith(".nodes.iconmatting_nodes") and "iconmatting" in n)
    empty = Path(ctx.args["empty"])
    empty.mkdir(parents=True, exist_ok=True)
    saved = folder_paths.folder_names_and_paths["iconmatting"]
    folder_paths.folder_names_and_paths["iconmatting"] = ([str(empty)], saved[1])
    try:
        folder_paths.filename_list_cache.pop("iconmatting", None) if hasattr(folder_paths, "filename_list_cache") else None
        schema = nodes_mod.IconMattingLoad.define_schema()
        combo = next(i for i in schema.inputs if i.id == "matting_model")
        message = nodes_mod.IconMattingLoad.validate_inputs(matting_model=combo.default)
        served = ctx.run_prompt(ctx.args["prompt"])["validation"] if "prompt" in ctx.args else None
        import nodes

        web = {name: path for name, path in nodes.EXTENSION_WEB_DIRS.items() if "iconmatting" in name}
        return {"options": list(combo.options), "default": combo.default, "validation": message, "web_dirs": web,
                "served_validation": served}
    finally:
        folder_paths.folder_names_and_paths["iconmatting"] = saved
        if hasattr(folder_paths, "filename_list_cache"):
            folder_paths.filename_list_cache.pop("iconmatting", None)
