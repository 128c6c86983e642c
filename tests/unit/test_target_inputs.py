"""Targets a user has that used to be read wrongly: pipes, sockets and devices in a target folder,
links to a folder above, broken links, folders that cannot be listed, manifests saved with a
byte-order mark or CRLF line endings, animated GIFs/WebPs/PNGs, and thread counts beyond the machine.
Expected lists, names and messages are written out here."""
import errno
import json
import os
import socket
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iconmatting_core.__main__ import main
from iconmatting_core.job import cli_args
from iconmatting_core.job.targets import TargetError, list_targets, read_manifest, split_targets


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


def _animation(path, frames, durations=100):
    """An animated (or, with one frame, still) GIF/WebP/PNG of flat frames of the given grey values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.full((16, 24, 3), v, np.uint8)) for v in frames]
    fmt = {".gif": "GIF", ".webp": "WEBP", ".png": "PNG"}[path.suffix]
    if len(images) > 1:
        images[0].save(path, fmt, save_all=True, append_images=images[1:], duration=durations, loop=0, lossless=True)
    else:
        images[0].save(path, fmt)
    return path


def _drop_last_webp_frame(data: bytes) -> bytes:
    """An animated WebP's bytes without its last ANMF chunk (chunks: 4-byte type, 32-bit LE size, data
    padded to even), the RIFF size fixed: an animation of one frame less."""
    chunks, i = [], 12
    while i < len(data):
        size = int.from_bytes(data[i + 4: i + 8], "little")
        chunks.append(data[i: i + 8 + size + size % 2])
        i += 8 + size + size % 2
    last = max(k for k, c in enumerate(chunks) if c[:4] == b"ANMF")
    body = b"WEBP" + b"".join(c for k, c in enumerate(chunks) if k != last)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def _socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return s


def _fed_pipe(path, data):
    """A named pipe whose readers get ``data``, so code that wrongly opens it reads that instead of
    blocking forever (the test then fails instead of hanging); returns the function that stops it."""
    os.mkfifo(path)
    stop = threading.Event()

    def feed():
        while not stop.is_set():
            try:
                with open(path, "wb") as pipe_end:  # waits for a reader
                    pipe_end.write(data)
            except OSError:  # the reader left early
                pass

    threading.Thread(target=feed, daemon=True).start()

    def close():
        stop.set()
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # frees a writer waiting for a reader

    return close


def _names(found, root):
    return [(str(t.path.relative_to(root)), t.name) for t in found.targets]


def test_pipes_sockets_and_devices_are_skipped_problems_never_opened(tmp_path):
    x = tmp_path / "x"
    _png(x / "a.png")
    os.mkfifo(x / "p.png")  # opening it would block the job forever
    os.mkfifo(x / "fifo")  # no target's extension: a file of another type, never opened
    (x / "null.jpg").symlink_to("/dev/null")
    sock = _socket(x / "s.webp")
    try:
        found = list_targets([str(x)])
    finally:
        sock.close()
    assert _names(found, x) == [("a.png", "a")]
    assert found.problems == [
        (x / "null.jpg", "not a regular file but a character device; not read"),
        (x / "p.png", "not a regular file but a named pipe; not read"),
        (x / "s.webp", "not a regular file but a socket; not read"),
    ]
    assert dict(found.skipped_types) == {"": 1}
    # the same through a glob, a manifest and a path given by itself
    (tmp_path / "list.txt").write_text("x/a.png\nx/p.png\n")
    found = list_targets([str(x / "*.png"), str(tmp_path / "list.txt"), str(x / "p.png")])
    assert [t.path for t in found.targets] == [x / "a.png"]
    assert found.problems == [(x / "p.png", "not a regular file but a named pipe; not read")] * 3


def test_a_link_to_a_folder_above_is_never_followed(tmp_path):
    parent = tmp_path / "parent"
    _png(parent / "other.png")  # the bug: a link to `parent` matted this
    _png(parent / "x" / "a.png")
    _png(parent / "x" / "sub" / "b.png")
    _png(tmp_path / "elsewhere" / "c.png")
    sub = parent / "x" / "sub"
    (sub / "up").symlink_to("../..", target_is_directory=True)  # relative: only resolved paths show where it leads
    (sub / "root").symlink_to("..", target_is_directory=True)
    (sub / "self").symlink_to(".", target_is_directory=True)
    (sub / "ext").symlink_to("../../../elsewhere", target_is_directory=True)  # not above: followed
    expected_problems = [(sub / "root", f"a link to {parent / 'x'}, a folder that holds it; not followed"),
                         (sub / "self", f"a link to {sub}, a folder that holds it; not followed"),
                         (sub / "up", f"a link to {parent}, a folder that holds it; not followed")]
    found = list_targets([str(parent / "x")])
    assert _names(found, parent / "x") == [("a.png", "a"), ("sub/b.png", "sub/b"), ("sub/ext/c.png", "sub/ext/c")]
    assert found.problems == expected_problems
    # the target folder given through a link of its own: still compared where the folders really are
    (tmp_path / "alias").symlink_to(parent / "x", target_is_directory=True)
    found = list_targets([str(tmp_path / "alias")])
    assert [t.name for t in found.targets] == ["a", "sub/b", "sub/ext/c"]
    assert [why for _, why in found.problems] == [why for _, why in expected_problems]


def test_a_folder_reached_twice_is_listed_once(tmp_path):
    x = tmp_path / "x"
    _png(x / "a" / "f.png")
    (x / "b").mkdir()
    (x / "b" / "to_a").symlink_to("../a", target_is_directory=True)
    found = list_targets([str(x)])
    assert [t.name for t in found.targets] == ["a/f"] and found.problems == []
    assert found.notes() == ["did not follow 1 folder link(s) to folders listed already"]


def test_broken_links_and_unlistable_folders_are_problems(tmp_path, monkeypatch):
    x = tmp_path / "x"
    _png(x / "a.png")
    (x / "gone.png").symlink_to("missing.png")
    (x / "old_photos").symlink_to("/nowhere/photos")  # a folder link whose folder is gone: any name counts
    _png(x / "locked" / "b.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) in (x / "locked", tmp_path / "shut"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # what os.walk meets in a folder without read permission
    found = list_targets([str(x)])
    assert [t.name for t in found.targets] == ["a"]
    assert found.problems == [(x / "locked", "cannot list this folder (Permission denied)"),
                              (x / "gone.png", "a broken link: its target missing.png does not exist"),
                              (x / "old_photos", "a broken link: its target /nowhere/photos does not exist")]
    assert found.notes()[-1] == f"skipped {x / 'old_photos'}: a broken link: its target /nowhere/photos does not exist"
    (tmp_path / "shut").mkdir()
    with pytest.raises(TargetError) as err:
        list_targets([str(tmp_path / "shut")])
    assert str(err.value) == f"--targets {tmp_path / 'shut'}: cannot list this folder (Permission denied); check its permissions"


def _reference(tmp_path):
    _png(tmp_path / "ref.png", 120)
    Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), 2)).save(tmp_path / "mask.png")
    return ["--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png")]


def test_listing_problems_are_lines_of_failures_jsonl(tmp_path, pipe, capsys):
    targets = tmp_path / "targets"
    _png(targets / "t0.png", 200)
    (targets / "gone.png").symlink_to("missing.png")
    (targets / "up").symlink_to("..", target_is_directory=True)
    sock = _socket(targets / "s.png")
    out = tmp_path / "out"
    args = ["matte", *_reference(tmp_path), "--targets", str(targets), "--out", str(out), "--no-foreground"]
    expected = [{"path": str(targets / "up"), "error": f"a link to {tmp_path}, a folder that holds it; not followed"},
                {"path": str(targets / "gone.png"), "error": "a broken link: its target missing.png does not exist"},
                {"path": str(targets / "s.png"), "error": "not a regular file but a socket; not read"}]
    try:
        assert main(args, pipe_factory=lambda: pipe) == 1
        err = capsys.readouterr().err
        assert "done: 1 matted, 3 failed" in err and f"note: skipped {targets / 's.png'}: not a regular file" in err
        assert sorted(p.name for p in out.iterdir()) == ["failures.jsonl", "iconmatting-job.jsonl", "t0_alpha.png", "t0_rgba.png"]
        assert [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()] == expected
        # a re-run with every target done still lists them (and still exits 1)
        assert main(args, pipe_factory=lambda: pipe) == 1
        assert "skipping 1 target(s)" in capsys.readouterr().err
        assert [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()] == expected
    finally:
        sock.close()
    # once they are gone, so is the list
    for name in ("gone.png", "up", "s.png"):
        (targets / name).unlink()
    assert main(args, pipe_factory=lambda: pipe) == 0 and not (out / "failures.jsonl").exists()


def test_manifest_with_a_byte_order_mark_and_crlf_keeps_its_first_entry(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffa.png\r\nsub/b.png\r\n# note\r\n".encode("utf-8"))
    assert read_manifest(tmp_path / "bom.txt") == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    (tmp_path / "crlf.lst").write_bytes(b"a.png\r\n\r\nsub/b.png\r\n")
    assert read_manifest(tmp_path / "crlf.lst") == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    (tmp_path / "bom_only_entry.txt").write_bytes("\ufeffc.png".encode("utf-8"))
    _png(tmp_path / "c.png")
    assert [(t.path, t.name) for t in list_targets([str(tmp_path / "bom_only_entry.txt")]).targets] == [(tmp_path / "c.png", "c")]
    (tmp_path / "utf16.txt").write_bytes("a.png\r\n".encode("utf-16"))  # Notepad's "Unicode"
    with pytest.raises(TargetError) as err:
        list_targets([str(tmp_path / "utf16.txt")])
    assert str(err.value) == f"--targets {tmp_path / 'utf16.txt'}: this manifest is not UTF-8 text; save it as UTF-8"


def test_gif_and_webp_are_clips_when_animated_and_images_when_still(tmp_path):
    x = tmp_path / "x"
    _animation(x / "anim.gif", [0, 100, 200])
    _animation(x / "anim2.webp", [0, 100, 200])
    _animation(x / "still.gif", [50])
    _animation(x / "still2.webp", [50])
    _animation(tmp_path / "gif_data.gif", [0, 100]).rename(x / "misnamed.webp")  # decided by content, not by name
    _animation(x / "two.webp", [0, 100])  # the smallest animation
    (x / "one_frame_animation.webp").write_bytes(_drop_last_webp_frame((x / "two.webp").read_bytes()))
    frames = [Image.fromarray(np.full((16, 24, 3), v, np.uint8)) for v in (0, 100)]  # an odd-sized chunk before the frames:
    frames[0].save(x / "odd_chunk.webp", save_all=True, append_images=frames[1:], lossless=True, icc_profile=b"7 bytes")
    rng = np.random.default_rng(0)  # noise: each GIF frame gets its own colour table, to be stepped over
    noise = [Image.fromarray((rng.random((16, 24, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    noise[0].save(x / "noise.gif", save_all=True, append_images=noise[1:], duration=100, comment=b"a comment block")
    noise[2].save(x / "noise_still.gif", comment=b"a comment block")
    (x / "cut_short.gif").write_bytes((x / "noise.gif").read_bytes()[:40])  # in its first image: its reader says so
    found = list_targets([str(x)])
    images, videos = split_targets(found.targets)
    assert [t.name for t in videos] == ["anim", "anim2", "misnamed", "noise", "odd_chunk", "two"]
    assert [t.name for t in images] == ["cut_short", "noise_still", "one_frame_animation", "still", "still2"]
    with Image.open(x / "one_frame_animation.webp") as im:  # Pillow reads it: one frame of an animation
        assert (im.n_frames, np.asarray(im.convert("L")).max()) == (1, 0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: big-endian 32-bit data length, type, data, CRC-32 of type and data."""
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _with_chunk_before_idat(png: bytes, chunk: bytes) -> bytes:
    """``png`` with ``chunk`` inserted right after its IHDR chunk (8-byte signature, IHDR of 13 data bytes: 25 bytes)."""
    return png[:33] + chunk + png[33:]


