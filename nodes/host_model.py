"""IconMatting on the host's own SD 2.1: the model wrapper that owns its ComfyUI patcher.

As ComfyUI core's background-removal model does it: the small IconMatting head is built from
``comfy.ops`` layers and gets its own patcher (``CoreModelPatcher`` where the host has it, the
dynamic-VRAM patcher on 2026 releases; else ``ModelPatcher``), its weights assigned with
``assign=patcher.is_dynamic()``. The SD 2.1 UNet and VAE stay the host's (``MODEL``/``VAE`` from
Load Checkpoint); every load goes through ``comfy.model_management.load_models_gpu`` with all
three patchers together, so ComfyUI can place, partially load and offload them as it does its own.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops

from ..iconmatting_core.checkpoint import read_head_weights
from ..iconmatting_core.matting_head import IconMattingHead
from ..iconmatting_core.pipeline import IconMattingModel, IconMattingPipeline
from .empty_prompt import empty_prompt_from_clip
from .native_features import ComfyFeatureExtractor


class _CastBatchNorm2d(torch.nn.BatchNorm2d, comfy.ops.CastWeightBiasOp):
    """BatchNorm2d (inference) whose weights ComfyUI may keep offloaded and cast per call."""

    def reset_parameters(self):
        return None

    def forward(self, x):
        if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
            weight, bias, stream = comfy.ops.cast_bias_weight(self, x, offloadable=True)
            try:
                mean = self.running_mean.to(x.device, weight.dtype)
                var = self.running_var.to(x.device, weight.dtype)
                return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
            finally:
                comfy.ops.uncast_bias_weight(self, weight, bias, stream)
        return super().forward(x)


class HeadOps(comfy.ops.manual_cast):
    """The head's layers: ComfyUI's casting Conv2d/LayerNorm, and its casting BatchNorm2d where the
    host has one (newer releases), else ours."""

    BatchNorm2d = getattr(comfy.ops.manual_cast, "BatchNorm2d", _CastBatchNorm2d)


def _patcher_class():
    """The host's patcher for a small model: CoreModelPatcher where it exists (read at call time:
    ComfyUI rebinds it at start-up when dynamic VRAM is on), else ModelPatcher."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def _is_dynamic(patcher) -> bool:
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def head_dtype(choice: str, device: torch.device) -> torch.dtype:
    """auto: fp32 on the CPU; on a GPU the half precision ComfyUI would pick for a UNet there."""
    if choice == "auto":
        if device.type == "cpu":
            return torch.float32
        if mm.should_use_fp16(device):
            return torch.float16
        if mm.should_use_bf16(device):
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


class HostIconMattingModel(IconMattingModel):
    """IconMattingModel whose extractor is the host's SD 2.1; computes on the patcher's load device."""

    load_device = torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self.load_device

    @device.setter
    def device(self, _value) -> None:
        """ComfyUI's patchers assign ``.device``; the load device stays the source of truth."""

    @property
    def dtype(self) -> torch.dtype:
        return self.head.similarity.token_norm.weight.dtype


class IconMattingOnHost:
    """What flows between the nodes as ICONMATTING_MODEL: the model and the patcher that owns it."""

    def __init__(self, model, clip, vae, matting_path: str, dtype: str = "auto"):
        state, config, prompt = read_head_weights(matting_path)
        if prompt is None:  # the released file has no prompt buffer: condition on SD 2.1's own CLIP
            if clip is None:
                raise ValueError(
                    f"{matting_path} carries no empty-prompt embedding. Connect the CLIP output of the SD 2.1 Load Checkpoint."
                )
            prompt = empty_prompt_from_clip(clip, getattr(model.model, "model_config", None))
        extractor = ComfyFeatureExtractor(model, vae, prompt, config)
        load_device = mm.get_torch_device()
        offload_device = mm.unet_offload_device()
        head = IconMattingHead(config, operations=HeadOps).to(head_dtype(dtype, load_device))
        self.model = HostIconMattingModel(extractor, head)
        self.model.load_device = load_device
        cls = _patcher_class()
        kwargs = {"load_device": load_device, "offload_device": offload_device}
        if "size" in inspect.signature(cls.__init__).parameters:
            kwargs["size"] = mm.module_size(self.model)
        self.patcher = cls(self.model, **kwargs)
        dtypes = {k: v.dtype for k, v in head.state_dict().items()}
        head.load_state_dict({k: v.to(dtypes[k]) for k, v in state.items()}, strict=True, assign=_is_dynamic(self.patcher))
        extractor.companions = [self.patcher]

    def get_models(self):
        """The patchers this object uses (newer ComfyUI tracks the models a prompt's outputs hold)."""
        return [self.patcher, self.extractor.patcher, self.extractor.vae.patcher]

    @property
    def extractor(self) -> ComfyFeatureExtractor:
        return self.model.extractor

    def pipeline(self, features: bool = True) -> IconMattingPipeline:
        """The pipeline over the host's models. With features, every feature step first asks ComfyUI
        to place the UNet, VAE and head together (``ComfyFeatureExtractor.load_all``); decoding alone
        needs only the head, placed here."""
        if not features:
            mm.load_models_gpu([self.patcher])
        return IconMattingPipeline(self.model)
