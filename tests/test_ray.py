"""`matte --engine ray` end to end on a real local Ray (2 CPUs): actors build the tiny pipeline
from its files, failures are recorded, re-runs resume."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import save_reference_and_targets
from iconmatting_core.__main__ import main, output_paths
from iconmatting_core.video import output_paths as video_output_paths
from iconmatting_core.video import read_rgba_frames
from test_video import FPS, write_clip

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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
    paths = video_output_paths(out, clip, ["alpha", "rgba"])
    fps, rgbas = read_rgba_frames(paths["rgba"])
    assert fps == FPS and len(rgbas) == 5 and rgbas[0].shape == (48, 64, 4)
    with __import__("av").open(str(paths["alpha"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5

    # resume, with the context from a file (the driver loads no model; the actors check its fingerprint)
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