def test_an_animated_png_is_a_clip_and_a_still_one_an_image(tmp_path):
    """APNG (an acTL chunk before the first IDAT states the frame count): 2+ frames a clip, also past an odd-sized
    text chunk before it; a plain PNG, and one whose acTL states 1 frame, are images."""
    x = tmp_path / "x"
    _animation(x / "anim.png", [0, 100, 200])
    still = _png(x / "still.png", 50)
    text = _png_chunk(b"tEXt", b"Comment\0abc")  # 11 data bytes: an odd size, then its 4-byte CRC
    (x / "after_text.png").write_bytes(_with_chunk_before_idat((x / "anim.png").read_bytes(), text))
    one = _png_chunk(b"acTL", (1).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    (x / "one_frame.png").write_bytes(_with_chunk_before_idat(still.read_bytes(), one))
    (x / "cut_short.png").write_bytes((x / "anim.png").read_bytes()[:30])  # inside IHDR: its reader says so
    images, videos = split_targets(list_targets([str(x)]).targets)
    assert [t.name for t in videos] == ["after_text", "anim"]
    assert [t.name for t in images] == ["cut_short", "one_frame", "still"]
    frames = {}
    for name in ("anim", "after_text", "one_frame", "still"):  # Pillow reads them alike: its frame 0 may be a default
        with Image.open(x / f"{name}.png") as im:          # image outside the animation (no fcTL before IDAT)
            frames[name] = im.n_frames - bool(im.info.get("default_image"))
    assert frames == {"anim": 3, "after_text": 3, "one_frame": 1, "still": 1}


def test_same_stem_siblings_are_told_apart_by_their_kind_from_content(tmp_path):
    x = tmp_path / "x"
    _animation(x / "t.gif", [0, 100])  # a clip: its outputs (t_alpha.mp4) cannot meet t.png's
    _png(x / "t.png")
    _animation(x / "u.gif", [0])  # an image, like u.png: both keep their extension
    _png(x / "u.png")
    _png(x / "p.png")
    # a pipe beside: counted by its name, never opened to learn its kind (if it were, it would read as an animation)
    stop = _fed_pipe(x / "p.gif", (x / "t.gif").read_bytes())
    try:
        found = list_targets([str(x)])
    finally:
        stop()
    assert sorted((t.name, t.video) for t in found.targets) == [("p_png", False), ("t", False), ("t", True),
                                                                ("u_gif", False), ("u_png", False)]


def test_threads_above_the_cores_are_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_args, "available_cores", lambda: 4)
    _png(tmp_path / "targets" / "t0.png")

    def no_model():
        raise AssertionError("a model was loaded")

    base = ["matte", *_reference(tmp_path), "--targets", str(tmp_path / "targets"), "--out", str(tmp_path / "o")]
    for extra, message in (
        (["--threads", "5"], "error: python -m iconmatting_core matte: argument --threads: 5 is more than the 4 cores "
                             "this process may use; give at most 4 (or leave it out for the default) (see --help)\n"),
        (["--engine", "ray", "--cpus-per-worker", "4.5"],
         "error: --cpus-per-worker 4.5 is more than the 4 cores of this machine, where the job starts its Ray; give at most 4 "
         "(or the --address of a cluster with bigger nodes)\n"),
    ):
        try:
            code = main(base + extra, pipe_factory=no_model)
        except SystemExit as exc:
            code = exc.code
        assert (code, capsys.readouterr().err) == (2, message)
    parser = __import__("iconmatting_core.__main__", fromlist=["build_parser"]).build_parser()
    assert parser.parse_args(base + ["--threads", "4"]).threads == 4  # all the cores is allowed
    assert cli_args.local_cpus_problem(4.0, None) is None
    assert cli_args.local_cpus_problem(64.0, "ray://head:10001") is None  # a cluster's nodes are Ray's to judge
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert cli_args.local_cpus_problem(64.0, None) is None
