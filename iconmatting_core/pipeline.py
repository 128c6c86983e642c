"""The whole flow: preprocess -> features -> reference context -> match -> matting head -> postprocess.

``IconMattingModel`` is the one ``nn.Module`` holding every weight (frozen SD feature extractor and
the trainable head), so a host application can move or offload it as a unit.
``IconMattingPipeline`` wraps it with the user-facing steps::

    pipe = load_pipeline("icm.safetensors", "v2-1_768-ema-pruned.safetensors")
    context = pipe.encode_reference(ref_image, ref_mask)      # once
    alphas = pipe.matte(context, target_images)               # any number of targets

Targets are processed in chunks of ``chunk_size``; results are moved to ``output_device`` after
each chunk, so device memory stays flat however long the batch. ``progress(done, total)`` is
called after each chunk (a host can raise from it to interrupt).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from . import preprocess as pre
from .checkpoint import CheckpointError, load_head
from .config import OVERFLOW_ADVICE, IconMattingConfig
from .context import ReferenceContext, build_context
from .features import REFERENCE_NOISE
from .sd_features import SDFeatureExtractor
from .matching import MatchResult, match_features
from .matting_head import IconMattingHead
from .postprocess import rgba_cutout
from .precision import resolve_dtype
from .sd_loading import load_sd_components

Progress = Optional[Callable[[int, int], None]]


class IconMattingModel(nn.Module):
    """Frozen SD feature extractor + IconMatting head."""

    def __init__(self, extractor: SDFeatureExtractor, head: IconMattingHead):
        super().__init__()
        if extractor.config != head.config:
            raise ValueError("feature extractor and head were built with different IconMattingConfig")
        self.extractor = extractor
        self.head = head
        self.requires_grad_(False)
        self.eval()

    @property
    def config(self) -> IconMattingConfig:
        return self.head.config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def fingerprint(self) -> str:
        """The signature of the head and SD weights in use (``context_file.model_fingerprint``)."""
        from .context_file import model_fingerprint

        return model_fingerprint(self.head, self.extractor)

    def close(self) -> None:
        """Give the SD modules back as they were (see :meth:`SDFeatureExtractor.close`)."""
        close = getattr(self.extractor, "close", None)
        if close is not None:
            close()


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _prepare(sources: Sequence, size: int, resize_mode: str, offset: int = 0):
    """Target images -> ([B, 3, S, S] in [-1, 1], placements)."""
    prepared, placements = [], []
    for i, img in enumerate(sources):
        x, p = pre.prepare_image(pre.to_rgb(img, f"target image {offset + i}"), size, resize_mode)
        prepared.append(x)
        placements.append(p)
    return torch.stack(prepared), placements


def _check_finite(x: torch.Tensor, stage: str, dtype: Optional[torch.dtype] = None) -> None:
    """A NaN/inf out of the head (an overflow in half precision) is an error, never a garbage matte."""
    if not torch.isfinite(x).all():
        dtype = dtype or x.dtype
        if dtype == torch.float32:  # no overflow to blame: the weights themselves
            raise FloatingPointError(
                f"IconMatting's {stage} gave NaN/inf in float32: the weights hold broken values. Download them again."
            )
        raise FloatingPointError(f"IconMatting's {stage} overflowed in {dtype} (NaN/inf): {OVERFLOW_ADVICE}.")


def _chunks(n: int, size: int):
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    for start in range(0, n, size):
        yield start, min(n, start + size)


class IconMattingPipeline:
    """User-facing steps over an :class:`IconMattingModel`."""

    def __init__(self, model: IconMattingModel):
        self.model = model

    @property
    def config(self) -> IconMattingConfig:
        return self.model.config

    def to(self, device=None, dtype=None) -> "IconMattingPipeline":
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def fingerprint(self) -> str:
        """Signature of the head and SD weights (:meth:`IconMattingModel.fingerprint`), computed once per
        dtype; a saved context records it and only loads with the same weights (``same_weights``)."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None or cached[0] != self.model.dtype:
            cached = (self.model.dtype, self.model.fingerprint())
            self._fingerprint = cached
        return cached[1]

    @torch.no_grad()
    def encode_reference(
        self,
        images,
        masks,
        pooling: str = "mask",
        resize_mode: str = "pad",
        seed: int = 0,
    ) -> ReferenceContext:
        """Reference image(s) + mask(s) -> ReferenceContext (on the CPU).

        images: one image [H, W, C] or a batch/list; masks: one [H, W] mask per image (or one
        mask for all images of a batch). Masks are binarised at 0.5. Raises ValueError for a mask
        whose size differs from its image, an empty mask, a mask covering the whole image, or a
        mask that selects no feature cell.
        """
        cfg = self.config
        imgs = pre.split_batch(images, "reference images")
        msks = pre.split_batch(masks, "masks", masks=True)
        if len(msks) == 1 and len(imgs) > 1:
            msks = msks * len(imgs)
        if len(msks) != len(imgs):
            raise ValueError(f"got {len(imgs)} reference images but {len(msks)} masks; give one mask per image")
        prepared = []  # check every reference before any model work
        for i, (img, m) in enumerate(zip(imgs, msks)):
            rgb = pre.to_rgb(img, f"reference image {i}")
            mask = pre.to_mask(m, f"reference mask {i}")
            if tuple(mask.shape) != tuple(rgb.shape[:2]):
                raise ValueError(
                    f"reference mask {i} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                    f"{rgb.shape[1]}x{rgb.shape[0]}; the mask must have the image's size"
                )
            fg = mask > 0.5
            if not fg.any():
                raise ValueError(f"reference mask {i} is empty (no value above 0.5): mark the foreground on the reference")
            if fg.all():
                raise ValueError(
                    f"reference mask {i} covers the whole image: mark only the foreground, so the model can tell it from the background"
                )
            x, placement = pre.prepare_image(rgb, cfg.image_size, resize_mode)
            prepared.append((x, mask, placement))  # cells are picked from the original-resolution mask
        device = self.model.device
        correspondences = []
        for x, _, _ in prepared:
            feats = self.model.extractor(x[None].to(device), seed=seed, with_attention=False, noise_stream=REFERENCE_NOISE)
            correspondences.append(feats.correspondence[0].float().cpu())
        return build_context(
            correspondences, [m for _, m, _ in prepared], [p for _, _, p in prepared], cfg, pooling, seed, resize_mode
        )

    @torch.no_grad()
    def match(
        self,
        context: ReferenceContext,
        images,
        resize_mode: str = "pad",
        chunk_size: int = 1,
        progress: Progress = None,
        output_device: Union[str, torch.device] = "cpu",
    ) -> MatchResult:
        """Targets (a batch [B, H, W, C] or a list of images of any sizes) -> MatchResult."""
        sources = self._checked(context, images, resize_mode)
        parts = []
        for start, stop in _chunks(len(sources), chunk_size):
            batch, placements = _prepare(sources[start:stop], self.config.image_size, resize_mode, start)
            parts.append(self._match_chunk(context, batch, placements, sources[start:stop], resize_mode).to(output_device))
            if progress is not None:
                progress(stop, len(sources))
        return MatchResult.concat(parts)

    @torch.no_grad()
    def decode(
        self,
        match: MatchResult,
        chunk_size: int = 4,
        progress: Progress = None,
        output_device: Union[str, torch.device] = "cpu",
    ) -> List[torch.Tensor]:
        """MatchResult -> one alpha matte [H, W] (float32, [0, 1]) per target, at its original size."""
        alphas: List[torch.Tensor] = []
        for start, stop in _chunks(len(match), chunk_size):
            part = match.slice(start, stop)
            images, _ = _prepare(part.sources, self.config.image_size, match.resize_mode, start)
            alphas += self._decode_chunk(part, images, output_device)
            if progress is not None:
                progress(stop, len(match))
        return alphas

    def matte(
        self,
        context: ReferenceContext,
        images,
        resize_mode: str = "pad",
        chunk_size: int = 1,
        progress: Progress = None,
        output_device: Union[str, torch.device] = "cpu",
    ) -> List[torch.Tensor]:
        """match + decode, chunk by chunk: one alpha [H, W] per target image.

        The targets are checked once, before any model work, and each chunk is prepared once for both
        steps; only the alphas accumulate, so host memory too stays bounded for any number of targets.
        """
        sources = self._checked(context, images, resize_mode)
        alphas: List[torch.Tensor] = []
        with torch.no_grad():
            for start, stop in _chunks(len(sources), chunk_size):
                batch, placements = _prepare(sources[start:stop], self.config.image_size, resize_mode, start)
                match = self._match_chunk(context, batch, placements, sources[start:stop], resize_mode)
                alphas += self._decode_chunk(match, batch, output_device)
                if progress is not None:
                    progress(stop, len(sources))
        return alphas

    def _checked(self, context: ReferenceContext, images, resize_mode: str) -> list:
        """The targets as a list, after checking the context, the mode and every image (before any work)."""
        if not isinstance(context, ReferenceContext):
            raise TypeError(f"context must be a ReferenceContext, got {type(context).__name__}")
        if context.config != self.config:
            raise ValueError("the reference context was encoded with a different model configuration")
        sources = pre.split_batch(images, "target images")
        pre.placement_for(1, 1, self.config.image_size, resize_mode)  # checks the mode
        for i, img in enumerate(sources):
            pre.to_rgb(img, f"target image {i}")
        return sources

    def _match_chunk(self, context: ReferenceContext, batch: torch.Tensor, placements, sources, resize_mode: str) -> MatchResult:
        """Prepared targets [B, 3, S, S] -> their MatchResult, on the model's device."""
        device = self.model.device
        feats = self.model.extractor(batch.to(device), seed=context.seed, with_attention=True)
        fused, similarity = match_features(self.model.head, context.tokens.to(device), feats, valid=placements)
        _check_finite(fused, "matting layers")
        return MatchResult(fused, similarity, sources, placements, resize_mode)

    def _decode_chunk(self, match: MatchResult, images: torch.Tensor, output_device) -> List[torch.Tensor]:
        """A chunk's MatchResult and its prepared targets [B, 3, S, S] -> one alpha per target, at its size."""
        device, dtype = self.model.device, self.model.dtype
        part = match.to(device, dtype)
        alpha = self.model.head.detail(part.fused, images.to(device, dtype)).float()
        _check_finite(alpha, "matting head", dtype)
        return [pre.restore_alpha(a, placement).to(output_device) for a, placement in zip(alpha, part.placements)]

    def cutout(self, image, alpha: torch.Tensor, estimate_colors: bool = True) -> torch.Tensor:
        """One target image [H, W, C] + its alpha [H, W] -> RGBA [H, W, 4] with estimated foreground colours."""
        rgb = pre.to_rgb(image)
        return rgba_cutout(rgb[None], alpha[None].to(rgb.device), estimate_colors)[0]


