"""Stage 2: Stable Diffusion features and self-attention maps of an image (frozen UNet + VAE).

As in IconMatting: each image is VAE-encoded (a posterior *sample*, times the scaling factor),
copied ``ensemble_size`` times, each copy noised to ``timestep`` with its own noise, and run
through the UNet conditioned on the empty prompt. Outputs, averaged over the copies:

* ``up_features[0]``: output of UNet up block 0, [B, C0, S/32, S/32]
* ``up_features[1]``: output of UNet up block 1, [B, C1, S/16, S/16] (also the correspondence feature)
* ``attention[r]``: self-attention probabilities at r x r tokens, averaged over heads, copies and
  all self-attention layers at that resolution (down, mid and up), [B, r*r (query), r*r (key)]

:class:`FeatureExtractor` holds these shared steps; a subclass supplies SD's VAE encoder and UNet:
:class:`~iconmatting_core.sd_features.SDFeatureExtractor` runs diffusers modules (library, command line), and the ComfyUI node
pack runs the host's own model objects through the same steps. Each recorded self-attention
layer computes its probabilities once, in float32, and derives both the recorded map and the
layer's output from them (as the reference's attention processor does). The UNet stops right
after the last block it is needed for (up block 1 for a reference); for the maps, once a first pass
has shown how many layers it records, right after the last of them (in up block 2, before that
block's last feed-forward and its upsampler, whose outputs nothing reads).
Noise comes from a CPU generator seeded per image (one stream for references, another for
targets), so a batch gives the same result as its images one at a time, on any device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from einops import rearrange
from torch import nn

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


class StopUNet(Exception):
    """Raised from inside the UNet once the last block whose output is used has run."""


class SelfAttentionRecorder:
    """Self-attention at the recorded resolutions: computes each layer's probabilities once,
    accumulates their mean over heads per image, and returns the layer's output from them."""

    def __init__(self, resolutions, images: int = 1, copies: int = 1):
        self.token_counts = {r * r: r for r in resolutions}
        self.active = False
        #: recorded layers in one whole UNet pass, once a pass has run to its end (None before; 0: the
        #: last of them runs before the last block whose output is kept); from then on a pass stops
        #: (StopUNet) right after the last one has recorded its probabilities
        self.layers_per_pass: Optional[int] = None
        self.reset(images, copies)

    def reset(self, images: int, copies: int):
        self.images, self.copies = images, copies
        self.pass_layers = 0  # recorded layers run so far in the UNet pass running now
        self.offset = 0  # index in the whole [B*E] batch of the first sample of the group running now
        self.sums: Dict[int, torch.Tensor] = {}
        self.layers: Dict[int, int] = {}  # layer calls per resolution (each group of copies calls every layer)
        self.samples: Dict[int, int] = {}  # probability maps added per resolution, all images together

    def records(self, tokens: int) -> bool:
        return self.active and tokens in self.token_counts

    @torch.no_grad()
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        """q, k, v [B, T, heads*D] (projected) -> attention output [B, T, heads*D] in q's dtype.

        softmax(q k^T * scale) is computed in float32, one sample at a time (memory heads x T^2);
        its mean over heads is added to the image's sum (copies of an image are adjacent in B; B
        may be a group of the copies, starting at sample ``self.offset`` of the whole batch).
        Raises StopUNet instead of returning after the pass's last recorded layer (once
        ``layers_per_pass`` is known): nothing the UNet computes after it is used.
        """
        res = self.token_counts[q.shape[1]]
        batch, tokens, _ = q.shape
        self.pass_layers += 1
        last = bool(self.layers_per_pass) and self.pass_layers >= self.layers_per_pass
        acc = self.sums.get(res)
        if acc is None:
            acc = torch.zeros(self.images, tokens, tokens, device=q.device, dtype=torch.float32)
            self.sums[res] = acc
        out = None if last else torch.empty_like(q)
        for i in range(batch):
            qh, kh, vh = (rearrange(t[i].float(), "t (h d) -> h t d", h=heads) for t in (q, k, v))
            probs = torch.matmul(qh, kh.transpose(-1, -2)).mul_(scale).softmax(dim=-1)  # [heads, T, T]
            acc[(self.offset + i) // self.copies] += probs.mean(dim=0)
            if out is not None:
                out[i] = rearrange(torch.matmul(probs, vh), "h t d -> t (h d)").to(q.dtype)
            del probs
        self.layers[res] = self.layers.get(res, 0) + 1
        self.samples[res] = self.samples.get(res, 0) + batch
        if out is None:
            raise StopUNet()
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


class FeatureExtractor(nn.Module):
    """The IconMatting feature steps over an SD 2.1 VAE encoder and UNet that a subclass supplies.

    Subclasses implement :meth:`posterior`, :meth:`unet_up_features`, :meth:`fingerprint_tensors`
    and the ``device``/``dtype`` properties (where and in what precision the UNet takes its input).
    """

    def __init__(self, config: IconMattingConfig, empty_prompt_embedding: torch.Tensor, latent_scaling_factor: float):
        super().__init__()
        self.config = config
        self.latent_scaling_factor = float(latent_scaling_factor)
        self.register_buffer("empty_prompt_embedding", empty_prompt_embedding.detach().float().clone(), persistent=False)
        self.recorder = SelfAttentionRecorder(config.attention_resolutions)
        self.signal_scale, self.noise_scale = noise_schedule(config)
        self._captured: Dict[int, torch.Tensor] = {}  # up block outputs of the pass running now
        self._layers_at_capture = 0  # recorded layers that had run when the pass's last capture was made

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

    def unet_up_features(
        self, latents: torch.Tensor, cond: torch.Tensor, with_attention: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Noised latents [N, 4, S/8, S/8] and the prompt embedding [N, 77, D] at config.timestep ->
        outputs of UNet up blocks 0 and 1; with_attention: self-attention goes through self.recorder
        (and the UNet runs up to up block 2), else the UNet may stop after up block 1."""
        raise NotImplementedError

    def fingerprint_tensors(self) -> Dict[str, torch.Tensor]:
        """Tensors identifying the SD weights in use, the same whichever host loaded them: the UNet's
        and the VAE encoder's input convolutions. (Not the empty-prompt embedding: hosts compute it
        with their own text encoder code, equal only to float rounding.)"""
        raise NotImplementedError

    def _capture(self, level: int, features: torch.Tensor) -> None:
        """Called by the subclass's UNet hook: keeps the output of up block ``level`` (0 or 1) of the pass."""
        self._captured[level] = features
        self._layers_at_capture = self.recorder.pass_layers

    #: at most this many noised copies (of all images together) per UNet pass; None: as many as
    #: :meth:`copies_per_pass` allows. Smaller groups give the same features to float rounding.
    max_copies_per_pass: Optional[int] = None

    def copies_per_pass(self, copies: int, with_attention: bool) -> int:
        """How many of the ``copies`` noised latents (B*E) one UNet pass takes; the rest follow in
        further passes. A host whose memory is short overrides this (the ComfyUI pack asks its
        memory manager); by default all of them, or ``max_copies_per_pass``."""
        return copies if self.max_copies_per_pass is None else self.max_copies_per_pass

    # --- shared steps ----------------------------------------------------------------------------
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
        mean, std = self.posterior(images)
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
        self.recorder.active = with_attention
        try:
            group = max(1, min(int(self.copies_per_pass(latents.shape[0], with_attention)), latents.shape[0]))
            parts = []
            for start in range(0, latents.shape[0], group):
                self.recorder.offset, self.recorder.pass_layers = start, 0
                stop = start + group
                parts.append([c.float() for c in self.unet_up_features(latents[start:stop], cond[start:stop], with_attention)])
                if with_attention and self.recorder.layers_per_pass is None:  # this pass ran to its end
                    # later passes stop after the last recorded layer if it runs after the last capture (0: never)
                    ran_after = self.recorder.pass_layers > self._layers_at_capture
                    self.recorder.layers_per_pass = self.recorder.pass_layers if ran_after else 0
            captured = [torch.cat(level) if len(parts) > 1 else level[0] for level in zip(*parts)]
            del parts
            ups = tuple(c.view(batch, e, *c.shape[1:]).mean(dim=1) for c in captured)
            attention = self.recorder.maps() if with_attention else None
        finally:  # never keep device tensors alive past the call, also after an error
            self.recorder.active = False
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
