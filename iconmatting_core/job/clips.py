"""A ``matte`` job's clips: each frame matted as it is decoded, its outputs written as it goes.

Memory does not grow with the clip's length. Outputs of ``clip.mp4`` in the output folder, keeping
each frame's timestamp (a variable-frame-rate clip stays variable):

* ``alpha``: ``clip_alpha.mp4``, the alpha matte as an H.264 (yuv420p) video;
* ``rgba``: ``clip_rgba.webm``, the cut-out with its alpha, VP9 ``yuva420p`` (libvpx-vp9): plays in
  browsers and editors with transparency; read it back with the libvpx-vp9 decoder
  (``video.read_rgba_frames``), since FFmpeg's built-in vp9 decoder drops the alpha plane;
* ``png``: ``clip_frames/clip_000000.png`` ..., the RGBA cut-outs as a PNG sequence.

Each output is written under a temporary name (``files.partial_path``: short, whatever the
output's length) and renamed when the clip is complete, every old output of the clip removed
first, so an interrupted run leaves no output that a re-run would take for done, and never an old
output beside a new one. ``tags`` (the job record's ``{"iconmatting": record}``) go into every
output: the videos' ``comment`` tag (as JSON) and each PNG frame's text chunks. H.264 4:2:0 needs
even sizes: the alpha video of an odd-sized clip repeats its last row/column. Decoding, probing and
the codecs are ``iconmatting_core.video``'s.
"""
from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from ..files import partial_path, remove_path
from ..image_io import png_info
from ..video import ALPHA_CODEC, RGBA_CODEC, VideoInfo, check_complete, import_av, iter_timed_chunks, probe, to_uint8

VIDEO_OUTPUTS = ("alpha", "rgba", "png")
DEFAULT_VIDEO_OUTPUTS = ("alpha", "rgba")


def output_paths(out_dir: Path, video: Path, kinds: Sequence[str], name: Optional[str] = None) -> Dict[str, Path]:
    """Output paths by kind; ``name`` (default: the clip's stem) from ``targets`` (the target's output name)."""
    name = name or video.stem
    names = {"alpha": f"{name}_alpha.mp4", "rgba": f"{name}_rgba.webm", "png": f"{name}_frames"}
    return {k: Path(out_dir) / names[k] for k in kinds}


