"""Stage 2 on diffusers modules: :class:`SDFeatureExtractor`, the :class:`~.features.FeatureExtractor`
over a diffusers SD 2.1 UNet and VAE (library, command line, training).

It borrows the caller's modules and gives them back as it found them: its attention-processor
wrappers and forward hooks do nothing while another extractor (or the caller) runs the UNet,
``close()`` unwraps and unhooks, and the last extractor to close restores the caller's
``requires_grad`` and train/eval flags. This adapter supplies only what is diffusers' own: the
UNet's layout (:func:`unet_layout`), the call of the UNet, and hooks that hand the recorded
self-attention layers and the outputs of up blocks 0 and 1 to the extractor, which runs and stops
the pass (:meth:`~.features.FeatureExtractor.unet_up_features`). The VAE encode runs the VAE's own
modules on the adapter's call path (:func:`vae_moments`: diffusers' residual-block forward spends
time on a division by 1.0 and fresh tensors), the same moments to the bit; nothing of the VAE is
rebound or hooked.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import IconMattingConfig
from .features import FeatureExtractor, SelfAttentionLayer, posterior_of_moments


def _no_owner() -> None:
    return None


class _ExtractorHook:
    """What an extractor puts into the caller's UNet. It holds its extractor weakly (the UNet must not
    keep its borrower alive) and pickles it strongly (a pipeline sent to another process, e.g. a Ray
    worker, keeps working)."""

    def __init__(self, extractor: "SDFeatureExtractor"):
        self.owner = weakref.ref(extractor)

    def __getstate__(self):
        return {**self.__dict__, "owner": self.owner()}

    def __setstate__(self, state):
        extractor = state.pop("owner")
        self.__dict__.update(state)
        self.owner = _no_owner if extractor is None else weakref.ref(extractor)


def _recordable(attn) -> bool:
    """True for SD's transformer self-attention (no norms, residual or rescaling inside)."""
    return (
        getattr(attn, "group_norm", None) is None
        and getattr(attn, "spatial_norm", None) is None
        and getattr(attn, "norm_q", None) is None
        and not getattr(attn, "residual_connection", False)
        and getattr(attn, "rescale_output_factor", 1.0) == 1.0
    )


def _self_attention_modules(module: nn.Module):
    """The transformer self-attention modules (``attn1``) under ``module``, in the order they run."""
    return [m for name, m in module.named_modules() if name.endswith("attn1") and hasattr(m, "processor")]


def unet_layout(unet: nn.Module) -> List[SelfAttentionLayer]:
    """A diffusers UNet2DConditionModel's self-attention layers that an extractor records, in run order
    (see :data:`~.features.UNetLayout`): down blocks (each halving the latent after its layers if it
    has a downsampler), the mid block, then up blocks (each doubling it after its output)."""
    layers, level = [], 0

    def add(block, up_blocks_before):
        count = sum(1 for m in _self_attention_modules(block) if _recordable(m))
        layers.extend([SelfAttentionLayer(level, up_blocks_before)] * count)

    for block in unet.down_blocks:
        add(block, 0)
        level += bool(getattr(block, "downsamplers", None))
    if unet.mid_block is not None:
        add(unet.mid_block, 0)
    for index, block in enumerate(unet.up_blocks):
        add(block, index)
        level -= bool(getattr(block, "upsamplers", None))
    return layers


class _RecordingAttnProcessor(_ExtractorHook):
    """Wraps a diffusers attention processor: while its extractor runs a pass that records this layer's
    resolution, the layer's self-attention is computed by the extractor (once, probabilities recorded);
    otherwise the original processor runs."""

    def __init__(self, inner, extractor: "SDFeatureExtractor"):
        super().__init__(extractor)
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ext = self.owner()
        if (
            ext is not None
            and encoder_hidden_states is None
            and attention_mask is None
            and hidden_states.ndim == 3
            and ext.records(hidden_states.shape[1])
            and _recordable(attn)
        ):
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            out = ext.self_attention(q, k, v, attn.heads, attn.scale)
            return attn.to_out[1](attn.to_out[0](out))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


