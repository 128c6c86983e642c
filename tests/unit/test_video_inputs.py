"""Clips as a player shows them: display matrices (a phone's portrait clip, 180 degrees, mirrors)
and animated GIFs/WebPs, decoded and matted. The frames are hand-made: four flat quadrants of
different greys, so where each quadrant is shown says how the frame was turned."""
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from iconmatting_core import video
from iconmatting_core.__main__ import main
from iconmatting_core.job.clips import output_paths

av = pytest.importorskip("av")

W, H = 48, 32  # as stored
TL, TR, BL, BR = 250, 170, 90, 10  # the stored frame's quadrants
ONE = 1 << 16  # 1.0 in a display matrix (16.16 fixed point); its last entry is 1.0 in 2.30
# FFmpeg's (and MP4's tkhd) layout: a stored pixel (x, y) is shown at (a*x + c*y, b*x + d*y), y downwards
MATRICES = {  # name: ((a, b, c, d), shown size (h, w), shown quadrants TL, TR, BL, BR)
    "phone portrait, 90 clockwise": ((0, ONE, -ONE, 0), (W, H), (BL, TL, BR, TR)),
    "90 counter-clockwise": ((0, -ONE, ONE, 0), (W, H), (TR, BR, TL, BL)),
    "180": ((-ONE, 0, 0, -ONE), (H, W), (BR, BL, TR, TL)),
    "mirrored left-right": ((-ONE, 0, 0, ONE), (H, W), (TR, TL, BR, BL)),
    "mirrored top-bottom": ((ONE, 0, 0, -ONE), (H, W), (BL, BR, TL, TR)),
    "transposed": ((0, ONE, ONE, 0), (W, H), (TL, BL, TR, BR)),
    "as stored": ((ONE, 0, 0, ONE), (H, W), (TL, TR, BL, BR)),
}


