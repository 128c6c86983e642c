"""Targets of a ``matte`` job and the names of their outputs.

``--targets`` takes folders (searched recursively unless ``recursive=False``), globs (``**``
matches any depth), image/video files and manifest files (``.txt``/``.lst``/``.list``, one path per
line, relative to the manifest's folder).

Output names are a function of each file's own path, never of the other targets, so adding
targets to a job never renames (and re-mattes) earlier outputs:

* a file found in a folder or by a glob is named by its path under that folder (under the glob's
  fixed leading folder), without its extension: ``photos/`` holding ``trip/x.jpg`` gives
  ``trip/x`` -> ``<out>/trip/x_alpha.png`` (the input tree is mirrored under ``--out``);
* a file given by itself or in a manifest is named by its stem: ``<out>/x_alpha.png``;
* when the file's own folder holds another target of the same kind (image or video) with the same
  stem, the extension is kept: ``t0.png`` and ``t0.jpg`` -> ``t0_png``, ``t0_jpg``.

Two different files that would still get the same name (e.g. ``a/x.png`` and ``b/x.png`` given as
two folders) are refused up front (:class:`TargetError`). Nothing under ``--out`` is ever a
target, so an output folder inside a target folder is skipped.
"""
from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..image_io import IMAGE_EXTENSIONS
from ..video import VIDEO_EXTENSIONS, is_video

MANIFEST_EXTENSIONS = {".txt", ".lst", ".list"}
TARGET_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


class TargetError(ValueError):
    """``--targets`` that cannot make a job (a usage error); the message names the spec."""


@dataclass(frozen=True)
class Target:
    path: Path
    name: str  # output name relative to the output folder, "/"-separated, without extension

    @property
    def video(self) -> bool:
        return is_video(self.path)


@dataclass
class TargetList:
    targets: List[Target] = field(default_factory=list)
    skipped_types: Counter = field(default_factory=Counter)  # extension -> files of other types in folders
    skipped_out: int = 0  # files under --out
    problems: List[str] = field(default_factory=list)  # entries skipped (symlink loops, unreadable folders)

    def notes(self) -> List[str]:
        out = []
        if self.skipped_types:
            kinds = ", ".join(f"{ext or '(none)'} x{n}" for ext, n in sorted(self.skipped_types.items()))
            out.append(f"skipped {sum(self.skipped_types.values())} file(s) of other types: {kinds}")
        if self.skipped_out:
            out.append(f"left out {self.skipped_out} file(s) under the output folder")
        return out + [f"skipped {p}" for p in self.problems]


def _is_under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _real(path: Path) -> Optional[Path]:
    try:
        return Path(os.path.realpath(path, strict=True))
    except (OSError, RuntimeError):
        return None