class _UpBlockHook(_ExtractorHook):
    """Forward hook on up block ``index``: hands its output to the extractor (which keeps it and may end
    the pass there; it ignores it while it runs no pass of its own)."""

    def __init__(self, extractor: "SDFeatureExtractor", index: int):
        super().__init__(extractor)
        self.index = index

    def __call__(self, _module, _inputs, output):
        ext = self.owner()
        if ext is not None:
            ext.up_block_output(self.index, output)


def _plain_resnet(block: nn.Module) -> bool:
    """Whether a diffusers ``ResnetBlock2D`` is the kind SD's VAE encoder has (group norms, no time embedding,
    no resampling, SiLU, output scale 1, eval mode), which :func:`_resnet` computes on its own call path (its
    in-place SiLU needs the norms' fresh outputs: an identity norm would hand it the block's input)."""
    return (
        isinstance(getattr(block, "norm1", None), nn.GroupNorm)
        and isinstance(getattr(block, "norm2", None), nn.GroupNorm)
        and getattr(block, "time_emb_proj", "?") is None
        and getattr(block, "upsample", "?") is None
        and getattr(block, "downsample", "?") is None
        and getattr(block, "output_scale_factor", None) == 1.0
        and isinstance(getattr(block, "nonlinearity", None), nn.SiLU)
        and not block.training
    )


def _resnet(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A diffusers ``ResnetBlock2D`` of SD's VAE encoder on ``x``: its maths, in its order, on its modules,
    without what its forward spends at 768 px for nothing: the division of every block's sum by its
    output scale (1.0), the fresh tensor of each SiLU and of the sum, and the copy of the shortcut's input
    to the contiguous layout (the convolution takes it in any). The same values to the last bit."""
    if not _plain_resnet(block):
        return block(x, None)
    h = F.silu(block.norm1(x), inplace=True)
    h = F.silu(block.norm2(block.conv1(h)), inplace=True)
    h = block.conv2(block.dropout(h))  # eval mode: dropout passes h through
    return h.add_(x if block.conv_shortcut is None else block.conv_shortcut(x))


def _own_encoder_path(vae: nn.Module) -> bool:
    """Whether :func:`vae_moments` may run this diffusers ``AutoencoderKL``'s encoder on the pack's call
    path: SD's layout, and nothing set that its ``encode`` would honour (tiling, slicing, an accelerate
    offload hook, gradient checkpointing while gradients are on)."""
    encoder = getattr(vae, "encoder", None)
    return (
        encoder is not None
        and not (torch.is_grad_enabled() and getattr(encoder, "gradient_checkpointing", False))
        and isinstance(getattr(encoder, "conv_norm_out", None), nn.GroupNorm)
        and not getattr(vae, "use_tiling", False)
        and not getattr(vae, "use_slicing", False)
        and not hasattr(vae, "_hf_hook")
        and not hasattr(encoder, "_hf_hook")
        and all(hasattr(encoder, name) for name in ("conv_in", "down_blocks", "mid_block", "conv_act", "conv_out"))
        and all(hasattr(b, "resnets") for b in encoder.down_blocks)
        and hasattr(encoder.mid_block, "attentions")
    )


def vae_moments(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A diffusers ``AutoencoderKL``'s encoder (and ``quant_conv``) on [B, 3, S, S] -> moments [B, 8, S/8, S/8],
    on the pack's own call path where :func:`_own_encoder_path` allows (its modules called in the order its
    forward calls them, the resnet blocks by :func:`_resnet`; nothing of the VAE rebound), else its
    ``encode``. Measured at 768 px on a 2-core CPU: see README "How close to the machine"."""
    if not _own_encoder_path(vae):
        return vae.encode(images).latent_dist.parameters
    encoder = vae.encoder
    h = encoder.conv_in(images)
    for down in encoder.down_blocks:
        for block in down.resnets:
            h = _resnet(block, h)
        for downsampler in down.downsamplers or ():
            h = downsampler(h)
    mid = encoder.mid_block
    h = _resnet(mid.resnets[0], h)
    for attention, block in zip(mid.attentions, mid.resnets[1:]):
        if attention is not None:
            h = attention(h)
        h = _resnet(block, h)
    h = encoder.conv_norm_out(h)
    h = F.silu(h, inplace=True) if isinstance(encoder.conv_act, nn.SiLU) else encoder.conv_act(h)
    h = encoder.conv_out(h)
    return h if getattr(vae, "quant_conv", None) is None else vae.quant_conv(h)


