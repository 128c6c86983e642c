"""Stage 2: Stable Diffusion features and self-attention maps of an image (frozen UNet + VAE).

As in IconMatting: each image is VAE-encoded (a posterior *sample*, times the scaling factor),
copied ``ensemble_size`` times, each copy noised to ``timestep`` with its own noise, and run
through the UNet conditioned on the empty prompt. Outputs, averaged over the copies:

* ``up_features[0]``: output of UNet up block 0, [B, C0, S/32, S/32]
* ``up_features[1]``: output of UNet up block 1, [B, C1, S/16, S/16] (also the correspondence feature)
* ``attention[r]``: self-attention probabilities at r x r tokens, averaged over heads, copies and
  all self-attention layers at that resolution (down, mid and up), [B, r*r (query), r*r (key)]

:class:`FeatureExtractor` holds these shared steps; a subclass (an *adapter*) supplies SD's VAE
encoder and a way to call its UNet: :class:`~iconmatting_core.sd_features.SDFeatureExtractor` runs
diffusers modules (library, command line), and the ComfyUI node pack runs the host's own model
objects. Each recorded self-attention layer computes its probabilities once, in float32, and
derives both the recorded map and the layer's output from them (as the reference's attention
processor does).

The UNet pass and its early stop have one home, :meth:`FeatureExtractor.unet_up_features`. An
adapter tells it, before any pass, where the UNet's self-attention layers lie (a
:data:`UNetLayout`), calls the UNet (:meth:`~FeatureExtractor.call_unet`), and from its hooks inside
the UNet hands over each recorded layer's projections (:meth:`~FeatureExtractor.self_attention`) and
the outputs of up blocks 0 and 1 (:meth:`~FeatureExtractor.up_block_output`). The extractor keeps
those outputs, records the maps and stops the pass, by an exception of its own, right after the
last thing the pass is needed for: up block 1's output for a reference; for the maps, the last
recorded layer (in up block 2 of SD, before that block's last feed-forward and its upsampler, whose
outputs nothing reads), or up block 1's output if that comes later. The stop is worked out from the
layout when the extractor is built, so every pass, the first included, stops at the same place.
Noise comes from a CPU generator seeded per image (one stream for references, another for
targets), so a batch gives the same result as its images one at a time, on any device.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
from einops import rearrange
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import OVERFLOW_ADVICE, IconMattingConfig


@dataclass
class ImageFeatures:
    """Per-image SD features; see the module docstring for shapes."""

    up_features: Tuple[torch.Tensor, torch.Tensor]
    attention: Optional[Dict[int, torch.Tensor]] = None

    @property
    def correspondence(self) -> torch.Tensor:
        """Feature used for inter-image similarity (up block 1): [B, C1, S/16, S/16]."""
        return self.up_features[1]


TARGET_NOISE, REFERENCE_NOISE = 0, 1
KEPT_UP_BLOCKS = 2
"""The outputs of up blocks 0 and 1 are the features; nothing of a later block is kept."""


class SelfAttentionLayer(NamedTuple):
    """One self-attention layer of a UNet pass, as the early stop sees it."""

    level: int
    """How many times the latent was halved where the layer runs (its tokens: (S/8 / 2**level)**2)."""
    up_blocks_before: int
    """How many up blocks have given their output when the layer runs."""


UNetLayout = Sequence[SelfAttentionLayer]
"""Every self-attention layer of a UNet, in the order a pass runs them (read off its modules)."""


class _StopPass(BaseException):
    """Ends a UNet pass once everything it is needed for has run. A BaseException, so that a wrapper
    another extension put around the UNet (``except Exception``: a fallback that runs the UNet again,
    or a re-raise as its own error) lets it through; only :meth:`FeatureExtractor.unet_up_features`
    catches it."""


class PassStop(NamedTuple):
    """Where a pass stops: right after its ``layers``-th recorded self-attention layer, or at the output
    of up block ``up_block``; None for neither."""

    layers: Optional[int]
    up_block: Optional[int]


def plan_stops(layout: UNetLayout, recorded_levels: Set[int]) -> Dict[bool, PassStop]:
    """{with_attention: where such a pass stops}, from the UNet's layout. Without attention: at up block
    1's output. With attention: right after the last layer at a recorded level if it runs after up
    block 1's output, else (nothing would be saved, and stopping there would lose that output) at up
    block 1's output."""
    recorded = [layer for layer in layout if layer.level in recorded_levels]
    at_features = PassStop(None, KEPT_UP_BLOCKS - 1)
    if recorded and recorded[-1].up_blocks_before >= KEPT_UP_BLOCKS:
        return {False: at_features, True: PassStop(len(recorded), None)}
    return {False: at_features, True: at_features}


