"""Finding and loading the model files of a job (command line and Ray workers), every problem as
one line: :class:`ModelFileError` (exit status 2); a head trained on other SD weights than the ones
loaded is a one-line warning on stderr (``context_file.other_sd_warning``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Tuple

from ..hub import SD_REPO_ID, SD_SINGLE_FILE, SDNotFoundError, find_or_download_sd, hub_cache_dir

MODELS_ENV = "ICONMATTING_MODELS"
MATTING_NAMES = ("icm.safetensors", "icm.ckpt")
SD_NAMES = (SD_SINGLE_FILE, "v2-1_768-ema-pruned.ckpt", "stable-diffusion-2-1")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


class ModelFileError(ValueError):
    """Model files missing or unusable, or a device this machine lacks; one line naming the file."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def default_models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or Path.home() / ".cache" / "iconmatting" / "models")


def find_model_files(models_dir: Path, matting: Optional[str], sd: Optional[str]):
    """(matting weights, SD source, problems). Explicit paths win; otherwise the usual file names
    in models_dir; SD 2.1 then comes from the Hugging Face cache or is downloaded (``hub``)."""
    def pick(explicit, names):
        if explicit:
            return Path(explicit) if Path(explicit).exists() else None
        return next((models_dir / n for n in names if (models_dir / n).exists()), None)

    m, s = pick(matting, MATTING_NAMES), pick(sd, SD_NAMES)
    problems = []
    if m is None:
        problems.append(
            f"IconMatting weights: {matting or ' or '.join(str(models_dir / n) for n in MATTING_NAMES)} not found. "
            "Download icm.ckpt (the authors' release, linked from github.com/tiny-smart/in-context-matting) "
            f"into {models_dir}, or pass --matting-weights PATH."
        )
    if s is None and sd:
        problems.append(
            f"Stable Diffusion 2.1: {sd} not found. Download {SD_SINGLE_FILE} ({SD_REPO_ID}) or the diffusers "
            f"folder of {SD_REPO_ID} and pass its path, or leave --sd out to fetch it into the Hugging Face cache."
        )
    elif s is None:
        try:  # nothing is downloaded while the matting weights are missing anyway
            s = find_or_download_sd(models_dir, offline=True if problems else None)
        except SDNotFoundError as exc:
            problems.append(str(exc))
    return m, s, problems


def check_device(device: str, local: bool = True) -> None:
    """ModelFileError for a device name torch does not know, or (``local``) one this machine lacks."""
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelFileError(f"--device {device}: not a device name; use {DEVICE_HELP}") from None
    if not local:
        return
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelFileError(f"--device {device}: this torch build has no usable CUDA device; use --device cpu "
                             "(or install a CUDA build of torch)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelFileError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelFileError(f"--device {device}: MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ModelFileError(f"--device {device}: not supported; use {DEVICE_HELP}")


def locate(matting: Optional[str], sd: Optional[str], models_dir: Optional[str]) -> Tuple[Path, Path]:
    """The matting weights and SD source, or ModelFileError listing what is missing."""
    root = Path(models_dir) if models_dir else default_models_dir()
    m, s, problems = find_model_files(root, matting, sd)
    if problems:
        raise ModelFileError("model files missing: " + " ".join(one_line(p) for p in problems))
    return m, s


def load(matting_weights, sd_path, device: str = "auto", dtype: str = "auto"):
    """``load_pipeline`` with every failure as a ModelFileError naming the files."""
    from ..pipeline import load_pipeline

    for what, path in (("--matting-weights", matting_weights), ("--sd", sd_path)):
        p = Path(path)
        if what == "--matting-weights" and p.is_dir():
            raise ModelFileError(f"{what} {p} is a folder; give the icm.ckpt or icm.safetensors file")
        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            raise ModelFileError(f"{what} {p} is an image, not model weights")
    try:
        pipe = load_pipeline(matting_weights, sd_path, device=device, dtype=dtype)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is a problem with the files
        raise ModelFileError(
            f"cannot load the model files ({matting_weights}, {sd_path}): {one_line(f'{type(exc).__name__}: {exc}')[:600]}; "
            f"use the released icm.ckpt and Stable Diffusion 2.1 ({SD_REPO_ID})") from None
    unet = getattr(getattr(pipe.model, "extractor", None), "unet", None)
    config = getattr(unet, "config", None)
    if config is not None and (isinstance(config.attention_head_dim, int) or not config.use_linear_projection):
        # SD 2.x: per-block head sizes and linear projections; SD 1.x: one head count, conv projections
        raise ModelFileError(f"--sd {sd_path}: not Stable Diffusion 2.x (its UNet is shaped like SD 1.x: attention_head_dim "
                             f"{config.attention_head_dim}, use_linear_projection {config.use_linear_projection}); use {SD_REPO_ID}")
    from ..context_file import other_sd_warning

    warning = other_sd_warning(matting_weights, pipe.model.extractor)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return pipe


def sd_label(sd_path) -> str:
    """The SD source's name for context metadata."""
    return SD_REPO_ID if hub_cache_dir() in Path(sd_path).parents else Path(sd_path).name
