"""``matte --engine ray``: the command line's image targets as a Ray Data pipeline, on one
machine or a cluster.

Image targets become a dataset of paths; a light read stage turns each into a pixel row,
``map_batches`` runs the rows through a pool of actors that each hold one model (one GPU per actor
when the cluster has GPUs, ``--cpus-per-worker`` CPUs otherwise), and the driver writes the PNGs as
results arrive, with their records, through the same call as the local engine
(``record.JobRecord.write_images``); the driver holds the output folder's lock for the whole job.
The reference context is put in the object store once and shared by every actor.
Clips are not sent to Ray: the command line mattes them with the local engine, streamed, so memory
stays flat in clip length (``job.matte``).

Resuming and failures work as with the local engine: targets whose outputs were made the same way
are left out of the dataset; a failing target comes back as an error row, is reported and listed in
``failures.jsonl``, and never stops the others. A worker that cannot set up (model files missing,
a context file that does not fit its model: ``context_file.check_fits``) stops the job with its own
error (``WorkerSetupError``); a job that breaks mid-run lists every target it did not finish in
``failures.jsonl``.

A local Ray started by the job runs without the dashboard and its agents (``ray.init`` with
``include_dashboard=False``), logs only errors, and is shut down at the end.

Workers read the targets and the model files by path, so on a cluster those paths must be the same
on every node (a shared filesystem); the outputs are written by the driver. A worker without
``--sd`` finds or downloads SD 2.1 into its own node's Hugging Face cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..image_io import read_image_uint8
from ..video import to_uint8
from .outputs import OUT_OF_MEMORY, Failures, JobStopped, Progress, error_text, is_out_of_memory, stop_reason
from .record import JobRecord
from .targets import Target


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise SystemExit("error: --engine ray needs Ray Data: pip install -r requirements-ray.txt (or 'ray[data]')") from exc
    return ray


@dataclass(frozen=True)
class PipelineSpec:
    """How a worker loads its model: the command line's model options (picklable)."""

    matting_weights: Optional[str]
    sd: Optional[str]
    models_dir: Optional[str]
    device: str = "auto"
    dtype: str = "auto"

    def build(self):
        from ..checkpoint import CheckpointError
        from . import model_files

        try:
            matting, sd = model_files.locate(self.matting_weights, self.sd, self.models_dir)
            return model_files.load(matting, sd, device=self.device, dtype=self.dtype)
        except model_files.ModelFileError as exc:
            raise CheckpointError(f"on this Ray node: {exc}") from None


@dataclass
class RayJob:
    """Everything the workers and the driver need besides the targets."""

    pipe_factory: Callable
    context: object  # ReferenceContext
    context_header: Optional[dict]  # of a context file; each worker checks its model against it
    resize_mode: str
    video_outputs: Sequence[str]
    estimate_colors: bool = True
    chunk_size: int = 4
    address: Optional[str] = None
    workers: Optional[int] = None
    cpus_per_worker: float = 1.0
    context_file: Optional[str] = None  # named in the workers' errors

    @classmethod
    def from_args(cls, args, context, context_header, resize_mode, video_outputs, pipe_factory=None) -> "RayJob":
        if pipe_factory is None:
            pipe_factory = PipelineSpec(args.matting_weights, args.sd, args.models_dir, args.device, args.dtype).build
        return cls(pipe_factory, context, context_header, resize_mode, list(video_outputs), not args.no_foreground,
                   args.chunk_size, args.address, args.workers, args.cpus_per_worker, args.context)


class MatteWorker:
    """A Ray Data actor: one model and the shared context; mattes batches of pixel rows
    {"target", "index", "frame" [H, W, 3] uint8, "error"} -> {"target", "index", "error",
    "alpha" [H, W] uint8, "rgba" [H, W, 4] uint8}. A row whose "error" is not empty failed (or
    arrived failed from the read stage); the others are unaffected.
    """

    def __init__(self, pipe_factory, context_ref, context_header, resize_mode, estimate_colors, threads,
                 context_file=None):
        import ray
        import torch

        from ..context_file import check_fits

        if threads:
            torch.set_num_threads(threads)
        self.pipe = pipe_factory()
        self.context = ray.get(context_ref[0])
        if context_header is not None:
            check_fits(context_file, context_header, self.context, self.pipe.fingerprint, self.pipe.config,
                       "a Ray worker loaded")
        self.resize_mode, self.estimate_colors = resize_mode, estimate_colors

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        frames, errors = list(batch["frame"]), list(batch["error"])
        alphas = [np.zeros(f.shape[:2], np.uint8) for f in frames]
        rgbas = [np.zeros((*f.shape[:2], 4), np.uint8) for f in frames]
        for i, frame in enumerate(frames):
            if errors[i]:
                continue
            try:  # one bad target must not lose the others
                alpha = self.pipe.matte(self.context, frame, resize_mode=self.resize_mode)[0]
                rgba = self.pipe.cutout(frame, alpha, estimate_colors=self.estimate_colors)
                alphas[i], rgbas[i] = to_uint8(alpha), to_uint8(rgba)
            except Exception as exc:
                errors[i] = error_text(exc)
        return {"target": batch["target"], "index": batch["index"], "error": np.array(errors, dtype=object),
                "alpha": _stack(alphas), "rgba": _stack(rgbas)}


