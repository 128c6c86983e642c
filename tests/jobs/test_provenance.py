"""`matte` knows what made its outputs: resume skips only outputs of the same source and recipe,
other outputs stop the job before any matting (one line, exit 2) until --overwrite redoes exactly
those, one job at a time per --out, and a context is checked in full (format, magnitudes, seed, model
configuration) before anything is decided. Expected texts, names and hashes are written out here."""
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from iconmatting_core.__main__ import main
from sample_inputs import save_reference_and_targets

JOB_RECORD = "iconmatting-job.jsonl"


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _stamps(out):
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _other_weights(pipe, seed=7):
    """The same SD with another head: other weights, another fingerprint."""
    from iconmatting_core.pipeline import IconMattingModel, IconMattingPipeline
    from tiny_models import tiny_head

    return IconMattingPipeline(IconMattingModel(pipe.model.extractor, tiny_head(pipe.config, seed=seed)))


@pytest.fixture()
def job(tmp_path, pipe):
    targets = save_reference_and_targets(tmp_path, 3)
    out = tmp_path / "out"

    def run(*extra, factory=None, reference=True):
        ref = ["--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png")] if reference else []
        return main(["matte", *ref, "--targets", str(targets), "--out", str(out), *extra],
                    pipe_factory=factory or (lambda: pipe))

    run.targets, run.out, run.dir = targets, out, tmp_path
    return run


def test_a_changed_mask_stops_the_job_until_overwrite_redoes_the_outputs(job, capsys):
    assert job() == 0
    first = _stamps(job.out)
    assert job() == 0
    assert "skipping 3 target(s) with existing outputs made the same way" in capsys.readouterr().err
    assert _stamps(job.out) == first

    mask = np.zeros((100, 150), np.uint8)  # a corrected mask: another region
    mask[10:60, 10:90] = 255
    Image.fromarray(mask).save(job.dir / "mask.png")
    assert job() == 2
    err = capsys.readouterr().err
    assert _one_error_line(err) == (
        f"error: 3 target(s) have outputs in {job.out} made differently (mask: 3); nothing was matted. "
        "Add --overwrite to redo exactly those 3, or pick another --out")
    assert _stamps(job.out) == first  # nothing was touched
    assert job("--overwrite") == 0
    assert "3 matted, 0 failed" in capsys.readouterr().err
    with Image.open(job.out / "t0_alpha.png") as im:
        assert json.loads(im.text["iconmatting"])["recipe"]["reference"]["masks"] == [_sha(job.dir / "mask.png")]
    assert job() == 0 and "skipping 3 target(s)" in capsys.readouterr().err


def test_other_weights_stop_the_job_and_overwrite_redoes_only_what_differs(job, pipe, capsys):
    assert job() == 0
    other = _other_weights(pipe)
    assert job(factory=lambda: other) == 2
    assert "made differently (weights: 3)" in _one_error_line(capsys.readouterr().err)

    # one target's file changes: only that one is made differently, and only it is redone
    before = _stamps(job.out)
    Image.fromarray(np.full((90, 60, 3), 200, np.uint8)).save(job.targets / "t1.png")
    assert job() == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "1 target(s) have outputs" in line and "(source: 1)" in line
    assert job("--overwrite") == 0
    err = capsys.readouterr().err
    assert "skipping 2 target(s)" in err and "overwriting the outputs of 1 target(s) made differently" in err
    assert "1 matted, 0 failed" in err
    after = _stamps(job.out)
    assert {n for n in after if after[n] != before[n]} == {"t1_alpha.png", "t1_rgba.png"}


def test_a_changed_source_is_named_in_the_refusal(job, capsys):
    assert job() == 0
    Image.fromarray(np.full((90, 60, 3), 200, np.uint8)).save(job.targets / "t1.png")
    assert job() == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == (f"error: 1 target(s) have outputs in {job.out} made differently (source: 1); nothing was matted. "
                    "Add --overwrite to redo exactly those 1 (the other 2 are kept), or pick another --out")


