"""The local engine: targets matted one after another in this process (images, then clips
streamed frame chunk by frame chunk). Outputs are written with their records (``record.JobRecord``)."""
from __future__ import annotations

import json
import sys
from typing import Sequence

from ..image_io import read_image
from ..video import probe as probe_video, to_uint8
from .clips import matte_video
from .outputs import Failures, JobStopped, Progress, error_text, stop_reason, target_outputs
from .record import RECORD_KEY, JobRecord
from .targets import Target, split_targets


def matte_images(pipe, context, images: Sequence[Target], record: JobRecord, resize_mode: str, estimate_colors: bool,
                 failures: Failures) -> int:
    """Matte image targets, writing ``<name>_alpha.png`` and ``<name>_rgba.png``; a target that
    fails is recorded and skipped; an error every target would meet raises JobStopped. Returns
    the number matted."""
    matted = 0
    bar = Progress(len(images), "matte", "img")
    try:
        for target in images:
            try:
                image = read_image(target.path)
                alpha = pipe.matte(context, image, resize_mode=resize_mode)[0]
                rgba = pipe.cutout(image, alpha, estimate_colors=estimate_colors)
                record.write_images(target, to_uint8(alpha), to_uint8(rgba))
                matted += 1
                bar.update(1, f"{target.path.name}: ok")
            except Exception as exc:  # one bad image must not lose the others
                reason = stop_reason(exc)
                if reason is not None:
                    raise JobStopped(reason) from None
                failures.add(target, error_text(exc), type(exc).__name__)
                bar.log(f"{target.path.name}: FAILED: {error_text(exc)}")
                bar.update(1, f"{target.path.name}: FAILED")
    finally:
        bar.close()
    return matted


def matte_clips(pipe, context, videos: Sequence[Target], record: JobRecord, resize_mode: str, estimate_colors: bool,
                failures: Failures, video_outputs: Sequence[str], chunk_size: int) -> int:
    """Matte clips one by one (see ``clips.matte_video``); as :func:`matte_images`."""
    matted = 0
    for target in videos:
        bar = None
        try:
            info = probe_video(target.path)
            made = record.describe(target)
            bar = Progress(info.frames or None, target.path.name, "frame")
            frames = matte_video(pipe, context, target.path, record.out_dir, video_outputs, resize_mode, chunk_size,
                                 estimate_colors, on_frames=bar.update, name=target.name,
                                 tags={RECORD_KEY: json.dumps(made)})
            record.complete(made, target_outputs(record.out_dir, target, video_outputs))
            matted += 1
            bar.log(f"{target.path.name}: ok, {frames} frames at {float(info.fps):.3g} fps")
        except Exception as exc:
            reason = stop_reason(exc)
            if reason is not None:
                raise JobStopped(reason) from None
            failures.add(target, error_text(exc), type(exc).__name__)
            print(f"{target.path.name}: FAILED: {error_text(exc)}", file=sys.stderr)
        finally:
            if bar is not None:
                bar.close()
    return matted


def run_local(pipe, context, todo: Sequence[Target], record: JobRecord, resize_mode: str, estimate_colors: bool,
              failures: Failures, video_outputs: Sequence[str], chunk_size: int) -> int:
    images, videos = split_targets(todo)
    matted = matte_images(pipe, context, images, record, resize_mode, estimate_colors, failures) if images else 0
    return matted + matte_clips(pipe, context, videos, record, resize_mode, estimate_colors, failures,
                                video_outputs, chunk_size)
