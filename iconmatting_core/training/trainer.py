"""The training loop: frozen SD features (as at inference) -> the IconMatting head, trained in fp32.

Per step, for each sample (global position p, see ``data``): the target and its reference go
through the frozen extractor without gradients exactly as at inference (t = 200, ensemble copies
of a sampled latent, fresh noise: the noise seed is derived from (seed, p)); the reference's
tokens are the correspondence cells its guidance covers entirely (min-pooling); the head then
runs with gradients: similarity -> propagation per sample, fusion and detail decoder over BatchNorm
groups of ``bn_group`` samples (the authors' 2 per GPU, whose BatchNorm statistics are per GPU).

Objective: the authors sum the per-sample losses over a GPU's 2 samples and DDP averages over
GPUs, i.e. 2 x the mean over the global batch; the ``recipe`` loss is scaled so the gradient is
that for any process count and batch size (``AUTHORS_BATCH / batch_size`` per process), which makes
N processes give the head one process gives with the same global batch. Optimizer: Adam (no
weight decay), lr x the authors' LambdaLinearScheduler (linear from 1e-6 over ``warmup`` steps,
then 1). The step stops with :class:`TrainingStopped` when the loss is NaN or above 1e4.

Several processes: launch with ``torchrun`` (or ``accelerate launch``); the environment's RANK /
WORLD_SIZE / LOCAL_RANK select DDP (NCCL on CUDA, gloo on CPU). Only rank 0 writes files.
"""
from __future__ import annotations

import math
import os
import shutil
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
from ..matching import inter_image_similarity, intra_image_propagation
from ..preprocess import Placement
from . import state as S
from .data import StepSampler, TrainData, TrainSamples
from .losses import LOSSES

AUTHORS_BATCH = 2
LOSS_LIMIT = 1e4
WARMUP_START = 1e-6


class TrainingStopped(RuntimeError):
    """NaN or exploding loss; the message names the step and the last good checkpoint."""


@dataclass
class TrainSettings:
    out: str
    steps: int = 10000
    batch_size: int = 2
    lr: float = 4e-4
    warmup: int = 250
    loss: str = "recipe"
    seed: int = 42
    bn_group: int = AUTHORS_BATCH
    val_every: int = 500
    checkpoint_every: int = 500
    checkpoints_total_limit: Optional[int] = 3
    resume: Optional[str] = None
    workers: int = 0
    trimap_radius: Optional[int] = None
    extra: dict = field(default_factory=dict)  # recorded in the head metadata (command line, files)


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
        self.run_dir = Path(settings.out)
        self.loss_fn = LOSSES[settings.loss]
        self.sd_fingerprint = self._sd_fingerprint()
        self.best = (math.inf, -1)
        self.timing = {"data": 0.0, "sd": 0.0, "head": 0.0}

    # ------------------------------------------------------------------ pieces
    def _sd_fingerprint(self) -> str:
        from ..context_file import model_fingerprint

        return model_fingerprint(nn.Module(), self.extractor)

    def metadata(self, step: int) -> dict:
        return {"step": step, "settings": {k: v for k, v in asdict(self.s).items() if k != "extra"}, **self.s.extra,
                "data": self.data.summary(), "val_data": self.val_data.summary() if self.val_data else None,
                "world_size": self.world, "sd_fingerprint": self.sd_fingerprint,
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
        self.head.train()
        self.extractor.eval()
        model = HeadStep(self.head, s.bn_group)
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        samples = TrainSamples(self.data, self.config.image_size, s.seed, s.trimap_radius)
        loader = torch.utils.data.DataLoader(
            samples, batch_size=s.batch_size, sampler=StepSampler(start, s.steps, s.batch_size, self.rank, self.world),
            num_workers=s.workers, pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if s.workers else None)
        metrics = S.Metrics(self.run_dir, start) if self.rank == 0 else None
        bar = None
        if self.rank == 0 and self.show_progress:
            from ..job.outputs import Progress

            bar = Progress(s.steps - start, "train", "step")
        if self.val_data is not None and start == 0 and self.rank == 0:
            self._validated(0, metrics, {"step": 0})
        scale = AUTHORS_BATCH / s.batch_size if s.loss == "recipe" else 1.0
        last_ckpt = S.checkpoint_dirs(self.run_dir)[-1] if S.checkpoint_dirs(self.run_dir) else None
        step, t_prev = start, time.perf_counter()
        t_data = time.perf_counter()
        try:
            for batch in _batches(loader, s.batch_size):
                t0 = time.perf_counter()
                self.timing["data"] += t0 - t_data
                for group in opt.param_groups:
                    group["lr"] = s.lr * lr_factor(step, s.warmup)
                feats = self.features(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t1 = time.perf_counter()
                pred = model(*feats, batch["image"].to(self.device))
                terms = self.loss_fn(batch["unknown"].to(self.device), pred, batch["alpha"].to(self.device))
                loss = sum(terms.values())
                logged = self._reduce(torch.stack([loss.detach() * scale] + [v.detach() * scale for v in terms.values()]))
                logged = logged / self.world
                if not math.isfinite(float(logged[0])) or float(logged[0]) > LOSS_LIMIT:
                    kept = f"; last good checkpoint: {last_ckpt}" if last_ckpt else "; no checkpoint was written yet"
                    raise TrainingStopped(f"loss {float(logged[0]):.4g} at step {step + 1} (NaN or above {LOSS_LIMIT:g}): "
                                          f"training stopped{kept}. Lower --lr or check that step's data")
                opt.zero_grad(set_to_none=True)
                (loss * scale).backward()
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
                tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
                shutil.copyfile(best, tmp)
                os.replace(tmp, final)
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