def _glob_root(spec: str) -> Path:
    """The leading folder of a glob with no wildcard in it."""
    parts = []
    for part in Path(spec).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _walk(root: Path, recursive: bool, out_real: Optional[Path], found: TargetList) -> List[Path]:
    """Target files under a folder, sorted; follows folder links once (loops are skipped and reported)."""
    files: List[Path] = []
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=lambda e: found.problems.append(
            f"{e.filename}: {e.strerror}")):
        real = _real(Path(dirpath))
        if real is None or real in seen_dirs:
            found.problems.append(f"{dirpath}: folder link loop")
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        if out_real is not None and _is_under(real, out_real):
            found.skipped_out += sum(len(names) for _, _, names in os.walk(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(dirnames) if recursive else []
        for name in sorted(filenames):
            files.append(Path(dirpath) / name)
    return files


def _kept(path: Path, found: TargetList, out_real: Optional[Path], from_folder: bool) -> bool:
    """Whether a file found in a folder or by a glob is a target (counts what is left out)."""
    ext = path.suffix.lower()
    if ext not in TARGET_EXTENSIONS:
        if from_folder:
            found.skipped_types[ext] += 1
        return False
    real = _real(path)
    if real is None:
        found.problems.append(f"{path}: link loop or broken link")
        return False
    if out_real is not None and _is_under(real, out_real):
        found.skipped_out += 1
        return False
    return True


def read_manifest(path: Path) -> List[Path]:
    """One target path per line (blank lines and '#' comments skipped); relative paths are
    relative to the manifest's folder."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(p if p.is_absolute() else Path(path).parent / p)
    return out


def _sibling_stems(folder: Path, cache: Dict[Path, Counter]) -> Counter:
    if folder not in cache:
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        cache[folder] = Counter((Path(n).stem.casefold(), is_video(Path(n))) for n in names
                                if Path(n).suffix.lower() in TARGET_EXTENSIONS)
    return cache[folder]


def _name(path: Path, root: Optional[Path], cache: Dict[Path, Counter]) -> str:
    stem = path.stem
    if _sibling_stems(path.parent, cache)[(stem.casefold(), is_video(path))] > 1:
        stem += "_" + path.suffix.lstrip(".").lower()
    if root is None:
        return stem
    rel = path.parent.relative_to(root).parts
    return "/".join((*rel, stem))


def list_targets(specs: Sequence[str], out_dir: Optional[Path] = None, recursive: bool = True) -> TargetList:
    """``--targets`` specs -> the job's targets, in the given order (folders and globs sorted),
    each file once. Raises TargetError for a spec that names nothing, a folder or glob without
    targets, ``--out`` equal to or holding a target folder, and two files that would get the same name."""
    out_real = _real(Path(out_dir)) if out_dir is not None and Path(out_dir).exists() else (
        Path(os.path.abspath(out_dir)) if out_dir is not None else None)
    found = TargetList()
    entries: List[Tuple[Path, Optional[Path]]] = []  # (file, root folder or None)
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            real = _real(p)
            if out_real is not None and real is not None and _is_under(real, out_real):
                raise TargetError(f"--out {out_dir} is (or holds) the --targets folder {spec}; give another --out folder")
            files = [f for f in _walk(p, recursive, out_real, found) if _kept(f, found, out_real, True)]
            if not files:
                raise TargetError(f"--targets {spec}: no images or videos in this folder"
                                  + ("" if recursive else " (not searched recursively)"))
            entries += [(f, p) for f in files]
        elif p.is_file() and p.suffix.lower() in MANIFEST_EXTENSIONS:
            listed = read_manifest(p)
            if not listed:
                raise TargetError(f"--targets {spec}: the manifest lists no files")
            entries += [(f, None) for f in listed]
        elif p.is_file() or p.is_symlink():
            entries.append((p, None))
        elif glob.has_magic(spec):
            root = _glob_root(spec)
            matches = sorted(Path(q) for q in glob.glob(spec, recursive=True) if Path(q).is_file())
            files = [f for f in matches if _kept(f, found, out_real, False)]
            if not files:
                raise TargetError(f"--targets {spec!r} matches no image or video" + (
                    f" ({len(matches)} other file(s))" if matches else "") + "; check the pattern (quote it for the shell)")
            entries += [(f, root) for f in files]
        else:
            raise TargetError(f"--targets {spec}: no such file or folder")
    cache: Dict[Path, Counter] = {}
    seen: Dict[Path, Target] = {}
    by_name: Dict[Tuple[str, bool], Target] = {}
    for path, root in entries:
        key = _real(path) or Path(os.path.abspath(path))
        if key in seen:
            continue
        target = Target(path, _name(path, root, cache))
        other = by_name.get((target.name.casefold(), target.video))
        if other is not None:
            raise TargetError(
                f"{other.path} and {path} would both write outputs named {target.name!r}; "
                "matte them into separate --out folders (or rename one)")
        seen[key] = by_name[(target.name.casefold(), target.video)] = target
        found.targets.append(target)
    return found


def split_targets(targets: Sequence[Target]) -> Tuple[List[Target], List[Target]]:
    """(images, videos)."""
    return [t for t in targets if not t.video], [t for t in targets if t.video]
