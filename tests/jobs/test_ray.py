"""`matte --engine ray` end to end on a real local Ray (2 CPUs): actors build the tiny pipeline
from its files, failures are recorded, re-runs resume."""
import json

import numpy as np
import pytest
from PIL import Image

from iconmatting_core.__main__ import main
from iconmatting_core.job.clips import output_paths as video_output_paths
from iconmatting_core.video import read_rgba_frames
from sample_inputs import FPS, save_reference_and_targets, write_clip

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a local Ray cluster: ~20-90 s per test


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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
    assert "note: 1 clip(s) are matted by the local engine on this machine" in err
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["path"] for f in failures] == [str(tmp_path / "images" / "broken.png")]
    assert "cannot identify image" in failures[0]["error"]

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


def test_read_stage_applies_exif_orientation(tmp_path):
    from iconmatting_core.job.ray_engine import read_targets

    wide = np.zeros((20, 30, 3), np.uint8)
    wide[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(wide).save(tmp_path / "rotated.png", exif=exif)
    (row,) = read_targets({"target": np.array([str(tmp_path / "rotated.png")], dtype=object)})
    assert row["error"][0] == "" and np.array_equal(row["frame"][0], np.rot90(wide, -1))


def test_no_ray_process_outlives_a_sigkilled_driver(tmp_path):
    """A local Ray started by the job (through its reaper) leaves nothing behind when the driver is SIGKILLed."""
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
            "print(' '.join(str(p.pid) for p in psutil.Process().children(recursive=True) if p.pid != r.pid), flush=True)\n"
            "time.sleep(300)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert len(pids) >= 3  # GCS, raylet, agents, workers
    end = time.monotonic() + 30
    while time.monotonic() < end and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids):
        time.sleep(0.5)
    left = [psutil.Process(p).name() for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not left
