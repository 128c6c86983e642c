"""`matte --engine ray` end to end on a real local Ray (2 CPUs, one session for the module): actors
build the tiny pipeline from its files, clips are matted by the workers, failures are recorded with
their error type, re-runs resume, a worker's setup error comes back through its ready() handshake."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from iconmatting_core.__main__ import main
from iconmatting_core.job.clips import output_paths as video_output_paths
from iconmatting_core.video import read_rgba_frames
from documented_env import HIDDEN, documented_env
from sample_inputs import FPS, save_reference_and_targets, write_clip

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a local Ray cluster: ~20-90 s per test


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module. Its processes (the workers that build the pipeline in their actors) start in
    the documented command-line environment (tests/support/documented_env.py), as a user's workers do."""
    env = documented_env()
    with pytest.MonkeyPatch.context() as patch:  # only while Ray starts: its processes take this environment
        for key in ("PYTHONPATH", "ICONMATTING_HIDDEN_PACKAGES"):
            patch.setenv(key, env[key])
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_workers_run_without_the_hidden_packages():
    @ray.remote(num_cpus=0)
    def imported():
        import sys

        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  what a worker builds the pipeline of

        return sorted(name for name in HIDDEN if sys.modules.get(name) is not None)

    assert ray.get(imported.remote()) == []


def output_paths(out, target):
    """The expected (alpha, rgba) files of an image target given by itself (named by its stem)."""
    return out / f"{target.stem}_alpha.png", out / f"{target.stem}_rgba.png"


def _inputs(tmp_path):
    images = save_reference_and_targets(tmp_path, 3, "images")
    (images / "broken.png").write_bytes(b"not a png")
    manifest = tmp_path / "targets.txt"  # one path per line, relative to the manifest
    manifest.write_text("# targets\nimages/t0.png\nimages/broken.png\n\nimages/t1.png\nimages/t2.png\n")
    return manifest


