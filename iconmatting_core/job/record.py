"""What an output folder knows: which source and which recipe made each output, and which job is
writing into it.

**Each output carries its record.** An output's record is ``{"source", "recipe", "made_by"}``:

* ``source``: the target file it was matted from: resolved path, size, ``mtime_ns`` and the sha256
  of its bytes. The content hash is what identifies a source (a moved, copied or touched file is
  the same source; another file under the same output name is not); path, size and mtime only
  spare re-reading an unchanged file on the next run. Hashing is cheap next to matting: a
  4000x3000 JPEG (~5 MB) hashes in ~10 ms against seconds of matting, a clip at disk speed once per
  run that writes it (decoding and matting every frame cost far more), and a resumed job reads
  only the sources whose size or mtime changed.
* ``recipe``: everything else that decides the pixels: the reference (the sha256 of each reference
  image and mask file, the guidance, seed and resize mode they were encoded with; or, for a
  context file that does not carry them, the digest of its tokens and fields), the weights (the
  label of the model fingerprint; a context file carries it, so a ``--context`` job knows its recipe
  without loading any model), the targets' resize mode, ``--dtype`` as given, the model's input
  size and foreground estimation.

The record travels with the output (a PNG's text chunk ``iconmatting``, as ComfyUI keeps workflows in
its images; a video's ``comment`` tag; every frame of a PNG sequence), written in the same atomic
write as the pixels, so a matte found on disk says what made it. The folder's **job record**,
``iconmatting-job.jsonl``, indexes them: one line per completed output, appended after its files are
in place (:meth:`JobRecord.complete`, the one call every engine makes), with each file's size and
mtime. A line that no longer matches its file (a run killed between the two writes, a file replaced
since) is ignored and the file's own record read instead; the index is rewritten compactly when
needed. Outputs without any record (older versions) count as made differently.

**Resume by record.** :meth:`JobRecord.plan` sorts the targets: an output skipped on resume is one
whose source and recipe both match; targets with outputs made differently (with the count of each
difference) stop the job before any matting unless ``--overwrite`` redoes exactly those.

**One job per folder.** :class:`OutputLock` holds an exclusive ``flock`` on ``.iconmatting-job.lock``
for the whole job (the Ray driver included); a second job is refused. The kernel releases the lock
when the process ends, however it ends; a job that ends normally also removes the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .._version import __version__
from ..files import append_line, remove_path, write_file
from .outputs import OutputError, output_paths, target_outputs
from .targets import Target

RECORD_FILE = "iconmatting-job.jsonl"
LOCK_FILE = ".iconmatting-job.lock"
RECORD_KEY = "iconmatting"
NO_RECORD = "no record (written by an older version?)"
_HASH_BLOCK = 1 << 20


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def reference_recipe(images: Sequence, masks: Sequence, pooling: str, seed: int, resize_mode: str) -> dict:
    """The reference part of a recipe from reference and mask files (``--reference/--mask``;
    ``encode`` stores it in the context file, so both ways of giving one reference agree)."""
    return {"images": [file_sha256(p) for p in images], "masks": [file_sha256(p) for p in masks],
            "pooling": pooling, "seed": seed, "resize_mode": resize_mode}


def context_reference(context, header: dict) -> dict:
    """The reference part of a recipe for a context file: the reference files' recipe it stores
    (written by ``encode``), else the digest of the context itself."""
    from ..context_file import context_digest

    stored = header.get("extra", {}).get("reference")
    keys = {"images": list, "masks": list, "pooling": str, "seed": int, "resize_mode": str}
    if isinstance(stored, dict) and set(stored) == set(keys) and all(type(stored[k]) is t for k, t in keys.items()):
        return stored
    return {"context": context_digest(context)}


def job_recipe(reference: dict, fingerprint: str, resize_mode: str, dtype: str, image_size: int, foreground: bool) -> dict:
    from ..context_file import fingerprint_label

    return {"reference": reference, "weights": fingerprint_label(fingerprint), "resize_mode": resize_mode,
            "dtype": dtype, "image_size": image_size, "foreground": foreground}


_REFERENCE_PARTS = (("images", "reference image"), ("masks", "mask"), ("pooling", "guidance"), ("seed", "seed"),
                    ("resize_mode", "resize mode"), ("context", "context"))
_RECIPE_PARTS = (("weights", "weights"), ("resize_mode", "resize mode"), ("dtype", "dtype"), ("image_size", "image size"),
                 ("foreground", "foreground estimation"))


def recipe_differences(old, new: dict) -> List[str]:
    """What differs between two recipes, in words (each at most once)."""
    if not isinstance(old, dict) or not isinstance(old.get("reference"), dict):
        return [NO_RECORD]
    out: List[str] = []
    ref_old, ref_new = old["reference"], new["reference"]
    if ("context" in ref_old) != ("context" in ref_new):
        out.append("reference (a context file vs reference images)")
    else:
        out += [name for key, name in _REFERENCE_PARTS if ref_old.get(key) != ref_new.get(key)]
    out += [name for key, name in _RECIPE_PARTS if old.get(key) != new.get(key)]
    return list(dict.fromkeys(out))


def _stamp(path: Path) -> List[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def read_embedded(path: Path) -> Optional[dict]:
    """The record an output carries (see the module docstring), or None."""
    try:
        if path.is_dir():  # a PNG sequence: its first frame
            path = min(path.glob("*.png"), default=None)
            if path is None:
                return None
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as im:
                text = im.info.get(RECORD_KEY)
        else:
            from ..video import import_av

            with import_av().open(str(path)) as container:  # mp4 names the tag "comment", Matroska "COMMENT"
                comment = next((v for k, v in container.metadata.items() if k.lower() == "comment"), None)
            text = json.loads(comment).get(RECORD_KEY) if comment else None
        made = json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - an unreadable or foreign file has no record of ours
        return None
    return made if isinstance(made, dict) else None


@dataclass
class Plan:
    """Targets sorted by their outputs: ``done`` (outputs complete, same source and recipe),
    ``todo`` (no outputs yet, or some missing of the same recipe) and ``different`` (target ->
    what differs)."""

    done: List[Target] = field(default_factory=list)
    todo: List[Target] = field(default_factory=list)
    different: Dict[Target, List[str]] = field(default_factory=dict)

    def refusal(self, out_dir: Path) -> str:
        """The one line that stops a job whose folder holds outputs made differently."""
        counts = Counter(reason for reasons in self.different.values() for reason in reasons)
        what = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
        n = len(self.different)
        kept = f" (the other {len(self.done)} are kept)" if self.done else ""
        return (f"{n} target(s) have outputs in {out_dir} made differently ({what}); nothing was matted. Add --overwrite "
                f"to redo exactly those {n}{kept}, or pick another --out")


class JobRecord:
    """The records of the outputs in one folder for one job's ``recipe`` (see the module docstring)."""

    def __init__(self, out_dir, recipe: dict):
        self.out_dir, self.recipe = Path(out_dir), recipe
        self.path = self.out_dir / RECORD_FILE
        self.entries: Dict[str, dict] = {}  # output file (relative, "/"-separated) -> its latest record
        self._rewrite = False
        self._hashes: Dict[str, str] = {}
        self._read()

    def _rel(self, path: Path) -> str:
        return Path(path).relative_to(self.out_dir).as_posix()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for line in lines:
            try:
                entry = json.loads(line)
                files = entry["files"]
                if not isinstance(files, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                self._rewrite = self._rewrite or bool(line.strip())  # a torn or foreign line
                continue
            for rel in files:
                self._rewrite = self._rewrite or rel in self.entries  # superseded lines
                self.entries[rel] = entry

    def _record_of(self, path: Path) -> Optional[dict]:
        rel = self._rel(path)
        entry = self.entries.get(rel)
        if entry is not None and entry["files"].get(rel) == _stamp(path):
            return entry
        embedded = read_embedded(path)  # the index is stale for this file: the file's own record
        self._rewrite = True
        if embedded is None:
            self.entries.pop(rel, None)
            return None
        self.entries[rel] = {**embedded, "files": {rel: _stamp(path)}}
        return self.entries[rel]

    def _hash(self, real: str) -> str:
        if real not in self._hashes:
            self._hashes[real] = file_sha256(real)
        return self._hashes[real]

    def _same_source(self, entry: dict, path: Path) -> bool:
        recorded = entry.get("source")
        if not isinstance(recorded, dict):
            return False
        real = os.path.realpath(path)
        st = os.stat(real)
        now = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if all(recorded.get(k) == v for k, v in now.items()):
            return True
        if recorded.get("sha256") != self._hash(real):
            return False
        entry["source"] = {**now, "sha256": recorded["sha256"]}  # the same bytes: the next run needs no hashing
        self._rewrite = True
        return True

    def plan(self, targets: Sequence[Target], kinds: Sequence[str]) -> Plan:
        """Sort ``targets`` by their outputs (:class:`Plan`); rewrites the index when it is stale."""
        plan = Plan()
        for target in targets:
            paths = target_outputs(self.out_dir, target, kinds)
            existing = [p for p in paths if p.exists()]
            reasons: List[str] = []
            for p in existing:
                entry = self._record_of(p)
                if entry is None:
                    reasons.append(NO_RECORD)
                    continue
                reasons += recipe_differences(entry.get("recipe"), self.recipe)
                if not self._same_source(entry, target.path):
                    reasons.append("source")
            if reasons:
                plan.different[target] = list(dict.fromkeys(reasons))
            elif existing and len(existing) == len(paths):
                plan.done.append(target)
            else:
                plan.todo.append(target)
        self._compact()
        return plan

    def _compact(self) -> None:
        """Rewrite the index (one line per record, only files that still exist) when it holds
        torn, superseded or stale lines."""
        for rel in [r for r in self.entries if not (self.out_dir / r).exists()]:
            del self.entries[rel]
            self._rewrite = True
        if not self._rewrite:
            return
        merged: Dict[str, dict] = {}  # outputs of one target (same source, recipe...) share a line
        for rel, entry in self.entries.items():
            made = {k: v for k, v in entry.items() if k != "files"}
            line = merged.setdefault(json.dumps(made, sort_keys=True), {**made, "files": {}})
            line["files"][rel] = entry["files"][rel]
        write_file(self.path, "".join(json.dumps(line) + "\n" for line in merged.values()).encode())
        self._rewrite = False

    def describe(self, target: Target) -> dict:
        """The record of an output of ``target`` about to be written (its source is read now)."""
        real = os.path.realpath(target.path)
        st = os.stat(real)
        source = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(real)}
        return {"source": source, "recipe": self.recipe, "made_by": f"iconmatting_core {__version__}"}

    def complete(self, record: dict, paths: Sequence[Path]) -> None:
        """Index outputs whose files are complete and in place (every engine calls this, after
        writing them, never before)."""
        entry = {**record, "files": {self._rel(p): _stamp(p) for p in paths}}
        append_line(self.path, json.dumps(entry))
        for rel in entry["files"]:
            self.entries[rel] = entry

    def write_images(self, target: Target, alpha, rgba) -> None:
        """An image target's two PNGs (uint8 alpha [H, W], RGBA [H, W, 4]), each carrying its
        record, then indexed. Outputs of another recipe are removed first (``--overwrite``), so a
        run killed in between never leaves an old and a new output side by side."""
        from ..image_io import png_bytes

        record = self.describe(target)
        text = {RECORD_KEY: json.dumps(record)}
        paths = output_paths(self.out_dir, target.name)
        for p in paths:
            remove_path(p)
        write_file(paths[0], png_bytes(alpha, "L", text))
        write_file(paths[1], png_bytes(rgba, "RGBA", text))
        self.complete(record, paths)


class OutputLock:
    """An exclusive lock on an output folder for as long as a job runs (``with OutputLock(out):``);
    OutputError (one line) when another job holds it. The lock file is removed when the job ends
    (a job that finds the file replaced after locking it locks the new one instead)."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OutputError(f"--out {self.out_dir}: cannot create {self.path.name} ({exc.strerror or exc})") from None
            if not _try_lock(fd):
                try:
                    holder = os.read(fd, 64).decode(errors="replace").strip()
                except OSError:
                    holder = ""
                os.close(fd)
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise OutputError(f"--out {self.out_dir} is in use by another iconmatting job{who}; wait for it to finish, "
                                  "or pick another --out")
            if _same_file(fd, self.path):
                self.fd = fd
            else:  # the job that held it removed it meanwhile: lock the file that is there now
                os.close(fd)
        try:  # who holds it, for the message above; best effort (a full disk must not stop the job here)
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()  # while still locked, so no other job can hold this file
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        return _try_lock_windows(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _try_lock_windows(fd: int) -> bool:
    try:
        import msvcrt
    except ImportError:  # neither fcntl nor msvcrt: a platform we do not know, so no lock rather than no job
        return True
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False
