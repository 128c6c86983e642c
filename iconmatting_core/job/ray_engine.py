"""``matte --engine ray``: the command line's targets, images and clips, on a pool of Ray actors, on
one machine or a cluster.

Each actor (:class:`Worker`) holds one model and the reference context (put in the object store
once, shared by every actor); one GPU per actor when the cluster has GPUs, ``--cpus-per-worker``
CPUs (and torch threads) otherwise. The driver hands out the work as tasks: a batch of
``--chunk-size`` images, or one whole clip, to whichever actor is free (clips first: they are the
long tasks), two tasks queued per actor so none waits for the driver.

**Setup is a handshake.** An actor's constructor never raises: it keeps what went wrong, and the
driver awaits every actor's :meth:`Worker.ready` before sending any work. A worker that cannot set
up (model files missing on its node, weights that do not match the context file:
``context_file.check_fits``) stops the job with that error, typed (``WorkerSetupError``, exit 2),
not read back out of a remote traceback.

**Where the outputs are written.** Images: the worker returns the two uint8 arrays and the driver
writes them with their records (``record.JobRecord.write_images``), as the local engine does; a
matte is small next to matting it. Clips: the worker writes the clip's outputs itself, straight into
``--out``, streamed frame chunk by frame chunk with the local engine's own code
(``clips.matte_video``: temporary names, renamed when the clip is complete), so a worker's memory
stays flat in clip length and no frame crosses the network; sending the frames back would move every
RGBA frame of every clip through the object store to one driver that must also encode them all,
and a catalogue of clips would scale no further than that one machine. A Ray cluster already needs
the targets and the model files on a filesystem every node sees at the same path, so ``--out``
lives there too. The record stays the driver's: it describes the clip (source hash and recipe)
before sending it, the worker embeds that record in every output it writes, and the driver indexes
the outputs (``JobRecord.complete``, the call every engine makes) only when the worker reports the
clip complete, so a job killed mid-clip leaves no output a re-run would take for done. The driver
holds the folder's lock for the whole job; the actors are the job's (killed when it ends, and by Ray
when its driver dies), so no writer outlives the lock; a re-run removes the temporary files a
killed worker left (``files.remove_partials``).

**Results are typed.** Every result row carries ``error_type`` (the exception's class name, or
``JobStopped`` for an error every target would meet: a full disk, out of GPU memory, recognised on
the worker by ``outputs.stop_reason``) beside the one-line ``error``; ``failures.jsonl`` lists both,
as for the local engine. A failing target never stops the others; a job that breaks mid-run (an
actor lost) lists every target it did not finish. Resuming works as with the local engine: targets
whose outputs were made the same way are never sent.

Ray Data is not used: a clip is one task for one worker, not rows of a dataset, and Ray Data's
actor pool offers no call to await a worker's setup.

A local Ray started by the job (no ``--address``) runs without the dashboard web server
(``include_dashboard=False``), logs only errors, and is shut down at the end. That option drops
only the web UI: Ray 2.60 still starts its dashboard head process (``dashboard.py``, with the
modules the job and state APIs need), the per-node dashboard agent and runtime-env agent (started
by the raylet whatever the options; no option leaves them out), the autoscaler monitor and the log
monitor, beside the GCS server, the raylet and the workers. The reaper (:func:`_start_reaper`)
removes whatever is left if the driver is killed. A worker without ``--sd``
finds or downloads SD 2.1 into its own node's Hugging Face cache.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..image_io import read_image
from ..video import to_uint8
from .clips import matte_video
from .outputs import Failures, JobStopped, Progress, error_text, stop_reason, target_outputs
from .record import RECORD_KEY, JobRecord
from .targets import Target, split_targets

STOPPED = "JobStopped"  # the error type of a row whose error every target would meet


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise SystemExit("error: --engine ray needs Ray: pip install -r requirements-ray.txt") from exc
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


@dataclass(frozen=True)
class RayJob:
    """Everything the workers and the driver need besides the targets (built by ``job.matte``
    from its parsed options; every field named, none read from an argparse namespace)."""

    pipe_factory: Callable[[], object]  # builds a worker's pipeline (``PipelineSpec.build``, or a test's)
    context: object  # ReferenceContext
    context_header: Optional[dict]  # of a context file; each worker checks its model against it
    context_file: Optional[str]  # named in the workers' errors
    resize_mode: str
    video_outputs: Sequence[str]
    estimate_colors: bool
    chunk_size: int
    address: Optional[str]
    workers: Optional[int]
    cpus_per_worker: float


class WorkerSetupError(RuntimeError):
    """A Ray worker could not set up: its model files are missing or do not match the context file."""


def _error_fields(exc: BaseException) -> dict:
    reason = stop_reason(exc)
    if reason is not None:
        return {"error_type": STOPPED, "error": reason}
    return {"error_type": type(exc).__name__, "error": error_text(exc)}


class Worker:
    """A Ray actor: one model and the shared context. Its constructor never raises (see the
    module docstring): :meth:`ready` says whether it is set up. Every result row is
    ``{"target", "pid", "actor_id", "error_type", "error"}`` plus the result: ``"alpha"``/``"rgba"``
    (uint8 arrays) for an image, ``"frames"`` for a clip; ``error_type`` is None when it worked."""

    def __init__(self, pipe_factory, context, context_header, context_file, resize_mode, estimate_colors,
                 chunk_size, threads):
        import ray

        self.context, self.resize_mode, self.estimate_colors, self.chunk_size = context, resize_mode, estimate_colors, chunk_size
        self.actor_id = ray.get_runtime_context().get_actor_id()
        self.pipe, self.setup = None, None
        try:
            import torch

            from ..context_file import check_fits

            if threads:
                torch.set_num_threads(threads)
            self.pipe = pipe_factory()
            if context_header is not None:
                check_fits(context_file, context_header, context, self.pipe.fingerprint, self.pipe.config,
                           "a Ray worker loaded")
        except Exception as exc:  # noqa: BLE001 - handed to the driver by ready()
            self.setup = {"error_type": type(exc).__name__, "error": " ".join(str(exc).split())}

    def _row(self, target: str) -> dict:
        return {"target": target, "pid": os.getpid(), "actor_id": self.actor_id, "error_type": None, "error": ""}

    def ready(self) -> dict:
        """The handshake: this worker's row, with its setup error (type and message) if it has one."""
        row = self._row("")
        if self.setup is not None:
            row.update(self.setup)
        return row

    def matte_images(self, paths: Sequence[str]) -> List[dict]:
        rows = []
        for path in paths:
            row = self._row(path)
            try:  # one bad target must not lose the others
                image = read_image(Path(path))
                alpha = self.pipe.matte(self.context, image, resize_mode=self.resize_mode)[0]
                rgba = self.pipe.cutout(image, alpha, estimate_colors=self.estimate_colors)
                row.update(alpha=to_uint8(alpha), rgba=to_uint8(rgba))
            except Exception as exc:  # noqa: BLE001 - the row says what
                row.update(_error_fields(exc))
            rows.append(row)
        return rows

    def matte_clip(self, path: str, out_dir: str, kinds: Sequence[str], name: str, tags: Dict[str, str]) -> dict:
        """Matte one clip streamed, writing its outputs (carrying ``tags``, the driver's record) into
        ``out_dir`` under temporary names, renamed when complete (``clips.matte_video``)."""
        row = self._row(path)
        try:
            row["frames"] = matte_video(self.pipe, self.context, Path(path), Path(out_dir), kinds, self.resize_mode,
                                        self.chunk_size, self.estimate_colors, name=name, tags=tags)
        except Exception as exc:  # noqa: BLE001 - the row says what
            row.update(_error_fields(exc))
        return row