def test_ray_engine_images_and_video_with_failures_and_resume(pipe, tiny_dir, tmp_path, capsys):
    manifest = _inputs(tmp_path)
    clip = write_clip(tmp_path / "clip.mp4", frames=5)
    out = tmp_path / "out"
    models = ["--matting-weights", str(tiny_dir / "head.safetensors"), "--sd", str(tiny_dir / "sd"), "--device", "cpu"]
    ref = ["--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png")]
    args = ["matte", "--targets", str(manifest), str(clip), "--out", str(out), "--engine", "ray", "--workers", "2",
            "--chunk-size", "2", *models]
    assert main([*args, *ref]) == 1
    err = capsys.readouterr().err
    assert "broken.png: FAILED" in err and "4 matted, 1 failed" in err
    assert "matted by the local engine" not in err
    (clip_pid,) = re.findall(r"^clip\.mp4: ok, 5 frames \(Ray worker pid (\d+), actor \w+\)$", err, re.MULTILINE)
    assert int(clip_pid) != os.getpid()  # a worker matted the clip, not the driver
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["path"] for f in failures] == [str(tmp_path / "images" / "broken.png")]
    assert "cannot identify image" in failures[0]["error"]
    assert failures[0]["error_type"] == "ImageReadError"  # the row's type, not only its text

    # the same mattes as the local engine (up to float rounding across thread counts)
    local = tmp_path / "local"
    assert main(["matte", *ref, "--targets", str(tmp_path / "images" / "t*.png"), "--out", str(local)],
                pipe_factory=lambda: pipe) == 0
    for i in range(3):
        target = tmp_path / "images" / f"t{i}.png"
        for a, b in zip(output_paths(out, target), output_paths(local, target)):
            with Image.open(a) as x, Image.open(b) as y:
                assert x.mode == y.mode and np.abs(np.asarray(x, int) - np.asarray(y, int)).max() <= 1
    with Image.open(output_paths(out, tmp_path / "images" / "t0.png")[0]) as im:  # the driver wrote its record
        made = json.loads(im.text["iconmatting"])
    assert made["source"]["sha256"] == __import__("hashlib").sha256((tmp_path / "images" / "t0.png").read_bytes()).hexdigest()
    paths = video_output_paths(out, clip, ["alpha", "rgba"])
    fps, rgbas = read_rgba_frames(paths["rgba"])
    assert fps == FPS and len(rgbas) == 5 and rgbas[0].shape == (48, 64, 4)
    with __import__("av").open(str(paths["alpha"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5

    # resume, with the context from a file of the same reference (`encode` stores its recipe: the outputs match; the
    # driver loads no model; the actors check the file against theirs)
    ctx = tmp_path / "ctx.safetensors"
    assert main(["encode", *ref, "--out", str(ctx), *models]) == 0
    t0 = output_paths(out, tmp_path / "images" / "t0.png")[0]
    stamp = t0.stat().st_mtime_ns
    redo = output_paths(out, tmp_path / "images" / "t1.png")[1]
    redo.unlink()
    (tmp_path / "images" / "broken.png").unlink()
    manifest.write_text(manifest.read_text().replace("images/broken.png\n", ""))
    assert main([*args, "--context", str(ctx), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "skipping 3 target(s)" in err and "1 matted, 0 failed" in err
    assert redo.exists() and t0.stat().st_mtime_ns == stamp and not (out / "failures.jsonl").exists()


def test_worker_with_other_weights_than_the_context_is_a_clear_error(tiny_dir, tmp_path, capsys):
    from tiny_models import save_tiny_head

    save_reference_and_targets(tmp_path, 1)
    other = save_tiny_head(tmp_path / "other.safetensors", seed=1)
    ctx = tmp_path / "ctx.safetensors"
    sd = ["--sd", str(tiny_dir / "sd"), "--device", "cpu"]
    assert main(["encode", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"), "--out", str(ctx),
                 "--matting-weights", str(tiny_dir / "head.safetensors"), *sd]) == 0
    out = tmp_path / "out"
    code = main(["matte", "--context", str(ctx), "--targets", str(tmp_path / "targets"), "--out", str(out),
                 "--engine", "ray", "--workers", "1", "--matting-weights", str(other), *sd])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {ctx} was encoded with other model weights" in err and "than the ones a Ray worker loaded" in err
    assert "Load the IconMatting and Stable Diffusion 2.1 weights it was made with" in err
    assert "Traceback" not in err.split("error:")[-1]
    assert not list(out.glob("*.png"))


def test_a_folder_tree_on_ray_is_mirrored(pipe, tmp_path, capsys):
    images = save_reference_and_targets(tmp_path, 2, "tree")
    (images / "b").mkdir()
    (images / "b" / "t0.png").write_bytes((images / "t1.png").read_bytes())
    out = tmp_path / "out"
    assert main(["matte", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"), "--targets",
                 str(images), "--out", str(out), "--engine", "ray", "--workers", "1"], pipe_factory=lambda: pipe) == 0
    assert "3 matted, 0 failed" in capsys.readouterr().err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*_alpha.png")) == [
        "b/t0_alpha.png", "t0_alpha.png", "t1_alpha.png"]
    with Image.open(out / "b" / "t0_alpha.png") as b, Image.open(out / "t1_alpha.png") as t1:
        assert np.array_equal(np.asarray(b), np.asarray(t1))  # b/t0 is a copy of t1


def test_a_job_that_breaks_mid_run_lists_the_unfinished_targets(pipe, tmp_path, monkeypatch, capsys):
    from iconmatting_core.job.record import JobRecord

    images = save_reference_and_targets(tmp_path, 3)
    real_write = JobRecord.write_images

    def write_then_break(self, target, alpha, rgba):  # the driver loses the job after the first image
        real_write(self, target, alpha, rgba)
        raise ray.exceptions.RayActorError()

    monkeypatch.setattr(JobRecord, "write_images", write_then_break)
    out = tmp_path / "out"
    assert main(["matte", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"), "--targets",
                 str(images), "--out", str(out), "--engine", "ray", "--workers", "1"], pipe_factory=lambda: pipe) == 1
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["path"] for f in failures] == [str(images / f"t{i}.png") for i in range(3)]
    assert all("the Ray job stopped: RayActorError" in f["error"] for f in failures)


def test_no_ray_process_outlives_a_sigkilled_driver(tmp_path):
    """A local Ray started by the job (through its reaper) leaves nothing behind when the driver is SIGKILLed.
    Also what such a start runs with ``include_dashboard=False`` (the README says which processes)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil  # requirements-dev.txt
    code = ("import logging, time, ray, psutil\n"
            "from iconmatting_core.job.ray_engine import _start_reaper\n"
            "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)\n"
            "time.sleep(2)\n"
            "r = _start_reaper()\n"
            "print(' '.join(f'{p.pid}:' + ' '.join(p.cmdline()).replace(' ', '_')[:300]\n"
            "               for p in psutil.Process().children(recursive=True) if p.pid != r.pid), flush=True)\n"
            "time.sleep(300)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        procs = dict(p.split(":", 1) for p in driver.stdout.readline().split())
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    pids = [int(p) for p in procs]
    started = {kind for kind in ("gcs_server", "raylet/raylet", "dashboard/dashboard.py", "ray::DashboardAgent",
                                 "ray::RuntimeEnvAgent", "_private/log_monitor.py", "autoscaler/_private/monitor.py")
               if any(kind in cmd for cmd in procs.values())}
    assert len(started) == 7, procs  # the dashboard's head and agents too, not only the GCS, raylet and workers
    end = time.monotonic() + 30
    while time.monotonic() < end and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids):
        time.sleep(0.5)
    left = [psutil.Process(p).name() for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not left


def _clip_inputs(tmp_path, n=2):
    save_reference_and_targets(tmp_path, 0)
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(n):
        write_clip(clips / f"c{i}.mp4", frames=4 + i)
    return ["--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png")], clips


def test_clips_are_matted_by_the_workers_with_their_records_and_typed_failures(pipe, tmp_path, capsys):
    from iconmatting_core.job.record import RECORD_FILE, read_embedded

    ref, clips = _clip_inputs(tmp_path)
    (clips / "bad.mp4").write_bytes(b"not a video at all")
    out = tmp_path / "out"
    assert main(["matte", *ref, "--targets", str(clips), "--out", str(out), "--engine", "ray", "--workers", "2",
                 "--chunk-size", "2", "--video-out", "alpha,png"], pipe_factory=lambda: pipe) == 1
    err = capsys.readouterr().err
    assert "2 matted, 1 failed" in err
    done = dict(re.findall(r"^(c\d)\.mp4: ok, \d frames \(Ray worker pid (\d+), actor \w+\)$", err, re.MULTILINE))
    assert sorted(done) == ["c0", "c1"] and str(os.getpid()) not in done.values()
    (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["path"] == str(clips / "bad.mp4") and failure["error"].startswith(failure["error_type"] + ": ")
    assert failure["error_type"] not in ("", None, "JobStopped")
    # every output carries the driver's record of its clip, and the job record indexes it
    lines = [json.loads(line) for line in (out / RECORD_FILE).read_text().splitlines()]
    for i, frames in ((0, 4), (1, 5)):
        sha = __import__("hashlib").sha256((clips / f"c{i}.mp4").read_bytes()).hexdigest()
        outputs = video_output_paths(out, clips / f"c{i}.mp4", ["alpha", "png"])
        assert len(list(outputs["png"].glob("*.png"))) == frames
        for path in outputs.values():
            assert read_embedded(path)["source"]["sha256"] == sha
        (line,) = [x for x in lines if f"c{i}_alpha.mp4" in x["files"]]
        assert line["source"]["sha256"] == sha and set(line["files"]) == {f"c{i}_alpha.mp4", f"c{i}_frames"}
    assert not [p for p in out.rglob("*") if ".partial" in p.name]


def test_a_clip_cut_off_by_a_kill_is_redone_and_the_finished_one_kept(pipe, tmp_path, monkeypatch, capsys):
    from iconmatting_core.job.record import JobRecord

    ref, clips = _clip_inputs(tmp_path)
    out = tmp_path / "out"
    args = ["matte", *ref, "--targets", str(clips), "--out", str(out), "--engine", "ray", "--workers", "1"]
    real_complete = JobRecord.complete

    def complete_then_interrupt(self, record, paths):  # Ctrl-C once the first clip is recorded (the second is queued)
        real_complete(self, record, paths)
        raise KeyboardInterrupt

    monkeypatch.setattr(JobRecord, "complete", complete_then_interrupt)
    assert main(args, pipe_factory=lambda: pipe) == 130
    monkeypatch.setattr(JobRecord, "complete", real_complete)
    kept = [p for p in out.iterdir() if p.name.endswith((".mp4", ".webm"))]
    assert len(kept) == 2  # the first clip's two outputs; nothing of the second under a final name
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    capsys.readouterr()
    assert main(args, pipe_factory=lambda: pipe) == 0
    err = capsys.readouterr().err
    assert "skipping 1 target(s)" in err and "1 matted, 0 failed" in err
    (pid,) = re.findall(r"^c\d\.mp4: ok, \d frames \(Ray worker pid (\d+), actor \w+\)$", err, re.MULTILINE)
    assert int(pid) != os.getpid()  # resumed on a worker
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    for i in range(2):
        for path in video_output_paths(out, clips / f"c{i}.mp4", ["alpha", "rgba"]).values():
            assert path.exists()
    assert not [p for p in out.rglob("*") if ".partial" in p.name]


def test_a_worker_setup_error_comes_back_from_ready_typed(pipe, tmp_path, capsys):
    from iconmatting_core.job.model_files import ModelFileError
    from iconmatting_core.job.ray_engine import Worker

    def no_weights():
        raise ModelFileError("no IconMatting weights in /models/iconmatting;\n  put head.safetensors there")

    actor = ray.remote(Worker).options(num_cpus=0).remote(no_weights, None, None, None, "pad", True, 4, 1)
    row = ray.get(actor.ready.remote())
    ray.kill(actor)
    assert row["error_type"] == "ModelFileError"
    assert row["error"] == "no IconMatting weights in /models/iconmatting; put head.safetensors there"

    def driver_only():
        """The pipeline in the driver (which encodes the reference); none in a Ray actor, whose model
        files are missing (the message has a line break, as a remote traceback's text would)."""
        if ray.get_runtime_context().get_actor_id() is not None:
            raise ModelFileError("no IconMatting weights on this node;\n put head.safetensors there")
        return pipe

    save_reference_and_targets(tmp_path, 1)
    out = tmp_path / "out"
    code = main(["matte", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
                 "--targets", str(tmp_path / "targets"), "--out", str(out), "--engine", "ray", "--workers", "1"],
                pipe_factory=driver_only)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines()[-1] == "error: no IconMatting weights on this node; put head.safetensors there"
    assert not list(out.glob("*.png")) and not (out / "failures.jsonl").exists()
