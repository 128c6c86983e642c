"""The training loop: frozen SD features (as at inference) -> the IconMatting head, trained in fp32.

Per step, for each sample (global position p, see ``data``): the target and its reference go
through the frozen extractor without gradients exactly as at inference (``config.timestep``,
ensemble copies of a sampled latent, fresh noise: the noise seed is derived from (seed, p), with
the reference's noise drawn apart from the target's, REFERENCE_NOISE vs TARGET_NOISE, as at
inference); the reference's tokens are the correspondence cells its guidance covers entirely
(min-pooling); the head then runs with gradients: similarity -> propagation per sample, fusion and
detail decoder over BatchNorm groups of ``bn_group`` samples (the authors' 2 per GPU, whose
BatchNorm statistics are per GPU).

Batch: ``batch_size`` is the global batch, all processes together (default 4: the authors' 2 GPUs x
2 samples); each of N processes takes ``batch_size / N`` samples.

Objective (:func:`group_objective`): the authors' loss on each BatchNorm group (their loss on a
GPU's 2 samples), averaged over the groups of the global batch -- what their DDP run optimises
(each GPU's loss, gradients averaged over GPUs). So the ``recipe`` loss (``LossFunction2``, a sum
over a GPU's samples) is 2 x the mean over the batch, and the ``finetune`` loss (``LossFunction``,
whose region terms pool a GPU's pixels) is the mean over pairs of its value on each pair: both give
the same head however the batch is split over processes (1 x 4 or 2 x 2). Optimizer: Adam (no
weight decay), lr x the authors' LambdaLinearScheduler (linear from 1e-6 over ``warmup`` steps,
then 1). The step stops with :class:`TrainingStopped` when the loss is NaN or above 1e4.

Several processes: launch with ``torchrun`` (or ``accelerate launch``); the environment's RANK /
WORLD_SIZE / LOCAL_RANK select DDP (NCCL on CUDA, gloo on CPU). Only rank 0 writes files. A run
starts only as ``state.check_start`` allows (never over another run; a resume only with the run's
own recipe, :func:`run_recipe`, unless ``resume_with_changes``).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import IconMattingConfig
from ..context import region_tokens
from ..features import REFERENCE_NOISE, TARGET_NOISE
from ..files import write_file
from ..matching import inter_image_similarity, intra_image_propagation
from ..preprocess import Placement
from . import state as S
from .data import StepSampler, TrainData, TrainSamples, band_radius
from .losses import LOSSES

AUTHORS_GPU_BATCH = 2  # samples per GPU in the authors' runs: the BatchNorm group
AUTHORS_GPUS = 2
AUTHORS_BATCH = AUTHORS_GPU_BATCH * AUTHORS_GPUS  # the global batch of their configs (2 GPUs x 2)
LOSS_LIMIT = 1e4
WARMUP_START = 1e-6


def leave_ctrl_c_to_the_trainer(_worker_id: int) -> None:
    """A data-loading worker ignores Ctrl-C and is quiet about the trainer hanging up on a batch: a terminal signals
    the whole process group; the trainer stops on it (its one line) and shuts its workers down. Seen in CI, each
    after that line: a worker that died of the signal while handing a batch's shared memory over, and the serving
    thread of a live worker (multiprocessing's resource sharer) printing EOFError's traceback because the interrupted
    trainer closed the hand-over's connection half-way. Any other error in a worker is printed as before."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = _without_hang_ups(sys.excepthook)


def _without_hang_ups(hook):
    def excepthook(kind, value, tb):
        if issubclass(kind, (EOFError, ConnectionError)) and _raised_in_resource_sharer(tb):
            return  # the trainer is gone or stopping: it reports for itself
        hook(kind, value, tb)

    return excepthook


def _raised_in_resource_sharer(tb) -> bool:
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == "multiprocessing.resource_sharer":
            return True
        tb = tb.tb_next
    return False


class TrainingStopped(RuntimeError):
    """NaN or exploding loss; the message names the step and the last good checkpoint."""


@dataclass
class TrainSettings:
    out: str
    steps: int = 10000
    batch_size: int = AUTHORS_BATCH  # global: all processes together
    lr: float = 4e-4
    warmup: int = 250
    loss: str = "recipe"
    seed: int = 42
    bn_group: int = AUTHORS_GPU_BATCH
    val_every: int = 500
    checkpoint_every: int = 500
    checkpoints_total_limit: Optional[int] = 3
    resume: Optional[str] = None
    resume_with_changes: bool = False  # resume although the recipe changed (recorded in the history)
    workers: int = 0
    trimap_radius: Optional[int] = None
    init: Optional[str] = None  # digest of the initial head's weights (state.weights_digest); None: from scratch
    mixed_precision: str = "no"  # of the frozen SD pass (recorded; the extractor's dtype is the caller's)
    extra: dict = field(default_factory=dict)  # recorded in the head metadata (command line, files)


def run_recipe(s: TrainSettings, config: IconMattingConfig, data: TrainData, val_data: Optional[TrainData],
               sd_fingerprint: Optional[str] = None) -> dict:
    """What makes a run's head, compared when it is resumed (``state.check_start``); the SD
    fingerprint is left out until the SD weights are loaded. JSON-normalised (tuples as lists)."""
    recipe = {"batch_size": s.batch_size, "bn_group": s.bn_group, "lr": s.lr, "warmup": s.warmup, "loss": s.loss,
              "seed": s.seed, "trimap_radius": band_radius(config.image_size, s.trimap_radius),
              "mixed_precision": s.mixed_precision, "config": config.to_dict(), "init": s.init,
              "data": data.digest(), "val_data": val_data.digest() if val_data is not None else None}
    if sd_fingerprint is not None:
        recipe["sd"] = sd_fingerprint
    return json.loads(json.dumps(recipe))


def data_files(data: TrainData, val_data: Optional[TrainData]) -> dict:
    """The data files of a run (relative path -> [size, sha256]), for the run record."""
    return json.loads(json.dumps({"data": data.files, "val_data": val_data.files if val_data is not None else {}}))


def group_objective(loss_fn, unknown, pred, alpha, group: int) -> Dict[str, torch.Tensor]:
    """The authors' loss on each BatchNorm group of ``group`` samples (their loss on one GPU's
    batch), averaged over the groups; every term of ``state.LOSS_TERMS`` (0 where no group has it)."""
    terms = {k: pred.new_zeros(()) for k in S.LOSS_TERMS}
    starts = range(0, pred.shape[0], group)
    for g0 in starts:
        part = slice(g0, g0 + group)
        for k, v in loss_fn(unknown[part], pred[part], alpha[part]).items():
            terms[k] = terms[k] + v
    return {k: v / len(starts) for k, v in terms.items()}


def lr_factor(step: int, warmup: int) -> float:
    """The authors' LambdaLinearScheduler (f_start 1e-6, f_max = f_min = 1): linear warm-up, then 1."""
    if step < warmup:
        return (1.0 - WARMUP_START) / warmup * step + WARMUP_START
    return 1.0


def noise_seed(seed: int, position: int) -> int:
    return (int(seed) << 40) + int(position)


class HeadStep(nn.Module):
    """The trainable computation (wrapped in DDP when distributed): per-sample matching, then
    fusion + detail decoder per BatchNorm group; only the first group updates BatchNorm's running
    statistics (what DDP keeps: rank 0's, broadcast before every forward)."""

    def __init__(self, head, bn_group: int):
        super().__init__()
        self.head, self.bn_group = head, bn_group

    def forward(self, tokens: List[torch.Tensor], corr, ups0, ups1, attention: Dict[int, torch.Tensor], images):
        head = self.head
        guidance = []
        for i, t in enumerate(tokens):
            sim = inter_image_similarity(head, t, corr[i:i + 1])
            guidance.append(intra_image_propagation(head, sim, {r: a[i:i + 1] for r, a in attention.items()}))
        preds = []
        norms = [m for m in head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for g0 in range(0, len(tokens), self.bn_group):
            g1 = min(len(tokens), g0 + self.bn_group)
            for m in norms:  # batch statistics as usual; only group 0 updates the running ones
                m.track_running_stats = g0 == 0
            try:
                levels = [torch.cat([g[j] for g in guidance[g0:g1]]) for j in range(len(guidance[0]))]
                fused = head.fusion([ups0[g0:g1], ups1[g0:g1]], levels)
                preds.append(head.detail(fused, images[g0:g1]))
            finally:
                for m in norms:
                    m.track_running_stats = True
        return torch.cat(preds)


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))) if world > 1 else (0, 1, 0)


