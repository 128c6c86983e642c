"""Writing files: the one home of how anything this package writes reaches the disk.

* Atomic: a file is written under a temporary name in its own folder and renamed over the final
  name when complete, so a killed or failing write never leaves a half file under a name that a
  later run (a resumed job, a loader) would take for whole; the temporary file is removed when the
  write fails.
* Short temporary names: ``.<16 hex of the final name>.<pid>.partial``, whatever the final name's
  length (a suffix appended to a 250-byte name would pass the file system's 255-byte limit). The
  pid keeps two processes writing the same file apart. :func:`remove_partials` finds what a killed
  run left (any name holding ``.partial``, the older ``<name>.partial`` spellings included).
* A user's file mode: created by ``open`` with 0666 less the umask, like any file the user writes,
  also for safetensors files (``safetensors.torch.save_file`` would create them 0600): they are
  serialised to bytes and written here.
* One seam: every byte this module writes goes through :func:`_write_bytes`, where the tests inject
  a full or read-only disk.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional

PARTIAL = ".partial"


def partial_path(path: Path) -> Path:
    """The temporary name :func:`write_file` (and a caller writing a file or folder by other means,
    e.g. a video encoder) uses for ``path``: short, hidden, in the same folder."""
    path = Path(path)
    digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]
    return path.with_name(f".{digest}.{os.getpid()}{PARTIAL}")


def _write_bytes(path: Path, data: bytes, append: bool = False) -> None:  # the one place bytes reach the disk
    with open(path, "ab" if append else "wb") as f:
        f.write(data)


def write_file(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        _write_bytes(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path


def append_line(path, line: str) -> None:
    """Append one line (a single write, so a killed run leaves at most a torn last line, which
    readers of such logs skip)."""
    _write_bytes(Path(path), (line.rstrip("\n") + "\n").encode(), append=True)


def write_safetensors(path, tensors, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """A ``.safetensors`` file, atomically and with the user's file mode (see the module docstring)."""
    from safetensors.torch import save

    return write_file(path, save(dict(tensors), metadata=dict(metadata) if metadata else None))


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename a completed temporary file or folder over ``final`` (an existing one is replaced)."""
    remove_path(final)
    os.replace(tmp, final)


def remove_path(path: Path) -> None:
    """Remove a file or folder if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_partials(folder) -> int:
    """Remove the temporary files and folders a killed or stopped run left under ``folder``; returns how many."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + dirnames:
            if PARTIAL in name:
                try:
                    remove_path(Path(dirpath) / name)
                    removed += 1
                except OSError:
                    pass
    return removed
