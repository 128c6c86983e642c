"""``matte --engine ray``: the command line's job as a Ray Data pipeline, on one machine or a cluster.

Targets become a dataset of paths; a light read stage turns each into pixel rows (an image: one
row; a video: its frames, decoded as a stream), ``map_batches`` runs the rows through a pool of
actors that each hold one model (one GPU per actor when the cluster has GPUs,
``--cpus-per-worker`` CPUs otherwise), and the driver writes the results as they arrive, in order
(PNGs for images; frames into the clip's video writers). The reference context is put in the
object store once and shared by every actor.

Resuming and failures work as with the local engine: targets whose outputs exist are left out of
the dataset; a failing target comes back as an error row, is reported and listed in
``failures.jsonl``, and never stops the others. A worker that cannot set up (model files missing,
weights not the context file's) stops the job with its own error (``WorkerSetupError``); a job
that breaks mid-run lists every target it did not finish in ``failures.jsonl``.

Workers read the targets and the model files by path, so on a cluster those paths must be the same
on every node (a shared filesystem); the outputs are written by the driver. A worker without
``--sd`` finds or downloads SD 2.1 into its own node's Hugging Face cache.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .batch import (
    Failures,
    Progress,
    error_text,
    output_paths,
    png_bytes,
    read_image_uint8,
    write_file,
)
from .video import VideoOutputs, is_video, iter_frame_chunks, probe, to_uint8


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
        from .__main__ import default_models_dir, find_model_files
        from .checkpoint import CheckpointError
        from .pipeline import load_pipeline

        models_dir = Path(self.models_dir) if self.models_dir else default_models_dir()
        matting, sd, problems = find_model_files(models_dir, self.matting_weights, self.sd)
        if problems:
            raise CheckpointError("model files missing on this Ray node: " + " ".join(problems))
        return load_pipeline(matting, sd, device=self.device, dtype=self.dtype)


@dataclass
class RayJob:
    """Everything the workers and the driver need besides the targets."""

    pipe_factory: Callable
    context: object  # ReferenceContext
    expected_fingerprint: Optional[str]  # of a context file; each worker checks its model against it
    resize_mode: str
    video_outputs: Sequence[str]
    estimate_colors: bool = True
    chunk_size: int = 4
    address: Optional[str] = None
    workers: Optional[int] = None
    cpus_per_worker: float = 1.0
    context_file: Optional[str] = None  # named in the workers' errors

    @classmethod
    def from_args(cls, args, context, resize_mode, video_outputs, pipe_factory=None) -> "RayJob":
        expected = None
        if args.context:
            from .context_file import read_context_metadata

            expected = read_context_metadata(args.context).get("fingerprint")
        if pipe_factory is None:
            pipe_factory = PipelineSpec(args.matting_weights, args.sd, args.models_dir, args.device, args.dtype).build
        return cls(pipe_factory, context, expected, resize_mode, list(video_outputs), not args.no_foreground,
                   args.chunk_size, args.address, args.workers, args.cpus_per_worker, args.context)


class MatteWorker:
    """A Ray Data actor: one model and the shared context; mattes batches of pixel rows
    {"target", "index", "frame" [H, W, 3] uint8, "error"} -> {"target", "index", "error",
    "alpha" [H, W] uint8, "rgba" [H, W, 4] uint8}. A row whose "error" is not empty failed (or
    arrived failed from the read stage); the others are unaffected.
    """

    def __init__(self, pipe_factory, context_ref, expected_fingerprint, resize_mode, estimate_colors, threads,
                 context_file=None):
        import ray
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.pipe = pipe_factory()
        from .context_file import ContextFileError, fingerprint_label, same_weights

        if expected_fingerprint is not None and not same_weights(self.pipe.fingerprint, expected_fingerprint):
            named = f" {context_file}" if context_file else ""
            raise ContextFileError(
                f"The context file{named} was encoded with other model weights "
                f"(fingerprint {fingerprint_label(expected_fingerprint)}) "
                f"than this Ray worker loaded ({fingerprint_label(self.pipe.fingerprint)}). Give the workers the weights it "
                "was made with, or encode the reference again with these."
            )
        self.context = ray.get(context_ref[0])
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


def read_targets(batch: Dict[str, np.ndarray], chunk_size: int):
    """Ray Data generator: rows {"target"} -> pixel rows. An image gives one row (index -1), a
    video its frames (index 0, 1, ...), ``chunk_size`` at a time, in order; a target that cannot
    be read gives one row with its error (index -1)."""
    for target in batch["target"]:
        index = 0
        try:
            if is_video(Path(target)):
                for chunk in iter_frame_chunks(Path(target), chunk_size):
                    yield _rows(target, index, chunk)
                    index += len(chunk)
            else:
                # uint8, upright by its EXIF orientation; the pipeline scales it as read_image does
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
    from .checkpoint import CheckpointError
    from .context_file import ContextFileError

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


def run_ray_job(job: RayJob, todo: Sequence[Path], out_dir: Path, failures: Failures,
                names: Optional[Mapping[Path, str]] = None) -> int:
    """Matte ``todo`` on Ray; writes outputs into out_dir (named by ``names``, default the targets'
    stems), records failures; returns targets matted. Raises WorkerSetupError when the workers
    cannot load their model (files missing, weights not the context file's)."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=job.address, log_to_driver=False, include_dashboard=False)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True  # a clip's frames reach its writers in order
        return _run(ray, job, todo, out_dir, failures, dict(names or {}))
    finally:
        if started_here:
            ray.shutdown()


def _run(ray, job: RayJob, todo: Sequence[Path], out_dir: Path, failures: Failures, names: Dict[Path, str]) -> int:
    total = 0
    for target in todo:
        try:
            total += probe(target).frames if is_video(target) else 1
        except Exception:
            total += 1
    workers, pool, threads = _pool_args(ray, job, total)
    ds = ray.data.from_items([{"target": str(t)} for t in todo], override_num_blocks=len(todo))
    # light: takes no CPU from the model actors, and few tasks at once (each is a worker process)
    ds = ds.map_batches(read_targets, fn_kwargs={"chunk_size": job.chunk_size}, batch_size=1, batch_format="numpy",
                        num_cpus=0, concurrency=min(len(todo), workers + 1))
    kwargs = dict(pipe_factory=job.pipe_factory, context_ref=[ray.put(job.context)],
                  expected_fingerprint=job.expected_fingerprint, resize_mode=job.resize_mode,
                  estimate_colors=job.estimate_colors, threads=threads, context_file=job.context_file)
    ds = ds.map_batches(MatteWorker, fn_constructor_kwargs=kwargs, batch_size=job.chunk_size, **pool)

    bar = Progress(total, f"matte on Ray ({workers} workers)", "img")
    matted, clip, seen, finished = 0, None, set(), set()
    stopped = None  # the error that ended the job early
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for target, index, error, alpha, rgba in zip(batch["target"], batch["index"], batch["error"],
                                                         batch["alpha"], batch["rgba"]):
                path = Path(target)
                if clip is not None and clip.video != path:
                    matted += clip.finish(failures, bar)
                    finished.add(str(clip.video))
                    clip = None
                seen.add(target)
                if is_video(path):
                    if clip is None:
                        clip = _ClipWriter(path, out_dir, job.video_outputs, names.get(path))
                    clip.add(int(index), error, alpha, rgba)
                elif error:
                    failures.add(path, error)
                    bar.log(f"{path.name}: FAILED: {error}")
                    finished.add(target)
                else:
                    alpha_path, rgba_path = output_paths(out_dir, path, names.get(path))
                    write_file(alpha_path, png_bytes(alpha, "L"))
                    write_file(rgba_path, png_bytes(rgba, "RGBA"))
                    matted += 1
                    finished.add(target)
                bar.update(1, f"{path.name}: {'FAILED' if error else 'ok'}")
        if clip is not None:
            matted += clip.finish(failures, bar)
            finished.add(str(clip.video))
            clip = None
    except Exception as exc:
        setup = _setup_error(exc)
        if setup is not None:
            raise WorkerSetupError(setup) from None
        stopped = exc
    finally:
        if clip is not None and clip.outputs is not None:
            clip.outputs.abort()
        bar.close()
    for target in todo:
        if str(target) in finished:
            continue
        if stopped is not None:
            error = f"not finished: the Ray job stopped: {_summary(stopped)}"
        elif str(target) not in seen:
            error = "no frames decoded"
        else:
            continue
        failures.add(target, error)
        bar.log(f"{target.name}: FAILED: {error}")
    return matted


class _ClipWriter:
    """The driver's side of one clip: frames arrive in order and go to its VideoOutputs."""

    def __init__(self, video: Path, out_dir: Path, kinds, name: Optional[str] = None):
        self.video, self.error, self.outputs = video, "", None
        try:
            self.outputs = VideoOutputs(out_dir, video, probe(video), kinds, name)
        except Exception as exc:
            self.error = error_text(exc)

    def add(self, index: int, error: str, alpha: np.ndarray, rgba: np.ndarray) -> None:
        if self.error:
            return
        if error:
            self.error = error if index < 0 else f"frame {index}: {error}"
        elif index != self.outputs.count:
            self.error = f"frame {index} arrived when frame {self.outputs.count} was expected"
        else:
            self.outputs.write(alpha, rgba)
            return
        self.outputs.abort()

    def finish(self, failures: Failures, bar: Progress) -> bool:
        if not self.error:
            try:
                self.outputs.close()
                bar.log(f"{self.video.name}: ok, {self.outputs.count} frames")
                return True
            except Exception as exc:
                self.error = error_text(exc)
                self.outputs.abort()
        failures.add(self.video, self.error)
        bar.log(f"{self.video.name}: FAILED: {self.error}")
        return False