class SelfAttentionRecorder:
    """Self-attention at the recorded resolutions: computes each layer's probabilities once,
    accumulates their mean over heads per image, and returns the layer's output from them."""

    def __init__(self, resolutions):
        self.token_counts = {r * r: r for r in resolutions}
        self.reset(0, 1)

    def reset(self, images: int, copies: int):
        self.images, self.copies = images, copies
        self.offset = 0  # index in the whole [B*E] batch of the first sample of the group running now
        self.sums: Dict[int, torch.Tensor] = {}
        self.layers: Dict[int, int] = {}  # layer calls per resolution (each group of copies calls every layer)
        self.samples: Dict[int, int] = {}  # probability maps added per resolution, all images together

    @torch.no_grad()
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
               output: bool = True) -> Optional[torch.Tensor]:
        """q, k, v [B, T, heads*D] (projected) -> attention output [B, T, heads*D] in q's dtype (None
        unless ``output``: the pass ends after this layer).

        softmax(q k^T * scale) is computed in float32, one sample at a time (memory heads x T^2);
        its mean over heads is added to the image's sum (copies of an image are adjacent in B; B
        may be a group of the copies, starting at sample ``self.offset`` of the whole batch).
        """
        res = self.token_counts[q.shape[1]]
        batch, tokens, _ = q.shape
        acc = self.sums.get(res)
        if acc is None:
            acc = torch.zeros(self.images, tokens, tokens, device=q.device, dtype=torch.float32)
            self.sums[res] = acc
        out = torch.empty_like(q) if output else None
        for i in range(batch):
            qh, kh, vh = (rearrange(t[i].float(), "t (h d) -> h t d", h=heads) for t in (q, k, v))
            probs = torch.matmul(qh, kh.transpose(-1, -2)).mul_(scale).softmax(dim=-1)  # [heads, T, T]
            acc[(self.offset + i) // self.copies] += probs.mean(dim=0)
            if out is not None:
                out[i] = rearrange(torch.matmul(probs, vh), "h t d -> t (h d)").to(q.dtype)
            del probs
        self.layers[res] = self.layers.get(res, 0) + 1
        self.samples[res] = self.samples.get(res, 0) + batch
        return out

    def maps(self) -> Dict[int, torch.Tensor]:
        """Mean attention per resolution: {r: [B, r*r, r*r]} float32."""
        out = {}
        for res in self.token_counts.values():
            if res not in self.sums:
                raise RuntimeError(f"no self-attention layer ran at {res}x{res} tokens")
            out[res] = self.sums[res] / (self.samples[res] // self.images)  # layers x copies per image
        return out


def noise_schedule(config: IconMattingConfig) -> Tuple[float, float]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) of SD's scaled-linear schedule at config.timestep."""
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps, dtype=torch.float32) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)[config.timestep]
    return float(alpha_bar.sqrt()), float((1.0 - alpha_bar).sqrt())


