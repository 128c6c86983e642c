"""The job's target discovery/naming and outputs, without a model (fast; no torch import, so the
mutation runs can use these alone). Expected names and texts are written out here."""
import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iconmatting_core import files
from iconmatting_core.job import outputs
from iconmatting_core.job.targets import TargetError, list_targets, read_manifest, split_targets


def _touch(root, *rels):
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def _names(found, root):
    return [(str(t.path.relative_to(root)), t.name) for t in found.targets]


def test_folder_targets_names_order_and_skipped_types(tmp_path):
    _touch(tmp_path, "x/b.png", "x/a.JPG", "x/z/c.webp", "x/y/d.mp4", "x/notes.txt", "x/data.json", "x/README")
    found = list_targets([str(tmp_path / "x")])
    assert _names(found, tmp_path / "x") == [("a.JPG", "a"), ("b.png", "b"), ("y/d.mp4", "y/d"), ("z/c.webp", "z/c")]
    assert dict(found.skipped_types) == {".txt": 1, ".json": 1, "": 1}
    assert found.notes() == ["skipped 3 file(s) of other types: (none) x1, .json x1, .txt x1"]
    assert [t.video for t in found.targets] == [False, False, True, False]
    images, videos = split_targets(found.targets)
    assert [t.name for t in images] == ["a", "b", "z/c"] and [t.name for t in videos] == ["y/d"]


def test_not_recursive(tmp_path):
    _touch(tmp_path, "x/a.png", "x/sub/b.png")
    assert [t.name for t in list_targets([str(tmp_path / "x")], recursive=False).targets] == ["a"]
    with pytest.raises(TargetError, match=r"y: no images or videos in this folder \(not searched recursively\)"):
        _touch(tmp_path, "y/sub/b.png")
        list_targets([str(tmp_path / "y")], recursive=False)


def test_same_stem_siblings_keep_their_extension(tmp_path):
    _touch(tmp_path, "x/t0.png", "x/t0.jpg", "x/t0.mp4", "x/t1.png", "x/T2.png", "x/t2.JPG")
    found = list_targets([str(tmp_path / "x")])
    assert sorted(t.name for t in found.targets) == ["T2_png", "t0", "t0_jpg", "t0_png", "t1", "t2_jpg"]


def test_globs_files_manifests_and_duplicates(tmp_path):
    _touch(tmp_path, "x/a.png", "x/b.txt", "x/s/c.png", "x/s/t/d.png")
    (tmp_path / "list.txt").write_text("# comment\n\nx/a.png\n  x/s/c.png  \nmissing.png\n")
    specs = [str(tmp_path / "x" / "*"), str(tmp_path / "x" / "a.png"), str(tmp_path / "list.txt"),
             str(tmp_path / "x" / "s" / "**" / "*.png")]
    found = list_targets(specs)
    assert _names(found, tmp_path) == [("x/a.png", "a"), ("x/s/c.png", "c"), ("missing.png", "missing"), ("x/s/t/d.png", "t/d")]
    assert read_manifest(tmp_path / "list.txt") == [tmp_path / "x/a.png", tmp_path / "x/s/c.png", tmp_path / "missing.png"]
    assert dict(found.skipped_types) == {}  # a glob's other files are not "skipped types"


def test_bad_specs(tmp_path):
    _touch(tmp_path, "x/a.png", "y/a.png", "e/n.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for specs, message in (
        ([str(tmp_path / "nope")], f"--targets {tmp_path / 'nope'}: no such file or folder"),
        ([str(tmp_path / "x" / "*.gif")], f"--targets '{tmp_path / 'x' / '*.gif'}' matches no image or video; check"),
        ([str(tmp_path / "e" / "*")], "matches no image or video (1 other file(s))"),
        ([str(tmp_path / "e")], f"--targets {tmp_path / 'e'}: no images or videos in this folder"),
        ([str(tmp_path / "empty.txt")], "the manifest lists no files"),
        ([str(tmp_path / "x"), str(tmp_path / "y")], f"{tmp_path / 'x' / 'a.png'} and {tmp_path / 'y' / 'a.png'} would both "
                                                     "write outputs named 'a'"),
    ):
        with pytest.raises(TargetError) as err:
            list_targets(specs)
        assert message in str(err.value), (specs, str(err.value))


