"""Video decoding and the codecs of the outputs (PyAV, imported only when a video is used).

Clips are decoded as a stream of timed frame chunks (:func:`iter_timed_chunks`), so memory does not
grow with the clip's length; the ``matte`` job writes its outputs with :data:`ALPHA_CODEC` (H.264)
and :data:`RGBA_CODEC` (VP9 with alpha, read back with :func:`read_rgba_frames`, since FFmpeg's
built-in vp9 decoder drops the alpha plane); see ``job.clips``.

Frames come out as a player shows them: a clip whose container says to turn it (a phone's portrait
clip is stored landscape with a 90 degree display matrix; mirrors too) is decoded turned, and
:func:`probe` gives its size as shown (:func:`orientation`). Images are turned upright by their
EXIF orientation the same way (``image_io``), so outputs never need a rotation of their own.

An animated GIF, WebP or PNG (APNG) that ``job.targets`` counts as a clip (more than one frame) is decoded by
Pillow (FFmpeg reads no animated WebP), each frame at the time its stated durations add up to.

A clip that ends before its container says it should (a file cut short) is an error naming both
numbers, and so is a clip whose container states no frame rate (no rate is made up).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .image_io import ANIMATED_EXTENSIONS, iter_animation

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg"}
ALPHA_CODEC, RGBA_CODEC = "libx264", "libvpx-vp9"
#: browsers show an animation frame that states 10 ms or less (often 0: "as fast as you can") for 100 ms
MIN_FRAME_MS, SHORT_FRAME_SHOWN_MS = 10, 100


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


#: how a decoded frame is turned to be shown: (transpose, flip rows, flip columns), in that order
Orientation = Tuple[bool, bool, bool]
AS_STORED: Orientation = (False, False, False)


def _quarter_turn(a: float, b: float, c: float, d: float) -> Orientation:
    """The orientation of a display matrix's linear part, in FFmpeg's layout (the same as MP4's
    ``tkhd`` matrix): the stored pixel at column x, row y is shown at column a*x + c*y, row b*x + d*y
    (plus a shift). Quarter turns and mirrors only; entries under 2% of the largest count as 0."""
    big = max(abs(a), abs(b), abs(c), abs(d))
    if not big:  # an empty matrix: players ignore it
        return AS_STORED
    a, b, c, d = (0 if abs(v) < big / 50 else v for v in (a, b, c, d))
    if a == d == 0 and b and c:
        return True, b < 0, c < 0
    if b == c == 0 and a and d:
        return False, d < 0, a < 0
    clockwise = math.degrees(math.atan2(b, a)) % 360
    raise ValueError(f"its container turns it {clockwise:.0f} degrees clockwise; only quarter turns are supported "
                     "(re-encode it upright)")


def orientation(stream, first_frame) -> Orientation:
    """How a clip's frames are turned for display. From the display matrix the decoder attaches to
    each frame (PyAV's ``frame.side_data``: rotations and mirrors); else from an older PyAV's
    ``stream.side_data`` (its counter-clockwise rotation) or an older FFmpeg's ``rotate`` tag
    (clockwise degrees). ValueError for a turn that is not a quarter turn."""
    for data in getattr(first_frame, "side_data", ()):
        if getattr(data.type, "name", str(data.type)) == "DISPLAYMATRIX":
            matrix = np.frombuffer(bytes(data), dtype=np.int32)  # 9 int32 in the machine's byte order
            return _quarter_turn(*(float(matrix[i]) for i in (0, 1, 3, 4)))
    side = getattr(stream, "side_data", None)
    if isinstance(side, dict) and side.get("DISPLAYMATRIX") is not None:
        counter_clockwise = float(side["DISPLAYMATRIX"])
    elif stream.metadata.get("rotate"):
        counter_clockwise = -float(stream.metadata["rotate"])
    else:
        return AS_STORED
    t = math.radians(counter_clockwise)  # the matrix of that rotation, as FFmpeg writes it
    return _quarter_turn(math.cos(t), -math.sin(t), math.sin(t), math.cos(t))


def turn(frame: np.ndarray, how: Orientation) -> np.ndarray:
    """A decoded frame [H, W, C] as it is shown (a contiguous array)."""
    transpose, flip_rows, flip_cols = how
    if transpose:
        frame = frame.swapaxes(0, 1)
    if flip_rows:
        frame = frame[::-1]
    if flip_cols:
        frame = frame[:, ::-1]
    return np.ascontiguousarray(frame)


def _is_animation(path: Path) -> bool:
    return Path(path).suffix.lower() in ANIMATED_EXTENSIONS


def _shown_ms(duration: int) -> int:
    """How long an animation frame that states ``duration`` ms is shown (as browsers show it)."""
    return duration if duration > MIN_FRAME_MS else SHORT_FRAME_SHOWN_MS


def _animation_frames(path: Path) -> Iterator[Tuple[np.ndarray, Fraction]]:
    """(RGB frame, time in seconds) of an animated GIF/WebP/APNG: each frame starts when the ones before
    it have been shown for their durations."""
    ms = 0
    for frame, duration in iter_animation(path):
        yield frame, Fraction(ms, 1000)
        ms += _shown_ms(duration)


def probe(path: Path) -> VideoInfo:
    """Frame rate, frame count (0 if unknown), size as shown, stated duration and time base of the
    first video stream. ValueError when there is none, when the container states no frame rate, or
    when it turns the frames by other than a quarter turn. An animated GIF/WebP/APNG is read through once
    (its frame count and durations, in ms; the rate is the average, frames / total duration)."""
    if _is_animation(path):
        count, ms, (height, width) = 0, 0, (0, 0)
        for frame, duration in iter_animation(path):
            count, ms, (height, width) = count + 1, ms + _shown_ms(duration), frame.shape[:2]
        if not count:
            raise ValueError(f"{path} holds no frames")
        return VideoInfo(Fraction(count * 1000, ms), count, width, height, None, Fraction(1, 1000))
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
        width, height = stream.codec_context.width, stream.codec_context.height
        if orientation(stream, next(iter(container.decode(stream)), None))[0]:
            width, height = height, width
        return VideoInfo(Fraction(fps), int(stream.frames or 0), width, height,
                         duration, Fraction(stream.time_base) if stream.time_base else None)


def _chunks(timed: Iterable[Tuple[np.ndarray, Optional[Fraction]]], chunk_size: int):
    chunk: List[np.ndarray] = []
    times: List[Optional[Fraction]] = []
    for frame, time in timed:
        chunk.append(frame)
        times.append(time)
        if len(chunk) == chunk_size:
            yield chunk, times
            chunk, times = [], []
    if chunk:
        yield chunk, times


def _decoded_frames(path: Path) -> Iterator[Tuple[np.ndarray, Optional[Fraction]]]:
    """(RGB frame as shown, time in seconds from the first frame or None) of a clip, in order."""
    av = import_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start, how = None, None
        for frame in container.decode(stream):
            if how is None:
                how = orientation(stream, frame)
            t = Fraction(frame.pts) * Fraction(frame.time_base) if frame.pts is not None and frame.time_base else None
            if t is not None and start is None:
                start = t
            yield turn(frame.to_ndarray(format="rgb24"), how), None if t is None else t - start


def iter_timed_chunks(path: Path, chunk_size: int) -> Iterator[Tuple[List[np.ndarray], List[Optional[Fraction]]]]:
    """(RGB frames [H, W, 3] uint8 as shown, their timestamps in seconds from the first frame, None
    when a frame has none), ``chunk_size`` frames at a time, in order."""
    return _chunks(_animation_frames(path) if _is_animation(path) else _decoded_frames(path), chunk_size)


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
