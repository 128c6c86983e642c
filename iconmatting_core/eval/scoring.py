"""Running a protocol over a data set and scoring its predictions: :func:`evaluate`, :func:`run_protocol`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import metrics as M
from .dataset import DatasetError, ICM57Dataset, Sample, read_image, read_matte, read_trimap
from .protocols import PROTOCOLS, crop_resize, project_jobs, reference_jobs
from .report import METRIC_KEYS, write_csv

PredictFn = Callable[[np.ndarray, np.ndarray, List[np.ndarray]], Sequence]


# --------------------------------------------------------------------------- evaluation


@dataclass
class ImageResult:
    name: str
    group: str
    reference: str  # reference names joined with "+"
    sad: float
    mse: float
    grad: float
    conn: float

    def metrics(self) -> Dict[str, float]:
        return {k: getattr(self, k) for k in METRIC_KEYS}


@dataclass
class EvalResults:
    """Per-image metrics of one run: protocol, references per target, region."""

    region: str
    images: List[ImageResult] = field(default_factory=list)
    protocol: str = "project"
    references: int = 1

    @staticmethod
    def _mean(rows: Sequence[ImageResult]) -> Dict[str, float]:
        if not rows:
            return {k: math.nan for k in METRIC_KEYS}
        return {k: float(np.mean([getattr(r, k) for r in rows])) for k in METRIC_KEYS}

    def mean(self) -> Dict[str, float]:
        """Mean of each metric over all target images."""
        return self._mean(self.images)

    def group_means(self) -> Dict[str, Dict[str, float]]:
        out: Dict[str, List[ImageResult]] = {}
        for r in self.images:
            out.setdefault(r.group, []).append(r)
        return {g: self._mean(rows) for g, rows in sorted(out.items())}

    @property
    def groups(self) -> List[str]:
        return sorted({r.group for r in self.images})


def _to_alpha_array(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{what} must be an HxW alpha matte, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -0.01 or hi > 1.01:
        raise ValueError(f"{what} has values in [{lo:g}, {hi:g}]; alpha mattes must lie in [0, 1]")
    return np.clip(a, 0.0, 1.0)


def _resize_alpha(a: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """Bilinear, ``align_corners=False``: how the reference brings its square prediction back to
    the original frame (and how a prediction of another size is brought to its target's)."""
    if a.shape == tuple(hw):
        return a
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)[0, 0].numpy().clip(0, 1)


def _quantize(a: np.ndarray, mode: Optional[str]) -> np.ndarray:
    if mode in (None, "none"):
        return a
    if mode == "floor":  # what the reference's saved PNGs hold: (pred * 255).astype(uint8)
        return np.floor(a * 255.0) / 255.0
    if mode == "round":
        return np.round(a * 255.0) / 255.0
    raise ValueError(f"quantize must be None, 'none', 'floor' or 'round', got {mode!r}")