def test_out_folder_is_never_a_target(tmp_path):
    _touch(tmp_path, "x/a.png", "x/out/a_alpha.png", "x/out/sub/b.png")
    found = list_targets([str(tmp_path / "x")], tmp_path / "x" / "out")
    assert [t.name for t in found.targets] == ["a"] and found.skipped_out == 2
    assert found.notes() == ["left out 2 file(s) under the output folder"]
    found = list_targets([str(tmp_path / "x" / "**" / "*.png")], tmp_path / "x" / "out")
    assert [t.name for t in found.targets] == ["a"] and found.skipped_out == 2
    for out in (tmp_path / "x", tmp_path):
        with pytest.raises(TargetError, match="is \\(or holds\\) the --targets folder"):
            list_targets([str(tmp_path / "x")], out)
    # an --out that does not exist yet is compared by its absolute path
    assert [t.name for t in list_targets([str(tmp_path / "x")], tmp_path / "new").targets] == ["a", "out/a_alpha", "out/sub/b"]


def test_link_loops(tmp_path):
    _touch(tmp_path, "x/a.png")
    (tmp_path / "x" / "loop").symlink_to(tmp_path / "x", target_is_directory=True)
    (tmp_path / "x" / "bad.png").symlink_to(tmp_path / "x" / "bad.png")
    found = list_targets([str(tmp_path / "x")])
    assert [t.name for t in found.targets] == ["a"]
    assert found.problems == [(tmp_path / "x" / "loop", f"a link to {tmp_path / 'x'}, a folder that holds it; not followed"),
                              (tmp_path / "x" / "bad.png", "a link loop; not followed")]


def test_output_paths_and_done(tmp_path):
    from iconmatting_core.job.targets import Target

    assert outputs.output_paths(tmp_path, "sub/x") == (tmp_path / "sub/x_alpha.png", tmp_path / "sub/x_rgba.png")
    image, clip = Target(Path("x.png"), "x"), Target(Path("c.mp4"), "d/c")
    assert outputs.target_outputs(tmp_path, clip, ["alpha", "png"]) == [tmp_path / "d/c_alpha.mp4", tmp_path / "d/c_frames"]
    assert outputs.target_outputs(tmp_path, image, ["alpha"]) == [tmp_path / "x_alpha.png", tmp_path / "x_rgba.png"]


