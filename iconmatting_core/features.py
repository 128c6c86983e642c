"""Stage 2: Stable Diffusion features and self-attention maps of an image (frozen UNet + VAE).

As in IconMatting: each image is VAE-encoded (a posterior *sample*, times the scaling factor),
copied ``ensemble_size`` times, each copy noised to ``timestep`` with its own noise, and run
through the UNet conditioned on the empty prompt. Outputs, averaged over the copies:

* ``up_features[0]``: output of UNet up block 0, [B, C0, S/32, S/32]
* ``up_features[1]``: output of UNet up block 1, [B, C1, S/16, S/16] (also the correspondence feature)
* ``attention[r]``: self-attention probabilities at r x r tokens, averaged over heads, copies and
  all self-attention layers at that resolution (down, mid and up), [B, r*r (query), r*r (key)]

The attention maps are recorded by wrapping each self-attention processor; the wrapped processor
still computes the layer's output, so the UNet's outputs are unchanged. The UNet stops right
after the last block it is needed for (up block 2 for the maps, up block 1 for a reference).
Noise comes from a CPU generator seeded per image (one stream for references, another for
targets), so a batch gives the same result as its images one at a time, on any device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .config import IconMattingConfig


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


class _StopUNet(Exception):
    pass


class SelfAttentionRecorder:
    """Accumulates head-averaged self-attention probabilities of the layers it is attached to."""

    def __init__(self, resolutions, images: int = 1, copies: int = 1):
        self.token_counts = {r * r: r for r in resolutions}
        self.active = False
        self.reset(images, copies)

    def reset(self, images: int, copies: int):
        self.images, self.copies = images, copies
        self.sums: Dict[int, torch.Tensor] = {}
        self.layers: Dict[int, int] = {}

    def wants(self, hidden_states: torch.Tensor, encoder_hidden_states) -> bool:
        return (
            self.active
            and encoder_hidden_states is None
            and hidden_states.ndim == 3
            and hidden_states.shape[1] in self.token_counts
        )

    @torch.no_grad()
    def add(self, attn, hidden_states: torch.Tensor) -> None:
        """Record softmax(q k^T * scale) of one layer: its mean over heads, summed over copies per image."""
        res = self.token_counts[hidden_states.shape[1]]
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        batch, tokens, _ = q.shape
        q = q.view(batch, tokens, attn.heads, -1).transpose(1, 2)
        k = k.view(batch, tokens, attn.heads, -1).transpose(1, 2)
        acc = self.sums.get(res)
        if acc is None:
            acc = torch.zeros(self.images, tokens, tokens, device=q.device, dtype=torch.float32)
            self.sums[res] = acc
        for i in range(batch):  # one sample at a time bounds memory to heads x tokens^2
            scores = torch.matmul(q[i].float(), k[i].float().transpose(-1, -2)) * attn.scale
            acc[i // self.copies] += scores.softmax(dim=-1).mean(dim=0)
            del scores
        self.layers[res] = self.layers.get(res, 0) + 1

    def maps(self) -> Dict[int, torch.Tensor]:
        """Mean attention per resolution: {r: [B, r*r, r*r]} float32."""
        out = {}
        for res in self.token_counts.values():
            if res not in self.sums:
                raise RuntimeError(f"no self-attention layer ran at {res}x{res} tokens")
            out[res] = self.sums[res] / (self.layers[res] * self.copies)
        return out


class _RecordingAttnProcessor:
    """Wraps a diffusers attention processor: records the map, then runs the original unchanged."""

    def __init__(self, inner, recorder: SelfAttentionRecorder):
        self.inner = inner
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.recorder.wants(hidden_states, encoder_hidden_states):
            self.recorder.add(attn, hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def noise_schedule(config: IconMattingConfig) -> Tuple[float, float]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) of SD's scaled-linear schedule at config.timestep."""
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps, dtype=torch.float32) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)[config.timestep]
    return float(alpha_bar.sqrt()), float((1.0 - alpha_bar).sqrt())


class SDFeatureExtractor(nn.Module):
    """Frozen SD UNet + VAE encoder + the empty-prompt embedding buffer."""

    def __init__(self, unet: nn.Module, vae: nn.Module, empty_prompt_embedding: torch.Tensor, config: IconMattingConfig):
        super().__init__()
        self.config = config
        self.unet = unet
        if getattr(vae, "decoder", None) is not None:
            vae.decoder = None  # only the encoder is used
        self.vae = vae
        self.register_buffer("empty_prompt_embedding", empty_prompt_embedding.detach().clone(), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.recorder = SelfAttentionRecorder(config.attention_resolutions)
        for name, module in self.unet.named_modules():
            if name.endswith("attn1") and hasattr(module, "processor"):
                module.set_processor(_RecordingAttnProcessor(module.processor, self.recorder))
        self._captured: Dict[int, torch.Tensor] = {}
        self._stop_after = 2
        for i, block in enumerate(self.unet.up_blocks[:3]):
            block.register_forward_hook(self._make_hook(i))
        self.signal_scale, self.noise_scale = noise_schedule(config)

    def _make_hook(self, index: int):
        def hook(_module, _inputs, output):
            if index < 2:
                self._captured[index] = output
            if index >= self._stop_after:
                raise _StopUNet()
        return hook

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

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
        x = images.to(self.device, self.dtype)
        posterior = self.vae.encode(x).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        out = []
        for b in range(x.shape[0]):
            post_eps, diff_eps = self._noise(e, mean.shape[1:], seed, stream)
            z = (mean[b] + std[b] * post_eps.to(mean.device)) * self.vae.config.scaling_factor
            out.append(self.signal_scale * z + self.noise_scale * diff_eps.to(mean.device))
        return torch.cat(out).to(self.dtype)

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
        cond = self.empty_prompt_embedding.to(self.device, self.dtype).expand(latents.shape[0], -1, -1)
        t = torch.tensor(self.config.timestep, dtype=torch.long, device=self.device)
        self._captured = {}
        self._stop_after = 2 if with_attention else 1
        self.recorder.reset(batch, e)
        self.recorder.active = with_attention
        try:
            try:
                self.unet(latents, t, encoder_hidden_states=cond)
            except _StopUNet:
                pass
            if 1 not in self._captured:
                raise RuntimeError("UNet did not run its up blocks 0 and 1")
            ups = tuple(
                self._captured[i].float().view(batch, e, *self._captured[i].shape[1:]).mean(dim=1) for i in (0, 1)
            )
            attention = self.recorder.maps() if with_attention else None
        finally:  # never keep device tensors alive past the call, also after an error
            self.recorder.active = False
            self._captured = {}
            self.recorder.reset(0, 1)
        maps = list(ups) + (list(attention.values()) if attention else [])
        if not all(torch.isfinite(m).all() for m in maps):
            raise FloatingPointError(
                f"Stable Diffusion features overflowed in {self.dtype} (NaN/inf). Run IconMatting in fp32 or bf16."
            )
        return ImageFeatures(up_features=ups, attention=attention)
