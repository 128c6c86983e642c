"""Options and set-up shared by the subcommands: model files, device, threads, number checks."""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Callable, Optional

from ..hub import SD_REPO_ID
from . import model_files
from .model_files import MODELS_ENV


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


def seed_value(text: str) -> int:
    from ..features import seed_problem

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    problem = seed_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{value} is {problem}")
    return value


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Torch threads of the local engine: one core left for decoding, encoding and the system,
    at most 8 (more rarely helps); 1 on a 1- or 2-core machine."""
    return max(1, min(available_cores() - 1, 8))


def thread_count(text: str) -> int:
    """``--threads``: 1 up to the cores this process may use. More is refused, not capped: threads
    beyond the cores only contend for them (``--threads 999`` was reported to run about 100x
    slower), and a cap would silently change the thread count that bit-for-bit reproducibility is
    stated for (README: same ``--threads``, same bits)."""
    value = positive_int(text)
    cores = available_cores()
    if value > cores:
        raise argparse.ArgumentTypeError(f"{value} is more than the {cores} cores this process may use; give at most {cores} "
                                         "(or leave it out for the default)")
    return value


def local_cpus_problem(cpus: float, address: Optional[str]) -> Optional[str]:
    """What is wrong with ``--cpus-per-worker`` for a Ray the job starts on this machine (no
    ``--address``, no ``RAY_ADDRESS``), or None: more than this machine's cores is an actor Ray can
    never place, and the job would wait for it forever. A cluster's nodes are for Ray to judge."""
    cores = available_cores()
    if address is None and not os.environ.get("RAY_ADDRESS") and cpus > cores:
        return (f"--cpus-per-worker {cpus:g} is more than the {cores} cores of this machine, where the job starts its Ray; "
                f"give at most {cores} (or the --address of a cluster with bigger nodes)")
    return None


def set_threads(threads) -> int:
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matting-weights", help="IconMatting weights (icm.ckpt or its .safetensors conversion)")
    p.add_argument("--sd", help=f"Stable Diffusion 2.1 checkpoint file or diffusers folder (default: the Hugging Face "
                                f"cache of {SD_REPO_ID}, downloaded when missing)")
    p.add_argument("--models-dir", help=f"where to look for model files (default ${MODELS_ENV} or ~/.cache/iconmatting/models)")
    p.add_argument("--device", default="auto", help=f"{model_files.DEVICE_HELP} (default auto: CUDA when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--threads", type=thread_count,
                   help="torch CPU threads, at most the cores this process may use (default: cores - 1, at most 8; "
                        "results are the same up to float rounding)")


def add_reference_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--reference", nargs="+", required=required, help="reference image(s)")
    p.add_argument("--mask", nargs="+", required=required,
                   help="foreground mask of each reference (white = foreground; or an image's alpha); one mask for all is fine")
    p.add_argument("--pooling", default="mask", choices=["mask", "scribble"], help="'scribble' for strokes/points")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the noise added before feature extraction")


_pipe_factory: Optional[Callable[[], object]] = None  # see pipeline_factory


@contextlib.contextmanager
def pipeline_factory(factory: Optional[Callable[[], object]]):
    """Within the block, jobs build their pipeline with ``factory()`` instead of loading model
    files (Ray workers included: the factory is sent to them). The seam for tests and benchmarks
    (``__main__.main(argv, pipe_factory)``), kept out of the parsed options; None changes nothing."""
    global _pipe_factory
    saved, _pipe_factory = _pipe_factory, factory if factory is not None else _pipe_factory
    try:
        yield
    finally:
        _pipe_factory = saved


def given_pipe_factory() -> Optional[Callable[[], object]]:
    """The factory :func:`pipeline_factory` set, or None (load the model files)."""
    return _pipe_factory


def load_pipe(args):
    """(pipeline, weight files' names for context metadata); ModelFileError when the files are
    missing or unusable. A factory set by :func:`pipeline_factory` replaces the files."""
    if _pipe_factory is not None:
        return _pipe_factory(), {}
    model_files.check_device(args.device)
    matting, sd = model_files.locate(args.matting_weights, args.sd, args.models_dir)
    pipe = model_files.load(matting, sd, device=args.device, dtype=args.dtype)
    return pipe, {"matting_weights": Path(matting).name, "sd": model_files.sd_label(sd)}


def check_reference_files(args) -> None:
    """Before any model loads: ValueError when --reference/--mask cannot make a reference (a mask count that does
    not fit; an animation, whose first frame is not what a user marked on), read from the files' headers."""
    from ..image_io import is_animation

    if len(args.mask) not in (1, len(args.reference)):
        raise ValueError(f"got {len(args.reference)} reference images but {len(args.mask)} masks; give one mask per image")
    for path in [*args.reference, *args.mask]:
        if is_animation(Path(path)):
            raise ValueError(f"{path} is an animation (more than one frame); give one still image: save the frame you "
                             "marked as a PNG")


def encode_reference(pipe, args, resize_mode: str):
    """The context of --reference/--mask (checked by :func:`check_reference_files` first); ValueError
    (ImageReadError) for bad files."""
    from ..image_io import read_image, read_mask

    images = [read_image(Path(p)) for p in args.reference]
    masks = [read_mask(Path(p)) for p in args.mask]
    return pipe.encode_reference(images, masks, pooling=args.pooling, resize_mode=resize_mode, seed=args.seed)
