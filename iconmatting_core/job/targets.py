"""Targets of a ``matte`` job and the names of their outputs.

``--targets`` takes folders (searched recursively unless ``recursive=False``), globs (``**``
matches any depth), image/video files and manifest files (``.txt``/``.lst``/``.list``, UTF-8 with or
without a byte-order mark, any line endings; one path per line, relative to the manifest's folder).

A target is a clip or an image, decided here once (:func:`is_clip`): a video file, or a GIF/WebP/PNG
holding more than one frame (by its content, not its name; a one-frame GIF/WebP or a plain PNG is an image).

Only regular files are read: a named pipe would block the job forever, a device would never end.
Folder links are followed, but never into a folder that holds the link (the target folder itself or
any folder above it), so a link to a parent folder does not matte that parent. Entries skipped for a
reason (a pipe, socket or device file with a target's extension, a broken link, a link loop, a
folder that cannot be listed, a link to a folder that holds it) are :attr:`TargetList.problems`,
which the job lists in ``failures.jsonl`` with the targets that failed.

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

import errno
import glob
import os
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..image_io import ANIMATED_EXTENSIONS, IMAGE_EXTENSIONS, is_animation
from ..video import VIDEO_EXTENSIONS

MANIFEST_EXTENSIONS = {".txt", ".lst", ".list"}
TARGET_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS | ANIMATED_EXTENSIONS


class TargetError(ValueError):
    """``--targets`` that cannot make a job (a usage error); the message names the spec."""


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def is_clip(path: Path) -> bool:
    """Whether a target is a clip (else an image): a video file, or a GIF/WebP/PNG that holds more than
    one frame (read from the file's headers; only a regular file is opened)."""
    suffix = Path(path).suffix.lower()
    if suffix in ANIMATED_EXTENSIONS:
        return _regular(path) and is_animation(path)
    return suffix in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class Target:
    path: Path
    name: str  # output name relative to the output folder, "/"-separated, without extension
    video: Optional[bool] = None  # a clip (see is_clip); worked out from the file when not given

    def __post_init__(self):
        if self.video is None:
            object.__setattr__(self, "video", is_clip(self.path))


@dataclass
class TargetList:
    targets: List[Target] = field(default_factory=list)
    skipped_types: Counter = field(default_factory=Counter)  # extension -> files of other types in folders
    skipped_out: int = 0  # files under --out
    skipped_again: int = 0  # folders reached a second time through a link (their files are listed once)
    problems: List[Tuple[Path, str]] = field(default_factory=list)  # (entry, why it was skipped): failures of the job

    def notes(self) -> List[str]:
        out = []
        if self.skipped_types:
            kinds = ", ".join(f"{ext or '(none)'} x{n}" for ext, n in sorted(self.skipped_types.items()))
            out.append(f"skipped {sum(self.skipped_types.values())} file(s) of other types: {kinds}")
        if self.skipped_out:
            out.append(f"left out {self.skipped_out} file(s) under the output folder")
        if self.skipped_again:
            out.append(f"did not follow {self.skipped_again} folder link(s) to folders listed already")
        return out + [f"skipped {path}: {why}" for path, why in self.problems]


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


_FILE_TYPES = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _unreadable(path: Path) -> Optional[str]:
    """Why a listed entry must not be read as a target (reading a pipe blocks forever, a device never
    ends): not a regular file, a broken link or a link loop. None for a regular file, and for a
    missing one that is no link (its reader reports it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if not os.path.islink(path):
            return None
        if exc.errno == errno.ELOOP:
            return "a link loop; not followed"
        if exc.errno == errno.ENOENT:
            return f"a broken link: its target {os.readlink(path)} does not exist"
        return f"cannot follow this link ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_TYPES if test(mode)), "a special file")
    return f"not a regular file but {kind}; not read"


def _walk(root: Path, recursive: bool, out_real: Optional[Path], found: TargetList) -> List[Path]:
    """Entries under a folder that are not folders, sorted. Folder links are followed, each folder
    listed once, never into a folder that holds the link (compared as resolved paths); a sub-folder
    that cannot be listed is a problem (the folder itself, a TargetError)."""
    files: List[Path] = []
    seen_dirs = set()

    def unlisted(exc: OSError) -> None:
        if Path(exc.filename) == Path(root):
            raise TargetError(f"--targets {root}: cannot list this folder ({exc.strerror}); check its permissions")
        found.problems.append((Path(exc.filename), f"cannot list this folder ({exc.strerror})"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unlisted):
        here = Path(os.path.realpath(dirpath))
        if here in seen_dirs:  # reached again through a link (e.g. a link beside its target): listed already
            found.skipped_again += 1
            dirnames[:] = []
            continue
        seen_dirs.add(here)
        if out_real is not None and _is_under(here, out_real):
            found.skipped_out += sum(len(names) for _, _, names in os.walk(dirpath))
            dirnames[:] = []
            continue
        followed = []
        for name in sorted(dirnames) if recursive else []:
            sub = Path(dirpath) / name
            link_to = Path(os.path.realpath(sub)) if os.path.islink(sub) else None
            if link_to is not None and _is_under(here, link_to):
                found.problems.append((sub, f"a link to {link_to}, a folder that holds it; not followed"))
            else:
                followed.append(name)
        dirnames[:] = followed
        files += [Path(dirpath) / name for name in sorted(filenames)]
    return files


def _kept(path: Path, found: TargetList, out_real: Optional[Path], from_folder: bool) -> bool:
    """Whether an entry found in a folder or by a glob is a target (counts and records what is left
    out: a broken link or link loop of any name, and a pipe, socket or device with a target's extension,
    are problems; a pipe of another name is just a file of another type, never opened)."""
    ext = path.suffix.lower()
    why = _unreadable(path)
    if why is not None and (ext in TARGET_EXTENSIONS or os.path.islink(path)):
        found.problems.append((path, why))
        return False
    if ext not in TARGET_EXTENSIONS:
        if from_folder:
            found.skipped_types[ext] += 1
        return False
    if out_real is not None and _is_under(Path(os.path.realpath(path)), out_real):
        found.skipped_out += 1
        return False
    return True


def read_manifest(path: Path) -> List[Path]:
    """One target path per line (blank lines and '#' comments skipped); relative paths are
    relative to the manifest's folder. UTF-8, with or without a byte-order mark (Windows editors
    write one), any line endings; TargetError when the file cannot be read as such."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TargetError(f"--targets {path}: this manifest is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise TargetError(f"--targets {path}: cannot read this manifest ({exc.strerror})") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(p if p.is_absolute() else Path(path).parent / p)
    return out