def test_changed_target_roots_never_keep_another_files_matte(tmp_path, pipe, capsys):
    """`--targets photos/a` then `--targets photos`: out/x_alpha.png is photos/a/x.png's matte, not photos/x.png's."""
    from sample_inputs import make_reference

    image, mask = make_reference()
    Image.fromarray((image.numpy() * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    rng = np.random.default_rng(4)
    for rel in ("x.png", "a/x.png"):
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(photos / rel)
    out = tmp_path / "out"
    ref = ["--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png")]
    assert main(["matte", *ref, "--targets", str(photos / "a"), "--out", str(out)], pipe_factory=lambda: pipe) == 0
    capsys.readouterr()
    assert main(["matte", *ref, "--targets", str(photos), "--out", str(out)], pipe_factory=lambda: pipe) == 2
    assert "1 target(s) have outputs" in _one_error_line(capsys.readouterr().err)
    assert main(["matte", *ref, "--targets", str(photos), "--out", str(out), "--overwrite"], pipe_factory=lambda: pipe) == 0
    assert "2 matted, 0 failed" in capsys.readouterr().err  # x redone from photos/x.png, a/x new
    for name, src in (("x", photos / "x.png"), ("a/x", photos / "a" / "x.png")):
        with Image.open(out / f"{name}_alpha.png") as im:
            assert json.loads(im.text["iconmatting"])["source"]["sha256"] == _sha(src)


def test_a_matte_on_disk_says_what_made_it(job, pipe, capsys):
    from iconmatting_core.context_file import fingerprint_label

    assert job("--resize-mode", "stretch", "--no-foreground") == 0
    target = job.targets / "t2.png"
    expected_source = {"path": str(target.resolve()), "size": target.stat().st_size, "mtime_ns": target.stat().st_mtime_ns,
                       "sha256": _sha(target)}
    expected_recipe = {"reference": {"images": [_sha(job.dir / "ref.png")], "masks": [_sha(job.dir / "mask.png")],
                                     "pooling": "mask", "seed": 0, "resize_mode": "stretch"},
                       "weights": fingerprint_label(pipe.fingerprint), "resize_mode": "stretch", "dtype": "auto",
                       "image_size": 128, "foreground": False}
    for name in ("t2_alpha.png", "t2_rgba.png"):
        with Image.open(job.out / name) as im:  # Pillow reads the text chunk back
            made = json.loads(im.text["iconmatting"])
        assert made["source"] == expected_source and made["recipe"] == expected_recipe
    lines = [json.loads(x) for x in (job.out / JOB_RECORD).read_text().splitlines()]
    (line,) = [x for x in lines if "t2_alpha.png" in x["files"]]
    assert sorted(line["files"]) == ["t2_alpha.png", "t2_rgba.png"] and line["source"] == expected_source


def test_a_clip_says_what_made_it(tmp_path, pipe):
    av = pytest.importorskip("av")
    from sample_inputs import write_clip

    save_reference_and_targets(tmp_path, 0)
    clip = write_clip(tmp_path / "clip.mp4", frames=2)
    out = tmp_path / "out"
    assert main(["matte", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
                 "--targets", str(clip), "--out", str(out), "--video-out", "alpha,rgba,png"], pipe_factory=lambda: pipe) == 0
    for name in ("clip_alpha.mp4", "clip_rgba.webm"):
        with av.open(str(out / name)) as c:
            comment = {k.lower(): v for k, v in c.metadata.items()}["comment"]
        assert json.loads(json.loads(comment)["iconmatting"])["source"]["sha256"] == _sha(clip)
    with Image.open(out / "clip_frames" / "clip_000001.png") as im:
        assert json.loads(im.text["iconmatting"])["source"]["sha256"] == _sha(clip)
    (line,) = [json.loads(x) for x in (out / JOB_RECORD).read_text().splitlines()]
    assert sorted(line["files"]) == ["clip_alpha.mp4", "clip_frames", "clip_rgba.webm"]


def test_outputs_of_an_older_version_are_made_differently(job, capsys):
    assert job() == 0
    (job.out / JOB_RECORD).unlink()
    for p in job.out.glob("*.png"):  # as an older version wrote them: no text chunk
        with Image.open(p) as im:
            pixels = im.copy()
        pixels.save(p)
    assert job() == 2
    assert "made differently (no record (written by an older version?): 3)" in _one_error_line(capsys.readouterr().err)
    assert job("--overwrite") == 0 and "3 matted" in capsys.readouterr().err


def test_an_output_is_recorded_only_once_its_files_are_written(job, monkeypatch, capsys):
    """A target whose write fails leaves no line in the job record (the record follows the files)."""
    import errno

    from iconmatting_core import files

    real = files._write_bytes

    def broken_t1(path, data, append=False):
        if not append and files.partial_path(job.out / "t1_rgba.png") == path:
            raise OSError(errno.EIO, "Input/output error", str(path))
        real(path, data, append)

    monkeypatch.setattr(files, "_write_bytes", broken_t1)
    assert job() == 1
    assert "t1.png: FAILED: OSError: [Errno 5] Input/output error" in capsys.readouterr().err
    lines = [json.loads(x) for x in (job.out / JOB_RECORD).read_text().splitlines()]
    assert sorted(f for x in lines for f in x["files"]) == ["t0_alpha.png", "t0_rgba.png", "t2_alpha.png", "t2_rgba.png"]
    for x in lines:
        for name, stamp in x["files"].items():
            assert [(job.out / name).stat().st_size, (job.out / name).stat().st_mtime_ns] == stamp
    monkeypatch.setattr(files, "_write_bytes", real)
    assert job() == 0 and "skipping 2 target(s)" in capsys.readouterr().err  # t1's lone alpha: the same recipe, redone


class _Blocking:
    """A pipeline whose first matte waits until released (a job caught mid-run)."""

    def __init__(self, pipe):
        self.pipe, self.started, self.release = pipe, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def matte(self, *a, **k):
        self.started.set()
        assert self.release.wait(120)
        return self.pipe.matte(*a, **k)


def test_a_second_job_on_a_busy_out_is_refused(job, pipe, capsys):
    blocking = _Blocking(pipe)
    codes = []
    first = threading.Thread(target=lambda: codes.append(job(factory=lambda: blocking)))
    first.start()
    try:
        assert blocking.started.wait(120)  # the first job is matting
        assert job() == 2
        err = capsys.readouterr().err
        assert _one_error_line(err) == (f"error: --out {job.out} is in use by another iconmatting job (pid {os.getpid()}); "
                                        "wait for it to finish, or pick another --out")
    finally:
        blocking.release.set()
        first.join(120)
    assert codes == [0]
    assert job() == 0 and "skipping 3 target(s)" in capsys.readouterr().err  # released when the first job ended


def _context(tmp_path, pipe):
    """A context file from `encode` of the job's reference (the same tiny weights); returns (path, header, tokens)."""
    path = tmp_path / "ctx.safetensors"
    assert main(["encode", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
                 "--out", str(path)], pipe_factory=lambda: pipe) == 0
    with safe_open(str(path), framework="pt") as f:
        return path, json.loads(f.metadata()["iconmatting_context"]), f.get_tensor("tokens")


def _rewrite(path, header, tokens):
    save_file({"tokens": tokens}, str(path), metadata={"iconmatting_context": json.dumps(header)})
    return path


def _matte_context(job, ctx, *extra, factory=None):
    return job("--context", str(ctx), *extra, reference=False, factory=factory)


def test_a_relabelled_format_1_context_is_refused_unless_trusted(job, pipe, capsys):
    from iconmatting_core.context_file import tensor_sha256

    path, header, tokens = _context(job.dir, pipe)
    tampered = tokens.clone()
    tampered[0] += 1.0  # another matte, and a checksum that no longer fits
    assert header["tensor_sha256"]["tokens"] != tensor_sha256(tampered)
    bad = _rewrite(job.dir / "relabelled.safetensors", {**header, "format_version": 1}, tampered)
    assert _matte_context(job, bad) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: {bad} is a context file of format 1, which carries no checksums: damage or tampering cannot be detected. "
        "Encode the reference again (or, if you trust this file, `matte --trust-unverified-context` uses it anyway).")
    assert not list(job.out.glob("*.png"))
    assert _matte_context(job, bad, "--trust-unverified-context") == 0  # the user's explicit word
    assert "3 matted" in capsys.readouterr().err


