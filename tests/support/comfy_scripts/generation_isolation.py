"""Runs inside a booted ComfyUI (tests/host/test_workflows.py): the generation template's matting branch against its
generation branch, in the same prompt.

args:

* ``generation_only``: an API prompt that only generates a batch, run first on a fresh ComfyUI state (no cached
  node output, no loaded model: the flags of ``POST /free``, taken by ComfyUI's prompt worker, as a user's "Unload
  models" button sets them);
* ``with_matting``: ``[{"name", "prompt", "fresh", "compare"}]``, run in order: generation graphs with the matting
  branch beside them (the same node ids, the same generation checkpoint), each on a fresh state or (``fresh``
  false) on what the previous prompt left (its cached Load Checkpoint and IconMatting Load outputs: the
  generation then runs on the MODEL an earlier matting used); ``compare``: the prompt generates the same batch
  (same seed), to be compared with the generation-only one;
* ``nodes``: the node ids (the same in every prompt) of ``decode`` (VAE Decode of the batch),
  ``generation_loader`` and ``features_loader`` (the two Load Checkpoint nodes) and ``load`` (IconMatting 1 · Load);
* ``pack_dirs``: the folders holding the pack's own code (``nodes/``, ``iconmatting_core/``).

While the prompts run, two host functions are watched, never changed in effect:

* ``comfy.model_management.load_models_gpu``: which patchers each call loads, and whether the pack itself made the
  call (its immediate caller, past model management's own frames, is a file of ``pack_dirs``);
* ``torch.nn.Module._apply`` (behind ``.to()``, ``.cuda()``, ``.cpu()``, ``.half()``, ...): every move or cast of a
  module whose immediate caller (past torch's own frames) is the pack's code. Such a call on a module of a host model
  (the MODEL's UNet, a VAE, a CLIP) is a direct move that bypasses ComfyUI's memory management.

Returns the generation-only run's entry (as ``ctx.run_prompt`` gives it) and per prompt with matting: its entry,
whether its generated batch equals the generation-only one bit for bit, the models' roles as ComfyUI loaded them,
the patch state of the user's MODELs after the run, the direct moves, and a control: a direct ``.to()`` of a host
UNet made from a file of ``pack_dirs`` is seen by the watcher.
"""
import os
import sys
import threading
import time
import types

import torch

_HERE = os.path.realpath(__file__)
_TORCH = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep


class Watch:
    """Records load_models_gpu calls and the pack's direct module moves while installed."""

    def __init__(self, pack_dirs):
        self.pack_dirs = tuple(os.path.realpath(d) + os.sep for d in pack_dirs)
        self.loads, self.moves = [], []
        self._depth = threading.local()

    def from_pack(self, frame, skip) -> bool:
        """Whether the first frame outside ``skip`` (path prefixes) and this file is the pack's code."""
        while frame is not None:
            path = os.path.realpath(frame.f_code.co_filename)
            if path != _HERE and not path.startswith(skip):
                return path.startswith(self.pack_dirs)
            frame = frame.f_back
        return False

    def install(self):
        import comfy.model_management as mm

        self._mm, self._load, self._apply = mm, mm.load_models_gpu, torch.nn.Module._apply
        mm_file = (os.path.realpath(mm.__file__),)
        watch, load, apply = self, self._load, self._apply

        def load_models_gpu(models, *args, **kwargs):
            watch.loads.append({
                "patchers": [id(m) for m in models],
                "models": [id(getattr(m, "model", None)) for m in models],
                "from_pack": watch.from_pack(sys._getframe(1), mm_file),
            })
            return load(models, *args, **kwargs)

        def _apply(module, fn, *args, **kwargs):
            depth = getattr(watch._depth, "n", 0)
            if depth == 0 and watch.from_pack(sys._getframe(1), (_TORCH,)):
                caller = sys._getframe(1)
                while os.path.realpath(caller.f_code.co_filename).startswith(_TORCH):
                    caller = caller.f_back
                watch.moves.append({"module": id(module), "class": type(module).__name__,
                                    "caller": f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno}"})
            watch._depth.n = depth + 1
            try:
                return apply(module, fn, *args, **kwargs)
            finally:
                watch._depth.n = depth

        mm.load_models_gpu = load_models_gpu
        torch.nn.Module._apply = _apply
        return self

    def uninstall(self):
        self._mm.load_models_gpu = self._load
        torch.nn.Module._apply = self._apply


def worker_idle(ctx, deadline: float) -> None:
    """Wait until ComfyUI's prompt worker waits for its queue again: past what it does after a prompt (the
    free-memory flags, its garbage collection, which frees models too), so nothing here runs beside it."""
    worker = ctx._comfy.worker
    while True:
        frame, names = sys._current_frames().get(worker.ident), []
        while frame is not None and len(names) < 3:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        if names[:2] == ["wait", "get"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"ComfyUI's prompt worker is still busy in {names}")
        time.sleep(0.01)


def free(ctx, timeout_s: float = 60.0) -> None:
    """ComfyUI's own "free memory": its prompt worker unloads every model and drops every cached output."""
    deadline = time.monotonic() + timeout_s
    worker_idle(ctx, deadline)
    queue = ctx._comfy.server.prompt_queue
    for flag in ("unload_models", "free_memory"):  # what ComfyUI's POST /free does with these two set
        queue.set_flag(flag, True)
    while queue.get_flags(reset=False):  # the worker takes the flags, then unloads and resets
        if time.monotonic() > deadline:
            raise TimeoutError("ComfyUI's prompt worker did not take the free-memory flags")
        time.sleep(0.01)
    worker_idle(ctx, deadline)


def patch_state(patcher) -> dict:
    """What a ModelPatcher carries beyond its weights: transformer patches, weight and object patches."""
    options = patcher.model_options.get("transformer_options", {})
    return {
        "patches": sorted(k for k, v in options.get("patches", {}).items() if v),
        "patches_replace": {k: len(v) for k, v in options.get("patches_replace", {}).items() if v},
        "weight_patches": len(patcher.patches),
        "object_patches": len(getattr(patcher, "object_patches", {})),
    }


def module_ids(*modules) -> set:
    return {id(m) for module in modules for m in module.modules()}


def run_with_matting(ctx, prompt, nodes, pack_dirs) -> dict:
    watch = Watch(pack_dirs).install()
    try:
        entry = ctx.run_prompt(prompt)
    finally:
        watch.uninstall()
    if not (entry["execution"] and entry["execution"]["success"]):
        return {"entry": entry}
    gen_model, gen_clip, gen_vae = (slot[0] for slot in ctx.node_outputs(nodes["generation_loader"]))
    feat_model, feat_clip, feat_vae = (slot[0] for slot in ctx.node_outputs(nodes["features_loader"]))
    loaded = ctx.node_outputs(nodes["load"])[0][0]
    clone = loaded.extractor.patcher
    roles = {"generation UNet": id(gen_model.model), "generation VAE": id(gen_vae.patcher.model),
             "features UNet": id(feat_model.model), "features VAE": id(feat_vae.patcher.model),
             "matting head": id(loaded.patcher.model)}
    host = module_ids(gen_model.model, feat_model.model, gen_vae.first_stage_model, feat_vae.first_stage_model,
                      gen_clip.cond_stage_model, feat_clip.cond_stage_model)
    pack_loads = [call for call in watch.loads if call["from_pack"]]
    direct, before_control = [m for m in watch.moves if m["module"] in host], len(watch.moves)
    watch.install()
    try:
        control_move(gen_model.model.diffusion_model.out, pack_dirs)
    finally:
        watch.uninstall()
    return {
        "entry": entry,
        "images": ctx.node_outputs(nodes["decode"])[0][0].clone(),
        "shared_model_object": gen_model is feat_model,
        "loaded_through_model_management": {role: any(i in call["models"] for call in watch.loads)
                                            for role, i in roles.items()},
        "pack_loads_generation_unet": gen_model is not feat_model
        and any(roles["generation UNet"] in call["models"] for call in pack_loads),
        "pack_loads_features_unet_as": sorted({"the user's MODEL" if p == id(feat_model) else
                                               "IconMatting's clone" if p == id(clone) else "another patcher"
                                               for call in pack_loads for p, m in zip(call["patchers"], call["models"])
                                               if m == roles["features UNet"]}),
        "pack_loads": len(pack_loads),
        "direct_moves_of_host_models": direct,
        "control_move_seen": any(m["module"] in host for m in watch.moves[before_control:]),
        "pack_moves": sorted({m["class"] for m in watch.moves}),
        "generation_model_state": patch_state(gen_model),
        "features_model_state": patch_state(feat_model),
        "clone_state": patch_state(clone),
        "clone_is_the_users_model": clone is feat_model,
    }


def control_move(module, pack_dirs) -> None:
    """A direct ``.to()`` of ``module`` made by code compiled as if it were a file of the pack (the watcher's control)."""
    def move(m):
        m.to("cpu")

    as_pack_file = move.__code__.replace(co_filename=os.path.join(pack_dirs[0], "_control.py"))
    types.FunctionType(as_pack_file, {})(module)


@torch.no_grad()
def run(ctx) -> dict:
    nodes, pack_dirs = ctx.args["nodes"], ctx.args["pack_dirs"]
    free(ctx)
    alone = ctx.run_prompt(ctx.args["generation_only"])
    out = {"generation_only": alone, "runs": {}}
    if not (alone["execution"] and alone["execution"]["success"]):
        return out
    batch = ctx.node_outputs(nodes["decode"])[0][0].clone()
    out["generated_shape"] = list(batch.shape)
    for item in ctx.args["with_matting"]:
        if item["fresh"]:
            free(ctx)
        else:
            worker_idle(ctx, time.monotonic() + 60)
        result = run_with_matting(ctx, item["prompt"], nodes, pack_dirs)
        images = result.pop("images", None)
        if images is not None and item["compare"]:
            result["bit_identical"] = images.shape == batch.shape and torch.equal(images, batch)
            result["max_abs_diff"] = (images.float() - batch.float()).abs().max().item()
        out["runs"][item["name"]] = result
    worker_idle(ctx, time.monotonic() + 60)  # the runner frees the models next
    return out
