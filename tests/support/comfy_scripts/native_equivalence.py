"""Runs inside a booted ComfyUI (``run_comfy(..., scripts=[...])``): the IconMatting pack on the host's
own SD 2.x objects (Load Checkpoint) against the core's diffusers path on the same single file.

args: ``ckpt`` (file name in models/checkpoints), ``head`` (path of the head .safetensors).
Returns max abs differences per quantity; where the passes stop; features under other extensions' UNet
wrappers and patches; and whether anything of the user's MODEL and VAE changed (snapshots before, during a
pass and after).
"""
import sys
from pathlib import Path

import torch

SUPPORT = Path(__file__).resolve().parents[1]


def _pack_module(suffix):
    """A module of the pack as ComfyUI imported it (its package is the pack's folder name)."""
    import importlib

    for name in list(sys.modules):
        if name.endswith(".nodes.host_model"):
            return importlib.import_module(name[: -len(".nodes.host_model")] + suffix)
    raise RuntimeError("the IconMatting pack is not loaded")


def _test_helpers():
    """tests/support/tiny_models.py and tiny_sd2_checkpoint.py: not part of the pack, imported from this repository
    (its root and tests/support appended to ``sys.path``, so ComfyUI's own modules, e.g. nodes.py, keep precedence)."""
    for path in (str(SUPPORT.parents[1]), str(SUPPORT)):
        if path not in sys.path:
            sys.path.append(path)
    import tiny_models
    import tiny_sd2_checkpoint

    return tiny_models, tiny_sd2_checkpoint


def _diff(a, b):
    return float((a.float() - b.float()).abs().max())