def test_huge_tokens_are_refused_up_front_as_a_bad_context(job, pipe, capsys):
    from iconmatting_core.context_file import tensor_sha256

    path, header, tokens = _context(job.dir, pipe)
    huge = tokens / tokens.abs().max() * 1e30
    header["tensor_sha256"]["tokens"] = tensor_sha256(huge)  # consistent: a buggy writer, not a flipped bit
    bad = _rewrite(job.dir / "huge.safetensors", header, huge)
    assert _matte_context(job, bad) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {bad}: tokens hold values up to 1e+30; the head's token normalisation overflows above ")
    assert "weights" not in line and not list(job.out.glob("*.png"))

    # just under the bound, matching stays finite (the bound is not stricter than it needs to be)
    from iconmatting_core.matching import max_token_magnitude

    bound = max_token_magnitude(tokens.shape[1])
    assert bound == pytest.approx((3.4028234663852886e38 / (4 * 64)) ** 0.5)
    large = tokens / tokens.abs().max() * (0.99 * bound)
    header["tensor_sha256"]["tokens"] = tensor_sha256(large)
    ok = _rewrite(job.dir / "large.safetensors", header, large)
    assert _matte_context(job, ok) == 0, capsys.readouterr().err


def test_a_context_that_cannot_be_matted_is_refused_before_any_target(job, pipe, capsys):
    path, header, tokens = _context(job.dir, pipe)
    cases = [
        ("seed", {"seed": 2**70}, f"seed is {2**70}, outside the noise generator's range [-4611686018427387904, "
                                  "9223372036854775807]"),
        ("size", {"config": {**header["fields"]["config"], "image_size": 192}},
         "was encoded for another model configuration than the weights loaded now (image_size 192 instead of 128); "
         "encode the reference again with these weights."),
    ]
    problems = []
    for name, fields, expected in cases:
        bad = _rewrite(job.dir / f"{name}.safetensors", {**header, "fields": {**header["fields"], **fields}}, tokens)
        code, err = _matte_context(job, bad), capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        if code != 2 or len(lines) != 1 or not lines[0].startswith(f"error: {bad}") or expected not in lines[0] \
                or list(job.out.glob("*.png")):
            problems.append(f"{name}: exit {code}: {err!r}")
    assert not problems, "\n".join(problems)