def evaluate(
    dataset: ICM57Dataset,
    predict_fn: PredictFn,
    region: str = "all",
    limit: Optional[int] = None,
    out_dir=None,
    quantize: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> EvalResults:
    """Project protocol (see :func:`reference_plan`), one region: ``run_protocol`` for one row.

    dataset: from :func:`load_dataset`. predict_fn(reference_image [H, W, 3] float32,
    reference_mask [H, W] float32 (the reference's ground-truth alpha), target_images: list of
    [H, W, 3] float32) -> one [H, W] alpha in [0, 1] per target (numpy or torch; a different size
    is resized bilinearly to the target's). region: "all" (whole image) or "unknown" (trimap
    unknown band; needs trimaps). limit: evaluate only the first ``limit`` groups (sorted by name).
    out_dir: if given, predictions are written there as 8-bit PNGs ``<name>.png`` plus
    ``metrics.csv``. quantize: None (score the float prediction), "floor" (score
    ``floor(255 a) / 255`` like the reference's saved PNGs) or "round".
    """
    return run_protocol(dataset, predict_fn, "project", [region], limit=limit, out_dir=out_dir,
                        quantize=quantize, progress=progress)[0]


def run_protocol(
    dataset: ICM57Dataset,
    predict_fn: PredictFn,
    protocol: str = "project",
    regions: Sequence[str] = ("all",),
    references: int = 1,
    seed: int = 0,
    image_size: int = 768,
    limit: Optional[int] = None,
    out_dir=None,
    quantize: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> List[EvalResults]:
    """Run one protocol (module docstring) and score every target over each region.

    Returns one :class:`EvalResults` per region (same predictions). ``references`` (K) and
    ``seed`` drive the reference protocol's draw; ``image_size`` is its square input. With K > 1
    predict_fn receives lists of reference images and masks. Other arguments as :func:`evaluate`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    regions = list(regions)
    if not regions or any(r not in ("all", "unknown") for r in regions):
        raise ValueError(f"regions must be 'all' and/or 'unknown', got {regions!r}")
    if protocol == "project" and references != 1:
        raise ValueError("the project protocol uses one reference per group; --references applies to 'reference'")
    _quantize(np.zeros((1, 1)), quantize)  # validate early
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    groups = list(dataset.groups.items())
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        groups = groups[:limit]
    names = {g: [s.name for s in members] for g, members in groups}
    samples = {s.name: s for _, members in groups for s in members}
    jobs = project_jobs(names) if protocol == "project" else reference_jobs(names, references, seed)
    results = [EvalResults(region=r, protocol=protocol, references=references) for r in regions]
    group_index = {g: i for i, (g, _) in enumerate(groups)}
    for group, ref_names, target_names in jobs:
        refs = [_load_pair(samples[n]) for n in ref_names]
        loaded = [_load_pair(samples[n]) for n in target_names]
        if protocol == "reference":
            refs = [(crop_resize(img, image_size), crop_resize(alpha, image_size)) for img, alpha in refs]
            inputs = [crop_resize(img, image_size) for img, _ in loaded]
        else:
            inputs = [img for img, _ in loaded]
        if progress is not None:
            progress(f"[{group_index[group] + 1}/{len(groups)}] {group}: reference {'+'.join(ref_names)} -> {', '.join(target_names)}")
        if len(refs) == 1:
            preds = predict_fn(refs[0][0], refs[0][1], inputs)
        else:
            preds = predict_fn([img for img, _ in refs], [alpha for _, alpha in refs], inputs)
        preds = list(preds)
        if len(preds) != len(target_names):
            raise ValueError(
                f"predict_fn returned {len(preds)} alphas for {len(target_names)} target images (group {group!r})"
            )
        for name, (_, gt), p in zip(target_names, loaded, preds):
            a = _to_alpha_array(p, f"prediction for {name!r}")
            a = _quantize(_resize_alpha(a, gt.shape), quantize)
            trimap = _trimap_for(samples[name], gt.shape) if "unknown" in regions else None
            for res in results:
                m = M.compute_all(a, gt, trimap, region=res.region, mse_scale=1.0)
                res.images.append(ImageResult(name, group, "+".join(ref_names), **m))
            if out is not None:
                _save_png(out / f"{name}.png", a)
    if out is not None:
        write_csv(results, out / "metrics.csv")
    return results


def _trimap_for(sample: Sample, shape) -> np.ndarray:
    if sample.trimap_path is None:
        raise DatasetError(f"--region unknown needs a trimap for {sample.name!r} (trimap/{sample.name}.png)")
    trimap = read_trimap(sample.trimap_path)
    if trimap.shape != tuple(shape):
        raise DatasetError(
            f"trimap {sample.trimap_path} is {trimap.shape[1]}x{trimap.shape[0]} but alpha "
            f"{sample.alpha_path} is {shape[1]}x{shape[0]}"
        )
    return trimap


def _load_pair(s: Sample) -> Tuple[np.ndarray, np.ndarray]:
    img = read_image(s.image_path)
    alpha = read_matte(s.alpha_path)
    if img.shape[:2] != alpha.shape:
        raise DatasetError(
            f"image {s.image_path} is {img.shape[1]}x{img.shape[0]} but its alpha {s.alpha_path} is "
            f"{alpha.shape[1]}x{alpha.shape[0]}"
        )
    return img, alpha


def _save_png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8), mode="L").save(path)