def _same_stems(folder: Path, cache: Dict[Path, Dict[str, List[str]]]) -> Dict[str, List[str]]:
    """The folder's names with a target's extension, by stem (case-folded)."""
    if folder not in cache:
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        stems: Dict[str, List[str]] = defaultdict(list)
        for n in names:
            if Path(n).suffix.lower() in TARGET_EXTENSIONS:
                stems[Path(n).stem.casefold()].append(n)
        cache[folder] = stems
    return cache[folder]


def _name(path: Path, root: Optional[Path], cache: Dict[Path, Dict[str, List[str]]], kind) -> str:
    """The output name; ``kind(path)`` is whether a file is a clip (siblings with the same stem are
    looked at only then, so a folder's GIFs/WebPs/PNGs are not all opened for it)."""
    stem = path.stem
    siblings = _same_stems(path.parent, cache)[stem.casefold()]
    if len(siblings) > 1 and sum(kind(path.parent / n) == kind(path) for n in siblings) > 1:
        stem += "_" + path.suffix.lstrip(".").lower()
    if root is None:
        return stem
    rel = path.parent.relative_to(root).parts
    return "/".join((*rel, stem))


def list_targets(specs: Sequence[str], out_dir: Optional[Path] = None, recursive: bool = True) -> TargetList:
    """``--targets`` specs -> the job's targets, in the given order (folders and globs sorted),
    each file once, each an image or a clip (:func:`is_clip`). Raises TargetError for a spec that
    names nothing, a folder or glob without targets, ``--out`` equal to or holding a target folder,
    a manifest that cannot be read, and two files that would get the same name."""
    out_real = _real(Path(out_dir)) if out_dir is not None and Path(out_dir).exists() else (
        Path(os.path.abspath(out_dir)) if out_dir is not None else None)
    found = TargetList()
    entries: List[Tuple[Path, Optional[Path]]] = []  # (file, root folder or None)

    def add_listed(paths: Sequence[Path]) -> None:  # files given by name (by themselves or in a manifest)
        for f in paths:
            why = _unreadable(f)
            if why is None:
                entries.append((f, None))
            else:
                found.problems.append((f, why))

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
            add_listed(listed)
        elif os.path.lexists(p):  # a file, or a link, pipe, ... (recorded as a problem, never read)
            add_listed([p])
        elif glob.has_magic(spec):
            root = _glob_root(spec)
            matches = sorted(Path(q) for q in glob.glob(spec, recursive=True) if not Path(q).is_dir())
            files = [f for f in matches if _kept(f, found, out_real, False)]
            if not files:
                raise TargetError(f"--targets {spec!r} matches no image or video" + (
                    f" ({len(matches)} other file(s))" if matches else "") + "; check the pattern (quote it for the shell)")
            entries += [(f, root) for f in files]
        else:
            raise TargetError(f"--targets {spec}: no such file or folder")
    cache: Dict[Path, Dict[str, List[str]]] = {}
    kinds: Dict[Path, bool] = {}

    def kind(path: Path) -> bool:
        if path not in kinds:
            kinds[path] = is_clip(path)
        return kinds[path]

    seen: Dict[Path, Target] = {}
    by_name: Dict[Tuple[str, bool], Target] = {}
    for path, root in entries:
        key = _real(path) or Path(os.path.abspath(path))
        if key in seen:
            continue
        target = Target(path, _name(path, root, cache, kind), kind(path))
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
