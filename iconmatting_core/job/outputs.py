"""Where a job's outputs go and what stops a job: output paths, the errors every target would meet
(a full disk, out of GPU memory), the failures manifest and progress lines. Files are written by
``iconmatting_core.files`` (atomic, never a half file); which outputs count as done is the job
record's (``record``)."""
from __future__ import annotations

import errno
import json
import sys
import time
import uuid
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..files import write_file
from .clips import output_paths as video_output_paths
from .targets import Target

FAILURES_FILE = "failures.jsonl"
_STOP_ERRNOS = {
    getattr(errno, name): what for name, what in (("ENOSPC", "no space left on the disk"),
                                                  ("EDQUOT", "disk quota exceeded"), ("EROFS", "the disk is read-only"))
    if hasattr(errno, name)
}


class OutputError(OSError):
    """The output folder cannot be written (a usage problem found before any model work)."""


class JobStopped(RuntimeError):
    """An error that every remaining target would meet too (disk full, read-only disk, out of GPU
    memory): the job stops at once instead of failing target after target."""


def output_paths(out_dir: Path, name: str) -> Tuple[Path, Path]:
    """(alpha, rgba) PNG paths of an image target named ``name`` (see ``targets``)."""
    return Path(out_dir) / f"{name}_alpha.png", Path(out_dir) / f"{name}_rgba.png"


def target_outputs(out_dir: Path, target: Target, video_outputs: Sequence[str]) -> List[Path]:
    if target.video:
        return list(video_output_paths(out_dir, target.path, video_outputs, target.name).values())
    return list(output_paths(out_dir, target.name))


def stop_reason(exc: BaseException) -> Optional[str]:
    """A one-line reason when ``exc`` would stop every remaining target too, else None."""
    if isinstance(exc, JobStopped):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _STOP_ERRNOS:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"{_STOP_ERRNOS[exc.errno]}{where}; free space (or pick another --out) and re-run the same command to resume"
    if is_out_of_memory(exc):
        return OUT_OF_MEMORY
    return None


def _out_of_memory_types() -> tuple:
    torch = sys.modules.get("torch")
    if torch is None:  # torch never loaded: nothing raised can be its error
        return ()
    return tuple({t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if isinstance(t, type)})


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error is torch running out of GPU memory: by its type (``torch.OutOfMemoryError``),
    except a CUDA error torch raises untyped (a RuntimeError saying "CUDA error: out of memory",
    e.g. a library's own allocation), which only its words tell. A Ray worker asks this of its own
    exception and sends the answer as the row's type (``ray_engine``)."""
    if isinstance(error, _out_of_memory_types()):
        return True
    return isinstance(error, RuntimeError) and "CUDA error: out of memory" in str(error)


OUT_OF_MEMORY = ("out of GPU memory; close other GPU programs, or use --dtype fp16, a smaller --chunk-size, "
                "or --device cpu, and re-run the same command to resume")


def check_writable(out_dir: Path, what: str = "--out") -> None:
    """Create ``out_dir`` and check a file can be written in it; OutputError (one line) if not."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{what} {out_dir} is a file; give a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".iconmatting-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{what} {out_dir} cannot be written ({exc.strerror or exc}); pick a writable folder") from None


class Failures:
    """This run's failures: reported at the end and written to ``failures.jsonl`` in the output
    folder (one JSON object per line: path, error, and error_type: the exception's class name, or
    ``JobStopped``, when the error came from one). The file is rewritten by every run, so it
    lists what is still failing; it is removed when nothing failed. When it cannot be written
    (a full disk), the list is printed instead."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / FAILURES_FILE
        self.items: List[Tuple[str, str]] = []
        self.types: List[Optional[str]] = []  # each item's error type

    def add(self, target, error: str, error_type: Optional[str] = None) -> None:
        self.items.append((str(getattr(target, "path", target)), error))
        self.types.append(error_type)

    def _lines(self) -> List[str]:
        return [json.dumps({"path": p, "error": e, **({"error_type": t} if t else {})})
                for (p, e), t in zip(self.items, self.types)]

    def __len__(self) -> int:
        return len(self.items)

    def finish(self, stream=None) -> bool:
        """Write (or remove) the manifest; False (after printing every failure) if it cannot be written."""
        try:
            if self.items:
                write_file(self.path, "".join(line + "\n" for line in self._lines()).encode())
            elif self.path.exists():
                self.path.unlink()
            return True
        except OSError as exc:
            stream = stream or sys.stderr
            print(f"error: cannot write {self.path} ({exc.strerror or exc}); the failures were:", file=stream)
            for line in self._lines():
                print(line, file=stream)
            return False


def error_text(exc: BaseException) -> str:
    """``Type: message`` on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class Progress:
    """Progress on stderr. On a terminal: a tqdm bar with rate and ETA (plain lines without tqdm).
    Off a terminal (CI logs, ``> job.log``): one plain line every ``interval`` seconds and at the end,
    never ``\\r`` updates.

    ``update(n, note)`` advances by n items; ``log(line)`` prints a line; ``total`` may be None."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "img", interval: float = 5.0, stream=None):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self.started = self.last = time.monotonic()
        self.interval, self.bar = interval, None
        if getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            return (f"{self.desc}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%), "
                    f"{rate:.2f} {self.unit}/s, ETA {eta:.0f}s")
        return f"{self.desc}: {self.done}, {rate:.2f} {self.unit}/s"

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done:
            print(self.line(), file=self.stream, flush=True)
