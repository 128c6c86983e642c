"""Runs inside a booted ComfyUI: its ``GET /object_info`` answer (every node type), as the frontend gets it.

args: ``nodes`` (optional): only these node types (a type the host lacks is left out).
"""


def run(ctx):
    status, body = ctx._comfy.call_route("GET", "/object_info")
    if status != 200:
        raise RuntimeError(f"GET /object_info answered {status}")
    wanted = ctx.args.get("nodes")
    return {"object_info": body if wanted is None else {n: body[n] for n in wanted if n in body}}
