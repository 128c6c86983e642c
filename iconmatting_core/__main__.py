"""Command line: ``python -m iconmatting_core {encode,matte,convert} ...``.

encode: reference image(s) + mask(s) -> a context file (``.safetensors``, see ``context_file``).

matte: a reference (``--reference/--mask``, or ``--context`` from ``encode``) and targets (folders,
globs, files, manifest files with one path per line; images and videos) -> ``<name>_alpha.png``
and ``<name>_rgba.png`` per image, and alpha/RGBA videos (or a PNG sequence) per video, in
``--out``. Targets whose outputs exist are skipped (re-run to resume); a target that fails is
reported, listed in ``failures.jsonl`` and skipped; the exit status is 1 if any failed.
``--engine ray`` runs the same job on a Ray cluster (``ray_engine``).

convert: the released ``icm.ckpt`` -> ``.safetensors``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .batch import (  # noqa: F401  (read_image, read_mask, list_targets: public helpers of the CLI)
    Failures,
    Progress,
    error_text,
    is_done,
    list_targets,
    output_names,
    output_paths,
    png_bytes,
    read_image,
    read_mask,
    split_targets,
    write_file,
)
from .hub import SD_REPO_ID, SD_SINGLE_FILE, SDNotFoundError, find_or_download_sd, hub_cache_dir
from .video import DEFAULT_VIDEO_OUTPUTS, VIDEO_OUTPUTS, matte_video, to_uint8
from .video import probe as probe_video

MODELS_ENV = "ICONMATTING_MODELS"
MATTING_NAMES = ("icm.safetensors", "icm.ckpt")
SD_NAMES = (SD_SINGLE_FILE, "v2-1_768-ema-pruned.ckpt", "stable-diffusion-2-1")


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


def _model_files(args):
    models_dir = Path(args.models_dir) if args.models_dir else default_models_dir()
    matting, sd, problems = find_model_files(models_dir, args.matting_weights, args.sd)
    if problems:
        print("error: model files missing:\n  " + "\n  ".join(problems), file=sys.stderr)
        return None
    return matting, sd


def _load_pipe(args, pipe_factory):
    """The pipeline and the weight files' names (for context metadata), or None after an error."""
    if pipe_factory is not None:
        return pipe_factory(), {}
    files = _model_files(args)
    if files is None:
        return None
    from .pipeline import load_pipeline

    pipe = load_pipeline(files[0], files[1], device=args.device, dtype=args.dtype)
    sd_name = SD_REPO_ID if hub_cache_dir() in Path(files[1]).parents else Path(files[1]).name
    return pipe, {"matting_weights": Path(files[0]).name, "sd": sd_name}


def _encode(pipe, args, resize_mode: str):
    if len(args.mask) not in (1, len(args.reference)):
        raise ValueError(f"got {len(args.reference)} reference images but {len(args.mask)} masks; give one mask per image")
    images = [read_image(Path(p)) for p in args.reference]
    masks = [read_mask(Path(p)) for p in args.mask]
    return pipe.encode_reference(images, masks, pooling=args.pooling, resize_mode=resize_mode, seed=args.seed)


def run_encode(args, pipe_factory=None) -> int:
    from .context_file import save_context

    loaded = _load_pipe(args, pipe_factory)
    if loaded is None:
        return 2
    pipe, files = loaded
    resize_mode = args.resize_mode or "pad"
    try:
        context = _encode(pipe, args, resize_mode)
    except (OSError, ValueError) as exc:
        print(f"error: reference: {exc}", file=sys.stderr)
        return 2
    path = save_context(args.out, context, pipe.fingerprint, {"resize_mode": resize_mode, **files})
    print(f"wrote {path} ({context.tokens.shape[0]} tokens from {context.num_references} reference(s))")
    return 0


def _context_for_matte(args, pipe):
    """(context, resize mode) from --context (checked against ``pipe``'s weights when given) or
    from --reference/--mask."""
    from .context_file import load_context, read_context_metadata

    if args.context:
        context = load_context(args.context, expected_fingerprint=pipe.fingerprint if pipe is not None else None)
        stored = (read_context_metadata(args.context).get("extra") or {}).get("resize_mode")
        return context, args.resize_mode or stored or "pad"
    resize_mode = args.resize_mode or "pad"
    return _encode(pipe, args, resize_mode), resize_mode


