"""SD 2.1's empty-prompt embedding from the host's CLIP, computed from float32 text-encoder weights.

IconMatting conditions every UNet pass on the embedding of "" (computed once per Load). ComfyUI
stores text encoders in fp16 unless started with ``--fp32-text-enc`` (its CLIP computes in float32,
but from weights rounded to fp16): that alone moves the embedding by ~8e-4 relative and the
features, similarity and mattes measurably away from the authors' float32 code. So when the CLIP
given holds lower-precision weights, the embedding is computed by a float32 twin of it, built by
ComfyUI's own classes (the MODEL's ``clip_target``, ``process_clip_state_dict``, ``comfy.sd.CLIP``)
from the text-encoder tensors of the checkpoint file the CLIP came from, on the CPU, then dropped.

That file is the one the host recorded for the CLIP (``cached_patcher_init``, newer ComfyUI), else
the ``.safetensors`` in ComfyUI's checkpoints folders whose text encoder, rounded to the CLIP's
dtype, equals the CLIP's weights exactly (checked on every tensor, never trusted by name). Only
the text-encoder tensors are read (safetensors, no pickle). If no file matches, the CLIP's own
embedding is used and a warning says how to get the exact one (``--fp32-text-enc``).
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Dict, Iterator, Optional

import torch
from safetensors import safe_open

import comfy.sd
import comfy.utils

log = logging.getLogger("IconMatting")

#: where SD 2.x single files keep the OpenCLIP text encoder (ldm layout, sgm layout)
TEXT_ENCODER_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.0.model.")
_PROBE = "positional_embedding"  # small, and trained: differs between text encoders
_OPTIONAL = ("logit_scale", "text_projection.weight", "position_ids")


def _encode_empty(clip) -> torch.Tensor:
    cond = clip.encode_from_tokens(clip.tokenize(""))
    if isinstance(cond, (tuple, list)):
        cond = cond[0]
    return cond.float().cpu()


def _weights(clip) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in clip.cond_stage_model.state_dict().items() if torch.is_floating_point(v)}


def _candidate_files(clip) -> Iterator[str]:
    init = getattr(getattr(clip, "patcher", None), "cached_patcher_init", None)
    if init and len(init) > 1 and init[1] and isinstance(init[1][0], str):
        yield init[1][0]
    try:
        import folder_paths

        names = folder_paths.get_filename_list("checkpoints")
    except Exception:  # not inside ComfyUI
        return
    for name in names:
        if name.lower().endswith(".safetensors"):
            path = folder_paths.get_full_path("checkpoints", name)
            if path:
                yield path


def _text_encoder_tensors(path: str, model_config, reference: Dict[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
    """The file's text encoder in ComfyUI's CLIP key layout (float32) if, rounded to the CLIP's
    dtype, it equals ``reference`` (the CLIP's weights) tensor for tensor; else None."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            prefix = next((p for p in TEXT_ENCODER_PREFIXES if p + _PROBE in keys), None)
            if prefix is None:
                return None
            probe = model_config.process_clip_state_dict({prefix + _PROBE: f.get_tensor(prefix + _PROBE)})
            if not all(k in reference and _same(v, reference[k]) for k, v in probe.items()):
                return None
            raw = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    except Exception as exc:  # unreadable or not a safetensors file: not the source
        log.debug("IconMatting: %s is not readable as the CLIP's source (%s)", path, exc)
        return None
    state = model_config.process_clip_state_dict(raw)
    state = {k: v.float() if torch.is_floating_point(v) else v for k, v in state.items()}
    # the file may lack what the embedding never uses and ComfyUI fills in itself (logit scale, projection)
    if not all(_same(state[k], v) if k in state else k.endswith(_OPTIONAL) for k, v in reference.items()):
        return None
    return state


def _same(full: torch.Tensor, stored: torch.Tensor) -> bool:
    """``full`` rounded to ``stored``'s dtype equals ``stored`` exactly."""
    return full.shape == stored.shape and torch.equal(full.to(stored.dtype), stored.detach().cpu())


def _float32_twin(model_config, state: Dict[str, torch.Tensor]):
    cpu = torch.device("cpu")
    options = {"dtype": torch.float32, "load_device": cpu, "offload_device": cpu, "initial_device": cpu}
    kwargs = {"tokenizer_data": state, "parameters": comfy.utils.calculate_parameters(state), "model_options": options}
    if "disable_dynamic" in inspect.signature(comfy.sd.CLIP.__init__).parameters:
        kwargs["disable_dynamic"] = True
    twin = comfy.sd.CLIP(model_config.clip_target(state_dict=state), **kwargs)
    twin.load_sd(state, full_model=True)
    return twin


def empty_prompt_from_clip(clip, model_config=None) -> torch.Tensor:
    """ComfyUI's SD 2.x CLIP conditioning of "" ([1, 77, 1024] for SD 2.1): the penultimate layer
    after the final layer norm, padded with id 0, as diffusers' SD 2.1 text encoder gives it;
    always from float32 weights (see the module docstring). ``model_config``: the MODEL's
    (``model.model.model_config``), which knows the checkpoint's text-encoder layout."""
    weights = _weights(clip)
    if all(v.dtype in (torch.float32, torch.float64) for v in weights.values()) or model_config is None:
        return _encode_empty(clip)
    seen = set()
    for path in _candidate_files(clip):
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        state = _text_encoder_tensors(path, model_config, weights)
        if state is not None:
            twin = _float32_twin(model_config, state)
            try:
                return _encode_empty(twin)
            finally:
                del twin, state
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in weights.values()})
    log.warning(
        "IconMatting: the CLIP holds %s weights and no checkpoint in ComfyUI's checkpoints folder matches it, so the "
        "empty-prompt embedding is computed from rounded weights (mattes differ slightly from the reference). "
        "Start ComfyUI with --fp32-text-enc for the exact embedding.", "/".join(dtypes)
    )
    return _encode_empty(clip)