def run(ctx):
    import comfy.model_management as mm
    import folder_paths
    import nodes

    host = _pack_module(".nodes.host_model")
    pipeline_mod = _pack_module(".iconmatting_core.pipeline")
    sd_loading = _pack_module(".iconmatting_core.sd_loading")
    tiny_models, tiny_sd2_checkpoint = _test_helpers()
    checkpoint = _pack_module(".iconmatting_core.checkpoint")

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ctx.args["ckpt"])[:3]
    torch.manual_seed(0)
    size = 128
    latent = torch.randn(2, 4, size // 8, size // 8)
    sigma = torch.tensor([2.0, 2.0])
    cond = torch.randn(2, 77, model.model.model_config.unet_config["context_dim"])

    def user_forward():  # what a KSampler asks of the user's MODEL
        mm.load_models_gpu([model])
        return model.model.apply_model(latent, sigma, c_crossattn=cond,
                                       transformer_options=dict(model.model_options["transformer_options"]))

    options_before = repr(model.model_options)
    before = user_forward()

    native = host.load_on_host(model, clip, vae, ctx.args["head"], "fp32")
    native_pipe = native.pipeline()
    sd = sd_loading.load_sd_components(folder_paths.get_full_path("checkpoints", ctx.args["ckpt"]),
                                       **tiny_sd2_checkpoint.tiny_comfy_sd2_configs())
    head, _ = checkpoint.load_head(ctx.args["head"])
    reference_pipe = pipeline_mod.IconMattingPipeline(pipeline_mod.build_model(sd, head))

    out = {"prompt": _diff(native.extractor.empty_prompt_embedding, reference_pipe.model.extractor.empty_prompt_embedding)}
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, size, size, generator=gen) * 2 - 1
    f_native = native.extractor(images, seed=5)
    f_ref = reference_pipe.model.extractor(images, seed=5)
    out["up0"] = _diff(f_native.up_features[0], f_ref.up_features[0])
    out["up1"] = _diff(f_native.up_features[1], f_ref.up_features[1])
    out["attention"] = {str(r): _diff(f_native.attention[r], f_ref.attention[r]) for r in f_ref.attention}
    out["feature_scale"] = float(max(f.abs().max() for f in f_ref.up_features))
    # the VAE encoder's attention in the pack's encode (ComfyUI's CPU default is its split attention), and the host's
    attn_blocks = [m for m in vae.first_stage_model.encoder.modules() if hasattr(m, "optimized_attention")]
    out["vae_attention"] = {"pack": getattr(native.extractor.vae_attention, "__name__", None),
                            "host": [m.optimized_attention.__name__ for m in attn_blocks]}
    # the UNet part alone (identical noised latents and prompt into both UNets): our patches vs diffusers' hooks
    latents = reference_pipe.model.extractor.noisy_latents(images, 5)
    prompt = reference_pipe.model.extractor.empty_prompt_embedding.expand(latents.shape[0], -1, -1)
    for name, ext in (("native", native.extractor), ("reference", reference_pipe.model.extractor)):
        ext.recorder.reset(images.shape[0], ext.config.ensemble_size)
        try:
            ups = ext.unet_up_features(latents, prompt, True)
            maps = ext.recorder.maps()
        finally:
            ext.recorder.reset(0, 1)
        out.setdefault("unet_only", {})[name] = (ups, maps)
    (nu, nm), (ru, rm) = out["unet_only"]["native"], out["unet_only"]["reference"]
    out["unet_only"] = {"up0": _diff(nu[0], ru[0]), "up1": _diff(nu[1], ru[1]),
                        "attention": max(_diff(nm[r], rm[r]) for r in rm)}

    ref_image = torch.rand(96, 120, 3, generator=gen)
    ref_mask = torch.zeros(96, 120)
    ref_mask[20:80, 30:100] = 1
    targets = [torch.rand(90, 60, 3, generator=gen), torch.rand(64, 100, 3, generator=gen)]
    results = {}
    for name, pipe in (("native", native_pipe), ("reference", reference_pipe)):
        context = pipe.encode_reference(ref_image, ref_mask, seed=2)
        match = pipe.match(context, targets)
        results[name] = (context, match, pipe.decode(match))
    out["tokens"] = _diff(results["native"][0].tokens, results["reference"][0].tokens)
    out["similarity"] = max(_diff(a, b) for a, b in zip(results["native"][1].similarity, results["reference"][1].similarity))
    out["alpha"] = max(_diff(a, b) for a, b in zip(results["native"][2], results["reference"][2]))
    out["alpha_shapes"] = [list(a.shape) for a in results["native"][2]]

    # memory short: the ensemble copies run in smaller groups (ComfyUI's free memory said to hold a pass over
    # three of the four copies: groups that split an image's copies), with the same features and alpha to float rounding
    ext = native.extractor
    passes = []
    unet_pass = ext.unet_up_features
    ext.unet_up_features = lambda latents, *a: passes.append(latents.shape[0]) or unet_pass(latents, *a)
    saved_free = mm.get_free_memory
    mm.get_free_memory = lambda *a, **k: mm.extra_reserved_memory() + ext.pass_bytes(3)
    try:
        f_group = ext(images, seed=5)
        passes, group_passes = [], list(passes)
        group_alpha = native_pipe.decode(native_pipe.match(results["native"][0], targets))
    finally:
        mm.get_free_memory = saved_free
        del ext.unet_up_features
    out["groups"] = {"passes": group_passes, "copies": images.shape[0] * ext.config.ensemble_size,
                     "up1": _diff(f_group.up_features[1], f_native.up_features[1]),
                     "attention": max(_diff(f_group.attention[r], f_native.attention[r]) for r in f_native.attention),
                     "alpha": max(_diff(a, b) for a, b in zip(group_alpha, results["native"][2]))}

    # ComfyUI's default text encoder dtype (fp16 on the CPU; this run has --fp32-text-enc): the same embedding
    import comfy.sd
    empty_prompt = _pack_module(".nodes.empty_prompt")
    clip16 = comfy.sd.load_checkpoint_guess_config(folder_paths.get_full_path("checkpoints", ctx.args["ckpt"]), output_vae=False,
                                                   output_model=False, te_model_options={"dtype": torch.float16})[1]
    fp32 = native.extractor.empty_prompt_embedding
    out["prompt_default_dtype"] = {
        "weights": [str(v.dtype) for v in clip16.cond_stage_model.state_dict().values() if v.is_floating_point()],
        "fp32_scale": float(fp32.abs().max()),
        "rounded_weights": _diff(empty_prompt._encode_empty(clip16), fp32),  # what ComfyUI's fp16 CLIP gives
        "pack": _diff(empty_prompt.empty_prompt_from_clip(clip16, model.model.model_config), fp32),
    }
    del clip16

    # what ComfyUI does to a model it can only partly load (--lowvram/--novram): weights stay offloaded
    # and every layer casts them per call; the head must give the same alpha that way
    cast = [m for m in native.model.head.modules() if hasattr(m, "comfy_cast_weights")]
    for m in cast:
        m.comfy_cast_weights = True
    try:
        alpha_cast = native_pipe.decode(results["native"][1])
    finally:
        for m in cast:
            m.comfy_cast_weights = False
    out["head_cast_layers"] = len(cast)
    out["head_layers"] = sum(1 for m in native.model.head.modules() if list(m.parameters(recurse=False)))
    out["alpha_cast_mode"] = max(_diff(a, b) for a, b in zip(alpha_cast, results["native"][2]))

    # a model that is not SD 2.x (here: the same weights declared SD 1.5) is refused, not matted with wrong features
    import comfy.supported_models

    saved = model.model.model_config
    fake = object.__new__(comfy.supported_models.SD15)  # not copy.copy: 0.28's BASE.__getattr__ answers None
    fake.__dict__.update(saved.__dict__)                # for __setstate__ too
    model.model.model_config = fake
    try:
        host.load_on_host(model, clip, vae, ctx.args["head"], "fp32")
        out["sd1_refused"] = None
    except ValueError as exc:
        out["sd1_refused"] = str(exc)
    finally:
        model.model.model_config = saved

    # the Load node on the host's objects: weights for other UNet widths are refused with one line before any
    # feature pass; a LoRA-patched MODEL runs with its warning in the node's UI output
    load_node = _pack_module(".nodes.model_nodes").IconMattingLoad
    head_path = Path(ctx.args["head"])
    other = head_path.with_name("other_widths.safetensors")
    tiny_models.save_tiny_head(other, tiny_models.tiny_config(unet_feature_channels=(64, 64)))
    try:
        load_node.execute(model, clip, vae, other.name)
        out["other_widths"] = None
    except ValueError as exc:
        out["other_widths"] = str(exc)
    finally:
        other.unlink()
    patched = model.clone()
    key = next(k for k in model.model.state_dict() if k.startswith("diffusion_model.") and k.endswith(".weight"))
    patched.add_patches({key: (torch.zeros_like(model.model.state_dict()[key]),)}, 1.0)
    out["patched_ui"] = load_node.execute(patched, clip, vae, head_path.name).ui
    out["plain_ui"] = load_node.execute(model, clip, vae, head_path.name).ui

    # a feature step places the head with the UNet and the VAE (it is complete from construction on)
    mm.unload_all_models()
    native.extractor.posterior(images)
    out["loaded_with_a_feature_step"] = sorted(name for name, patcher in (("head", native.patcher), ("unet", native.extractor.patcher),
                                                                          ("vae", vae.patcher))
                                               if any(lm.model is patcher for lm in mm.current_loaded_models))
    out.update(_early_stop(host, model, clip, vae, ctx.args["head"], images, f_native, reference_pipe))
    out.update(_nothing_of_the_user_changes(native_pipe, model, vae, images, ref_image, ref_mask, targets))
    out["fingerprints_match"] = _pack_module(".iconmatting_core.context_file").same_weights(
        native_pipe.fingerprint, reference_pipe.fingerprint)

    after = user_forward()
    out["user_model_bit_equal"] = bool(torch.equal(before, after))
    out["user_model_options_unchanged"] = repr(model.model_options) == options_before
    out["patcher_options_untouched"] = repr(native.extractor.patcher.model_options) == options_before
    out["patcher_class"] = type(native.patcher).__name__
    return out