def _summary(exc: BaseException) -> str:
    """A Ray error's last meaningful line (its message is a remote traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and set(line.strip()) != {"^"}]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def run_ray_job(job: RayJob, todo: Sequence[Target], record: JobRecord, failures: Failures) -> int:
    """Matte the targets ``todo`` (images and clips) on Ray; outputs are written with their records
    (``record``), failures recorded; returns targets matted. Raises WorkerSetupError when a worker
    cannot set up (files missing, weights not the context file's), JobStopped on an error every
    target would meet."""
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
        logging.getLogger("ray").setLevel(logging.CRITICAL)  # Ray's INFO/WARNING notes are not the user's business
        with _without_native_log_lines() as stderr:
            return _run(ray, job, list(todo), record, failures, stderr)
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
    passes through. Yields the stream for the job's own progress: where ``sys.stderr`` is the process's
    fd 2, a text stream on the real stderr, past the filter, so a terminal stays a terminal (a tqdm bar,
    its ``\\r`` updates shown at once); ``sys.stderr`` itself where a caller has put another stream there."""
    try:
        saved = os.dup(2)
    except OSError:
        yield sys.stderr
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
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a stream of the caller's (io.StringIO, a test's capture)
        on_fd2 = False
    own = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace") if on_fd2 else None
    try:
        yield own or sys.stderr
    finally:
        if own is not None:
            own.close()
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


def _start_workers(ray, job: RayJob, tasks: int) -> list:
    gpus = ray.cluster_resources().get("GPU", 0)
    count = max(1, min(job.workers or (int(gpus) if gpus >= 1 else 1), tasks))
    resources = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": job.cpus_per_worker}
    threads = None if gpus >= 1 else max(1, int(job.cpus_per_worker))
    actor = ray.remote(Worker).options(max_restarts=0, **resources)
    context = ray.put(job.context)  # once in the object store; each actor receives the object
    return [actor.remote(job.pipe_factory, context, job.context_header, job.context_file, job.resize_mode,
                         job.estimate_colors, job.chunk_size, threads) for _ in range(count)]


