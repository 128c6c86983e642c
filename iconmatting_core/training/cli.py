"""``python -m iconmatting_core train --data DIR --sd SD --out RUN [...]`` (see ``trainer``).

Defaults are the authors' recipe from scratch (lr 4e-4, ``LossFunction2``, global batch 4 = their
2 GPUs x 2 samples, on one process or split over several); with ``--init HEAD`` the optimisation of
their ``finetune.yaml`` (lr 4e-5, the four matting losses on every sample). Several GPUs or machines:
``torchrun --nproc_per_node N -m iconmatting_core train ...`` (the same head as one process).

Every problem a user can cause is one line and exit status 2, found before the SD weights load
where it can be: the options, the device, the data, the run folder (never trained into afresh; a
resume only with the run's own settings, ``state.check_start``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

DEFAULT_STEPS, DEFAULT_FINETUNE_STEPS = 10000, 1000
DEFAULT_BATCH = 4  # trainer.AUTHORS_BATCH (not imported here: torch loads only once the options are checked)
MAX_SEED = 2**23 - 1  # the noise seeds (seed << 40) + position, doubled per stream, must fit torch's 64-bit seeds


def add_parser(subparsers) -> argparse.ArgumentParser:
    t = subparsers.add_parser("train", help="train or fine-tune the matting head on your own mattes")
    t.add_argument("--data", required=True, help="training folder: the eval layout (image/, alpha/, json) or "
                                                 "DIR/<group>/images + DIR/<group>/alphas")
    t.add_argument("--json", help="group json of the eval layout (default: found as `eval` finds it)")
    t.add_argument("--sd", required=True, help="Stable Diffusion 2.1 checkpoint file or diffusers folder")
    t.add_argument("--out", required=True, help="run folder (checkpoints, metrics.csv, head.safetensors); a new or "
                                                "empty folder, or the run's own with --resume")
    t.add_argument("--init", help="fine-tune from this head file (icm.ckpt or .safetensors; its config comes with it)")
    t.add_argument("--config", help="JSON of IconMattingConfig fields for a head trained from scratch (default: the released model's)")
    t.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS}, {DEFAULT_FINETUNE_STEPS} with --init)")
    t.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help=f"global batch: samples per step, all processes together (default {DEFAULT_BATCH}, the authors' "
                        "2 GPUs x 2); each process takes batch-size / processes, in BatchNorm groups of 2")
    t.add_argument("--lr", type=float, help="learning rate (default 4e-4, 4e-5 with --init)")
    t.add_argument("--warmup", type=int, default=250, help="linear warm-up steps from 1e-6 x lr (default 250)")
    t.add_argument("--loss", choices=["recipe", "finetune"], help="recipe: LossFunction2 (default from scratch); "
                                                                  "finetune: the four matting losses (default with --init)")
    t.add_argument("--image-size", type=int, help="model input size, a multiple of 64 (default 768, or the --init head's)")
    t.add_argument("--timestep", type=int, help="diffusion timestep of the SD features (default: the --init head's, "
                                                "else 200, what inference uses; the authors' finetune.yaml used 0); "
                                                "recorded in the head, whose mattes then use it")
    t.add_argument("--val-data", help="validation folder (same layouts); head.safetensors is then the best on it")
    t.add_argument("--val-json", help="group json of --val-data")
    t.add_argument("--val-every", type=int, default=500)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--checkpoints-total-limit", type=int, default=3, help="checkpoints kept, the newest (0: all)")
    t.add_argument("--resume", help="'latest' (the run's newest checkpoint, or a fresh start) or a checkpoint folder")
    t.add_argument("--resume-with-changes", action="store_true",
                   help="resume although settings, data or weights differ from the run's (its history records both)")
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


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_args(args):
    for name in ("steps", "batch_size", "val_every", "checkpoint_every"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {v}"
    for name in ("warmup", "workers", "trimap_radius", "checkpoints_total_limit"):
        v = getattr(args, name)
        if v is not None and v < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {v}"
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        return f"--lr must be a number above 0, got {args.lr}"
    if not 0 <= args.seed <= MAX_SEED:
        return f"--seed must be between 0 and {MAX_SEED}, got {args.seed}"
    if args.val_json and not args.val_data:
        return "--val-json needs --val-data"
    if args.batch_size % _world():
        return (f"--batch-size {args.batch_size} (the global batch) does not split over {_world()} processes; give a "
                f"multiple of {_world()}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a folder for the run"
    return None


def _config(args):
    from ..config import IconMattingConfig

    fields = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
    if args.image_size:
        fields["image_size"] = args.image_size
    if args.timestep is not None:
        fields["timestep"] = args.timestep
    return IconMattingConfig.from_dict(fields)


def _device(name: str):
    import torch

    from ..pipeline import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and _world() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _data_warnings(args, data, val) -> None:
    """What trains without error but not as the user probably thinks: a BatchNorm group of 1, a head
    chosen on the evaluation set or on training images."""
    per_process, group = args.batch_size // _world(), 2
    if per_process % group:
        _warn(f"--batch-size {args.batch_size} gives each of {_world()} process(es) {per_process} samples: BatchNorm runs "
              f"on groups of {group} (the authors' per-GPU batch), so one group has {per_process % group} sample; give a "
              f"multiple of {group * _world()}")
    if val is None:
        return
    if val.layout == "eval":
        _warn(f"--val-data {args.val_data} is laid out as the evaluation set (ICM-57: image/, alpha/, json): "
              "head.safetensors is chosen on it, so scores on that set are no longer held out; validate on other data")
    train_images = {data.files[data.relative(i.image)][1] for i in data.items}
    shared = sum(val.files[val.relative(i.image)][1] in train_images for i in val.items)
    if shared:
        _warn(f"{shared} of the {len(val)} --val-data images are also --data images (same content): head.safetensors "
              "is chosen on images it was trained on; validate on other data")


def run(args) -> int:
    problem = _check_args(args)
    if problem:
        return _error(problem)
    from ..eval import DatasetError
    from ..job.model_files import ModelFileError, check_device
    from .data import load_train_data
    from .state import ResumeError, check_start

    try:
        check_device(args.device)
        if not args.resume:  # a folder holding a run is refused at once (a resume is checked once the data is known)
            check_start(args.out, None, {}, {}, False)
    except (ModelFileError, ResumeError) as exc:
        return _error(str(exc))
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
        return _error(f"--config / --image-size / --timestep: {exc}")
    _data_warnings(args, data, val)
    return _train(args, data, val, config)


def _train(args, data, val, config) -> int:
    import dataclasses

    import torch
    import torch.distributed as dist

    from ..checkpoint import CheckpointError, load_head
    from ..eval import DatasetError
    from ..sd_features import SDFeatureExtractor
    from ..matting_head import IconMattingHead
    from ..sd_loading import load_sd_components
    from . import state as S
    from .trainer import Trainer, TrainingStopped, TrainSettings, _dist, data_files, run_recipe

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
            if args.timestep is not None:
                head.config = dataclasses.replace(head.config, timestep=args.timestep)
        else:
            head = IconMattingHead(config)
    except (CheckpointError, ValueError) as exc:
        return _error(str(exc))
    settings = TrainSettings(
        out=args.out, steps=args.steps or (DEFAULT_FINETUNE_STEPS if args.init else DEFAULT_STEPS),
        batch_size=args.batch_size, lr=args.lr or (4e-5 if args.init else 4e-4), warmup=args.warmup,
        loss=args.loss or ("finetune" if args.init else "recipe"), seed=args.seed, val_every=args.val_every,
        checkpoint_every=args.checkpoint_every, checkpoints_total_limit=args.checkpoints_total_limit or None,
        resume=args.resume, resume_with_changes=args.resume_with_changes,
        workers=args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1)),
        trimap_radius=args.trimap_radius, init=S.weights_digest(head.state_dict()) if args.init else None,
        mixed_precision=args.mixed_precision,
        extra={"init": Path(args.init).name if args.init else None, "sd": Path(args.sd).name})
    try:  # all but the SD weights, before they load; Trainer.run checks them too
        S.check_start(args.out, args.resume, run_recipe(settings, head.config, data, val), data_files(data, val),
                      args.resume_with_changes)
        sd_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
        sd = load_sd_components(args.sd, sd_dtype)
    except (CheckpointError, S.ResumeError) as exc:
        return _error(str(exc))
    empty = sd.empty_prompt_embedding if prompt is None else prompt
    extractor = SDFeatureExtractor(sd.unet, sd.vae, empty, head.config).to(device)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if rank == 0 else (lambda line: None)
    trainer = Trainer(settings, data, extractor, head, device, val, empty_prompt=prompt, log=log,
                      progress=not args.no_progress)
    try:
        final = trainer.run()
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (S.ResumeError, DatasetError) as exc:  # other SD weights on resume, a checkpoint or a data file unusable mid-run
        return _error(str(exc))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"wrote {final}")
    return 0