def _stack(arrays: List[np.ndarray]) -> np.ndarray:
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)  # images of different sizes
    out[:] = arrays
    return out


def _rows(target: str, start: int, frames: List[np.ndarray], error: str = ""):
    n = len(frames)
    return {"target": np.array([target] * n, dtype=object), "index": np.arange(start, start + n),
            "frame": _stack(frames), "error": np.array([error] * n, dtype=object)}


def read_targets(batch: Dict[str, np.ndarray]):
    """Ray Data generator: rows {"target"} -> pixel rows (uint8, upright by EXIF orientation; the
    pipeline scales it as ``read_image`` does); a target that cannot be read gives a row with its error."""
    for target in batch["target"]:
        try:
            yield _rows(target, -1, [read_image_uint8(Path(target))])
        except Exception as exc:
            yield _rows(target, -1, [np.zeros((2, 2, 3), np.uint8)], error_text(exc))


def _pool_args(ray, job: RayJob, items: int):
    from ray.data import ActorPoolStrategy

    gpus = ray.cluster_resources().get("GPU", 0)
    workers = max(1, min(job.workers or (int(gpus) if gpus >= 1 else 1), items))
    resources = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": job.cpus_per_worker}
    threads = None if gpus >= 1 else max(1, int(job.cpus_per_worker))
    return workers, dict(compute=ActorPoolStrategy(size=workers), batch_format="numpy", **resources), threads


class WorkerSetupError(RuntimeError):
    """A Ray worker could not set up: its model files are missing or do not match the context file."""


_SETUP_ERROR = re.compile(r"^(?:[\w.]+\.)?(ContextFileError|CheckpointError|FileNotFoundError): (.+)", re.MULTILINE | re.DOTALL)


def _setup_error(exc: BaseException) -> Optional[str]:
    """The message of a worker's setup error inside a Ray error (an actor that died in its
    constructor carries only its traceback's text), or None."""
    from ..checkpoint import CheckpointError
    from ..context_file import ContextFileError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ContextFileError, CheckpointError)):
            return str(exc)
        match = _SETUP_ERROR.search(str(exc))
        if match and "creation task" in str(exc):  # ActorDiedError of a constructor
            return match.group(2).strip()
        exc = exc.__cause__ or exc.__context__
    return None