class VideoOutputs:
    """Writes the requested outputs of one clip frame by frame; :meth:`close` completes them."""

    def __init__(self, out_dir: Path, video: Path, info: VideoInfo, kinds: Sequence[str], name: Optional[str] = None,
                 tags: Optional[Mapping[str, str]] = None):
        self.final = output_paths(out_dir, video, kinds, name)
        self.tags = dict(tags or {})
        self.stem, self.info, self.count = (name or video.stem).rsplit("/", 1)[-1], info, 0
        self.containers: Dict[str, object] = {}
        self.streams: Dict[str, object] = {}
        self.time_base = Fraction(info.time_base) if info.time_base else 1 / Fraction(info.fps)
        self.last_pts = -1
        try:
            next(iter(self.final.values())).parent.mkdir(parents=True, exist_ok=True)
            for kind in kinds:
                if kind == "png":
                    partial_path(self.final[kind]).mkdir(parents=True, exist_ok=True)
                else:
                    self._open(kind)
        except Exception:
            self.abort()
            raise

    def _open(self, kind: str) -> None:
        av = import_av()
        codec = ALPHA_CODEC if kind == "alpha" else RGBA_CODEC
        if codec not in av.codecs_available:
            raise RuntimeError(f"this PyAV's FFmpeg has no {codec} encoder, needed for the {kind} video")
        # the format by name: the temporary file has no extension to tell it
        container = av.open(str(partial_path(self.final[kind])), "w", format="mp4" if kind == "alpha" else "webm")
        self.containers[kind] = container
        if self.tags:
            container.metadata["comment"] = json.dumps(self.tags)
        # libvpx's default (best-quality search) takes ~10x longer than matting a frame; realtime speed 8
        # keeps the same size at this quality for mattes, and buffers no frames (flat memory)
        options = {"crf": "12"} if kind == "alpha" else {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"}
        stream = container.add_stream(codec, rate=self.info.fps, options=options)
        width, height = self.info.width, self.info.height
        if kind == "alpha":
            width, height = width + width % 2, height + height % 2
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if kind == "alpha" else "yuva420p"
        stream.codec_context.time_base = self.time_base
        self.streams[kind] = stream

    def _encode(self, kind: str, array: np.ndarray, fmt: str, pts: int) -> None:
        av = import_av()
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=fmt)
        frame.pts = pts
        frame.time_base = self.time_base
        for packet in self.streams[kind].encode(frame):
            self.containers[kind].mux(packet)

    def write(self, alpha: np.ndarray, rgba: np.ndarray, time: Optional[Fraction] = None) -> None:
        """alpha [H, W] uint8 and rgba [H, W, 4] uint8 of the next frame, shown at ``time`` seconds
        from the start (default: the average frame rate's next slot)."""
        from PIL import Image

        if time is None:
            time = self.count / Fraction(self.info.fps)
        pts = max(round(Fraction(time) / self.time_base), self.last_pts + 1)
        self.last_pts = pts
        if "alpha" in self.streams:
            a = alpha
            if a.shape[0] % 2 or a.shape[1] % 2:
                a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2)), mode="edge")
            self._encode("alpha", a, "gray", pts)
        if "rgba" in self.streams:
            self._encode("rgba", rgba, "rgba", pts)
        if "png" in self.final:
            Image.fromarray(rgba, "RGBA").save(partial_path(self.final["png"]) / f"{self.stem}_{self.count:06d}.png",
                                               pnginfo=png_info(self.tags))
        self.count += 1

    def close(self) -> None:
        """Flush the encoders and move every output to its final name (the old outputs removed first)."""
        for kind, stream in self.streams.items():
            for packet in stream.encode():
                self.containers[kind].mux(packet)
            self.containers[kind].close()
        self.containers, self.streams = {}, {}
        for path in self.final.values():
            remove_path(path)
        for path in self.final.values():
            os.replace(partial_path(path), path)

    def abort(self) -> None:
        """Drop the partial outputs (after an error)."""
        for container in self.containers.values():
            try:
                container.close()
            except Exception:
                pass
        self.containers, self.streams = {}, {}
        for path in self.final.values():
            p = partial_path(path)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()


def matte_video(pipe, context, video: Path, out_dir: Path, kinds: Sequence[str], resize_mode: str,
                chunk_size: int = 4, estimate_colors: bool = True, on_frames=None, name: Optional[str] = None,
                tags: Optional[Mapping[str, str]] = None) -> int:
    """Matte every frame of ``video`` against ``context`` and write the outputs (named by ``name``,
    default the clip's stem, carrying ``tags``); returns the frame count. ``on_frames(n)`` is called
    after each chunk of n frames (progress). A clip that decodes to no frames, or ends before its
    container says it should, raises ValueError and leaves no outputs."""
    info = probe(video)
    outputs = VideoOutputs(out_dir, video, info, kinds, name, tags)
    last = None
    try:
        for frames, times in iter_timed_chunks(video, chunk_size):
            alphas = pipe.matte(context, frames, resize_mode=resize_mode, chunk_size=chunk_size)
            for frame, alpha, time in zip(frames, alphas, times):
                rgba = pipe.cutout(frame, alpha, estimate_colors=estimate_colors)
                outputs.write(to_uint8(alpha), to_uint8(rgba), time)
                last = time
            if on_frames is not None:
                on_frames(len(frames))
        check_complete(video, info, outputs.count, last)
        outputs.close()
    except BaseException:
        outputs.abort()
        raise
    return outputs.count
