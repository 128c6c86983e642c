"""IconMatting on the host's own SD 2.1: the model wrapper that owns its ComfyUI patcher.

Built as ComfyUI core's background-removal model is: :class:`IconMattingOnHost` is constructed from
the head's config, complete (the head, its patcher, the feature extractor over the host's SD 2.1
that loads the head's patcher with its own), then :meth:`IconMattingOnHost.load_weights` puts the
weights in; :func:`load_on_host` does both from a weights file. The small IconMatting head is
built from ``comfy.ops`` layers, *folded* for inference (each BatchNorm merged into the convolution
before it, ``matting_head.fold_batch_norm``), so it holds only convolutions and layer norms that
every ComfyUI can keep offloaded and cast per call; its patcher is ``CoreModelPatcher`` where the
host has it (the dynamic-VRAM patcher on 2026 releases), else ``ModelPatcher``, its weights
assigned with ``assign=patcher.is_dynamic()``. The SD 2.1 UNet and VAE stay the host's
(``MODEL``/``VAE`` from Load Checkpoint); every load goes through
``comfy.model_management.load_models_gpu`` with all three patchers together, so ComfyUI can place,
partially load and offload them as it does its own.
"""
from __future__ import annotations

import inspect
from typing import Dict, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops

from ..iconmatting_core.checkpoint import read_head_weights
from ..iconmatting_core.config import IconMattingConfig
from ..iconmatting_core.context_file import model_fingerprint
from ..iconmatting_core.matting_head import IconMattingHead
from ..iconmatting_core.pipeline import IconMattingModel, IconMattingPipeline
from ..iconmatting_core.precision import resolve_dtype
from .empty_prompt import empty_prompt_from_clip
from .native_features import ComfyFeatureExtractor


def _patcher_class():
    """The host's patcher for a small model: CoreModelPatcher where it exists (read at call time:
    ComfyUI rebinds it at start-up when dynamic VRAM is on), else ModelPatcher."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def _is_dynamic(patcher) -> bool:
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def head_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The head's precision: the core's one rule (``precision.resolve_dtype``), with ComfyUI's answer
    to whether ``device`` computes bfloat16 natively as the host's hint."""
    return resolve_dtype(choice, device, native_bf16=bool(mm.should_use_bf16(device)))


class HostIconMattingModel(IconMattingModel):
    """IconMattingModel whose extractor is the host's SD 2.1 and whose head is folded; computes on the
    host's load device."""

    def __init__(self, extractor: ComfyFeatureExtractor, head: IconMattingHead, load_device: torch.device):
        super().__init__(extractor, head)
        self.load_device = load_device
        self.weights_fingerprint: Optional[str] = None

    @property
    def device(self) -> torch.device:
        return self.load_device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.similarity.token_norm.weight.dtype

    def fingerprint(self) -> str:
        """The fingerprint of the weights as trained (taken in :meth:`IconMattingOnHost.load_weights`,
        before the fold), so that contexts move between this host and the command line."""
        if self.weights_fingerprint is None:
            raise RuntimeError("the IconMatting weights are not loaded yet (IconMattingOnHost.load_weights)")
        return self.weights_fingerprint


class IconMattingOnHost:
    """What flows between the nodes as ICONMATTING_MODEL: the model and the patcher that owns its head."""

    def __init__(self, model, vae, empty_prompt: torch.Tensor, config: IconMattingConfig, dtype: str = "auto"):
        """Everything but the weights, from the head's config: the folded head in ``dtype`` (see
        :func:`head_dtype`) with its own patcher, and the extractor over the host's ``model`` (MODEL)
        and ``vae`` (VAE) conditioned on ``empty_prompt``, which loads that patcher with its own."""
        load_device = mm.get_torch_device()
        head = IconMattingHead(config, operations=comfy.ops.manual_cast, folded=True).to(head_dtype(dtype, load_device))
        cls = _patcher_class()
        kwargs = {"load_device": load_device, "offload_device": mm.unet_offload_device()}
        if "size" in inspect.signature(cls.__init__).parameters:
            kwargs["size"] = mm.module_size(head)
        self.patcher = cls(head, **kwargs)
        extractor = ComfyFeatureExtractor(model, vae, empty_prompt, config, companions=[self.patcher])
        self.model = HostIconMattingModel(extractor, head, load_device)

    def load_weights(self, state: Dict[str, torch.Tensor]) -> None:
        """The trained head's weights (``state``, with its BatchNorms, as ``read_head_weights`` gives them),
        folded into the head (strict: every key must fit)."""
        with torch.device("meta"):  # the trained layout around the file's own tensors: nothing allocated twice
            trained = IconMattingHead(self.model.config)
        trained.load_state_dict(state, strict=True, assign=True)
        self.model.weights_fingerprint = model_fingerprint(trained, self.extractor)
        head = self.model.head
        dtypes = {k: v.dtype for k, v in head.state_dict().items()}
        folded = trained.folded_state_dict()
        head.load_state_dict({k: v.to(dtypes[k]) for k, v in folded.items()}, strict=True, assign=_is_dynamic(self.patcher))

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


def load_on_host(model, clip, vae, matting_path: str, dtype: str = "auto") -> IconMattingOnHost:
    """IconMatting weights file ``matting_path`` over the host's SD 2.1 (MODEL, CLIP, VAE of one Load
    Checkpoint): its config, and its empty-prompt embedding or else CLIP's, build the model; then its
    weights are loaded."""
    state, config, prompt = read_head_weights(matting_path)
    if prompt is None:  # the released file has no prompt buffer: condition on SD 2.1's own CLIP
        if clip is None:
            raise ValueError(
                f"{matting_path} carries no empty-prompt embedding. Connect the CLIP output of the SD 2.1 Load Checkpoint."
            )
        prompt = empty_prompt_from_clip(clip, getattr(model.model, "model_config", None))
    loaded = IconMattingOnHost(model, vae, prompt, config, dtype)
    loaded.load_weights(state)
    return loaded
