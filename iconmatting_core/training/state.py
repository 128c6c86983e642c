"""What a training run writes: head files (the format ``convert`` writes, plus training metadata),
checkpoints for resuming (written atomically, never read half-written), ``metrics.csv`` and the
run record that says what the run is.

Run folder::

    RUN/run.json                         # the run record: its settings' history, its data files
    RUN/head.safetensors                 # at the end: the last head, or the best on validation
    RUN/best.safetensors                 # with --val-data: the best head so far
    RUN/metrics.csv                      # one row per step (validation SAD on validation steps)
    RUN/checkpoints/step-0000500/        # state.pt (head, optimizer, step, RNG states) + head.safetensors

A checkpoint folder is written under its temporary name (``files.partial_path``) and renamed when
complete, so a folder named ``step-N`` is always whole; leftovers of a killed run are removed on start.

A run is known by what made it, never by its folder's name (:func:`check_start`): a folder that
holds a run is never trained into afresh (only ``--resume``), and a run is resumed only with its
own *recipe* -- global batch, BatchNorm group, lr, warm-up, loss, seed, trimap band, SD precision,
model config (timestep included), the initial head's weights (a digest), the data and validation
data (digests of their files' contents), the SD weights (fingerprint) -- unless the user says
``--resume-with-changes``; the record, and every head the run writes, then keep the whole history
(each recipe with the step it began at). ``run.json`` also lists every data file (relative path,
size, sha256), so a refusal can say what changed in the data.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..checkpoint import CONFIG_METADATA_KEY, EMPTY_PROMPT_KEY, TRAINING_METADATA_KEY
from ..files import move_into_place, partial_path, remove_partials, remove_path, write_file, write_safetensors

_STEP_DIR = re.compile(r"^step-(\d+)$")
RUN_RECORD = "run.json"
RUN_FILES = (RUN_RECORD, "metrics.csv", "head.safetensors", "best.safetensors", "checkpoints")
# the recipe's entries as the command line names them (what a refused resume lists)
RECIPE_NAMES = {"batch_size": "--batch-size", "bn_group": "BatchNorm group", "lr": "--lr", "warmup": "--warmup",
                "loss": "--loss", "seed": "--seed", "trimap_radius": "--trimap-radius",
                "mixed_precision": "--mixed-precision", "config": "model config", "init": "--init",
                "data": "--data", "val_data": "--val-data", "sd": "--sd"}


class ResumeError(ValueError):
    """--out or --resume points at nothing usable, or at a run of another recipe; the message says what to do."""


def write_head(path, head: torch.nn.Module, config, training: dict, empty_prompt: Optional[torch.Tensor] = None) -> Path:
    """The head as ``convert`` writes it (IconMattingHead keys, config in the metadata), plus the
    training metadata (JSON under ``iconmatting_training``); written atomically (``files.write_safetensors``)."""
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in head.state_dict().items()}
    if empty_prompt is not None:
        tensors[EMPTY_PROMPT_KEY] = empty_prompt.detach().float().contiguous().cpu()
    return write_safetensors(path, tensors, {CONFIG_METADATA_KEY: json.dumps(config.to_dict()),
                                             TRAINING_METADATA_KEY: json.dumps(training, sort_keys=True)})


def weights_digest(state: Dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, shapes and float32 values: the same weights from any file format."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update((t.float() if t.is_floating_point() else t).contiguous().numpy().tobytes())
    return h.hexdigest()


def run_files(run) -> List[str]:
    """The files of a training run that a folder holds ([] for a new or an empty folder)."""
    return [name for name in RUN_FILES if (Path(run) / name).exists()]


def read_record(run) -> Optional[dict]:
    path = Path(run) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResumeError(f"cannot read the run record {path} ({type(exc).__name__}); resume with "
                          "--resume-with-changes to write a new one, or give another --out") from None
    return record if isinstance(record, dict) else None


def write_record(run, record: dict) -> Path:
    """``run.json``, written to a temporary file and renamed (never read half-written)."""
    return write_file(Path(run) / RUN_RECORD, json.dumps(record, sort_keys=True).encode("utf-8"))


def _files_changed(what: str, old: dict, new: dict) -> str:
    changed = sum(1 for k in new if k in old and list(old[k]) != list(new[k]))
    added, removed = len(set(new) - set(old)), len(set(old) - set(new))
    parts = [f"{n} file(s) {word}" for n, word in ((changed, "changed"), (added, "added"), (removed, "removed")) if n]
    return f"{what}: " + (", ".join(parts) if parts else "other groups or names") + " (by content)"


def recipe_changes(old: dict, new: dict, old_files: Optional[dict] = None, new_files: Optional[dict] = None) -> List[str]:
    """What differs between a run's recipe and a new one, one short phrase each (entries missing from
    ``new`` are not compared: the SD weights before they are loaded)."""
    from ..context_file import same_weights

    old_files, new_files = old_files or {}, new_files or {}
    out = []
    for key, name in RECIPE_NAMES.items():
        if key not in new or old.get(key) == new[key]:
            continue
        a, b = old.get(key), new[key]
        if key == "sd":
            if not same_weights(a, b):
                out.append(f"{name}: other weights (by fingerprint)")
        elif key == "init":
            out.append(f"{name}: " + ("another head (by content)" if a and b else "a head -> none" if a else "none -> a head"))
        elif key in ("data", "val_data"):
            if a and b:
                out.append(_files_changed(name, old_files.get(key) or {}, new_files.get(key) or {}))
            else:
                out.append(f"{name}: " + ("none -> a folder" if b else "a folder -> none"))
        elif key == "config" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{field} {a.get(field)} -> {b.get(field)}" for field in sorted(set(a) | set(b)) if a.get(field) != b.get(field)]
        else:
            out.append(f"{name} {a} -> {b}")
    return out


def check_start(run, resume: Optional[str], recipe: dict, files: dict, allow_changes: bool) -> List[str]:
    """Whether a run may start in ``run`` as asked; returns the changes of recipe that
    ``allow_changes`` lets through (else ResumeError, one line naming them and the ways out).

    Without ``resume`` the folder must hold no run. With it, the run that owns the checkpoint (or
    ``run`` for ``latest``) must have been made with ``recipe`` and ``files``."""
    run = Path(run)
    found = run_files(run)
    if not resume:
        if found:
            raise ResumeError(f"--out {run} already holds a training run ({', '.join(found)}); continue it with "
                              "--resume latest, or give another --out")
        return []
    folder = resolve_resume(run, resume)
    source = run if folder is None else folder.parent.parent
    if source.resolve() != run.resolve() and found:
        raise ResumeError(f"--out {run} already holds a training run ({', '.join(found)}); resume {folder} into "
                          "a new --out")
    if folder is None and (run / "head.safetensors").exists():
        raise ResumeError(f"--resume {resume}: {run} holds a finished head but no checkpoint to resume from; "
                          "give another --out")
    record = read_record(source)
    if record is None:
        if folder is None or allow_changes:
            return [] if folder is None else ["no run record"]
        raise ResumeError(f"--resume {resume}: {source} has no run record ({RUN_RECORD}), so its settings cannot be "
                          "checked; add --resume-with-changes to continue it anyway, or give another --out")
    old = (record.get("history") or [{}])[-1].get("recipe", {})
    changes = recipe_changes(old, recipe, record.get("files"), files)
    if changes and not allow_changes:
        raise ResumeError(f"--resume {resume}: the run was made with other settings ({'; '.join(changes)}); resume "
                          "with its settings, add --resume-with-changes to continue with these (the run's history "
                          "keeps both), or give another --out")
    return changes


def run_history(run, resume_dir: Optional[Path], start: int, recipe: dict, changes: List[str], processes: int) -> list:
    """The run's recipes with the step each began at: the owning run's up to ``start``, plus this
    start when it begins a run or changes the recipe."""
    entry = {"step": start, "recipe": recipe, "processes": processes}
    if resume_dir is None:
        return [entry]
    record = read_record(resume_dir.parent.parent) or {}
    kept = [h for h in record.get("history") or [] if int(h.get("step", 0)) <= start]
    if changes or not kept:
        kept = [h for h in kept if int(h.get("step", 0)) < start] + [{**entry, "changed": changes}]
    return kept


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_dirs(run: Path) -> List[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and (d / "state.pt").is_file()]
    return [d for _, d in sorted(found)]


def remove_partial(run: Path) -> None:
    root = Path(run) / "checkpoints"
    if root.is_dir():
        remove_partials(root)


def save_checkpoint(run: Path, step: int, state: dict, head_writer, limit: Optional[int]) -> Path:
    """state.pt + head.safetensors into ``checkpoints/step-N`` (atomic rename); keep the newest ``limit``."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = partial_path(final)
    remove_path(tmp)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    head_writer(tmp / "head.safetensors")
    move_into_place(tmp, final)
    if limit:
        for old in checkpoint_dirs(run)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(run: Path, spec: Optional[str]) -> Optional[Path]:
    """``--resume latest`` (None when the run has no checkpoint yet: a fresh start) or a path."""
    if not spec:
        return None
    if spec == "latest":
        dirs = checkpoint_dirs(run)
        return dirs[-1] if dirs else None
    p = Path(spec)
    if p.is_dir() and (p / "state.pt").is_file():
        return p
    if p.is_file() and p.name == "state.pt":
        return p.parent
    raise ResumeError(f"--resume {spec}: not a checkpoint folder (one holding state.pt, e.g. "
                      f"{Path(run) / 'checkpoints' / 'step-0000500'}); use --resume latest")


def load_checkpoint(folder: Path) -> dict:
    try:
        return torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ResumeError(f"cannot read the checkpoint {folder} ({type(exc).__name__}); resume from another "
                          "one (--resume PATH)") from None


LOSS_TERMS = ("unknown_l1_loss", "known_l1_loss", "loss_pha_laplacian", "loss_gradient_penalty")
"""Every loss term a step logs (the authors' names; the segmentation branch's smooth L1 is logged as known_l1_loss)."""
METRIC_FIELDS = ["step", "lr", "loss", *LOSS_TERMS, "val_sad", "steps_per_s"]


class Metrics:
    """``metrics.csv`` (rows past ``start_step`` from an interrupted run are dropped) and, when the
    ``tensorboard`` package is installed, TensorBoard scalars under RUN/tensorboard."""

    def __init__(self, run: Path, start_step: int):
        self.path = Path(run) / "metrics.csv"
        rows = []
        if self.path.is_file() and start_step > 0:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run) / "tensorboard"), purge_step=start_step + 1)
        except Exception:  # noqa: BLE001 - optional extra
            self.tb = None

    def write(self, row: Dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, METRIC_FIELDS).writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v != "":
                    self.tb.add_scalar(k, float(v), int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
