"""Fault injection on the command line's job: a full disk, read-only output, kill and resume,
--out inside --targets, link loops, out of GPU memory, Ctrl-C, truncated and re-timed clips,
progress off a terminal. Expected names and counts are written out here, not taken from the code."""
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iconmatting_core import files
from iconmatting_core.__main__ import main
from iconmatting_core.job import outputs
from documented_env import documented_env
from sample_inputs import save_reference_and_targets


def _ref(d):
    return ["--reference", str(d / "ref.png"), "--mask", str(d / "mask.png")]


def _images(folder, names, size=(24, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for n in names:
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / n)


def _files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_disk_full_stops_at_once_removes_partials_and_keeps_the_failures(tmp_path, pipe, monkeypatch, capsys):
    targets = save_reference_and_targets(tmp_path, 0)
    (targets / "a_broken.png").write_bytes(b"not a png")
    _images(targets, [f"t{i}.png" for i in range(5)])
    real, calls = files._write_bytes, []

    def fill_up(path, data, append=False):  # the fourth write finds the disk full, after half its bytes
        calls.append(path.name)
        if len(calls) >= 4:
            with open(path, "ab" if append else "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, append)

    monkeypatch.setattr(files, "_write_bytes", fill_up)
    out = tmp_path / "out"
    assert main(["matte", *_ref(tmp_path), "--targets", str(targets), "--out", str(out)], pipe_factory=lambda: pipe) == 1
    err = capsys.readouterr().err
    assert len(calls) == 5  # t0's pair and its record line, t1's alpha, then failures.jsonl: nothing after the first "no space"
    assert "error: stopped: no space left on the disk writing" in err
    # failures.jsonl could not be written either: the list is printed instead
    assert f'{{"path": "{targets / "a_broken.png"}", "error": ' in err
    assert _files(out) == ["iconmatting-job.jsonl", "t0_alpha.png", "t0_rgba.png"]  # no .partial left

    monkeypatch.setattr(files, "_write_bytes", real)  # space freed: the re-run resumes
    assert main(["matte", *_ref(tmp_path), "--targets", str(targets), "--out", str(out)], pipe_factory=lambda: pipe) == 1
    assert "skipping 1 target(s)" in capsys.readouterr().err
    assert _files(out) == ["failures.jsonl", "iconmatting-job.jsonl"] + [f"t{i}_{k}.png" for i in range(5) for k in ("alpha", "rgba")]
    assert [json.loads(x)["path"] for x in (out / "failures.jsonl").read_text().splitlines()] == [str(targets / "a_broken.png")]


def test_read_only_output_is_found_before_any_model_work(tmp_path, monkeypatch, capsys):
    targets = save_reference_and_targets(tmp_path, 1)

    def no_model():
        raise AssertionError("model loaded")

    out = tmp_path / "ro"
    out.mkdir()
    real_open = outputs.Path.write_bytes

    def read_only(self, data):
        if self.parent == out:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_open(self, data)

    monkeypatch.setattr(outputs.Path, "write_bytes", read_only)
    assert main(["matte", *_ref(tmp_path), "--targets", str(targets), "--out", str(out)], pipe_factory=no_model) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {out} cannot be written (Read-only file system); pick a writable folder\n"


def test_out_inside_targets_is_never_matted_again(tmp_path, pipe, capsys):
    targets = save_reference_and_targets(tmp_path, 2)
    out = targets / "out"
    for _ in range(3):
        assert main(["matte", *_ref(tmp_path), "--targets", str(targets), "--out", str(out)], pipe_factory=lambda: pipe) == 0
    assert _files(out) == ["iconmatting-job.jsonl", "t0_alpha.png", "t0_rgba.png", "t1_alpha.png", "t1_rgba.png"]
    assert "note: left out 5 file(s) under the output folder" in capsys.readouterr().err  # the 4 PNGs and the job record


def test_link_loops_are_skipped_and_reported(tmp_path, pipe, capsys):
    targets = save_reference_and_targets(tmp_path, 1)
    (targets / "loop").symlink_to(targets, target_is_directory=True)  # a folder that holds itself
    (targets / "self.png").symlink_to(targets / "self.png")  # a file link to itself
    out = tmp_path / "out"
    assert main(["matte", *_ref(tmp_path), "--targets", str(targets), "--out", str(out)], pipe_factory=lambda: pipe) == 1
    err = capsys.readouterr().err
    assert f"note: skipped {targets / 'loop'}: a link to {targets}, a folder that holds it; not followed" in err
    assert f"note: skipped {targets / 'self.png'}: a link loop; not followed" in err
    # both listed there (test_target_inputs.py)
    assert _files(out) == ["failures.jsonl", "iconmatting-job.jsonl", "t0_alpha.png", "t0_rgba.png"]


class _Failing:
    """A pipeline whose matte raises ``exc`` (counting calls)."""

    def __init__(self, pipe, exc):
        self.pipe, self.exc, self.calls = pipe, exc, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def matte(self, *a, **k):
        self.calls += 1
        raise self.exc


def test_out_of_gpu_memory_stops_the_job_with_one_line(tmp_path, pipe, capsys):
    import torch

    targets = save_reference_and_targets(tmp_path, 4)
    failing = _Failing(pipe, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert main(["matte", *_ref(tmp_path), "--targets", str(targets), "--out", str(tmp_path / "out")],
                pipe_factory=lambda: failing) == 1
    err = capsys.readouterr().err
    assert failing.calls == 1 and err.count("error:") == 1 and "error: stopped: out of GPU memory" in err
    assert not (tmp_path / "out" / "failures.jsonl").exists()  # no target is blamed


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, pipe, capsys):
    targets = save_reference_and_targets(tmp_path, 2)
    failing = _Failing(pipe, KeyboardInterrupt())
    assert main(["matte", *_ref(tmp_path), "--targets", str(targets), "--out", str(tmp_path / "out")],
                pipe_factory=lambda: failing) == 130
    assert capsys.readouterr().err.endswith("interrupted; re-run the same command to resume (finished outputs are kept)\n")


def test_progress_off_a_terminal_is_plain_lines():
    stream = io.StringIO()
    bar = outputs.Progress(3, "matte", "img", interval=0.0, stream=stream)
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 4
    assert lines[0].startswith("matte: 1/3 (33%), ") and lines[-1].startswith("matte: 3/3 (100%), ")
    quiet = io.StringIO()
    bar = outputs.Progress(100, "matte", "img", interval=3600, stream=quiet)
    for _ in range(100):
        bar.update(1)
    assert quiet.getvalue() == ""  # nothing between intervals; one line at the end
    bar.close()
    assert quiet.getvalue().count("\n") == 1


def test_default_threads_leave_a_core(monkeypatch):
    from iconmatting_core.job import cli_args

    for cores, threads in ((1, 1), (2, 1), (4, 3), (16, 8), (64, 8)):
        monkeypatch.setattr(cli_args, "available_cores", lambda c=cores: c)
        assert cli_args.default_threads() == threads


def test_a_float_image_in_0_255_is_refused():
    from iconmatting_core.preprocess import to_rgb

    with pytest.raises(ValueError, match=r"target image 0 is a float image with values up to 200; float images must be in \[0, 1\]"):
        to_rgb(np.full((4, 4, 3), 200.0, np.float32), "target image 0")
    assert to_rgb(np.full((2, 2, 3), 1.25, np.float32)).tolist() == [[[1.0] * 3] * 2] * 2  # a resampling overshoot


def test_write_file_goes_through_a_partial_name(tmp_path, monkeypatch):
    import hashlib

    seen = []
    real = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (seen.append((Path(a).name, Path(b).name)), real(a, b)))
    files.write_file(tmp_path / "x_alpha.png", b"abc")
    short = f".{hashlib.sha256(b'x_alpha.png').hexdigest()[:16]}.{os.getpid()}.partial"
    assert seen == [(short, "x_alpha.png")] and (tmp_path / "x_alpha.png").read_bytes() == b"abc"

    def broken(a, b):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(files.os, "replace", broken)
    with pytest.raises(OSError):
        files.write_file(tmp_path / "y_alpha.png", b"abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_alpha.png"]  # no half file, no .partial


def _wait_for(predicate, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow  # more than ~20 s on its own
def test_sigkill_then_resume_redoes_nothing(tmp_path, tiny_dir):
    targets = save_reference_and_targets(tmp_path, 0)
    _images(targets, [f"t{i:02d}.png" for i in range(10)], size=(48, 64))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "iconmatting_core", "matte", *_ref(tmp_path), "--targets", str(targets), "--out", str(out),
           "--matting-weights", str(tiny_dir / "head.safetensors"), "--sd", str(tiny_dir / "sd"), "--device", "cpu",
           "--threads", "1"]
    root = Path(__file__).resolve().parents[2]
    job = subprocess.Popen(cmd, cwd=root, env=documented_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait_for(lambda: len(list(out.glob("*_rgba.png"))) >= 2, 240), job.stderr.read1().decode()
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    done = {p.name[: -len("_rgba.png")] for p in out.glob("*_rgba.png")} & {p.name[: -len("_alpha.png")] for p in out.glob("*_alpha.png")}
    for p in out.glob("*.png"):  # every file with a final name is whole
        with Image.open(p) as im:
            im.load()
    again = subprocess.run(cmd, cwd=root, env=documented_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"skipping {len(done)} target(s)" in again.stderr and f"done: {10 - len(done)} matted, 0 failed" in again.stderr
    assert _files(out) == ["iconmatting-job.jsonl"] + [f"t{i:02d}_{k}.png" for i in range(10) for k in ("alpha", "rgba")]
    assert "\r" not in again.stderr  # not a terminal: plain progress lines


def _clip(path, times_ms, size=(48, 64)):
    """An H.264 clip in a Matroska/MP4 container with the given frame times (ms)."""
    import av  # requirements-dev.txt

    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = size[1], size[0], "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for t in times_ms:
            f = av.VideoFrame.from_ndarray((rng.random((*size, 3)) * 255).astype(np.uint8), format="rgb24")
            f.pts, f.time_base = t, Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_a_clip_cut_short_is_a_failure_with_both_numbers(tmp_path, pipe, capsys):
    save_reference_and_targets(tmp_path, 0)
    whole = _clip(tmp_path / "whole.mkv", [40 * i for i in range(50)])
    clips = tmp_path / "clips"
    clips.mkdir()
    data = whole.read_bytes()
    (clips / "cut.mkv").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    for _ in range(2):  # and it is not taken for done on the re-run
        assert main(["matte", *_ref(tmp_path), "--targets", str(clips), "--out", str(out), "--video-out", "alpha"],
                    pipe_factory=lambda: pipe) == 1
        err = capsys.readouterr().err
        assert "cut.mkv: FAILED: ValueError: cut.mkv ends at " in err and "but its container states 2.00 s (cut short?)" in err
    assert _files(out) == ["failures.jsonl"]


def test_variable_frame_rate_keeps_each_frames_time(tmp_path, pipe):
    save_reference_and_targets(tmp_path, 0)
    times = [0, 80, 100, 180, 200, 280, 300, 380]  # 80 ms and 20 ms apart, alternating
    clip = _clip(tmp_path / "vfr.mkv", times)
    out = tmp_path / "out"
    assert main(["matte", *_ref(tmp_path), "--targets", str(clip), "--out", str(out), "--video-out", "alpha,rgba"],
                pipe_factory=lambda: pipe) == 0
    import av

    for name in ("vfr_alpha.mp4", "vfr_rgba.webm"):
        with av.open(str(out / name)) as c:
            got = [round(float(f.pts * f.time_base) * 1000) for f in c.decode(video=0)]
        assert got == times, name


def test_a_clip_without_a_frame_rate_is_refused(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from iconmatting_core import video

    stream = SimpleNamespace(average_rate=None, guessed_rate=None, frames=0, duration=None, time_base=None,
                             codec_context=SimpleNamespace(width=8, height=8))

    class Container:
        streams = SimpleNamespace(video=[stream])
        duration = None

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(video, "import_av", lambda: SimpleNamespace(open=lambda path: Container()))
    with pytest.raises(ValueError, match="states no frame rate; re-mux it with one"):
        video.probe(tmp_path / "x.mkv")


def test_an_sd1_shaped_unet_is_refused(tmp_path, tiny_dir, capsys):
    """An SD 1.x-shaped UNet (one head count, conv projections) loads in diffusers but is not SD 2.x."""
    import shutil

    from diffusers import UNet2DConditionModel

    from tiny_models import tiny_unet_config

    sd1 = tmp_path / "sd1"
    shutil.copytree(tiny_dir / "sd", sd1)
    shutil.rmtree(sd1 / "unet")
    UNet2DConditionModel.from_config({**tiny_unet_config(), "attention_head_dim": 2, "use_linear_projection": False}) \
        .save_pretrained(sd1 / "unet")
    targets = save_reference_and_targets(tmp_path, 1)
    code = main(["matte", *_ref(tmp_path), "--targets", str(targets), "--out", str(tmp_path / "out"),
                 "--matting-weights", str(tiny_dir / "head.safetensors"), "--sd", str(sd1), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"error: --sd {sd1}: not Stable Diffusion 2.x (its UNet is shaped like SD 1.x: attention_head_dim 2" in err


def test_ray_native_log_lines_are_kept_out_of_the_users_output(capfd):
    from iconmatting_core.job.ray_engine import _without_native_log_lines

    with _without_native_log_lines():
        for line in (b"[2026-12-01 20:14:52,184 E 26340 26340] core_worker.cc:2465: Actor with class name\n",
                     b"\x1b[33m(raylet)\x1b[0m Task ActorLocationTracker.get_actor_locations failed.\n",
                     b"matte on Ray (2 workers): 1/3 (33%)\n", b"error: stopped: no space left on the disk\n"):
            os.write(2, line)
    assert capfd.readouterr().err == "matte on Ray (2 workers): 1/3 (33%)\nerror: stopped: no space left on the disk\n"