# a user's setup problem whose message says what to do (model files, a context file that does not fit them)
_USER_SETUP_ERRORS = ("CheckpointError", "ContextFileError", "ModelFileError", "FileNotFoundError")


def _await_ready(ray, workers: list) -> None:
    """The setup handshake: every worker's ready(); the first setup error stops the job (typed).
    A worker that died before its constructor could run (its arguments could not be unpickled
    there, its node was lost) answers ready() with Ray's error: it could not start."""
    try:
        rows = ray.get([w.ready.remote() for w in workers])
    except ray.exceptions.RayError as exc:
        raise WorkerSetupError(f"a Ray worker could not start: {_summary(exc)}") from None
    for row in rows:
        if row["error_type"] is not None:
            raise WorkerSetupError(row["error"] if row["error_type"] in _USER_SETUP_ERRORS else
                                   f"a Ray worker could not set up: {row['error_type']}: {row['error']}")


def _run(ray, job: RayJob, todo: List[Target], record: JobRecord, failures: Failures, stderr) -> int:
    images, videos = split_targets(todo)
    tasks = deque([("clip", t) for t in videos]  # the long tasks first
                  + [("images", images[i:i + job.chunk_size]) for i in range(0, len(images), job.chunk_size)])
    by_path = {str(t.path): t for t in todo}
    workers = _start_workers(ray, job, len(tasks))
    pending: Dict[object, tuple] = {}  # result ref -> (worker, the record of a clip's outputs)
    bar = Progress(len(todo), f"matte on Ray ({len(workers)} workers)", "target", stream=stderr)
    matted, finished = 0, set()

    def send(worker) -> None:
        while tasks:
            kind, item = tasks.popleft()
            if kind == "images":
                pending[worker.matte_images.remote([str(t.path) for t in item])] = (worker, None)
                return
            try:
                made = record.describe(item)  # the clip's source, read here as the local engine does
            except OSError as exc:  # gone or unreadable since it was listed: this clip fails, not the job
                _finish({**_error_fields(exc), "target": str(item.path), "pid": os.getpid(), "actor_id": "(driver)"},
                        item, None, job, record, failures, bar)
                finished.add(str(item.path))
                continue
            pending[worker.matte_clip.remote(str(item.path), str(record.out_dir), list(job.video_outputs), item.name,
                                             {RECORD_KEY: json.dumps(made)})] = (worker, made)
            return

    stopped = None  # the error that ended the job early
    try:
        _await_ready(ray, workers)
        for _ in range(2):  # two tasks queued per worker: the next starts as soon as one ends
            for worker in workers:
                if tasks:
                    send(worker)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            worker, made = pending.pop(ref)
            if tasks:
                send(worker)
            result = ray.get(ref)
            for row in result if isinstance(result, list) else [result]:
                matted += _finish(row, by_path[row["target"]], made, job, record, failures, bar)
                finished.add(row["target"])
    except (JobStopped, WorkerSetupError):
        raise
    except Exception as exc:
        stopped = exc
    finally:
        bar.close()
        _stop(ray, workers, pending)
    if stopped is not None:
        for t in todo:
            if str(t.path) not in finished:
                error = f"not finished: the Ray job stopped: {_summary(stopped)}"
                failures.add(t, error, type(stopped).__name__)
                bar.log(f"{t.path.name}: FAILED: {error}")
    return matted


def _stop(ray, workers: list, pending: dict) -> None:
    """End the job's actors (a clip being written leaves only temporary files) and wait until their
    calls have ended, so that no worker writes into ``--out`` once the driver lets go of its lock."""
    for worker in workers:
        ray.kill(worker)
    for ref in pending:
        try:
            ray.get(ref, timeout=30)
        except Exception:  # noqa: BLE001 - the actor's death is what we wait for
            pass


def _finish(row: dict, target: Target, made: Optional[dict], job: RayJob, record: JobRecord, failures: Failures,
            bar: Progress) -> int:
    """Write or record one result row; returns 1 if the target was matted."""
    if row["error_type"] == STOPPED:
        raise JobStopped(row["error"])
    where = f"(Ray worker pid {row['pid']}, actor {row['actor_id']})"
    if row["error_type"] is None:
        try:
            if made is None:
                record.write_images(target, row["alpha"], row["rgba"])
            else:
                record.complete(made, target_outputs(record.out_dir, target, job.video_outputs))
        except OSError as exc:
            reason = stop_reason(exc)
            if reason is not None:
                raise JobStopped(reason) from None
            row = {**row, "error_type": type(exc).__name__, "error": error_text(exc)}
    if row["error_type"] is not None:
        failures.add(target, row["error"], row["error_type"])
        bar.log(f"{target.path.name}: FAILED {where}: {row['error']}")
        bar.update(1, f"{target.path.name}: FAILED")
        return 0
    if made is not None:  # a clip: which worker matted it, as for a failure
        bar.log(f"{target.path.name}: ok, {row['frames']} frames {where}")
    bar.update(1, f"{target.path.name}: ok")
    return 1