def test_write_file_and_partials(tmp_path, monkeypatch):
    files.write_file(tmp_path / "a" / "b_alpha.png", b"xyz")
    assert (tmp_path / "a" / "b_alpha.png").read_bytes() == b"xyz" and sorted(os.listdir(tmp_path / "a")) == ["b_alpha.png"]

    def half(path, data, append=False):
        Path(path).write_bytes(data[:1])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write_bytes", half)
    with pytest.raises(OSError):
        files.write_file(tmp_path / "a" / "c_alpha.png", b"xyz")
    assert sorted(os.listdir(tmp_path / "a")) == ["b_alpha.png"]
    # what a killed run leaves: this version's temporary names, and older versions' ones
    _touch(tmp_path, "o/x_alpha.png.partial", "o/s/y.partial.mp4", "o/keep.png", "o/.0123456789abcdef.77.partial")
    (tmp_path / "o" / "c_frames.partial").mkdir()
    assert files.remove_partials(tmp_path / "o") == 4
    assert sorted(str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").rglob("*")) == ["keep.png", "s"]


def test_check_writable(tmp_path):
    outputs.check_writable(tmp_path / "new" / "deep")
    assert (tmp_path / "new" / "deep").is_dir() and os.listdir(tmp_path / "new" / "deep") == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(outputs.OutputError, match=f"^--out {tmp_path / 'f'} is a file; give a folder$"):
        outputs.check_writable(tmp_path / "f")
    with pytest.raises(outputs.OutputError, match="cannot be written .*; pick a writable folder"):
        outputs.check_writable(tmp_path / "f" / "sub")


def test_failures_manifest(tmp_path, monkeypatch):
    f = outputs.Failures(tmp_path)
    assert f.finish() and not (tmp_path / "failures.jsonl").exists()
    f.add(Path("a.png"), "E: one")
    f.add("b.png", "E: two")
    assert len(f) == 2 and f.finish()
    assert (tmp_path / "failures.jsonl").read_text() == '{"path": "a.png", "error": "E: one"}\n{"path": "b.png", "error": "E: two"}\n'
    assert outputs.Failures(tmp_path).finish() and not (tmp_path / "failures.jsonl").exists()  # nothing fails any more

    def full(path, data, append=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write_bytes", full)
    stream = io.StringIO()
    assert not f.finish(stream)
    assert stream.getvalue().splitlines() == [
        f"error: cannot write {tmp_path / 'failures.jsonl'} (No space left on device); the failures were:",
        '{"path": "a.png", "error": "E: one"}', '{"path": "b.png", "error": "E: two"}']


def test_stop_reasons_and_error_text():
    assert outputs.stop_reason(OSError(errno.ENOSPC, "x", "/o/a.png")) == (
        "no space left on the disk writing /o/a.png; free space (or pick another --out) and re-run the same command to resume")
    assert outputs.stop_reason(OSError(errno.EROFS, "x")).startswith("the disk is read-only; ")
    assert outputs.stop_reason(OSError(errno.EDQUOT, "x")).startswith("disk quota exceeded; ")
    assert outputs.stop_reason(OSError(errno.ENOENT, "x")) is None
    assert outputs.stop_reason(ValueError("bad image")) is None
    assert outputs.stop_reason(ValueError("CUDA out of memory")) is None  # by type (torch's: tests/unit/test_record.py)
    assert outputs.stop_reason(outputs.JobStopped("why")) == "why"
    assert not outputs.is_out_of_memory(ValueError("CUDA error: out of memory"))  # a RuntimeError's words only
    assert outputs.error_text(ValueError("a\n  b")) == "ValueError: a b"


def test_progress_lines():
    stream = io.StringIO()
    bar = outputs.Progress(None, "clip.mp4", "frame", interval=0.0, stream=stream)
    bar.update(2)
    bar.log("clip.mp4: ok")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("clip.mp4: 2, ") and lines[0].endswith(" frame/s") and lines[1] == "clip.mp4: ok"
    assert len(lines) == 3
    silent = io.StringIO()
    outputs.Progress(5, "x", stream=silent).close()  # nothing done: nothing printed
    assert silent.getvalue() == ""


def test_read_mask_takes_the_alpha_of_rgba_and_la(tmp_path):
    from iconmatting_core.image_io import read_mask

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = 255  # white colour everywhere: luminance would say "all foreground"
    rgba[..., 3] = [[0, 51, 255], [255, 0, 102]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    expected = [[0.0, 0.2, 1.0], [1.0, 0.0, 0.4]]
    assert np.allclose(read_mask(tmp_path / "m.png"), expected) and np.allclose(read_mask(tmp_path / "la.png"), expected)
    Image.fromarray(np.array([[0, 255]], np.uint8)).save(tmp_path / "g.png")
    assert read_mask(tmp_path / "g.png").tolist() == [[0.0, 1.0]]


def test_more_target_rules(tmp_path, monkeypatch):
    from iconmatting_core.job.targets import Target

    _touch(tmp_path, "x/a.png", "x/loop_then/b.png", "x/m_out/old_alpha.png", "x/m_out/failures.jsonl", "x/z/c.png",
           "x/n1.txt", "x/n2.txt", "x/q/r/d.png")
    (tmp_path / "x" / "k_loop").symlink_to(tmp_path / "x", target_is_directory=True)
    (tmp_path / "x" / "a_link.png").symlink_to(tmp_path / "x" / "a.png")
    (tmp_path / "m.lst").write_text("x/z/c.png\nnofolder/gone1.png\n")
    (tmp_path / "m.list").write_text("nofolder/gone2.png\n")
    found = list_targets([str(tmp_path / "x"), str(tmp_path / "m.lst"), str(tmp_path / "m.list")], tmp_path / "x" / "m_out")
    assert _names(found, tmp_path) == [("x/a.png", "a"), ("x/loop_then/b.png", "loop_then/b"), ("x/q/r/d.png", "q/r/d"),
                                       ("x/z/c.png", "z/c"), ("nofolder/gone1.png", "gone1"), ("nofolder/gone2.png", "gone2")]
    assert dict(found.skipped_types) == {".txt": 2} and found.skipped_out == 2  # failures.jsonl counted as under --out
    assert found.notes() == ["skipped 2 file(s) of other types: .txt x2", "left out 2 file(s) under the output folder",
                             f"skipped {tmp_path / 'x' / 'k_loop'}: a link to {tmp_path / 'x'}, a folder that holds it; not followed"]
    assert len({Target(Path("a.png"), "a"), Target(Path("a.png"), "a")}) == 1  # hashable, immutable
    # a wildcard in the middle: the glob's folder is the part before it
    assert [t.name for t in list_targets([str(tmp_path / "x" / "*" / "r" / "*.png")]).targets] == ["q/r/d"]
    monkeypatch.chdir(tmp_path / "x" / "z")
    assert [t.name for t in list_targets(["*.png"]).targets] == ["c"]


def test_target_errors_word_for_word(tmp_path):
    _touch(tmp_path, "x/a.png", "y/a.png")
    (tmp_path / "e.txt").write_text("\n")
    cases = [
        ([str(tmp_path / "nope")], None, f"--targets {tmp_path / 'nope'}: no such file or folder"),
        ([str(tmp_path / "e.txt")], None, f"--targets {tmp_path / 'e.txt'}: the manifest lists no files"),
        ([str(tmp_path / "x")], tmp_path, f"--out {tmp_path} is (or holds) the --targets folder {tmp_path / 'x'}; "
                                          "give another --out folder"),
        ([str(tmp_path / "x"), str(tmp_path / "y")], None, f"{tmp_path / 'x' / 'a.png'} and {tmp_path / 'y' / 'a.png'} would "
                                                           "both write outputs named 'a'; matte them into separate --out "
                                                           "folders (or rename one)"),
        ([str(tmp_path / "e")], None, f"--targets {tmp_path / 'e'}: no such file or folder"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append(([str(tmp_path / "empty")], None, f"--targets {tmp_path / 'empty'}: no images or videos in this folder"))
    for specs, out, message in cases:
        with pytest.raises(TargetError) as err:
            list_targets(specs, out)
        assert str(err.value) == message


def test_progress_with_a_controlled_clock(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(outputs.time, "monotonic", lambda: clock[0])
    stream = io.StringIO()
    bar = outputs.Progress(10, "matte", stream=stream)  # default: img, every 5 s
    clock[0] = 102.0
    bar.update()  # 2 s after the start: nothing yet
    bar.update(3)
    assert stream.getvalue() == ""
    clock[0] = 105.0
    bar.update()  # 5 s: a line; 5 done in 5 s
    assert stream.getvalue() == "matte: 5/10 (50%), 1.00 img/s, ETA 5s\n"
    clock[0] = 109.0
    bar.update(3)  # 4 s after the last line: nothing
    clock[0] = 110.0
    bar.update()
    assert stream.getvalue().splitlines()[-1] == "matte: 9/10 (90%), 0.90 img/s, ETA 1s"
    clock[0] = 110.5
    bar.update()
    bar.close()
    assert stream.getvalue().splitlines()[-1] == "matte: 10/10 (100%), 0.95 img/s, ETA 0s"
    assert len(stream.getvalue().splitlines()) == 3
    first = outputs.Progress(4, "x", stream=io.StringIO())
    assert first.line() == "x: 0/4 (0%), 0.00 img/s, ETA nans"  # no time has passed


def test_more_output_details(tmp_path):
    from iconmatting_core.job.targets import Target

    assert outputs.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert outputs.stop_reason(RuntimeError("CUDA error: out of memory")) == (
        "out of GPU memory; close other GPU programs, or use --dtype fp16, a smaller --chunk-size, or --device cpu, "
        "and re-run the same command to resume")

    class OutOfMemoryError(RuntimeError):  # a name is not a type
        pass

    assert outputs.stop_reason(OutOfMemoryError("allocating 2 GiB")) is None
    f = outputs.Failures(tmp_path)
    f.add(Target(Path("/d/x.png"), "x"), "E: x", "E")
    f.add(Path("/d/y.png"), "a pipe; not read")  # a listing problem: no exception, no type
    assert f.items == [("/d/x.png", "E: x"), ("/d/y.png", "a pipe; not read")]
    assert f.finish() and (tmp_path / "failures.jsonl").read_text().splitlines() == [
        '{"path": "/d/x.png", "error": "E: x", "error_type": "E"}', '{"path": "/d/y.png", "error": "a pipe; not read"}']
    files.write_file(tmp_path / "a" / "b" / "c.png", b"1")  # parents made
    assert (tmp_path / "a" / "b" / "c.png").read_bytes() == b"1"
    outputs.check_writable(tmp_path / "a")  # an existing folder is fine, and left as it was
    assert sorted(os.listdir(tmp_path / "a")) == ["b"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(outputs.OutputError) as err:
        outputs.check_writable(tmp_path / "file" / "sub", "the folder of encode --out")
    assert str(err.value) == (f"the folder of encode --out {tmp_path / 'file' / 'sub'} cannot be written (Not a directory); "
                              "pick a writable folder")


def test_progress_rate_and_eta_are_computed_not_guessed(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(outputs.time, "monotonic", lambda: clock[0])
    bar = outputs.Progress(10, "matte", stream=io.StringIO())
    clock[0] = 8.0
    bar.done = 2  # 0.25 img/s: 8 left take 32 s
    assert bar.line() == "matte: 2/10 (20%), 0.25 img/s, ETA 32s"
    clock[0] = 0.5
    bar.done = 1  # under a second is still a rate: 2 img/s, 9 left in 4.5 s
    assert bar.line() == "matte: 1/10 (10%), 2.00 img/s, ETA 4s"


def test_progress_on_a_terminal_is_a_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = outputs.Progress(3, "matte", "img", interval=3600, stream=stream)
    assert type(bar.bar).__name__ == "tqdm"
    for name in ("a.png", "b.png", "c.png"):
        bar.update(1, note=name)
    bar.log("a line")
    bar.close()
    text = stream.getvalue()
    assert "\r" in text and "3/3" in text and "c.png" in text and "a line\n" in text


def test_an_image_is_read_upright_by_its_exif_orientation(tmp_path):
    """What a Ray worker reads, as the local engine does (``image_io.read_image``)."""
    from iconmatting_core.image_io import read_image

    wide = np.zeros((20, 30, 3), np.uint8)
    wide[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(wide).save(tmp_path / "rotated.png", exif=exif)
    assert np.array_equal(read_image(tmp_path / "rotated.png"), np.rot90(wide, -1).astype(np.float32) / 255)
