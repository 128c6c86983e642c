"""What made each output, without a model: the job record's plan (done / todo / made differently),
the sources by content, the records outputs carry, the lock, the one file-writing module (short
temporary names), out-of-memory by type. Expected words, names and hashes are written out here."""
import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iconmatting_core import files
from iconmatting_core.job import outputs, record as rec
from iconmatting_core.job.targets import Target

RECIPE = {"reference": {"images": ["a" * 64], "masks": ["b" * 64], "pooling": "mask", "seed": 0, "resize_mode": "pad"},
          "weights": "0123456789ab", "resize_mode": "pad", "dtype": "auto", "image_size": 128, "foreground": True}


def _recipe(**changes):
    r = json.loads(json.dumps(RECIPE))
    for key, value in changes.items():
        if key in ("images", "masks", "pooling", "seed", "context"):
            r["reference"][key] = value
        else:
            r[key] = value
    return r


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _source(tmp_path, name="x.png", seed=0):
    src = tmp_path / "in" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((6, 8, 3)) * 255).astype(np.uint8)).save(src)
    return Target(src, Path(name).stem)


def _write(out, target, recipe):
    """Outputs of ``target`` as a job with ``recipe`` writes them."""
    rec.JobRecord(out, recipe).write_images(target, np.zeros((6, 8), np.uint8), np.zeros((6, 8, 4), np.uint8))


def _plan(out, targets, recipe):
    return rec.JobRecord(out, recipe).plan(targets, ["alpha", "rgba"])


def test_recipe_differences_name_each_part():
    assert rec.recipe_differences(RECIPE, _recipe()) == []
    assert rec.recipe_differences(RECIPE, _recipe(masks=["c" * 64])) == ["mask"]
    assert rec.recipe_differences(RECIPE, _recipe(images=["c" * 64])) == ["reference image"]
    assert rec.recipe_differences(RECIPE, _recipe(weights="ba9876543210", dtype="fp16")) == ["weights", "dtype"]
    assert rec.recipe_differences(RECIPE, _recipe(seed=1, pooling="scribble")) == ["guidance", "seed"]
    assert rec.recipe_differences(RECIPE, _recipe(image_size=192, foreground=False)) == ["image size", "foreground estimation"]
    both = _recipe(resize_mode="stretch")
    both["reference"]["resize_mode"] = "stretch"
    assert rec.recipe_differences(RECIPE, both) == ["resize mode"]  # once, though two parts say it
    from_file = _recipe()
    from_file["reference"] = {"context": "d" * 64}
    assert rec.recipe_differences(RECIPE, from_file) == ["reference (a context file vs reference images)"]
    other_file = json.loads(json.dumps(from_file))
    other_file["reference"]["context"] = "e" * 64
    assert rec.recipe_differences(from_file, other_file) == ["context"]
    assert rec.recipe_differences(None, RECIPE) == ["no record (written by an older version?)"]


