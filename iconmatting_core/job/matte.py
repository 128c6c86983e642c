"""``matte``: a reference (``--reference/--mask``, or ``--context`` from ``encode``) and targets
(folders, globs, files, manifests; images and videos; see ``targets``) -> ``<name>_alpha.png`` and
``<name>_rgba.png`` per image, and alpha/RGBA videos (or a PNG sequence) per clip, in ``--out``.

Every output carries the record of its source and recipe (``record``). Re-running resumes: a
target whose outputs exist and were made from the same source with the same recipe is skipped;
when outputs in ``--out`` were made differently (another source under the same name, another
mask, weights, resize mode...) the job stops before any matting with one line saying how many and
what differs, and ``--overwrite`` redoes exactly those. The context is loaded and checked in full
first, whatever is left to do; a ``--context`` job whose outputs are all done loads no model. One
job at a time per ``--out`` (a lock). A target that fails is reported, listed in
``failures.jsonl`` and skipped; an error every target would meet (disk full, out of GPU memory)
stops the job with one line. Exit status: 0 all done, 1 some targets failed or the job stopped, 2
a usage, model-file or context-file problem, outputs made differently or a busy ``--out`` (found
before any target is matted). ``--engine ray`` mattes images and clips on a Ray cluster
(``ray_engine``), each clip on one worker.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from ..files import remove_partials
from .cli_args import add_model_args, add_reference_args, check_reference_files, encode_reference, load_pipe, positive_float
from .cli_args import positive_int, set_threads
from .cli_args import given_pipe_factory, local_cpus_problem
from .clips import DEFAULT_VIDEO_OUTPUTS, VIDEO_OUTPUTS
from .local import run_local
from .outputs import Failures, JobStopped, check_writable
from .record import JobRecord, OutputLock, context_reference, job_recipe, reference_recipe
from .targets import TargetError, list_targets


class UsageError(ValueError):
    """A bad combination of options (exit 2)."""


def add_parser(subparsers) -> None:
    m = subparsers.add_parser("matte", help="matte a batch of targets (images and videos) with one marked reference")
    add_reference_args(m, required=False)
    m.add_argument("--context", help="context file from `encode` (instead of --reference/--mask)")
    m.add_argument("--trust-unverified-context", action="store_true",
                   help="use a --context file of format 1 (no checksums: damage cannot be detected)")
    m.add_argument("--targets", required=True, nargs="+",
                   help="folder(s) (searched recursively), glob(s) (** for any depth), image/video files, or manifest "
                        "files (.txt/.lst) with one path per line; outputs mirror the folders' trees under --out")
    m.add_argument("--no-recursive", action="store_true", help="do not search folders' subfolders")
    m.add_argument("--out", required=True, help="output folder (never searched for targets)")
    add_model_args(m)
    m.add_argument("--resize-mode", choices=["pad", "stretch"], help="default: the context file's, else pad")
    m.add_argument("--no-foreground", action="store_true", help="do not estimate foreground colours for the RGBA cut-outs")
    m.add_argument("--overwrite", action="store_true",
                   help="redo the targets whose outputs in --out were made differently (another source, reference, "
                        "weights or setting); without it such a job stops before matting")
    m.add_argument("--video-out", default=",".join(DEFAULT_VIDEO_OUTPUTS),
                   help="outputs per video, comma-separated: alpha (<name>_alpha.mp4), rgba (<name>_rgba.webm, VP9 with "
                        "alpha), png (<name>_frames/ RGBA PNG sequence); default alpha,rgba")
    m.add_argument("--chunk-size", type=positive_int, default=4, help="video frames (and Ray batches) matted together")
    m.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="ray: matte the images and clips on a Ray cluster (pip install -r requirements-ray.txt)")
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
    cpus = local_cpus_problem(args.cpus_per_worker, args.address) if args.engine == "ray" else None
    if cpus:
        raise UsageError(cpus)


class Reference:
    """The job's reference: the context (from --context, checked in full, or encoded from
    --reference/--mask), the targets' resize mode, the recipe its outputs record, and the
    pipeline when one was loaded for it."""

    def __init__(self, args, pipe=None):
        from ..context_file import read_context_file

        self.pipe, self.header = pipe, None
        foreground = not args.no_foreground
        if args.context:  # the file says everything the recipe needs: no model yet
            self.context, self.header = read_context_file(args.context, args.trust_unverified_context)
            self.resize_mode = args.resize_mode or self.header["extra"].get("resize_mode") or self.context.resize_mode
            self.recipe = job_recipe(context_reference(self.context, self.header), self.header["fingerprint"],
                                     self.resize_mode, args.dtype, self.context.config.image_size, foreground)
            return
        try:
            check_reference_files(args)
        except ValueError as exc:
            raise UsageError(f"reference: {exc}") from None
        self.pipe, _ = load_pipe(args)
        self.resize_mode = args.resize_mode or "pad"
        try:
            self.context = encode_reference(self.pipe, args, self.resize_mode)
            reference = reference_recipe(args.reference, args.mask, args.pooling, args.seed, self.resize_mode)
        except (OSError, ValueError) as exc:
            raise UsageError(f"reference: {' '.join(str(exc).split())}") from None
        self.recipe = job_recipe(reference, self.pipe.fingerprint, self.resize_mode, args.dtype, self.pipe.config.image_size,
                                 foreground)

    def load_pipe(self, args):
        """The pipeline, loaded now if it was not, with the context file checked against it."""
        from ..context_file import check_fits

        if self.pipe is None:
            self.pipe, _ = load_pipe(args)
            check_fits(args.context, self.header, self.context, self.pipe.fingerprint, self.pipe.config)
        return self.pipe


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
    with OutputLock(out_dir):  # held until the job ends, however it ends
        return _run(args, kinds, out_dir, found)


def _run(args, kinds, out_dir: Path, found) -> int:
    remove_partials(out_dir)  # a killed run's half files (no other job writes here: the lock)
    for note in found.notes():
        print(f"note: {note}", file=sys.stderr)
    targets = found.targets
    set_threads(args.threads)
    reference = Reference(args)
    record = JobRecord(out_dir, reference.recipe)
    plan = record.plan(targets, kinds)
    if plan.different and not args.overwrite:
        raise UsageError(plan.refusal(out_dir))
    if plan.done:
        print(f"skipping {len(plan.done)} target(s) with existing outputs made the same way in {out_dir}", file=sys.stderr)
    if plan.different:
        print(f"overwriting the outputs of {len(plan.different)} target(s) made differently", file=sys.stderr)
    redo = set(plan.todo) | set(plan.different)
    todo = [t for t in targets if t in redo]
    failures = Failures(out_dir)
    for path, why in found.problems:  # entries skipped while listing (pipes, broken links, ...) are failures too
        failures.add(path, why)
    if not todo:
        failures.finish()  # nothing else to do: the list holds only those (or is removed)
        return 1 if failures else 0

    # the Ray driver needs no model for a context file: the workers check it against theirs
    pipe = None if args.engine == "ray" else reference.load_pipe(args)
    context, resize_mode = reference.context, reference.resize_mode

    try:
        if args.engine == "ray":
            from .ray_engine import PipelineSpec, RayJob, run_ray_job

            factory = given_pipe_factory() or PipelineSpec(args.matting_weights, args.sd, args.models_dir, args.device,
                                                           args.dtype).build
            job = RayJob(pipe_factory=factory, context=context, context_header=reference.header, context_file=args.context,
                         resize_mode=resize_mode, video_outputs=kinds, estimate_colors=not args.no_foreground,
                         chunk_size=args.chunk_size, address=args.address, workers=args.workers,
                         cpus_per_worker=args.cpus_per_worker)
            matted = run_ray_job(job, todo, record, failures)
        else:
            matted = run_local(pipe, context, todo, record, resize_mode, not args.no_foreground, failures, kinds,
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
