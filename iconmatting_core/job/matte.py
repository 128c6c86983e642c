"""``matte``: a reference (``--reference/--mask``, or ``--context`` from ``encode``) and targets
(folders, globs, files, manifests; images and videos; see ``targets``) -> ``<name>_alpha.png`` and
``<name>_rgba.png`` per image, and alpha/RGBA videos (or a PNG sequence) per clip, in ``--out``.

Targets whose outputs exist are skipped (re-run to resume); a target that fails is reported,
listed in ``failures.jsonl`` and skipped; an error every target would meet (disk full, out of GPU
memory) stops the job with one line. Exit status: 0 all done, 1 some targets failed or the job
stopped, 2 a usage, model-file or context-file problem (found before any target is matted).
``--engine ray`` mattes the images on a Ray cluster (``ray_engine``); clips always run on the
local engine, in this process.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from .cli_args import add_model_args, add_reference_args, encode_reference, load_pipe, positive_float, positive_int, set_threads
from .clips import DEFAULT_VIDEO_OUTPUTS, VIDEO_OUTPUTS
from .local import matte_clips, run_local
from .outputs import Failures, JobStopped, check_writable, is_done, remove_partials
from .targets import TargetError, list_targets, split_targets


class UsageError(ValueError):
    """A bad combination of options (exit 2)."""


def add_parser(subparsers) -> None:
    m = subparsers.add_parser("matte", help="matte a batch of targets (images and videos) with one marked reference")
    add_reference_args(m, required=False)
    m.add_argument("--context", help="context file from `encode` (instead of --reference/--mask)")
    m.add_argument("--targets", required=True, nargs="+",
                   help="folder(s) (searched recursively), glob(s) (** for any depth), image/video files, or manifest "
                        "files (.txt/.lst) with one path per line; outputs mirror the folders' trees under --out")
    m.add_argument("--no-recursive", action="store_true", help="do not search folders' subfolders")
    m.add_argument("--out", required=True, help="output folder (never searched for targets)")
    add_model_args(m)
    m.add_argument("--resize-mode", choices=["pad", "stretch"], help="default: the context file's, else pad")
    m.add_argument("--no-foreground", action="store_true", help="do not estimate foreground colours for the RGBA cut-outs")
    m.add_argument("--video-out", default=",".join(DEFAULT_VIDEO_OUTPUTS),
                   help="outputs per video, comma-separated: alpha (<name>_alpha.mp4), rgba (<name>_rgba.webm, VP9 with "
                        "alpha), png (<name>_frames/ RGBA PNG sequence); default alpha,rgba")
    m.add_argument("--chunk-size", type=positive_int, default=4, help="video frames (and Ray batches) matted together")
    m.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="ray: matte the images on a Ray cluster (pip install 'ray[data]'); clips run locally")
    m.add_argument("--address", help="Ray cluster address (e.g. auto, or ray://head:10001); default: a local Ray")
    m.add_argument("--workers", type=positive_int, help="Ray: model replicas (default: one per GPU, else 1)")
    m.add_argument("--cpus-per-worker", type=positive_float, default=1.0,
                   help="Ray, CPU workers: CPUs (and torch threads) per replica")


def video_outputs(spec: str) -> List[str]:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in VIDEO_OUTPUTS]
    if bad or not kinds:
        raise UsageError(f"--video-out takes a comma list of {', '.join(VIDEO_OUTPUTS)}; got {spec!r}")
    return kinds


def _check_usage(args) -> None:
    if args.context and (args.reference or args.mask):
        raise UsageError("give either --context FILE or --reference IMAGE --mask MASK, not both")
    if not args.context and not (args.reference and args.mask):
        raise UsageError("give --context FILE, or --reference IMAGE with --mask MASK")
    if args.engine == "local" and (args.address or args.workers):
        raise UsageError("--address and --workers are for --engine ray")


def _context(args, pipe):
    """(context, resize mode) from --context (checked against ``pipe``'s weights when given) or
    from --reference/--mask."""
    from ..context_file import load_context, read_context_metadata

    if args.context:
        context = load_context(args.context, expected_fingerprint=pipe.fingerprint if pipe is not None else None)
        stored = read_context_metadata(args.context)["extra"].get("resize_mode")
        return context, args.resize_mode or stored or context.resize_mode
    resize_mode = args.resize_mode or "pad"
    try:
        return encode_reference(pipe, args, resize_mode), resize_mode
    except (OSError, ValueError) as exc:
        raise UsageError(f"reference: {' '.join(str(exc).split())}") from None


def run(args) -> int:
    _check_usage(args)
    kinds = video_outputs(args.video_out)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a folder")
    try:
        found = list_targets(args.targets, out_dir, recursive=not args.no_recursive)
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    check_writable(out_dir)
    remove_partials(out_dir)  # a killed run's half files
    for note in found.notes():
        print(f"note: {note}", file=sys.stderr)
    targets = found.targets
    todo = [t for t in targets if not is_done(out_dir, t, kinds)]
    if len(todo) < len(targets):
        print(f"skipping {len(targets) - len(todo)} target(s) with existing outputs in {out_dir}", file=sys.stderr)
    if not todo:
        Failures(out_dir).finish()  # nothing is failing any more: drop a previous run's list
        return 0

    threads = set_threads(args.threads)
    images, videos = split_targets(todo)
    ray_images_only = args.engine == "ray" and not videos and args.context and getattr(args, "pipe_factory", None) is None
    pipe, context = None, None
    if ray_images_only:  # the Ray driver needs no model: the workers check the context file
        context, resize_mode = _context(args, None)
    else:
        pipe, _ = load_pipe(args)
        context, resize_mode = _context(args, pipe)

    failures = Failures(out_dir)
    matted = 0
    try:
        if args.engine == "ray":
            from .ray_engine import RayJob, run_ray_job

            if images:
                job = RayJob.from_args(args, context, resize_mode, kinds, getattr(args, "pipe_factory", None))
                matted += run_ray_job(job, images, out_dir, failures)
            if videos:
                print(f"note: {len(videos)} clip(s) are matted by the local engine on this machine ({threads} threads); "
                      "the Ray engine takes images", file=sys.stderr)
                matted += matte_clips(pipe, context, videos, out_dir, resize_mode, not args.no_foreground, failures,
                                      kinds, args.chunk_size)
        else:
            matted = run_local(pipe, context, todo, out_dir, resize_mode, not args.no_foreground, failures, kinds,
                               args.chunk_size)
    except JobStopped as exc:
        removed = remove_partials(out_dir)
        print(f"error: stopped: {exc}", file=sys.stderr)
        failures.finish()
        print(f"stopped: {len(failures)} failed before it, {removed} partial file(s) removed; outputs in {out_dir}",
              file=sys.stderr)
        return 1
    written = failures.finish()
    print(f"done: {matted} matted, {len(failures)} failed, outputs in {out_dir}", file=sys.stderr)
    if written:
        for target, error in failures.items:
            print(f"  failed: {target}: {error}", file=sys.stderr)
        if failures:
            print(f"  (listed in {failures.path})", file=sys.stderr)
    return 1 if failures else 0
