"""What a training run writes: head files (the format ``convert`` writes, plus training metadata),
checkpoints for resuming (written atomically, never read half-written) and ``metrics.csv``.

Run folder::

    RUN/head.safetensors                 # at the end: the last head, or the best on validation
    RUN/best.safetensors                 # with --val-data: the best head so far
    RUN/metrics.csv                      # one row per step (validation SAD on validation steps)
    RUN/checkpoints/step-0000500/        # state.pt (head, optimizer, step, RNG states) + head.safetensors

A checkpoint folder is written as ``step-N.tmp-<pid>`` and renamed when complete, so a folder
named ``step-N`` is always whole; leftovers of a killed run (``*.tmp-*``) are removed on start.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..checkpoint import CONFIG_METADATA_KEY, EMPTY_PROMPT_KEY, current_umask

TRAINING_METADATA_KEY = "iconmatting_training"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(ValueError):
    """--resume points at nothing usable; the message says what to do."""


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_head(path, head: torch.nn.Module, config, training: dict, empty_prompt: Optional[torch.Tensor] = None) -> Path:
    """The head as ``convert`` writes it (IconMattingHead keys, config in the metadata), plus the
    training metadata (JSON under ``iconmatting_training``); written to a temporary file and renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in head.state_dict().items()}
    if empty_prompt is not None:
        tensors[EMPTY_PROMPT_KEY] = empty_prompt.detach().float().contiguous().cpu()
    tmp = _atomic_target(path)
    save_file(tensors, str(tmp), metadata={CONFIG_METADATA_KEY: json.dumps(config.to_dict()),
                                          TRAINING_METADATA_KEY: json.dumps(training, sort_keys=True)})
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
    return path


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
        for d in root.iterdir():
            if ".tmp-" in d.name:
                shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(run: Path, step: int, state: dict, head_writer, limit: Optional[int]) -> Path:
    """state.pt + head.safetensors into ``checkpoints/step-N`` (atomic rename); keep the newest ``limit``."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    head_writer(tmp / "head.safetensors")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
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


METRIC_FIELDS = ["step", "lr", "loss", "unknown_l1_loss", "known_l1_loss", "loss_pha_laplacian",
                 "loss_gradient_penalty", "val_sad", "steps_per_s"]


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
