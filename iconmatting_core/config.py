"""Configuration of the IconMatting model (defaults = the released model, `config/eval.yaml`)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Tuple

SD_CONFIG_DIR = Path(__file__).parent / "sd_configs"
OVERFLOW_ADVICE = "load IconMatting in fp32 or bf16 (the dtype option, --dtype on the command line)"
"""What every NaN/inf error recommends; "auto" precision picks one of the two (precision.resolve_dtype)."""


@dataclass(frozen=True)
class IconMattingConfig:
    """Hyper-parameters of the whole model.

    The defaults reproduce the released checkpoint: SD 2.1 at 768x768, timestep 200, 4 noised
    copies per image, UNet up blocks 0 and 1 as features, self-attention at image_size/32 and
    image_size/16 (24 and 48 for 768).
    """

    image_size: int = 768
    """Square side every image is brought to before the UNet; a multiple of 64."""
    timestep: int = 200
    ensemble_size: int = 4
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # Channels of UNet up-block outputs 0 (at image_size/32) and 1 (at image_size/16).
    unet_feature_channels: Tuple[int, int] = (1280, 1280)
    attention_out_channels: int = 256
    fused_channels: Tuple[int, int] = (320, 320)
    detail_channels: Tuple[int, int, int] = (48, 96, 192)
    decoder_channels: Tuple[int, int, int, int] = (256, 128, 64, 32)
    alpha_head_channels: int = 16

    def __post_init__(self):
        if self.image_size % 64 != 0 or self.image_size < 128:
            raise ValueError(f"image_size must be a multiple of 64 and >= 128, got {self.image_size}")
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}")
        if not 0 <= self.timestep < self.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {self.num_train_timesteps}), got {self.timestep}")

    @property
    def attention_resolutions(self) -> Tuple[int, int]:
        """Side of the self-attention maps used: (image_size/32, image_size/16)."""
        return (self.image_size // 32, self.image_size // 16)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IconMattingConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown IconMattingConfig fields: {sorted(unknown)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)


def load_sd_config(name: str) -> dict:
    """Shipped Stable Diffusion 2.1 config: name in {'unet', 'vae', 'text_encoder'}."""
    with open(SD_CONFIG_DIR / f"{name}_config.json", encoding="utf-8") as f:
        return json.load(f)