def run_matte(args, pipe_factory=None) -> int:
    if bool(args.context) == bool(args.reference or args.mask):
        print("error: give either --context FILE or --reference IMAGE --mask MASK", file=sys.stderr)
        return 2
    if not args.context and not (args.reference and args.mask):
        print("error: --reference needs --mask (and --mask needs --reference)", file=sys.stderr)
        return 2
    video_outputs = _video_outputs(args.video_out)
    targets = list_targets(args.targets)
    if not targets:
        print(f"error: no target images or videos found in {' '.join(args.targets)}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(targets)  # of all targets, so a re-run names them the same
    todo = [t for t in targets if not is_done(out_dir, t, video_outputs, names[t])]
    if len(todo) < len(targets):
        print(f"skipping {len(targets) - len(todo)} target(s) with existing outputs in {out_dir}", file=sys.stderr)
    if not todo:
        Failures(out_dir).finish()  # nothing is failing any more: drop a previous run's list
        return 0

    from .checkpoint import CheckpointError
    from .context_file import ContextFileError

    ray_with_file = args.engine == "ray" and args.context and pipe_factory is None
    pipe, files = None, {}
    if not ray_with_file:  # the Ray driver needs no model when the context comes from a file
        loaded = _load_pipe(args, pipe_factory)
        if loaded is None:
            return 2
        pipe, files = loaded
    try:
        context, resize_mode = _context_for_matte(args, pipe)
    except ContextFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: reference: {exc}", file=sys.stderr)
        return 2

    failures = Failures(out_dir)
    if args.engine == "ray":
        from .ray_engine import RayJob, WorkerSetupError, run_ray_job

        job = RayJob.from_args(args, context, resize_mode, video_outputs, pipe_factory)
        try:
            matted = run_ray_job(job, todo, out_dir, failures, names)
        except (ContextFileError, CheckpointError, WorkerSetupError) as exc:  # a worker's model files missing, or not the context's
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        matted = _matte_locally(pipe, context, todo, out_dir, resize_mode, video_outputs, args, failures, names)
    failures.finish()
    print(f"done: {matted} matted, {len(failures)} failed, outputs in {out_dir}", file=sys.stderr)
    for target, error in failures.items:
        print(f"  failed: {target}: {error}", file=sys.stderr)
    if failures:
        print(f"  (listed in {failures.path})", file=sys.stderr)
    return 1 if failures else 0


def _matte_locally(pipe, context, todo, out_dir, resize_mode, video_outputs, args, failures, names) -> int:
    images, videos = split_targets(todo)
    matted = 0
    if images:
        bar = Progress(len(images), "matte", "img")
        for target in images:
            try:
                image = read_image(target)
                alpha = pipe.matte(context, image, resize_mode=resize_mode)[0]
                rgba = pipe.cutout(image, alpha, estimate_colors=not args.no_foreground)
                alpha_path, rgba_path = output_paths(out_dir, target, names[target])
                write_file(alpha_path, png_bytes(to_uint8(alpha), "L"))
                write_file(rgba_path, png_bytes(to_uint8(rgba), "RGBA"))
                matted += 1
                bar.update(1, f"{target.name}: ok")
            except Exception as exc:  # one bad image must not lose the others
                failures.add(target, error_text(exc))
                bar.log(f"{target.name}: FAILED: {error_text(exc)}")
                bar.update(1, f"{target.name}: FAILED")
        bar.close()
    for video in videos:
        bar = None
        try:
            info = probe_video(video)
            bar = Progress(info.frames or None, video.name, "frame")
            frames = matte_video(pipe, context, video, out_dir, video_outputs, resize_mode, args.chunk_size,
                                 not args.no_foreground, on_frames=bar.update, name=names[video])
            matted += 1
            bar.log(f"{video.name}: ok, {frames} frames at {float(info.fps):.3g} fps")
        except Exception as exc:
            failures.add(video, error_text(exc))
            print(f"{video.name}: FAILED: {error_text(exc)}", file=sys.stderr)
        finally:
            if bar is not None:
                bar.close()
    return matted


def _video_outputs(spec: str) -> List[str]:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in VIDEO_OUTPUTS]
    if bad or not kinds:
        raise SystemExit(f"error: --video-out takes a comma list of {', '.join(VIDEO_OUTPUTS)}; got {spec!r}")
    return kinds