def test_a_folder_as_context_is_named_as_a_folder(job, capsys):
    (job.dir / "contexts").mkdir()
    assert _matte_context(job, job.dir / "contexts") == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: {job.dir / 'contexts'} is a folder; give the context file itself (a .safetensors file made by `encode`).")


def test_a_damaged_context_is_an_error_even_when_every_output_exists(job, pipe, capsys):
    path, header, tokens = _context(job.dir, pipe)
    assert _matte_context(job, path) == 0

    def no_model():
        raise AssertionError("model loaded")

    assert _matte_context(job, path, factory=no_model) == 0  # all done: a --context job loads no model
    assert "skipping 3 target(s)" in capsys.readouterr().err
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one bit of the tokens
    path.write_bytes(bytes(data))
    assert _matte_context(job, path, factory=no_model) == 2
    assert "tensor 'tokens' does not match its checksum" in _one_error_line(capsys.readouterr().err)


def test_encode_and_reference_files_make_the_same_recipe(job, pipe, capsys):
    """`matte --reference/--mask`, then the same reference as a context file from `encode`: nothing to redo."""
    assert job() == 0
    path, header, tokens = _context(job.dir, pipe)
    assert header["extra"]["reference"]["masks"] == [_sha(job.dir / "mask.png")]
    assert _matte_context(job, path) == 0 and "skipping 3 target(s)" in capsys.readouterr().err
    # a context without the reference's recipe (e.g. saved by ComfyUI): known by its tokens, so not the same
    bare = {**header, "extra": {"resize_mode": "pad"}}
    assert _matte_context(job, _rewrite(job.dir / "bare.safetensors", bare, tokens)) == 2
    assert "(reference (a context file vs reference images): 3)" in _one_error_line(capsys.readouterr().err)


def test_a_250_byte_output_name_is_written(tmp_path, pipe):
    av = pytest.importorskip("av")  # noqa: F841 - the clip's outputs need PyAV
    from sample_inputs import write_clip

    targets = save_reference_and_targets(tmp_path, 1)
    stem = "x" * 240  # <stem>_alpha.png and <stem>_alpha.mp4 are 250 bytes
    (targets / "t0.png").rename(targets / f"{stem}.png")
    write_clip(targets / f"{stem}.mp4", frames=1)
    out = tmp_path / "out"
    assert main(["matte", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
                 "--targets", str(targets), "--out", str(out)], pipe_factory=lambda: pipe) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([JOB_RECORD, f"{stem}_alpha.png", f"{stem}_rgba.png", f"{stem}_alpha.mp4", f"{stem}_rgba.webm"])
    assert len(f"{stem}_alpha.png".encode()) == 250


def test_seeds_the_noise_generator_cannot_take_are_usage_errors(job, capsys):
    with pytest.raises(SystemExit) as code:
        job("--seed", str(2**70))
    assert code.value.code == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: python -m iconmatting_core matte: argument --seed: {2**70} is outside the noise generator's range "
        "[-4611686018427387904, 9223372036854775807] (see --help)")
    for seed in (-(2**62), 2**63 - 1):  # the ends of the range seed both noise streams
        for stream in (0, 1):
            torch.Generator().manual_seed(2 * seed + stream)


def test_a_full_disk_while_recording_stops_the_job_and_the_outputs_still_count(job, monkeypatch, capsys):
    """The disk fills up between a target's PNGs and its line in the job record: one line, and the
    re-run takes the PNGs' own records (half a line is dropped)."""
    import errno

    from iconmatting_core import files

    real = files._write_bytes

    def full_at_the_record(path, data, append=False):
        if append:
            with open(path, "ab") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, append)

    monkeypatch.setattr(files, "_write_bytes", full_at_the_record)
    assert job() == 1
    assert f"error: stopped: no space left on the disk writing {job.out / JOB_RECORD}" in capsys.readouterr().err
    monkeypatch.setattr(files, "_write_bytes", real)
    assert job() == 0
    err = capsys.readouterr().err
    assert "skipping 1 target(s)" in err and "2 matted, 0 failed" in err
    lines = [json.loads(x) for x in (job.out / JOB_RECORD).read_text().splitlines()]
    assert sorted(f for x in lines for f in x["files"]) == [f"t{i}_{k}.png" for i in range(3) for k in ("alpha", "rgba")]