def _counting(modules):
    """How many times each of ``modules`` (name -> module) started running; removes its hooks with ``remove()``."""
    counts = dict.fromkeys(modules, 0)
    hooks = [m.register_forward_pre_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1)) for name, m in modules.items()]
    return counts, lambda: [h.remove() for h in hooks]


def _early_stop(host, model, clip, vae, head, images, f_native, reference_pipe):
    """Where the native passes stop, from a fresh Load on: a reference first, then targets; the layout read off
    ComfyUI's UNet; features under other extensions' UNet wrappers (``except Exception``) and with patches on the
    user's MODEL, which the pack's passes do not run."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    native_features = _pack_module(".nodes.native_features")
    sd_features = _pack_module(".iconmatting_core.sd_features")
    unet = model.model.diffusion_model
    _, up_ends = native_features.unet_layout(unet)
    block2 = unet.output_blocks[up_ends[2]]
    last_ff = [m for m in block2.modules() if isinstance(m, BasicTransformerBlock)][-1].ff
    upsampler = [m for m in block2.modules() if isinstance(m, native_features.Upsample)][-1]
    fresh = host.load_on_host(model, clip, vae, head, "fp32")
    out = {"layout": [list(x) for x in native_features.self_attention_layout(unet)],
           "diffusers_layout": [list(x) for x in sd_features.unet_layout(reference_pipe.model.extractor.unet)],
           "stops": {str(k): list(v) for k, v in fresh.extractor.stops.items()}}
    pipe = fresh.pipeline()
    # ComfyUI runs a block's layers one by one (not the block's own forward): up block 2 starts with its first layer
    counts, remove = _counting({"up block 2": unet.output_blocks[up_ends[1] + 1][0], "last feed-forward": last_ff,
                                "upsampler": upsampler})
    ref_image = torch.rand(64, 80, 3, generator=torch.Generator().manual_seed(3))
    ref_mask = torch.zeros(64, 80)
    ref_mask[10:50, 20:60] = 1
    try:
        context = pipe.encode_reference(ref_image, ref_mask)
        out["counts_after_reference"] = dict(counts)
        pipe.matte(context, [ref_image, ref_image.flip(0)], chunk_size=1)
        out["counts_after_targets"] = dict(counts)
        planned, whole = fresh.extractor.stops, _pack_module(".iconmatting_core.features").PassStop(None, None)
        fresh.extractor.stops = {False: whole, True: whole}  # the counters do see those modules run
        try:
            fresh.extractor(images[:1], seed=5)
        finally:
            fresh.extractor.stops = planned
        out["counts_after_a_whole_pass"] = dict(counts)
    finally:
        remove()

    # other extensions' wrappers with a catch-all fallback: around the whole UNet, and a re-raise as their own error
    # around each transformer block (where the stop is raised, inside an attention patch)
    fired, saved = [], (UNetModel.forward, BasicTransformerBlock.forward)

    def unet_forward(self, *args, **kwargs):
        try:
            return saved[0](self, *args, **kwargs)
        except Exception as exc:
            fired.append(f"unet fallback after {type(exc).__name__}")
            return saved[0](self, *args, **kwargs)

    def block_forward(self, *args, **kwargs):
        try:
            return saved[1](self, *args, **kwargs)
        except Exception as exc:
            fired.append(f"block error after {type(exc).__name__}")
            raise RuntimeError("another extension's wrapper failed") from exc

    UNetModel.forward, BasicTransformerBlock.forward = unet_forward, block_forward
    try:
        wrapped = fresh.extractor(images, seed=5)
    except BaseException as exc:  # reported, not raised: the test says what went wrong
        wrapped, out["wrapped_error"] = None, f"{type(exc).__name__}: {exc}"
    finally:
        UNetModel.forward, BasicTransformerBlock.forward = saved
    out["wrappers_fired"] = fired
    if wrapped is not None:
        out["wrapped_diff"] = max(_diff(a, b) for a, b in zip([*wrapped.up_features, *wrapped.attention.values()],
                                                              [*f_native.up_features, *f_native.attention.values()]))

    # the user's MODEL with generation patches (an output-block patch, an attention replacement, a UNet wrapper):
    # the pack's passes run none of them
    patched = model.clone()
    ran = []
    patched.set_model_output_block_patch(lambda h, hsp, to: (ran.append("output block") or h * 2, hsp))
    patched.set_model_attn1_replace(lambda q, k, v, extra: ran.append("attn1") or q, "output", up_ends[1] + 1)
    if hasattr(patched, "add_wrapper_with_key"):
        import comfy.patcher_extension

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test",
                                     lambda executor, *a, **k: ran.append("wrapper") or executor(*a, **k))
    on_patched = host.load_on_host(patched, clip, vae, head, "fp32").extractor(images, seed=5)
    out["patched_model_ran"] = ran
    out["patched_model_diff"] = max(_diff(a, b) for a, b in zip([*on_patched.up_features, *on_patched.attention.values()],
                                                                [*f_native.up_features, *f_native.attention.values()]))
    return out


def _nothing_of_the_user_changes(native_pipe, model, vae, images, ref_image, ref_mask, targets):
    """Snapshots of everything the user's MODEL and VAE hold (patcher, model options, patches, wrappers, every
    module's attention function, forward and hooks) before a reference and a target, from inside the pack's
    passes (the UNet's unrecorded attention, the VAE's attention) and after."""
    from object_snapshot import changes, snapshot

    ext = native_pipe.model.extractor
    user = {"MODEL": model, "VAE": vae}
    native_pipe.matte(native_pipe.encode_reference(ref_image, ref_mask), targets[:1])  # everything loaded once
    before, during = snapshot(user, "user"), {"unet": [], "vae": []}
    unet_attention, vae_attention = ext.attention, ext.vae_attention

    def in_unet(*args, **kwargs):
        if not during["unet"]:
            during["unet"].append(snapshot(user, "user"))
        return unet_attention(*args, **kwargs)

    def in_vae(*args):
        if not during["vae"]:
            during["vae"].append(snapshot(user, "user"))
        return vae_attention(*args)

    ext.attention, ext.vae_attention = in_unet, in_vae
    try:
        native_pipe.matte(native_pipe.encode_reference(ref_image, ref_mask), targets[:1])
    finally:
        ext.attention, ext.vae_attention = unet_attention, vae_attention
    return {"snapshot_paths": len(before),
            "changed_during_unet": [c for d in during["unet"] for c in changes(before, d)] if during["unet"] else ["not taken"],
            "changed_during_vae": [c for d in during["vae"] for c in changes(before, d)] if during["vae"] else ["not taken"],
            "changed_after": changes(before, snapshot(user, "user"))}