def run_convert(args) -> int:
    from .checkpoint import CheckpointError, convert_checkpoint

    try:
        dst = convert_checkpoint(args.src, args.dst)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matting-weights", help="IconMatting weights (icm.ckpt or its .safetensors conversion)")
    p.add_argument("--sd", help=f"Stable Diffusion 2.1 checkpoint file or diffusers folder (default: the Hugging Face "
                                f"cache of {SD_REPO_ID}, downloaded when missing)")
    p.add_argument("--models-dir", help=f"where to look for model files (default ${MODELS_ENV} or ~/.cache/iconmatting/models)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])


def _add_reference_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--reference", nargs="+", required=required, help="reference image(s)")
    p.add_argument("--mask", nargs="+", required=required,
                   help="foreground mask of each reference (white = foreground; or an image's alpha); one mask for all is fine")
    p.add_argument("--pooling", default="mask", choices=["mask", "scribble"], help="'scribble' for strokes/points")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iconmatting_core", description="In-context matting (IconMatting).")
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("encode", help="encode a marked reference once into a context file")
    _add_reference_args(e, required=True)
    e.add_argument("--out", required=True, help="context file to write (.safetensors)")
    e.add_argument("--resize-mode", choices=["pad", "stretch"], help="default pad; stored in the file for matte")
    _add_model_args(e)

    m = sub.add_parser("matte", help="matte a batch of targets (images and videos) with one marked reference")
    _add_reference_args(m, required=False)
    m.add_argument("--context", help="context file from `encode` (instead of --reference/--mask)")
    m.add_argument("--targets", required=True, nargs="+",
                   help="folder(s), glob(s), image/video files, or manifest files (.txt/.lst) with one path per line")
    m.add_argument("--out", required=True, help="output folder")
    _add_model_args(m)
    m.add_argument("--resize-mode", choices=["pad", "stretch"], help="default: the context file's, else pad")
    m.add_argument("--no-foreground", action="store_true", help="do not estimate foreground colours for the RGBA cut-outs")
    m.add_argument("--video-out", default=",".join(DEFAULT_VIDEO_OUTPUTS),
                   help="outputs per video, comma-separated: alpha (<name>_alpha.mp4), rgba (<name>_rgba.webm, VP9 with "
                        "alpha), png (<name>_frames/ RGBA PNG sequence); default alpha,rgba")
    m.add_argument("--chunk-size", type=int, default=4, help="video frames (and Ray batches) matted together")
    m.add_argument("--engine", default="local", choices=["local", "ray"], help="ray: run on a Ray cluster (pip install 'ray[data]')")
    m.add_argument("--address", help="Ray cluster address (e.g. auto, or ray://head:10001); default: a local Ray")
    m.add_argument("--workers", type=int, help="Ray: model replicas (default: one per GPU, else 1)")
    m.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray, CPU workers: CPUs (and torch threads) per replica")

    c = sub.add_parser("convert", help="convert the released icm.ckpt to .safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    __import__("iconmatting_core.training.cli", fromlist=["add_parser"]).add_parser(sub)  # train (training/cli.py)
    return parser


def main(argv: Optional[Sequence[str]] = None, pipe_factory=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        return run_convert(args)
    if args.command == "train":  # training/cli.py
        return __import__("iconmatting_core.training.cli", fromlist=["run"]).run(args)
    if args.command == "encode":
        return run_encode(args, pipe_factory)
    return run_matte(args, pipe_factory)


if __name__ == "__main__":
    sys.exit(main())
