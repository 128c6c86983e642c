"""Training-test helpers: generated training folders and a stand-in for the frozen SD extractor.

* :func:`make_groups`: ``DIR/<group>/images|alphas`` of soft discs on noisy backgrounds;
* :class:`FakeExtractor`: the ``FeatureExtractor`` interface (``forward(images, seed, with_attention,
  noise_stream)``, ``fingerprint_tensors()``) computed from pooled pixels in a few microseconds, so a
  ``Trainer`` runs in-process in a fraction of a second per step; every call is recorded;
* :func:`use_fake_sd`: ``python -m iconmatting_core train`` with a FakeExtractor in place of the SD
  weights (``--sd`` then names nothing that is read; its ``seed`` stands for the weights);
* :func:`no_model_loads`: any model load fails the test (for refusals that must come first).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from iconmatting_core.features import ImageFeatures, TARGET_NOISE


def _disc(h, w, rng):
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.uniform(0.35 * h, 0.65 * h), rng.uniform(0.35 * w, 0.65 * w), rng.uniform(0.2, 0.3) * min(h, w)
    return np.clip((r - np.hypot(yy - cy, xx - cx)) / 3 + 0.5, 0, 1)


def make_groups(root: Path, groups=2, per_group=3, seed=0, size=(80, 100)) -> Path:
    """DIR/<group>/images|alphas: a coloured soft disc (one colour per group) on a noisy background."""
    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]
    for g in range(groups):
        for i in range(per_group):
            a = _disc(*size, rng)
            bg = rng.uniform(40, 160, (*size, 3))
            img = a[..., None] * np.array(colours[g]) + (1 - a[..., None]) * bg
            for sub, arr in (("images", img.astype(np.uint8)), ("alphas", (a * 255).astype(np.uint8))):
                (root / f"g{g}" / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / f"g{g}" / sub / f"{i}.png")
    return root


class FakeExtractor(nn.Module):
    """Features of the right shapes from the image's pooled pixels and seeded noise: per resolution r
    (S/32, S/16), a fixed random projection of the r x r mean-pooled image plus noise from a
    generator seeded like the real one (2 * seed + stream); attention = softmax of their similarity."""

    def __init__(self, config, weights_seed: int = 0, dtype=torch.float32):
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(1000 + weights_seed)
        c0, c1 = config.unet_feature_channels
        self.proj = nn.ParameterList([nn.Parameter(torch.randn(c, 3, generator=gen), requires_grad=False) for c in (c0, c1)])
        self.marks = {"unet.conv_in.weight": torch.randn(8, 4, 3, 3, generator=gen).to(dtype),
                      "vae.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=gen).to(dtype)}
        self.calls = []  # (seed, with_attention, noise_stream) per call

    def fingerprint_tensors(self):
        return self.marks

    @torch.no_grad()
    def forward(self, images, seed: int = 0, with_attention: bool = True, noise_stream: int = TARGET_NOISE):
        self.calls.append((int(seed), bool(with_attention), int(noise_stream)))
        gen = torch.Generator().manual_seed(2 * int(seed) + int(noise_stream))
        ups, attention = [], {}
        for proj, r in zip(self.proj, self.config.attention_resolutions):
            pooled = F.adaptive_avg_pool2d(images.float(), r)  # [B, 3, r, r]
            feat = torch.einsum("cd,bdhw->bchw", proj, pooled) + 0.1 * torch.randn(
                (images.shape[0], proj.shape[0], r, r), generator=gen)
            ups.append(feat)
            flat = feat.flatten(2).transpose(1, 2)  # [B, r*r, C]
            attention[r] = torch.softmax(flat @ flat.transpose(1, 2) / flat.shape[-1] ** 0.5, dim=-1)
        return ImageFeatures(up_features=tuple(ups), attention=attention if with_attention else None)


def use_fake_sd(monkeypatch, weights_seed: int = 0, dtype=torch.float32) -> list:
    """The training command line with FakeExtractor(weights_seed, dtype) for the SD weights (dtype:
    the precision they are loaded in); returns the list of extractors it builds."""
    import iconmatting_core.sd_features as sd_features
    import iconmatting_core.sd_loading as sd_loading

    built = []

    def load(source, dtype=torch.float32, **_):
        return SimpleNamespace(unet=None, vae=None, empty_prompt_embedding=torch.zeros(1, 77, 32))

    def extractor(unet, vae, prompt, config):
        built.append(FakeExtractor(config, weights_seed, dtype))
        return built[-1]

    monkeypatch.setattr(sd_loading, "load_sd_components", load)
    monkeypatch.setattr(sd_features, "SDFeatureExtractor", extractor)
    return built


def no_model_loads(monkeypatch) -> None:
    """Loading the SD weights or a head file fails the test."""
    import iconmatting_core.checkpoint as checkpoint
    import iconmatting_core.sd_loading as sd_loading

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the problem was reported")

    monkeypatch.setattr(sd_loading, "load_sd_components", refuse)
    monkeypatch.setattr(checkpoint, "load_head", refuse)