def test_outputs_carry_their_record_and_the_job_record_indexes_them(tmp_path):
    target = _source(tmp_path)
    out = tmp_path / "out"
    _write(out, target, RECIPE)
    for name in ("x_alpha.png", "x_rgba.png"):
        with Image.open(out / name) as im:
            made = json.loads(im.text["iconmatting"])
        assert made["recipe"] == RECIPE and made["made_by"].startswith("iconmatting_core ")
        assert made["source"] == {"path": os.path.realpath(target.path), "size": target.path.stat().st_size,
                                  "mtime_ns": target.path.stat().st_mtime_ns, "sha256": _sha(target.path)}
    (line,) = (out / "iconmatting-job.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert entry["files"] == {n: [(out / n).stat().st_size, (out / n).stat().st_mtime_ns] for n in ("x_alpha.png", "x_rgba.png")}
    assert entry["recipe"] == RECIPE and entry["source"]["sha256"] == _sha(target.path)


def test_plan_sorts_done_todo_and_made_differently(tmp_path):
    out = tmp_path / "out"
    same, masked, partial, fresh = (_source(tmp_path, f"{n}.png", i) for i, n in enumerate(("same", "masked", "partial", "fresh")))
    _write(out, same, RECIPE)
    _write(out, masked, _recipe(masks=["c" * 64]))
    _write(out, partial, RECIPE)
    (out / "partial_rgba.png").unlink()  # a run killed between the two files: same recipe, redone without a word
    plan = _plan(out, [same, masked, partial, fresh], RECIPE)
    assert plan.done == [same] and plan.todo == [partial, fresh] and plan.different == {masked: ["mask"]}
    assert plan.refusal(out) == (f"1 target(s) have outputs in {out} made differently (mask: 1); nothing was matted. "
                                 "Add --overwrite to redo exactly those 1 (the other 1 are kept), or pick another --out")


def test_a_source_is_its_content_not_its_name(tmp_path, monkeypatch):
    out = tmp_path / "out"
    target = _source(tmp_path)
    _write(out, target, RECIPE)
    hashed = []
    real = rec.file_sha256
    monkeypatch.setattr(rec, "file_sha256", lambda p: (hashed.append(Path(p).name), real(p))[1])
    assert _plan(out, [target], RECIPE).done == [target] and hashed == []  # unchanged: size and mtime suffice

    os.utime(target.path, ns=(1, 1))  # touched (or copied): the same bytes, read once to tell
    assert _plan(out, [target], RECIPE).done == [target] and hashed == ["x.png"]
    assert _plan(out, [target], RECIPE).done == [target] and hashed == ["x.png"]  # the record now knows the new mtime

    moved = tmp_path / "elsewhere" / "x.png"
    moved.parent.mkdir()
    target.path.rename(moved)
    assert _plan(out, [Target(moved, "x")], RECIPE).done == [Target(moved, "x")]

    other = _source(tmp_path, "y.png", seed=5)  # another file under the same output name
    plan = _plan(out, [Target(other.path, "x")], RECIPE)
    assert plan.different == {Target(other.path, "x"): ["source"]}


def test_a_torn_or_lost_job_record_falls_back_to_the_outputs_own_records(tmp_path):
    out = tmp_path / "out"
    a, b = _source(tmp_path, "a.png", 1), _source(tmp_path, "b.png", 2)
    _write(out, a, RECIPE)
    _write(out, b, RECIPE)
    journal = out / "iconmatting-job.jsonl"
    text = journal.read_text()
    journal.write_text(text[: len(text) - 40])  # a run killed while appending b's line
    assert _plan(out, [a, b], RECIPE).done == [a, b]
    lines = journal.read_text().splitlines()  # rewritten whole: one line per output pair, no torn line
    assert [sorted(json.loads(x)["files"]) for x in lines] == [["a_alpha.png", "a_rgba.png"], ["b_alpha.png", "b_rgba.png"]]
    journal.unlink()
    assert _plan(out, [a, b], _recipe(dtype="fp16")).different == {a: ["dtype"], b: ["dtype"]}


def test_a_foreign_line_is_dropped_so_later_lines_stay_whole(tmp_path):
    out = tmp_path / "out"
    a, b = _source(tmp_path, "a.png", 1), _source(tmp_path, "b.png", 2)
    _write(out, a, RECIPE)
    with open(out / "iconmatting-job.jsonl", "a") as f:
        f.write('{"files": ')  # no newline: a later line appended as is would be glued to it
    record = rec.JobRecord(out, RECIPE)
    assert record.plan([a, b], ["alpha", "rgba"]).done == [a]
    record.write_images(b, np.zeros((6, 8), np.uint8), np.zeros((6, 8, 4), np.uint8))
    lines = [json.loads(x) for x in (out / "iconmatting-job.jsonl").read_text().splitlines()]
    assert [sorted(x["files"]) for x in lines] == [["a_alpha.png", "a_rgba.png"], ["b_alpha.png", "b_rgba.png"]]


def test_a_file_replaced_since_its_line_is_judged_by_its_own_record(tmp_path):
    out = tmp_path / "out"
    a = _source(tmp_path, "a.png")
    _write(out, a, RECIPE)
    stale = (out / "iconmatting-job.jsonl").read_text()
    _write(out, a, _recipe(seed=3))  # an --overwrite run killed after its PNGs, before its line
    (out / "iconmatting-job.jsonl").write_text(stale)
    assert _plan(out, [a], RECIPE).different == {a: ["seed"]}
    assert _plan(out, [a], _recipe(seed=3)).done == [a]


def test_outputs_without_a_record_are_made_differently(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    a = _source(tmp_path, "a.png")
    for name in ("a_alpha.png", "a_rgba.png"):  # as an older version wrote them
        Image.fromarray(np.zeros((6, 8), np.uint8)).save(out / name)
    plan = _plan(out, [a], RECIPE)
    assert plan.different == {a: ["no record (written by an older version?)"]}
    assert "(no record (written by an older version?): 1)" in plan.refusal(out)


def test_the_lock_refuses_a_second_job_until_the_first_ends(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    with rec.OutputLock(out):
        with pytest.raises(outputs.OutputError) as err:
            rec.OutputLock(out).__enter__()  # another holder (a lock taken twice in one process conflicts too)
        assert str(err.value) == (f"--out {out} is in use by another iconmatting job (pid {os.getpid()}); wait for it to "
                                  "finish, or pick another --out")
        with rec.OutputLock(elsewhere):  # another folder is free
            pass
    with rec.OutputLock(out):  # released: the next job takes it
        pass
    assert os.listdir(out) == []  # and the lock file goes with the job


def test_write_file_takes_a_250_byte_name(tmp_path):
    name = "x" * 240 + "_alpha.png"
    assert len(name.encode()) == 250
    files.write_file(tmp_path / name, b"abc")
    assert (tmp_path / name).read_bytes() == b"abc" and os.listdir(tmp_path) == [name]
    partial = files.partial_path(tmp_path / name).name
    assert partial == f".{hashlib.sha256(name.encode()).hexdigest()[:16]}.{os.getpid()}.partial"
    (tmp_path / partial).write_bytes(b"half")  # what a killed run leaves is still found
    assert files.remove_partials(tmp_path) == 1 and os.listdir(tmp_path) == [name]


def test_written_files_have_the_users_mode_and_leave_nothing_on_failure(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        files.write_safetensors(tmp_path / "h.safetensors", {"w": __import__("torch").zeros(2)}, {"k": "v"})
    finally:
        os.umask(old)
    assert oct((tmp_path / "h.safetensors").stat().st_mode & 0o777) == "0o644"  # not safetensors' 0600

    def full(path, data, append=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "_write_bytes", full)
    with pytest.raises(OSError):
        files.write_safetensors(tmp_path / "g.safetensors", {"w": __import__("torch").zeros(2)})
    assert os.listdir(tmp_path) == ["h.safetensors"]


def test_out_of_memory_is_told_by_type():
    import torch

    assert outputs.stop_reason(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == outputs.OUT_OF_MEMORY
    assert outputs.stop_reason(torch.cuda.OutOfMemoryError("x")) == outputs.OUT_OF_MEMORY
    assert outputs.stop_reason(RuntimeError("CUDA error: out of memory")) == outputs.OUT_OF_MEMORY  # raised untyped
    assert outputs.stop_reason(ValueError("mask says CUDA out of memory")) is None
    assert outputs.stop_reason(RuntimeError("CUDA out of memory in a message")) is None
