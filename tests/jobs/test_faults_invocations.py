"""Bad invocations of the command line: each is exactly one line on stderr, no traceback, and the
right exit status (2: usage, model-file or context-file problem)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iconmatting_core.__main__ import main
from sample_inputs import save_reference_and_targets

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def place(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("bad")
    save_reference_and_targets(d, 2)
    (d / "empty").mkdir()
    (d / "notes").mkdir()
    (d / "notes" / "a.txt").write_text("x")
    (d / "afile").write_text("x")
    (d / "out_holder" / "targets").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "out_holder" / "targets" / "x.png")
    (d / "dup" / "t0").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "dup" / "t0.png")
    (d / "truncated.safetensors").write_bytes((tiny_dir / "head.safetensors").read_bytes()[:500])
    (d / "plain.safetensors").write_bytes((tiny_dir / "head.safetensors").read_bytes())
    return d


def _cases(d, tiny):
    ref = ["--reference", f"{d}/ref.png", "--mask", f"{d}/mask.png"]
    models = ["--matting-weights", f"{tiny}/head.safetensors", "--sd", f"{tiny}/sd", "--device", "cpu"]
    m = ["matte", *ref, "--targets", f"{d}/targets"]
    job = [*m, "--out", f"{d}/o", *models]
    return [
        ([], "the following arguments are required: command"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["matte", *ref, "--out", f"{d}/o"], "the following arguments are required: --targets"),
        ([*job, "--chunk-size", "-1"], "--chunk-size: -1 must be 1 or more"),
        ([*job, "--chunk-size", "0"], "--chunk-size: 0 must be 1 or more"),
        ([*job, "--chunk-size", "many"], "'many' is not a whole number"),
        ([*job, "--engine", "ray", "--workers", "-2"], "--workers: -2 must be 1 or more"),
        ([*job, "--engine", "ray", "--cpus-per-worker", "-1"], "--cpus-per-worker: -1 must be more than 0"),
        ([*job, "--engine", "ray", "--cpus-per-worker", "nan"], "--cpus-per-worker: nan must be more than 0"),
        ([*job, "--threads", "0"], "--threads: 0 must be 1 or more"),
        ([*job, "--threads", "999"], "--threads: 999 is more than the"),  # no machine here has 999 cores
        ([*job, "--engine", "ray", "--cpus-per-worker", "999"], "--cpus-per-worker 999 is more than the"),
        ([*job, "--video-out", "gif"], "--video-out takes a comma list of alpha, rgba, png; got 'gif'"),
        ([*job, "--engine", "spark"], "invalid choice: 'spark'"),
        ([*job, "--dtype", "fp8"], "invalid choice: 'fp8'"),
        ([*job, "--resize-mode", "crop"], "invalid choice: 'crop'"),
        ([*job, "--pooling", "max"], "invalid choice: 'max'"),
        ([*job, "--context", f"{d}/ctx.safetensors"], "give either --context FILE or --reference IMAGE --mask MASK, not both"),
        (["matte", "--targets", f"{d}/targets", "--out", f"{d}/o", *models], "give --context FILE, or --reference IMAGE"),
        (["matte", "--reference", f"{d}/ref.png", "--targets", f"{d}/targets", "--out", f"{d}/o", *models],
         "give --context FILE, or --reference IMAGE with --mask MASK"),
        ([*job, "--address", "auto"], "--address and --workers are for --engine ray"),
        (["matte", *ref, "--targets", f"{d}/nowhere", "--out", f"{d}/o", *models], f"--targets {d}/nowhere: no such file or folder"),
        (["matte", *ref, "--targets", f"{d}/targets/*.jpg", "--out", f"{d}/o", *models], "*.jpg' matches no image or video"),
        (["matte", *ref, "--targets", f"{d}/empty", "--out", f"{d}/o", *models], "empty: no images or videos in this folder"),
        (["matte", *ref, "--targets", f"{d}/notes/*", "--out", f"{d}/o", *models], "matches no image or video (1 other file(s))"),
        (["matte", *ref, "--targets", f"{d}/targets", "--out", f"{d}/afile", *models], f"--out {d}/afile is a file"),
        (["matte", *ref, "--targets", f"{d}/targets", "--out", f"{d}/afile/sub", *models], "cannot be written"),
        (["matte", *ref, "--targets", f"{d}/targets", "--out", "/proc/iconmatting-out", *models], "cannot be written"),
        (["matte", *ref, "--targets", f"{d}/targets", "--out", f"{d}/targets", *models], "is (or holds) the --targets folder"),
        (["matte", *ref, "--targets", f"{d}/out_holder/targets", "--out", f"{d}/out_holder", *models],
         "is (or holds) the --targets folder"),
        (["matte", *ref, "--targets", f"{d}/targets/t0.png", f"{d}/dup/t0.png", "--out", f"{d}/o", *models],
         "would both write outputs named 't0'"),
        ([*job[:-2], "--device", "gpu"], "--device gpu: not a device name"),
        ([*job[:-2], "--device", "cuda"], "--device cuda: this torch build has no usable CUDA device"),
        ([*m, "--out", f"{d}/o", "--matting-weights", f"{d}/missing.safetensors", "--sd", f"{tiny}/sd", "--device", "cpu"],
         "model files missing: IconMatting weights"),
        ([*m, "--out", f"{d}/o", "--matting-weights", f"{d}/empty", "--sd", f"{tiny}/sd", "--device", "cpu"],
         f"--matting-weights {d}/empty is a folder"),
        ([*m, "--out", f"{d}/o", "--matting-weights", f"{d}/ref.png", "--sd", f"{tiny}/sd", "--device", "cpu"],
         f"--matting-weights {d}/ref.png is an image"),
        ([*m, "--out", f"{d}/o", "--matting-weights", f"{d}/truncated.safetensors", "--sd", f"{tiny}/sd", "--device", "cpu"],
         "cannot load the model files"),
        ([*m, "--out", f"{d}/o", "--matting-weights", f"{tiny}/head.safetensors", "--sd", f"{d}/nosd", "--device", "cpu"],
         "Stable Diffusion 2.1"),
        ([*m, "--out", f"{d}/o", "--matting-weights", f"{tiny}/head.safetensors", "--sd", f"{d}/empty", "--device", "cpu"],
         "cannot load the model files"),
        (["matte", "--context", f"{d}/nothing.safetensors", "--targets", f"{d}/targets", "--out", f"{d}/o", *models],
         "context file not found"),
        (["matte", "--context", f"{d}/plain.safetensors", "--targets", f"{d}/targets", "--out", f"{d}/o", *models],
         "is not an IconMatting context file"),
        (["encode", *ref, "--out", f"{d}/empty", *models], f"encode --out {d}/empty is a folder"),
        (["encode", *ref, "--out", "/proc/iconmatting/ctx.safetensors", *models], "cannot be written"),
        (["encode", "--reference", f"{d}/missing.png", "--mask", f"{d}/mask.png", "--out", f"{d}/c.safetensors", *models],
         "reference: cannot read"),
        (["encode", "--reference", f"{d}/ref.png", f"{d}/ref.png", f"{d}/ref.png", "--mask", f"{d}/mask.png",
          f"{d}/mask.png", "--out", f"{d}/c.safetensors", *models], "got 3 reference images but 2 masks"),
        (["encode", "--reference", f"{d}/ref.png", "--mask", f"{d}/targets/t0.png", "--out", f"{d}/c.safetensors",
          *models[:-2], "--device", "cpu"], "reference"),
        (["convert", f"{d}/missing.ckpt", f"{d}/x.safetensors"], "missing.ckpt"),
    ]


def test_bad_invocations_are_one_line_each(place, tiny_dir, capsys):
    cases = _cases(place, tiny_dir)
    assert len(cases) >= 30
    problems = []
    for argv, expected in cases:
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        if code != 2 or err.count("\n") != 1 or not err.startswith("error:") or "Traceback" in err or expected not in err:
            problems.append(f"{argv[:1]} ... -> {code}: {err!r} (expected {expected!r})")
    assert not problems, "\n".join(problems)


def test_a_bad_invocation_in_a_real_process(place, tiny_dir):
    """The same through `python -m iconmatting_core`: one line, no traceback, exit 2."""
    done = subprocess.run([sys.executable, "-m", "iconmatting_core", "matte", "--reference", str(place / "ref.png"),
                           "--mask", str(place / "mask.png"), "--targets", str(place / "targets"), "--out", str(place / "o"),
                           "--chunk-size", "-3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