class Trainer:
    """``Trainer(settings, data, extractor, head, ...).run()``; see the module docstring.

    extractor: a FeatureExtractor (frozen SD); head: IconMattingHead (trained in fp32 in place);
    val_data: optional TrainData for validation SAD; device: torch.device;
    log: where one-line messages go (rank 0)."""

    def __init__(self, settings: TrainSettings, data: TrainData, extractor, head, device, val_data=None,
                 empty_prompt=None, log: Callable[[str], None] = print, progress: bool = True):
        self.s, self.data, self.val_data = settings, data, val_data
        self.extractor, self.head, self.device = extractor, head.float().to(device), device
        self.config: IconMattingConfig = head.config
        self.empty_prompt, self.log, self.show_progress = empty_prompt, log, progress
        self.rank, self.world, _ = _dist()
        if settings.batch_size % self.world:
            raise ValueError(f"batch size {settings.batch_size} (global) does not split over {self.world} processes")
        self.batch = settings.batch_size // self.world  # this process's samples per step
        self.run_dir = Path(settings.out)
        self.loss_fn = LOSSES[settings.loss]
        from ..context_file import sd_fingerprint

        self.sd_fingerprint = sd_fingerprint(extractor)
        self.recipe = run_recipe(settings, self.config, data, val_data, self.sd_fingerprint)
        self.history: list = []
        self.best = (math.inf, -1)
        self.timing = {"data": 0.0, "sd": 0.0, "head": 0.0}

    # ------------------------------------------------------------------ pieces
    def metadata(self, step: int) -> dict:
        return {"step": step, "settings": {k: v for k, v in asdict(self.s).items() if k != "extra"}, **self.s.extra,
                "data": self.data.summary(), "val_data": self.val_data.summary() if self.val_data else None,
                "world_size": self.world, "sd_fingerprint": self.sd_fingerprint, "history": self.history,
                "best_val_sad": None if self.best[1] < 0 else {"sad": self.best[0], "step": self.best[1]}}

    def write_head(self, path, step: int):
        return S.write_head(path, self.head, self.config, self.metadata(step), self.empty_prompt)

    @torch.no_grad()
    def features(self, batch: dict, seeds: Optional[List[int]] = None):
        """SD features of a batch's targets and the references' tokens (no gradients); noise seeds
        from the samples' positions unless given."""
        size = self.config.image_size
        full = Placement(size, size, size, size)
        tokens, corr, ups0, ups1, attn = [], [], [], [], {}
        for i in range(batch["image"].shape[0]):
            seed = seeds[i] if seeds is not None else noise_seed(self.s.seed, int(batch["position"][i]))
            t = self.extractor(batch["image"][i:i + 1].to(self.device), seed=seed, with_attention=True,
                               noise_stream=TARGET_NOISE)
            r = self.extractor(batch["reference"][i:i + 1].to(self.device), seed=seed, with_attention=False,
                               noise_stream=REFERENCE_NOISE)
            tokens.append(region_tokens(r.correspondence[0].float(), batch["guidance"][i], full, size, "mask").to(self.device))
            corr.append(t.correspondence.float())
            ups0.append(t.up_features[0].float())
            ups1.append(t.up_features[1].float())
            for res, a in t.attention.items():
                attn.setdefault(res, []).append(a.float())
        return tokens, torch.cat(corr), torch.cat(ups0), torch.cat(ups1), {r: torch.cat(a) for r, a in attn.items()}

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    @torch.no_grad()
    def validate(self) -> float:
        """Mean SAD (sum |pred - alpha| / 1000 at the model's size) over the validation set, with the
        head in inference mode and inference's noise seed (0)."""
        samples = TrainSamples(self.val_data, self.config.image_size, self.s.seed, self.s.trimap_radius, fixed=True)
        self.head.eval()
        total = 0.0
        try:
            for p in range(len(samples)):
                b = {k: v[None] for k, v in samples[p].items()}
                feats = self.features(b, seeds=[0])
                pred = HeadStep(self.head, 1)(*feats, b["image"].to(self.device)).float().cpu()
                total += float((pred - b["alpha"]).abs().sum()) / 1000
        finally:
            self.head.train()
        return total / len(samples)

    # ------------------------------------------------------------------ loop
    def run(self) -> Path:
        s = self.s
        files = data_files(self.data, self.val_data)
        changes = S.check_start(self.run_dir, s.resume, self.recipe, files, s.resume_with_changes)
        if self.world > 1:
            dist.barrier()  # every process has checked the folder before rank 0 writes into it
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            S.remove_partial(self.run_dir)
        resume_dir = S.resolve_resume(self.run_dir, s.resume)
        opt = torch.optim.Adam(self.head.parameters(), lr=s.lr, weight_decay=0)
        start = 0
        if resume_dir is not None:
            st = S.load_checkpoint(resume_dir)
            self.head.load_state_dict(st["head"])
            opt.load_state_dict(st["optimizer"])
            start, self.best = int(st["step"]), (float(st["best"][0]), int(st["best"][1]))
            S.set_rng_states(st["rng"])
            if self.rank == 0:
                self.log(f"resuming from {resume_dir} at step {start}")
        self.history = S.run_history(self.run_dir, resume_dir, start, self.recipe, changes, self.world)
        if self.rank == 0:
            S.write_record(self.run_dir, {"history": self.history, "files": files})
            if changes:
                self.log(f"continuing at step {start} with changed settings ({'; '.join(changes)}); recorded in "
                         f"{self.run_dir / S.RUN_RECORD}")
        self.head.train()
        self.extractor.eval()
        model = HeadStep(self.head, s.bn_group)
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        samples = TrainSamples(self.data, self.config.image_size, s.seed, s.trimap_radius)
        loader = torch.utils.data.DataLoader(
            samples, batch_size=self.batch, sampler=StepSampler(start, s.steps, self.batch, self.rank, self.world),
            num_workers=s.workers, pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if s.workers else None, worker_init_fn=leave_ctrl_c_to_the_trainer)
        metrics = S.Metrics(self.run_dir, start) if self.rank == 0 else None
        bar = None
        if self.rank == 0 and self.show_progress:
            from ..job.outputs import Progress

            bar = Progress(s.steps - start, "train", "step")
        if self.val_data is not None and start == 0 and self.rank == 0:
            self._validated(0, metrics, {"step": 0})
        last_ckpt = S.checkpoint_dirs(self.run_dir)[-1] if S.checkpoint_dirs(self.run_dir) else None
        step, t_prev = start, time.perf_counter()
        t_data = time.perf_counter()
        try:
            for batch in _batches(loader, self.batch):
                t0 = time.perf_counter()
                self.timing["data"] += t0 - t_data
                for group in opt.param_groups:
                    group["lr"] = s.lr * lr_factor(step, s.warmup)
                feats = self.features(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t1 = time.perf_counter()
                pred = model(*feats, batch["image"].to(self.device))
                terms = group_objective(self.loss_fn, batch["unknown"].to(self.device), pred,
                                        batch["alpha"].to(self.device), s.bn_group)
                loss = sum(terms.values())
                logged = self._reduce(torch.stack([loss.detach()] + [v.detach() for v in terms.values()])) / self.world
                if not math.isfinite(float(logged[0])) or float(logged[0]) > LOSS_LIMIT:
                    kept = f"; last good checkpoint: {last_ckpt}" if last_ckpt else "; no checkpoint was written yet"
                    raise TrainingStopped(f"loss {float(logged[0]):.4g} at step {step + 1} (NaN or above {LOSS_LIMIT:g}): "
                                          f"training stopped{kept}. Lower --lr or check that step's data")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t_data = time.perf_counter()
                self.timing["sd"] += t1 - t0
                self.timing["head"] += t_data - t1
                step += 1
                now = time.perf_counter()
                if self.rank == 0:
                    row = {"step": step, "lr": opt.param_groups[0]["lr"], "loss": float(logged[0]),
                           "steps_per_s": 1.0 / max(now - t_prev, 1e-9)}
                    row.update({k: float(v) for k, v in zip(terms, logged[1:])})
                    if self.val_data is not None and (step % s.val_every == 0 or step == s.steps):
                        self._validated(step, metrics, row)
                    else:
                        metrics.write(row)
                    if bar is not None:
                        bar.update(1, f"loss {row['loss']:.4g}")
                t_prev = now
                if step % s.checkpoint_every == 0 or step == s.steps:
                    last_ckpt = self._checkpoint(step, opt) or last_ckpt
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
        final = self.run_dir / "head.safetensors"
        if self.rank == 0:
            best = self.run_dir / "best.safetensors"
            if self.val_data is not None and best.is_file():
                write_file(final, best.read_bytes())
            else:
                self.write_head(final, step)
        return final

    def _validated(self, step: int, metrics, row: dict) -> None:
        sad = self.validate()
        row["val_sad"] = sad
        metrics.write(row)
        if sad < self.best[0]:
            self.best = (sad, step)
            self.write_head(self.run_dir / "best.safetensors", step)
        self.log(f"step {step}: validation SAD {sad:.4f} (best {self.best[0]:.4f} at step {self.best[1]})")

    def _checkpoint(self, step: int, opt) -> Optional[Path]:
        if self.world > 1:
            dist.barrier()
        path = None
        if self.rank == 0:
            st = {"head": self.head.state_dict(), "optimizer": opt.state_dict(), "step": step,
                  "best": [self.best[0], self.best[1]], "rng": S.rng_states()}
            path = S.save_checkpoint(self.run_dir, step, st, lambda p: self.write_head(p, step),
                                     self.s.checkpoints_total_limit)
        if self.world > 1:
            dist.barrier()
        return path


def _batches(loader, batch_size: int):
    for batch in loader:
        if batch["image"].shape[0] == batch_size:
            yield batch