def _summary(exc: BaseException) -> str:
    """A Ray error's last meaningful line (its message is a remote traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and set(line.strip()) != {"^"}]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def run_ray_job(job: RayJob, todo: Sequence[Target], record: JobRecord, failures: Failures) -> int:
    """Matte the image targets ``todo`` on Ray; writes outputs with their records (``record``),
    records failures; returns targets matted. Raises WorkerSetupError when the workers cannot load their model
    (files missing, weights not the context file's), JobStopped on an error every target would meet."""
    ray = _ray()
    started_here = not ray.is_initialized()
    reaper = None
    if started_here:
        # errors of Ray's own helper actors (e.g. its stats actor restarted under memory pressure) are not the
        # job's: the job's errors arrive through its results
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        ray.init(address=job.address, log_to_driver=False, include_dashboard=False, logging_level=logging.CRITICAL)
        if job.address is None:
            reaper = _start_reaper()
    try:
        from ray.data import DataContext

        for name in ("ray", "ray.data"):  # Ray Data's INFO/WARNING notes are not the user's business
            logging.getLogger(name).setLevel(logging.CRITICAL)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.execution_options.preserve_order = True
        with _without_native_log_lines():
            return _run(ray, job, list(todo), record, failures)
    finally:
        if started_here:
            ray.shutdown()
        if reaper is not None:
            reaper.stdin.close()  # the reaper kills whatever the shutdown left, then exits
            reaper.wait(timeout=30)


# the C++ core's "[2026-01-01 10:00:00,000 E 123 123] ..." lines and Ray's "(raylet) ..." notes
_NATIVE_LOG_LINE = re.compile(rb"^(?:\[\d{4}-\d\d-\d\d [\d:,]+ [DIWE] \d+ \d+\] |(?:\x1b\[\d+m)?\(raylet\))")


@contextlib.contextmanager
def _without_native_log_lines():
    """Drop the lines Ray's C++ core writes straight to this process's stderr (e.g. a note on
    actor constructor arguments) and Ray's ``(raylet)`` notes while the job runs; everything else
    passes through."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    out = os.dup(saved)  # the pump's own copy of the real stderr, taken before the body can end

    def pump():
        with os.fdopen(read_end, "rb") as src, os.fdopen(out, "wb", buffering=0) as dst:
            for line in src:
                if not _NATIVE_LOG_LINE.match(line):
                    dst.write(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump drains and stops
        os.close(saved)
        thread.join(timeout=5)


_REAPER = """
import sys, psutil
procs = []
for line in sys.stdin:
    procs = [tuple(x.split("@")) for x in line.split()]
for pid, started in procs:
    try:
        p = psutil.Process(int(pid))
        if repr(p.create_time()) == started:
            p.kill()
    except psutil.Error:
        pass
"""


def _start_reaper():
    """A small process holding the pids of the local Ray this driver started; when the driver ends
    (even by SIGKILL, which closes the pipe) it kills any of them still running. Ray's own
    fate-sharing stops the GCS and raylet but leaves the dashboard and runtime-env agents behind."""
    import subprocess
    import sys

    try:
        import psutil
    except ImportError:  # no reaper: a SIGKILLed driver may leave Ray's agents running
        return None
    reaper = subprocess.Popen([sys.executable, "-c", _REAPER], stdin=subprocess.PIPE, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kids = [p for p in psutil.Process().children(recursive=True) if p.pid != reaper.pid]
    reaper.stdin.write(" ".join(f"{p.pid}@{p.create_time()!r}" for p in kids) + "\n")
    reaper.stdin.flush()
    return reaper


def _run(ray, job: RayJob, todo: List[Target], record: JobRecord, failures: Failures) -> int:
    from ray.data import TaskPoolStrategy

    by_path = {str(t.path): t for t in todo}
    workers, pool, threads = _pool_args(ray, job, len(todo))
    ds = ray.data.from_items([{"target": str(t.path)} for t in todo], override_num_blocks=min(len(todo), 200))
    # light: takes no CPU from the model actors, and few tasks at once (each is a worker process)
    ds = ds.map_batches(read_targets, batch_size=1, batch_format="numpy", num_cpus=0,
                        compute=TaskPoolStrategy(size=min(len(todo), workers + 1)))
    kwargs = dict(pipe_factory=job.pipe_factory, context_ref=[ray.put(job.context)],
                  context_header=job.context_header, resize_mode=job.resize_mode,
                  estimate_colors=job.estimate_colors, threads=threads, context_file=job.context_file)
    ds = ds.map_batches(MatteWorker, fn_constructor_kwargs=kwargs, batch_size=job.chunk_size, **pool)

    bar = Progress(len(todo), f"matte on Ray ({workers} workers)", "img")
    matted, finished = 0, set()
    stopped = None  # the error that ended the job early
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for target, error, alpha, rgba in zip(batch["target"], batch["error"], batch["alpha"], batch["rgba"]):
                t = by_path[str(target)]
                if error and is_out_of_memory(error):
                    raise JobStopped(OUT_OF_MEMORY)
                if error:
                    failures.add(t, error)
                    bar.log(f"{t.path.name}: FAILED: {error}")
                    finished.add(str(target))
                else:
                    try:
                        record.write_images(t, alpha, rgba)
                    except OSError as exc:
                        reason = stop_reason(exc)
                        if reason is not None:
                            raise JobStopped(reason) from None
                        failures.add(t, error_text(exc))
                        bar.log(f"{t.path.name}: FAILED: {error_text(exc)}")
                        finished.add(str(target))
                        continue
                    matted += 1
                    finished.add(str(target))
                bar.update(1, f"{t.path.name}: {'FAILED' if error else 'ok'}")
    except JobStopped:
        raise
    except Exception as exc:
        setup = _setup_error(exc)
        if setup is not None:
            raise WorkerSetupError(setup) from None
        stopped = exc
    finally:
        bar.close()
    if stopped is not None:
        for t in todo:
            if str(t.path) not in finished:
                error = f"not finished: the Ray job stopped: {_summary(stopped)}"
                failures.add(t, error)
                bar.log(f"{t.path.name}: FAILED: {error}")
    return matted
