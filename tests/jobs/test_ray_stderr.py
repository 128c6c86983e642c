"""What `matte --engine ray` does with stderr while a job runs (``ray_engine._without_native_log_lines``): the lines
Ray's C++ core writes straight to fd 2 are dropped, everything else passes, and the job's own progress goes past
that filter, so on a terminal it is a tqdm bar (README "Progress"); a caller's own ``sys.stderr`` is kept."""
import os
import pty
import subprocess
import sys
from pathlib import Path

from iconmatting_core.job.ray_engine import _without_native_log_lines

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import os
from iconmatting_core.job.ray_engine import _without_native_log_lines

with _without_native_log_lines() as progress:
    os.write(2, b"[2026-01-01 10:00:00,000 E 123 123] a note of Ray's core\n")
    os.write(2, b"another library's line\n")
    progress.write(f"progress on a terminal: {progress.isatty()}; fd 2 a terminal: {os.isatty(2)}\n")
"""


def _run(stderr):
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, stderr=stderr, stdout=subprocess.DEVNULL, timeout=120)


def test_on_a_terminal_the_progress_stream_is_the_terminal_and_core_lines_are_dropped():
    master, slave = pty.openpty()
    try:
        assert _run(slave).returncode == 0
        os.close(slave)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    lines = shown.decode().replace("\r\n", "\n").splitlines()
    assert sorted(lines) == ["another library's line", "progress on a terminal: True; fd 2 a terminal: False"]


def test_redirected_the_progress_stream_is_the_file(tmp_path):
    with open(tmp_path / "log", "wb") as log:
        assert _run(log).returncode == 0
    assert sorted((tmp_path / "log").read_text().splitlines()) == [
        "another library's line", "progress on a terminal: False; fd 2 a terminal: False"]


def test_a_callers_own_stderr_stream_gets_the_progress(capsys):
    with _without_native_log_lines() as progress:
        assert progress is sys.stderr
        print("a line", file=progress)
    assert capsys.readouterr().err == "a line\n"
