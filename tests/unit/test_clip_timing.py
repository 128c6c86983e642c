"""A clip's frames in time: where the first frame starts, when a clip counts as whole, output timestamps
and the rounding of output pixels. Expected values are worked out by hand from the documented rules
(a clip may lack at most two frames' time; frames keep their own timestamps; 8-bit outputs round)
with frame rates whose frame times are exact binary fractions, so no comparison sits on a float edge."""
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from iconmatting_core import video
from iconmatting_core.job.clips import VideoOutputs
from iconmatting_core.video import VideoInfo, check_complete, iter_timed_chunks, to_uint8

av = pytest.importorskip("av")


def _clip(path, first_pts, frames=3, fps=10):
    """An H.264 clip whose first frame's timestamp is ``first_pts`` frames after 0 (a cut from a longer clip)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 60 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = first_pts + i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_clip_whose_first_timestamp_is_not_zero_starts_at_zero(tmp_path, suffix):
    """Stored at 0.5, 0.6, 0.7 s: decoded as 0, 0.1, 0.2 s from the first frame."""
    path = _clip(tmp_path / f"cut{suffix}", first_pts=5)
    times = [t for _, chunk_times in iter_timed_chunks(path, 2) for t in chunk_times]
    assert times == [Fraction(0), Fraction(1, 10), Fraction(2, 10)]


def test_frames_come_in_chunks_with_a_last_short_chunk():
    """5 frames in chunks of 2: 2, 2 and the last 1 (no frame left behind)."""
    timed = [(np.full((1, 1, 3), i, np.uint8), Fraction(i, 10)) for i in range(5)]
    chunks = list(video._chunks(timed, 2))
    assert [len(frames) for frames, _ in chunks] == [2, 2, 1]
    assert chunks[-1][1] == [Fraction(4, 10)] and int(chunks[-1][0][0][0, 0, 0]) == 4


def _info(frames=0, duration=None, fps=8):
    return VideoInfo(Fraction(fps), frames, 16, 16, duration, Fraction(1, 1000))


def test_a_clip_missing_its_last_frame_is_cut_short():
    """10 frames stated, 9 decoded: cut short; all 10: whole."""
    with pytest.raises(ValueError, match="ends after 9 of the 10 frames"):
        check_complete(Path("c.mp4"), _info(frames=10), 9, None)
    check_complete(Path("c.mp4"), _info(frames=10), 10, None)


def test_a_clip_may_end_up_to_two_frames_early_but_no_more():
    """8 fps, 10 s stated: a frame shows 1/8 s and two frames' time (0.25 s) is allowed. A last frame
    at 9.625 s is shown until 9.75 s: whole. One at 9.5 s is shown until 9.625 s, 0.375 s (three
    frames) early: cut short, although it is under half a second early."""
    check_complete(Path("c.mp4"), _info(duration=10.0), 78, Fraction(77, 8))
    with pytest.raises(ValueError, match=r"ends at 9\.62 s \(77 frames\) but its container states 10\.00 s"):
        check_complete(Path("c.mp4"), _info(duration=10.0), 77, Fraction(76, 8))


def test_eight_bit_outputs_round_and_clip():
    """0.5 * 255 = 127.5 -> 128; 0.999 * 255 = 254.7 -> 255; 1/255 -> 1; out of range clipped, never wrapped."""
    assert to_uint8(np.array([0.5, 0.999, 1 / 255, 1.5, -0.2], np.float32)).tolist() == [128, 255, 1, 255, 0]


def test_frames_whose_timestamps_round_to_one_output_slot_keep_their_order(tmp_path):
    """Time base 1/25 s: frames at 0, 0.04 and 0.041 s would round to slots 0, 1, 1; the third takes slot 2
    (0.08 s), so the output holds three frames at three times."""
    info = VideoInfo(Fraction(25), 0, 16, 16, None, Fraction(1, 25))
    outputs = VideoOutputs(tmp_path, Path("clip.mp4"), info, ["alpha"])
    for i, t in enumerate((Fraction(0), Fraction(1, 25), Fraction(41, 1000))):
        outputs.write(np.full((16, 16), 100 * i, np.uint8), np.zeros((16, 16, 4), np.uint8), t)
    outputs.close()
    with av.open(str(tmp_path / "clip_alpha.mp4")) as container:
        times = [frame.time for frame in container.decode(container.streams.video[0])]
    assert times == pytest.approx([0.0, 0.04, 0.08])


def test_frames_without_timestamps_take_the_average_rate_slots(tmp_path):
    """No timestamps, 25 fps: frames at 0, 0.04, 0.08 s; the PNG sequence is numbered from 0."""
    info = VideoInfo(Fraction(25), 0, 16, 16, None, None)
    outputs = VideoOutputs(tmp_path, Path("clip.mp4"), info, ["alpha", "png"])
    for i in range(3):
        outputs.write(np.full((16, 16), 100 * i, np.uint8), np.zeros((16, 16, 4), np.uint8))
    outputs.close()
    with av.open(str(tmp_path / "clip_alpha.mp4")) as container:
        times = [frame.time for frame in container.decode(container.streams.video[0])]
    assert times == pytest.approx([0.0, 0.04, 0.08])
    assert sorted(p.name for p in (tmp_path / "clip_frames").iterdir()) == ["clip_000000.png", "clip_000001.png",
                                                                           "clip_000002.png"]


@pytest.mark.parametrize("stated, shown", [(0, 100), (10, 100), (11, 11), (40, 40)])
def test_animation_frames_of_ten_ms_or_less_are_shown_for_100_ms(stated, shown):
    """Browsers show a frame that states 10 ms or less for 100 ms, and longer ones as stated."""
    assert video._shown_ms(stated) == shown


def test_the_alpha_video_of_a_clip_with_an_odd_height_repeats_its_last_row(tmp_path):
    """16 wide, 15 high, alpha 16 x column: the H.264 alpha video is 16 x 16, each column keeps its value
    (a padded column instead would rescale them: 17 columns into 16) and row 15 repeats row 14."""
    info = VideoInfo(Fraction(25), 0, 16, 15, None, None)
    outputs = VideoOutputs(tmp_path, Path("clip.mp4"), info, ["alpha"])
    alpha = np.tile(np.arange(16, dtype=np.uint8) * 16, (15, 1))
    outputs.write(alpha, np.zeros((15, 16, 4), np.uint8))
    outputs.close()
    with av.open(str(tmp_path / "clip_alpha.mp4")) as container:
        (frame,) = [f.to_ndarray(format="gray") for f in container.decode(container.streams.video[0])]
    assert frame.shape == (16, 16)
    assert np.abs(frame.astype(int) - np.tile(np.arange(16) * 16, (16, 1))).max() <= 6


def test_a_new_png_sequence_replaces_the_old_one_whole(tmp_path):
    """A re-run's frames replace the old folder: an old frame past the new clip's end does not stay beside them."""
    old = tmp_path / "clip_frames"
    old.mkdir()
    (old / "clip_000009.png").write_bytes(b"old")
    outputs = VideoOutputs(tmp_path, Path("clip.mp4"), VideoInfo(Fraction(25), 0, 4, 4, None, None), ["png"])
    outputs.write(np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8))
    outputs.close()
    assert sorted(p.name for p in old.iterdir()) == ["clip_000000.png"]


def test_the_job_record_goes_into_the_videos_comment_and_nothing_without_one(tmp_path):
    tags = {"iconmatting": {"weights": "w", "resize_mode": "pad"}}
    for name, given in (("tagged.mp4", tags), ("plain.mp4", None)):
        outputs = VideoOutputs(tmp_path, Path(name), VideoInfo(Fraction(25), 0, 16, 16, None, None), ["alpha"], tags=given)
        outputs.write(np.zeros((16, 16), np.uint8), np.zeros((16, 16, 4), np.uint8))
        outputs.close()
    with av.open(str(tmp_path / "tagged_alpha.mp4")) as tagged, av.open(str(tmp_path / "plain_alpha.mp4")) as plain:
        assert tagged.metadata["comment"] == '{"iconmatting": {"weights": "w", "resize_mode": "pad"}}'
        assert "comment" not in plain.metadata