_BORROWED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""UNet -> its open SDFeatureExtractors and the flags its caller had set (restored by the last close)."""


def _module_flags(unet: nn.Module, vae: nn.Module):
    """requires_grad of every parameter and train/eval of every submodule; the UNet itself only by
    value (a weak dictionary's value must not hold its key)."""
    return (
        unet.training,
        [(p, p.requires_grad) for m in (unet, vae) for p in m.parameters()],
        [(m, m.training) for m in (*list(unet.modules())[1:], *vae.modules())],
    )


def _restore_flags(unet: nn.Module, flags) -> None:
    unet_training, params, modes = flags
    unet.training = unet_training
    for p, flag in params:
        p.requires_grad_(flag)
    for m, training in modes:
        m.training = training


class SDFeatureExtractor(FeatureExtractor):
    """Frozen diffusers SD UNet + VAE encoder + the empty-prompt embedding buffer.

    It borrows the caller's modules and gives them back as it found them on :meth:`close` (or at
    the end of a ``with`` block): it wraps the UNet's self-attention processors and adds forward
    hooks to up blocks 0 and 1, and freezes both modules (``requires_grad`` off, eval mode); close
    unwraps exactly its own processors and removes its hooks, and the last extractor over a UNet
    to close restores the flags the caller had set. The VAE is used
    as given, its encoder's modules called by :func:`vae_moments` (``load_model`` drops the decoder of
    the VAE it loads itself). The wrappers and hooks
    act only while this extractor runs, so several extractors may share one UNet.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, empty_prompt_embedding: torch.Tensor, config: IconMattingConfig):
        super().__init__(config, empty_prompt_embedding, vae.config.scaling_factor, unet_layout(unet))
        self.unet = unet
        self.vae = vae
        users = _BORROWED.setdefault(unet, {"extractors": weakref.WeakSet(), "flags": None})
        if not users["extractors"]:  # the first borrower keeps the flags as the caller had them
            users["flags"] = _module_flags(unet, vae)
        users["extractors"].add(self)
        self.requires_grad_(False)
        self.eval()
        self._wrapped = []  # (attention module, our processor)
        for module in _self_attention_modules(self.unet):
            wrapper = _RecordingAttnProcessor(module.processor, self)
            module.set_processor(wrapper)
            self._wrapped.append((module, wrapper))
        self._hooks = [block.register_forward_hook(_UpBlockHook(self, i)) for i, block in enumerate(self.unet.up_blocks[:2])]
        self.closed = False

    def close(self) -> None:
        """Give the UNet and VAE back as they were: own processors unwrapped (wherever another
        extractor's wrapper now sits around them), hooks removed, requires_grad/train flags restored."""
        if self.closed:
            return
        for module, wrapper in self._wrapped:
            if module.processor is wrapper:
                module.set_processor(wrapper.inner)
                continue
            outer = module.processor
            while isinstance(outer, _RecordingAttnProcessor) and outer.inner is not wrapper:
                outer = outer.inner
            if isinstance(outer, _RecordingAttnProcessor):
                outer.inner = wrapper.inner
        for handle in self._hooks:
            handle.remove()
        users = _BORROWED.get(self.unet)
        if users is not None and self in users["extractors"]:
            users["extractors"].discard(self)
            if not users["extractors"]:  # the last borrower gives the flags back
                _restore_flags(self.unet, users.pop("flags"))
                del _BORROWED[self.unet]
        self._wrapped, self._hooks = [], []
        self.closed = True

    def __enter__(self) -> "SDFeatureExtractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def posterior(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return posterior_of_moments(vae_moments(self.vae, images.to(self.device, self.dtype)))

    def call_unet(self, latents, cond, with_attention):
        if self.closed:
            raise RuntimeError("this SDFeatureExtractor is closed: build a new one over the UNet")
        t = torch.tensor(self.config.timestep, dtype=torch.long, device=self.device)
        self.unet(latents.to(self.device, self.dtype), t, encoder_hidden_states=cond.to(self.device, self.dtype))

    def fingerprint_tensors(self) -> Dict[str, torch.Tensor]:
        return {
            "unet.conv_in.weight": self.unet.conv_in.weight,
            "vae.encoder.conv_in.weight": self.vae.encoder.conv_in.weight,
        }
