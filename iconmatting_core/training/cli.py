"""``python -m iconmatting_core train --data DIR --sd SD --out RUN [...]`` (see ``trainer``).

Defaults are the authors' recipe from scratch (lr 4e-4, ``LossFunction2``); with ``--init HEAD``
their fine-tune recipe (lr 4e-5, the four matting losses on every sample, ``finetune.yaml``).
Several GPUs or machines: ``torchrun --nproc_per_node N -m iconmatting_core train ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_STEPS, DEFAULT_FINETUNE_STEPS = 10000, 1000


def add_parser(subparsers) -> argparse.ArgumentParser:
    t = subparsers.add_parser("train", help="train or fine-tune the matting head on your own mattes")
    t.add_argument("--data", required=True, help="training folder: the eval layout (image/, alpha/, json) or "
                                                 "DIR/<group>/images + DIR/<group>/alphas")
    t.add_argument("--json", help="group json of the eval layout (default: found as `eval` finds it)")
    t.add_argument("--sd", required=True, help="Stable Diffusion 2.1 checkpoint file or diffusers folder")
    t.add_argument("--out", required=True, help="run folder (checkpoints, metrics.csv, head.safetensors)")
    t.add_argument("--init", help="fine-tune from this head file (icm.ckpt or .safetensors; its config comes with it)")
    t.add_argument("--config", help="JSON of IconMattingConfig fields for a head trained from scratch (default: the released model's)")
    t.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS}, {DEFAULT_FINETUNE_STEPS} with --init)")
    t.add_argument("--batch-size", type=int, default=2, help="samples per process/GPU (default 2, the authors')")
    t.add_argument("--lr", type=float, help="learning rate (default 4e-4, 4e-5 with --init)")
    t.add_argument("--warmup", type=int, default=250, help="linear warm-up steps from 1e-6 x lr (default 250)")
    t.add_argument("--loss", choices=["recipe", "finetune"], help="recipe: LossFunction2 (default from scratch); "
                                                                  "finetune: the four matting losses (default with --init)")
    t.add_argument("--image-size", type=int, help="model input size, a multiple of 64 (default 768, or the --init head's)")
    t.add_argument("--val-data", help="validation folder (same layouts); head.safetensors is then the best on it")
    t.add_argument("--val-json", help="group json of --val-data")
    t.add_argument("--val-every", type=int, default=500)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--checkpoints-total-limit", type=int, default=3, help="checkpoints kept (0: all)")
    t.add_argument("--resume", help="'latest' (the run's newest checkpoint, or a fresh start) or a checkpoint folder")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--device", default="auto")
    t.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="precision of the frozen SD pass")
    t.add_argument("--workers", type=int, help="data loading processes (default: min(4, CPUs - 1))")
    t.add_argument("--trimap-radius", type=int, help="half-width of the derived unknown band in model pixels (default 10 at 768)")
    t.add_argument("--no-progress", action="store_true")
    return t


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _check_args(args):
    for name in ("steps", "batch_size", "val_every", "checkpoint_every"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {v}"
    if args.warmup < 0:
        return f"--warmup must be >= 0, got {args.warmup}"
    if args.val_json and not args.val_data:
        return "--val-json needs --val-data"
    return None


def _config(args):
    from ..config import IconMattingConfig

    if args.config:
        fields = json.loads(Path(args.config).read_text(encoding="utf-8"))
        if args.image_size:
            fields["image_size"] = args.image_size
        return IconMattingConfig.from_dict(fields)
    return IconMattingConfig(image_size=args.image_size) if args.image_size else IconMattingConfig()


def _device(name: str):
    import torch

    from ..pipeline import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def run(args) -> int:
    problem = _check_args(args)
    if problem:
        return _error(problem)
    from ..eval import DatasetError
    from .data import load_train_data

    try:  # every data problem is found before any model is loaded
        data = load_train_data(args.data, args.json)
        val = load_train_data(args.val_data, args.val_json) if args.val_data else None
    except DatasetError as exc:
        return _error(str(exc))
    if not Path(args.sd).exists() and "/" not in args.sd:
        return _error(f"Stable Diffusion weights not found: {args.sd}; give the SD 2.1 file or diffusers folder")
    if args.init and not Path(args.init).is_file():
        return _error(f"--init {args.init}: file not found")
    try:
        config = None if args.init else _config(args)
    except (OSError, ValueError) as exc:
        return _error(f"--config / --image-size: {exc}")
    return _train(args, data, val, config)


def _train(args, data, val, config) -> int:
    import torch
    import torch.distributed as dist

    from ..checkpoint import CheckpointError, load_head
    from ..eval import DatasetError
    from ..sd_features import SDFeatureExtractor
    from ..matting_head import IconMattingHead
    from ..sd_loading import load_sd_components
    from .state import ResumeError
    from .trainer import Trainer, TrainingStopped, TrainSettings, _dist

    rank, world, _ = _dist()
    device = _device(args.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(args.seed)
    prompt = None
    try:
        if args.init:
            head, prompt = load_head(args.init)
            if args.image_size and args.image_size != head.config.image_size:
                return _error(f"--image-size {args.image_size} does not fit --init {args.init} "
                              f"(a {head.config.image_size}px head); leave --image-size out")
        else:
            head = IconMattingHead(config)
        sd_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
        sd = load_sd_components(args.sd, sd_dtype)
    except CheckpointError as exc:
        return _error(str(exc))
    empty = sd.empty_prompt_embedding if prompt is None else prompt
    extractor = SDFeatureExtractor(sd.unet, sd.vae, empty, head.config).to(device)
    workers = args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    settings = TrainSettings(
        out=args.out, steps=args.steps or (DEFAULT_FINETUNE_STEPS if args.init else DEFAULT_STEPS),
        batch_size=args.batch_size, lr=args.lr or (4e-5 if args.init else 4e-4), warmup=args.warmup,
        loss=args.loss or ("finetune" if args.init else "recipe"), seed=args.seed, val_every=args.val_every,
        checkpoint_every=args.checkpoint_every, checkpoints_total_limit=args.checkpoints_total_limit or None,
        resume=args.resume, workers=workers, trimap_radius=args.trimap_radius,
        extra={"init": Path(args.init).name if args.init else None, "sd": Path(args.sd).name,
               "mixed_precision": args.mixed_precision})
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if rank == 0 else (lambda line: None)
    trainer = Trainer(settings, data, extractor, head, device, val, empty_prompt=prompt, log=log,
                      progress=not args.no_progress)
    try:
        final = trainer.run()
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ResumeError, DatasetError) as exc:  # a checkpoint or a data file unusable mid-run
        return _error(str(exc))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"wrote {final}")
    return 0
