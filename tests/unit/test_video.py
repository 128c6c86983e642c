"""Videos on the command line: streamed frames in, alpha video / RGBA video / PNG sequence out."""
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from iconmatting_core.__main__ import main
from iconmatting_core.job.clips import output_paths
from iconmatting_core.video import read_rgba_frames
from sample_inputs import FPS, FRAMES, H, W, make_reference, write_clip

av = pytest.importorskip("av")


def _reference(tmp_path):
    image, mask = make_reference()
    Image.fromarray((image.numpy() * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    return ["--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png")]


def _decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="gray") for f in container.decode(stream)]
        return Fraction(stream.average_rate), frames


def test_matte_video_writes_alpha_video_rgba_video_and_png_sequence(pipe, tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    args = ["matte", *_reference(tmp_path), "--targets", str(clip), "--out", str(out), "--video-out", "alpha,rgba,png",
            "--chunk-size", "4"]
    assert main(args, pipe_factory=lambda: pipe) == 0
    assert "1 matted, 0 failed" in capsys.readouterr().err
    paths = output_paths(out, clip, ["alpha", "rgba", "png"])

    fps, alphas = _decode(paths["alpha"])
    assert fps == FPS and len(alphas) == FRAMES and alphas[0].shape == (H, W)
    fps, rgbas = read_rgba_frames(paths["rgba"])
    assert fps == FPS and len(rgbas) == FRAMES and rgbas[0].shape == (H, W, 4)
    pngs = sorted(paths["png"].iterdir())
    assert [p.name for p in pngs] == [f"clip_{i:06d}.png" for i in range(FRAMES)]
    for png, alpha, rgba in zip(pngs, alphas, rgbas):
        with Image.open(png) as im:
            assert im.mode == "RGBA" and im.size == (W, H)
            exact = np.asarray(im)[..., 3].astype(int)
        assert exact.std() > 1  # a real matte, not a constant
        # both videos carry that matte (up to lossy compression)
        assert np.abs(alpha.astype(int) - exact).mean() < 6
        assert np.abs(rgba[..., 3].astype(int) - exact).mean() < 6
    assert not list(out.glob("*.partial*"))

    stamp = paths["alpha"].stat().st_mtime_ns  # resume: a done clip is skipped
    assert main(args, pipe_factory=lambda: pipe) == 0
    assert "skipping 1 target(s)" in capsys.readouterr().err and paths["alpha"].stat().st_mtime_ns == stamp


def test_odd_sized_clip_and_default_outputs(pipe, tmp_path):
    clip = tmp_path / "odd.webm"
    with av.open(str(clip), "w") as container:  # VP9 takes odd sizes; H.264 output is padded to even
        stream = container.add_stream("libvpx-vp9", rate=10)
        stream.width, stream.height, stream.pix_fmt = 33, 21, "yuv420p"
        for _ in range(2):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((21, 33, 3), 90, np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "out"
    assert main(["matte", *_reference(tmp_path), "--targets", str(clip), "--out", str(out)], pipe_factory=lambda: pipe) == 0
    paths = output_paths(out, clip, ["alpha", "rgba"])
    assert sorted(p.name for p in out.iterdir()) == sorted(["iconmatting-job.jsonl", *(p.name for p in paths.values())])
    assert _decode(paths["alpha"])[1][0].shape == (22, 34)
    fps, rgbas = read_rgba_frames(paths["rgba"])
    assert fps == 10 and len(rgbas) == 2 and rgbas[0].shape == (21, 33, 4)


def test_broken_video_is_a_recorded_failure_without_partial_outputs(pipe, tmp_path, capsys):
    targets = tmp_path / "targets"
    targets.mkdir()
    write_clip(targets / "good.mp4", frames=2)
    (targets / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    out = tmp_path / "out"
    assert main(["matte", *_reference(tmp_path), "--targets", str(targets), "--out", str(out)], pipe_factory=lambda: pipe) == 1
    err = capsys.readouterr().err
    assert "broken.mp4: FAILED" in err and "1 matted, 1 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["failures.jsonl", "good_alpha.mp4", "good_rgba.webm", "iconmatting-job.jsonl"]


def test_clip_without_frames_is_a_failure(pipe, tmp_path, monkeypatch, capsys):
    from iconmatting_core.job import clips

    clip = write_clip(tmp_path / "clip.mp4", frames=1)
    monkeypatch.setattr(clips, "iter_timed_chunks", lambda path, chunk_size: iter(()))  # decodes to nothing
    out = tmp_path / "out"
    assert main(["matte", *_reference(tmp_path), "--targets", str(clip), "--out", str(out)], pipe_factory=lambda: pipe) == 1
    err = capsys.readouterr().err
    assert "clip.mp4: FAILED: ValueError: no frames decoded" in err and "0 matted, 1 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["failures.jsonl"]


def test_same_named_clips_in_a_tree_get_mirrored_outputs(pipe, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / "clips" / folder).mkdir(parents=True)
        write_clip(tmp_path / "clips" / folder / "clip.mp4", frames=1)
    out = tmp_path / "out"
    assert main(["matte", *_reference(tmp_path), "--targets", str(tmp_path / "clips"), "--out", str(out),
                 "--video-out", "alpha,png"], pipe_factory=lambda: pipe) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "a", "a/clip_alpha.mp4", "a/clip_frames", "a/clip_frames/clip_000000.png",
        "b", "b/clip_alpha.mp4", "b/clip_frames", "b/clip_frames/clip_000000.png", "iconmatting-job.jsonl"]