def posterior_of_moments(moments: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """An SD VAE encoder's moments [B, 8, h, w] -> its diagonal Gaussian posterior (mean, std), each
    [B, 4, h, w] float32: the first four channels the mean, the last four the log-variance, clamped to
    [-30, 20] before std = exp(logvar / 2) (as SD's ``DiagonalGaussianDistribution``)."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean.float(), std.float()


class ChannelsLastConvolutions(TorchFunctionMode):
    """While active (the extractor's own VAE encode), every 2-d convolution takes its input in ``channels_last``
    layout, whatever layout the module before it gave; the weights are left as they are (the caller's or the
    host's modules are never converted: the kernel reorders them itself).

    Why: on the CPU, oneDNN's convolutions run faster on channels-last activations, and their output is
    channels-last too, so the layout flows through GroupNorm, SiLU and the residual sums to the next
    convolution. The VAE encoder is convolutions at full resolution: measured on a 2-core AVX2 machine at
    256 px, its convolutions took 16% less time and the encode 8% less (README "Benchmark"). Not the UNet:
    its transformer blocks hand back contiguous tensors, and the copies back and forth (7.3 s against 1.8 s)
    ate more than its convolutions gained (0.8 s), 11% slower. The values are those of the contiguous run
    (the same oneDNN kernels fed in another layout; pinned by tests/unit/test_conv_layout.py)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.conv2d and args and args[0].dim() == 4:
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        return func(*args, **(kwargs or {}))


class _Pass:
    """The UNet pass running now: where it stops, what it records, what it has kept so far."""

    def __init__(self, stop: PassStop, record: bool):
        self.stop, self.record = stop, record
        self.layers = 0  # recorded self-attention layers run so far
        self.captured: Dict[int, torch.Tensor] = {}  # up block outputs


class FeatureExtractor(nn.Module):
    """The IconMatting feature steps over an SD 2.1 VAE encoder and UNet that a subclass supplies.

    Subclasses pass the UNet's :data:`UNetLayout` to ``__init__``, implement :meth:`posterior`,
    :meth:`call_unet`, :meth:`fingerprint_tensors` and the ``device``/``dtype`` properties (where
    and in what precision the UNet takes its input), and from inside the UNet call
    :meth:`self_attention` (for each layer :meth:`records` accepts) and :meth:`up_block_output`.
    """

    def __init__(self, config: IconMattingConfig, empty_prompt_embedding: torch.Tensor, latent_scaling_factor: float,
                 layout: UNetLayout):
        super().__init__()
        self.config = config
        self.latent_scaling_factor = float(latent_scaling_factor)
        self.register_buffer("empty_prompt_embedding", empty_prompt_embedding.detach().float().clone(), persistent=False)
        self.recorder = SelfAttentionRecorder(config.attention_resolutions)
        self.signal_scale, self.noise_scale = noise_schedule(config)
        latent, sides = config.image_size // 8, set(config.attention_resolutions)
        #: {with_attention: where such a pass stops}, the same for every pass (see :func:`plan_stops`)
        self.stops = plan_stops(layout, {layer.level for layer in layout if latent >> layer.level in sides})
        self._pass: Optional[_Pass] = None

    # --- supplied by a subclass ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def posterior(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, S, S] in [-1, 1] -> VAE posterior (mean, std), each [B, 4, S/8, S/8] float32."""
        raise NotImplementedError

    def call_unet(self, latents: torch.Tensor, cond: torch.Tensor, with_attention: bool) -> None:
        """Run the UNet on noised latents [N, 4, S/8, S/8] and the prompt embedding [N, 77, D] at
        config.timestep, with the adapter's hooks in place (its output is not used: the pass is stopped
        inside it). ``with_attention``: whether the pass records self-attention (a host may size its
        memory for it)."""
        raise NotImplementedError

    def fingerprint_tensors(self) -> Dict[str, torch.Tensor]:
        """Tensors identifying the SD weights in use, the same whichever host loaded them: the UNet's
        and the VAE encoder's input convolutions. (Not the empty-prompt embedding: hosts compute it
        with their own text encoder code, equal only to float rounding.)"""
        raise NotImplementedError

    #: whether the VAE encode runs its convolutions on channels-last activations
    #: (:class:`ChannelsLastConvolutions`); None: on the CPU, where it was measured to pay
    channels_last: Optional[bool] = None

    def conv_layout(self):
        """The context of the extractor's own VAE encode: :class:`ChannelsLastConvolutions` when
        :attr:`channels_last` says so, else nothing."""
        wanted = self.device.type == "cpu" if self.channels_last is None else self.channels_last
        return ChannelsLastConvolutions() if wanted else contextlib.nullcontext()

    #: at most this many noised copies (of all images together) per UNet pass; None: as many as
    #: :meth:`copies_per_pass` allows. Smaller groups give the same features to float rounding.
    max_copies_per_pass: Optional[int] = None

    def copies_per_pass(self, copies: int, with_attention: bool) -> int:
        """How many of the ``copies`` noised latents (B*E) one UNet pass takes; the rest follow in
        further passes. A host whose memory is short overrides this (the ComfyUI pack asks its
        memory manager); by default all of them, or ``max_copies_per_pass``."""
        return copies if self.max_copies_per_pass is None else self.max_copies_per_pass

    # --- called from inside the UNet by the adapter's hooks --------------------------------------
    def records(self, tokens: int) -> bool:
        """Whether this extractor's pass is running and records self-attention over ``tokens`` tokens
        (the adapter then hands the layer to :meth:`self_attention`; otherwise the UNet's own runs)."""
        return self._pass is not None and self._pass.record and tokens in self.recorder.token_counts

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        """A recorded layer (see :meth:`SelfAttentionRecorder.attend`): its output, or the end of the pass
        after the last recorded layer it is needed for."""
        run = self._pass
        run.layers += 1
        last = run.layers == run.stop.layers
        out = self.recorder.attend(q, k, v, heads, scale, output=not last)
        if last:
            raise _StopPass()
        return out

    def up_block_output(self, index: int, features: torch.Tensor) -> None:
        """The output of up block ``index`` of the running pass: kept if a feature, and the end of the
        pass if nothing later is needed. Does nothing while this extractor runs no pass."""
        run = self._pass
        if run is None:
            return
        if index < KEPT_UP_BLOCKS:
            run.captured[index] = features
        if index == run.stop.up_block:
            raise _StopPass()

    # --- shared steps ----------------------------------------------------------------------------
    def unet_up_features(
        self, latents: torch.Tensor, cond: torch.Tensor, with_attention: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One UNet pass: noised latents [N, 4, S/8, S/8] and the prompt embedding [N, 77, D] -> outputs of
        UNet up blocks 0 and 1; with_attention: self-attention is recorded into self.recorder."""
        self._pass = _Pass(self.stops[with_attention], with_attention)
        try:
            try:
                self.call_unet(latents, cond, with_attention)
            except _StopPass:
                pass
            captured = self._pass.captured
            if len(captured) < KEPT_UP_BLOCKS:
                raise RuntimeError("the UNet did not run its up blocks 0 and 1")
            return captured[0], captured[1]
        finally:  # never keep device tensors alive past the pass, also after an error
            self._pass = None

    def _noise(self, count: int, latent_shape, seed: int, stream: int) -> Tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(2 * int(seed) + stream)
        shape = (count, *latent_shape)
        posterior_eps = torch.randn(shape, generator=gen, dtype=torch.float32)
        diffusion_eps = torch.randn(shape, generator=gen, dtype=torch.float32)
        return posterior_eps, diffusion_eps

    @torch.no_grad()
    def noisy_latents(self, images: torch.Tensor, seed: int, stream: int = TARGET_NOISE) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] -> [B*E, 4, S/8, S/8] noised latents (copies of one image adjacent)."""
        e = self.config.ensemble_size
        with self.conv_layout():
            mean, std = self.posterior(images)
        mean, std = mean.contiguous(), std.contiguous()  # the UNet pass starts from the layout it was measured in
        out = []
        for b in range(images.shape[0]):
            post_eps, diff_eps = self._noise(e, mean.shape[1:], seed, stream)
            z = (mean[b] + std[b] * post_eps.to(mean.device)) * self.latent_scaling_factor
            out.append(self.signal_scale * z + self.noise_scale * diff_eps.to(mean.device))
        return torch.cat(out)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, seed: int = 0, with_attention: bool = True, noise_stream: int = TARGET_NOISE
    ) -> ImageFeatures:
        """Features of images [B, 3, S, S] (SD-normalised, [-1, 1]); S must be config.image_size.

        ``noise_stream`` separates the noise of references (REFERENCE_NOISE) from that of targets
        (TARGET_NOISE): the reference implementation draws them independently, and shared noise
        would bias the similarity towards where the reference's mask lies.
        """
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"expected images [B, 3, {size}, {size}], got {tuple(images.shape)}")
        batch, e = images.shape[0], self.config.ensemble_size
        latents = self.noisy_latents(images, seed, noise_stream)
        cond = self.empty_prompt_embedding.expand(latents.shape[0], -1, -1)
        self.recorder.reset(batch, e)
        try:
            group = max(1, min(int(self.copies_per_pass(latents.shape[0], with_attention)), latents.shape[0]))
            parts: List[List[torch.Tensor]] = []
            for start in range(0, latents.shape[0], group):
                self.recorder.offset = start
                stop = start + group
                parts.append([c.float() for c in self.unet_up_features(latents[start:stop], cond[start:stop], with_attention)])
            captured = [torch.cat(level) if len(parts) > 1 else level[0] for level in zip(*parts)]
            del parts
            ups = tuple(c.view(batch, e, *c.shape[1:]).mean(dim=1) for c in captured)
            attention = self.recorder.maps() if with_attention else None
        finally:  # never keep device tensors alive past the call, also after an error
            self.recorder.reset(0, 1)
        maps = list(ups) + (list(attention.values()) if attention else [])
        if not all(torch.isfinite(m).all() for m in maps):
            raise FloatingPointError(
                f"Stable Diffusion features overflowed in {self.dtype} (NaN/inf): {OVERFLOW_ADVICE}."
            )
        return ImageFeatures(up_features=ups, attention=attention)


# the generator of stream s is seeded with 2 * seed + s; torch takes seeds in [-2**63, 2**64 - 1]
SEED_RANGE = (-(2**62), 2**63 - 1)


def seed_problem(seed) -> Optional[str]:
    """Why ``seed`` cannot seed the noise of both streams ("not a whole number", "outside ..."), or None."""
    if type(seed) is not int:
        return "not a whole number"
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        return f"outside the noise generator's range [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"
    return None