def _quadrants_frame():
    frame = np.empty((H, W, 3), np.uint8)
    frame[: H // 2, : W // 2], frame[: H // 2, W // 2:] = TL, TR
    frame[H // 2:, : W // 2], frame[H // 2:, W // 2:] = BL, BR
    return frame


def _quadrants(frame):
    """Mean grey of each quadrant's inside (away from the lossy edges): TL, TR, BL, BR."""
    h, w = frame.shape[:2]
    m = 3
    parts = (frame[m: h // 2 - m, m: w // 2 - m], frame[m: h // 2 - m, w // 2 + m: -m],
             frame[h // 2 + m: -m, m: w // 2 - m], frame[h // 2 + m: -m, w // 2 + m: -m])
    return tuple(float(p.mean()) for p in parts)


def _clip(path, abcd=None, frames=3):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if abcd is not None:
            a, b, c, d = abcd
            stream.set_display_matrix([a, b, 0, c, d, 0, 0, 0, 1 << 30])
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_quadrants_frame(), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _close(got, expected, tol=12):
    return all(abs(g - e) <= tol for g, e in zip(got, expected))


@pytest.mark.parametrize("name", list(MATRICES))
def test_clips_are_decoded_as_their_display_matrix_shows_them(tmp_path, name):
    abcd, (h, w), shown = MATRICES[name]
    clip = _clip(tmp_path / "clip.mp4", abcd)
    info = video.probe(clip)
    assert (info.height, info.width, info.frames) == (h, w, 3)
    chunks = list(video.iter_timed_chunks(clip, 2))
    assert [len(frames) for frames, _ in chunks] == [2, 1]
    for frames, _ in chunks:
        for frame in frames:
            assert frame.shape == (h, w, 3) and frame.flags.c_contiguous
            assert _close(_quadrants(frame), shown), (name, _quadrants(frame), shown)


class _Stream:
    """An older PyAV's stream: no display matrix on frames, the rotation on the stream."""

    def __init__(self, metadata=None, side_data=None):
        self.metadata = metadata or {}
        if side_data is not None:
            self.side_data = side_data


def test_older_pyav_rotations_turn_frames_the_same_way():
    frame = _quadrants_frame()
    frame_without_side_data = object()
    for stream, shown in (
        (_Stream({"rotate": "90"}), MATRICES["phone portrait, 90 clockwise"][2]),  # the tag is clockwise
        (_Stream({"rotate": "270"}), MATRICES["90 counter-clockwise"][2]),
        (_Stream({"rotate": "180"}), MATRICES["180"][2]),
        (_Stream(side_data={"DISPLAYMATRIX": 90.0}), MATRICES["90 counter-clockwise"][2]),  # counter-clockwise
        (_Stream(side_data={"DISPLAYMATRIX": -90.0}), MATRICES["phone portrait, 90 clockwise"][2]),
        (_Stream(), MATRICES["as stored"][2]),
    ):
        turned = video.turn(frame, video.orientation(stream, frame_without_side_data))
        assert _quadrants(turned) == tuple(float(v) for v in shown), (stream.__dict__, _quadrants(turned))
    with pytest.raises(ValueError) as err:
        video.orientation(_Stream({"rotate": "45"}), frame_without_side_data)
    assert str(err.value) == "its container turns it 45 degrees clockwise; only quarter turns are supported (re-encode it upright)"


def test_a_turn_that_is_no_quarter_turn_is_refused(tmp_path):
    c, s = round(ONE * np.cos(np.radians(30))), round(ONE * np.sin(np.radians(30)))
    clip = _clip(tmp_path / "tilted.mp4", (c, s, -s, c))  # 30 degrees clockwise
    with pytest.raises(ValueError, match="turns it 30 degrees clockwise; only quarter turns are supported"):
        video.probe(clip)


def _reference(tmp_path):
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(tmp_path / "ref.png")
    Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 4)).save(tmp_path / "mask.png")
    return ["--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png")]


def _pngs(folder):
    out = []
    for p in sorted(folder.iterdir()):
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGBA")))
    return out


def _decoded_times(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(f.width, f.height, float(f.pts * f.time_base), f.rotation) for f in container.decode(stream)]


def test_a_phone_portrait_clip_is_matted_upright(tmp_path, pipe):
    abcd, (h, w), shown = MATRICES["phone portrait, 90 clockwise"]
    clip = _clip(tmp_path / "portrait.mp4", abcd)
    out = tmp_path / "out"
    assert main(["matte", *_reference(tmp_path), "--targets", str(clip), "--out", str(out), "--video-out", "alpha,png",
                 "--no-foreground"], pipe_factory=lambda: pipe) == 0
    paths = output_paths(out, clip, ["alpha", "png"])
    frames = _pngs(paths["png"])  # --no-foreground: the cut-outs' colours are the frames' own
    assert len(frames) == 3
    for rgba in frames:
        assert rgba.shape == (h, w, 4) and _close(_quadrants(rgba[..., :3]), shown), _quadrants(rgba[..., :3])
    # the alpha video is upright too, with no display matrix of its own for a player to apply again
    assert [(fw, fh, rotation) for fw, fh, _, rotation in _decoded_times(paths["alpha"])] == [(w, h, 0)] * 3


def test_animated_webp_gif_and_png_are_clips_with_their_frame_times(tmp_path, pipe, capsys):
    targets = tmp_path / "targets"
    targets.mkdir()
    greys = [30, 140, 230]
    images = [Image.fromarray(np.full((32, 48, 3), g, np.uint8)) for g in greys]
    for name, fmt in (("anim.webp", "WEBP"), ("anim2.gif", "GIF"), ("anim3.png", "PNG")):
        images[0].save(targets / name, fmt, save_all=True, append_images=images[1:], duration=[100, 200, 300], loop=0,
                       lossless=True)
    images[0].save(targets / "still.webp", "WEBP", lossless=True)  # one frame: an image
    out = tmp_path / "out"
    assert main(["matte", *_reference(tmp_path), "--targets", str(targets), "--out", str(out), "--video-out", "alpha,png",
                 "--no-foreground"], pipe_factory=lambda: pipe) == 0
    assert "4 matted, 0 failed" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["anim2_alpha.mp4", "anim2_frames", "anim3_alpha.mp4", "anim3_frames",
                                                     "anim_alpha.mp4", "anim_frames", "iconmatting-job.jsonl",
                                                     "still_alpha.png", "still_rgba.png"]
    for stem in ("anim", "anim2", "anim3"):
        paths = output_paths(out, targets / f"{stem}.x", ["alpha", "png"])
        frames = _pngs(paths["png"])
        assert [int(np.median(f[..., :3])) for f in frames] == greys  # every frame, in order, none dropped
        times = [(fw, fh, round(t, 3)) for fw, fh, t, _ in _decoded_times(paths["alpha"])]
        assert times == [(48, 32, 0.0), (48, 32, 0.1), (48, 32, 0.3)]  # each frame starts when the ones before have been shown


def test_an_animated_png_is_its_animation_frames_without_its_default_image(tmp_path):
    """APNG: a default image (white, shown by viewers without animation; no fcTL before its IDAT) and three
    animation frames stating 100, 200 and 300 ms: three frames at 0, 0.1 and 0.3 s; and one whose first image is
    its first frame (Pillow's default)."""
    greys = [30, 140, 230]
    frames = [Image.fromarray(np.full((8, 12, 3), g, np.uint8)) for g in greys]
    white = Image.fromarray(np.full((8, 12, 3), 255, np.uint8))
    white.save(tmp_path / "hidden.png", save_all=True, append_images=frames, default_image=True, duration=[100, 200, 300])
    frames[0].save(tmp_path / "plain.png", save_all=True, append_images=frames[1:], duration=[100, 200, 300])
    for name in ("hidden.png", "plain.png"):
        info = video.probe(tmp_path / name)
        assert (info.frames, info.width, info.height, info.fps) == (3, 12, 8, Fraction(3 * 1000, 600)), name
        chunks = list(video.iter_timed_chunks(tmp_path / name, 2))
        assert [int(f[0, 0, 0]) for chunk, _ in chunks for f in chunk] == greys, name
        assert [t for _, times in chunks for t in times] == [0, Fraction(1, 10), Fraction(3, 10)], name


def test_animation_frames_of_no_stated_duration_are_shown_for_100_ms(tmp_path):
    images = [Image.fromarray(np.full((8, 8, 3), g, np.uint8)) for g in (0, 90, 180)]
    images[0].save(tmp_path / "fast.gif", save_all=True, append_images=images[1:], duration=[0, 50, 0], loop=0)
    info = video.probe(tmp_path / "fast.gif")
    assert (info.frames, info.fps, info.duration, info.time_base) == (3, Fraction(3, Fraction(25, 100)), None, Fraction(1, 1000))
    times = [t for _, chunk_times in video.iter_timed_chunks(tmp_path / "fast.gif", 2) for t in chunk_times]
    assert times == [Fraction(0), Fraction(1, 10), Fraction(15, 100)]


def test_an_animation_is_turned_upright_by_its_exif_orientation_like_an_image(tmp_path):
    stored = Image.fromarray(_quadrants_frame())
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation 6: shown turned 90 degrees clockwise (a phone held upright)
    darker = Image.fromarray(_quadrants_frame() - 4)  # a second frame that differs (equal ones are merged)
    stored.save(tmp_path / "turned.webp", save_all=True, append_images=[darker], duration=100, lossless=True, exif=exif)
    _, (h, w), shown = MATRICES["phone portrait, 90 clockwise"]
    info = video.probe(tmp_path / "turned.webp")
    assert (info.frames, info.height, info.width) == (2, h, w)
    frames = [f for chunk, _ in video.iter_timed_chunks(tmp_path / "turned.webp", 4) for f in chunk]
    assert len(frames) == 2
    for frame, darkened in zip(frames, (0, 4)):
        assert frame.shape == (h, w, 3) and _quadrants(frame) == tuple(float(v - darkened) for v in shown)
