"""Video decoding and the codecs of the outputs (PyAV, imported only when a video is used).

Clips are decoded as a stream of timed frame chunks (:func:`iter_timed_chunks`), so memory does not
grow with the clip's length; the ``matte`` job writes its outputs with :data:`ALPHA_CODEC` (H.264)
and :data:`RGBA_CODEC` (VP9 with alpha, read back with :func:`read_rgba_frames`, since FFmpeg's
built-in vp9 decoder drops the alpha plane); see ``job.clips``.

A clip that ends before its container says it should (a file cut short) is an error naming both
numbers, and so is a clip whose container states no frame rate (no rate is made up).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".gif"}
ALPHA_CODEC, RGBA_CODEC = "libx264", "libvpx-vp9"


def is_video(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def import_av():
    try:
        import av
    except ImportError as exc:  # only needed for videos
        raise RuntimeError("matting videos needs PyAV: pip install av") from exc
    return av


@dataclass(frozen=True)
class VideoInfo:
    fps: Fraction  # average frame rate
    frames: int  # 0 when the container does not say
    width: int
    height: int
    duration: Optional[float] = None  # seconds, as the container states it (None when it does not)
    time_base: Optional[Fraction] = None  # of the stream's timestamps


def probe(path: Path) -> VideoInfo:
    """Frame rate, frame count (0 if unknown), size, stated duration and time base of the first
    video stream. ValueError when there is none, or when the container states no frame rate."""
    av = import_av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate
        if not fps:
            raise ValueError(f"{path} states no frame rate; re-mux it with one (e.g. ffmpeg -r 25 -i IN -c copy OUT)")
        duration = container.duration / 1_000_000 if container.duration else None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        return VideoInfo(Fraction(fps), int(stream.frames or 0), stream.codec_context.width, stream.codec_context.height,
                         duration, Fraction(stream.time_base) if stream.time_base else None)


def iter_timed_chunks(path: Path, chunk_size: int) -> Iterator[Tuple[List[np.ndarray], List[Optional[Fraction]]]]:
    """(RGB frames [H, W, 3] uint8, their timestamps in seconds from the first frame, None when a
    frame has none), ``chunk_size`` frames at a time, in order."""
    av = import_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        chunk: List[np.ndarray] = []
        times: List[Optional[Fraction]] = []
        start = None
        for frame in container.decode(stream):
            t = Fraction(frame.pts) * Fraction(frame.time_base) if frame.pts is not None and frame.time_base else None
            if t is not None and start is None:
                start = t
            chunk.append(frame.to_ndarray(format="rgb24"))
            times.append(None if t is None else t - start)
            if len(chunk) == chunk_size:
                yield chunk, times
                chunk, times = [], []
        if chunk:
            yield chunk, times


def check_complete(path: Path, info: VideoInfo, count: int, last_time: Optional[Fraction]) -> None:
    """ValueError when a clip decoded to no frames, or ended before its container says it should
    (fewer frames than stated, or its last frame well before the stated duration)."""
    if count == 0:
        raise ValueError("no frames decoded")
    if info.frames and count < info.frames:
        raise ValueError(f"{path.name} ends after {count} of the {info.frames} frames its container states (cut short?)")
    if info.duration and last_time is not None:
        end = float(last_time) + 1 / float(info.fps)
        if end < info.duration - max(2 / float(info.fps), 0.05):
            raise ValueError(f"{path.name} ends at {end:.2f} s ({count} frames) but its container states "
                             f"{info.duration:.2f} s (cut short?)")


def to_uint8(x) -> np.ndarray:
    """[0, 1] float tensor/array -> uint8 array, rounded."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return (np.clip(x, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def read_rgba_frames(path: Path) -> Tuple[Fraction, List[np.ndarray]]:
    """(frame rate, RGBA frames [H, W, 4] uint8) of a VP9 WebM with alpha, decoded with libvpx-vp9
    (which reads the alpha plane the built-in decoder drops). For checks and small clips."""
    av = import_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoder = av.CodecContext.create(RGBA_CODEC, "r")
        frames = []
        for packet in container.demux(stream):
            for frame in decoder.decode(packet):
                frames.append(frame.to_ndarray(format="rgba"))
        return Fraction(stream.average_rate), frames