def build_model(sd, head: IconMattingHead, empty_prompt: Optional[torch.Tensor] = None) -> IconMattingModel:
    prompt = sd.empty_prompt_embedding if empty_prompt is None else empty_prompt
    extractor = SDFeatureExtractor(sd.unet, sd.vae, prompt, head.config)
    return IconMattingModel(extractor, head)


def load_model(
    matting_weights,
    sd_path,
    dtype: Union[str, torch.dtype] = "auto",
    config: Optional[IconMattingConfig] = None,
    device: Union[str, torch.device] = "cpu",
) -> IconMattingModel:
    """Load an IconMattingModel on the CPU in ``dtype`` (the caller moves it to ``device``, where it
    will run: "auto" precision is resolved for that device, see :func:`.precision.resolve_dtype`)."""
    dtype = resolve_dtype(dtype, resolve_device(device))
    head, empty_prompt = load_head(matting_weights, config)
    sd = load_sd_components(sd_path, dtype)
    sd.vae.decoder = None  # loaded here for IconMatting alone, which uses only the encoder
    # a checkpoint that kept the reference's prompt buffer conditions exactly as in training
    if empty_prompt is not None and empty_prompt.shape != sd.empty_prompt_embedding.shape:
        raise CheckpointError(
            f"{matting_weights}: its empty-prompt embedding {tuple(empty_prompt.shape)} does not fit the Stable "
            f"Diffusion text encoder of {sd_path} {tuple(sd.empty_prompt_embedding.shape)}; use SD 2.1"
        )
    return build_model(sd, head, empty_prompt).to(dtype=dtype)


def load_pipeline(matting_weights, sd_path, device="auto", dtype="auto", config=None) -> IconMattingPipeline:
    """Load everything and move it to ``device`` ("auto": CUDA when available) in ``dtype``
    ("auto": bf16 on a GPU with native bfloat16, else fp32, see :func:`.precision.resolve_dtype`; or fp32/fp16/bf16)."""
    dev = resolve_device(device)
    return IconMattingPipeline(load_model(matting_weights, sd_path, dtype, config, device=dev).to(dev))
