"""ICM-57 evaluation: ``python -m iconmatting_core.eval --data DIR --matting-weights PATH --sd PATH``.

Data layout (what the reference repository, tiny-smart/in-context-matting, reads; see its
``icm/data/image_file.py``: ``get_dir_ext`` and ``ContextData``)::

    datasets/
    ├── ICM57.json          # groups: {image_name: {"class", "sub_class", "HalfOrFull", ...}}
    └── ICM57/              # = --data DIR
        ├── image/<name>.jpg
        ├── alpha/<name>.png    # ground-truth alpha, 8-bit gray
        └── trimap/<name>.png   # optional here (only for --region unknown)

* The json maps each image name (file name without extension) to a record such as
  ``{"dataset_name": "ICM57", "class": "animal", "sub_class": null, "HalfOrFull": "half",
  "TransparentOrOpaque": "SO"}``. As in the reference (``ContextData.get_image_class_dict``) an
  image's group is ``f"{class}-{sub_class}-{HalfOrFull}"`` (``str()`` of each, so ``null`` becomes
  ``None``). The json is looked for at ``--json`` if given, else next to the data folder as
  ``<DIR>.json`` (the reference's ``datasets/ICM57.json``), else inside it as ``DIR/ICM57.json``
  or ``DIR/<DIR name>.json``. Groups are never guessed when the json is missing: the reference has
  no such fallback (it fails to open the json), so neither do we.
* Only the images listed in the json are evaluated (like the reference); files are looked up
  with the reference's extensions first (``.jpg`` images, ``.png`` alpha/trimap), then other
  common ones. A listed image without its image or alpha file is an error naming the file.
* Images and mattes are read with Pillow (EXIF orientation applied, as ``cv2.imread`` does);
  alpha is read as gray and divided by 255 (16-bit PNGs by 65535), as ``cv2.imread(path, 0) / 255``.

Two protocols (``--protocol``, several may be given; one table row per protocol, number of
references and region):

``project`` (default; this project's way of running the model, not the paper's). Within a group
sorted by name ``[a0, a1, ..., an]``, ``a0`` is the reference for ``a1..an`` and ``a1`` is the
reference for ``a0``; a group of one image is evaluated with itself as reference. Images go to
the pipeline at their own size (letterboxed), predictions come back at the original size (one
of another size is resized bilinearly, ``align_corners=False``), and the metrics are summed over
the whole image by default.

``reference`` (the authors' released evaluation path, ``eval.py`` with ``config/eval.yaml``:
``InContextDataset`` -> ``CropResize(768)`` -> ``validation_step_end``; comparable with the
paper's ICM-57 table):

* every image and alpha is centre-cropped to a square (``margin = (long - short) // 2`` on the
  long side, :func:`centre_crop_box`) and resized to ``image_size`` (768) squared;
* each target gets its reference(s) drawn at random from its own group, the target itself
  excluded when the group has more than two images (in a group of two the reference may be the
  target itself, as in the reference code); the draw is seeded (``--seed``) per target name, so it
  does not depend on the order or on ``--limit`` (:func:`draw_references`). ``--references K``
  draws K different ones (as many as the group allows), all encoded into one context;
* the guidance is the reference's ground-truth soft alpha after the same crop and resize; the
  model binarises it at 0.5 (``SemiTrainingAttentionBlocks.forward``) and keeps the 16x16 cells
  it covers entirely (min-pooling), which the pipeline does for a mask of the model's size;
* the square prediction is stretched back over the whole original frame (bilinear,
  ``align_corners=False``, to the original HxW, although it came from a crop: this reproduces the
  reference's ``F.interpolate(pred, size=alpha_shape)`` exactly, borders included) and quantised
  like the PNG the reference saves (``(pred * 255).astype(uint8)``, i.e. floor; ``--quantize``
  overrides);
* metrics are computed against the original alpha and trimap, by default over the trimap's
  unknown region (``85 <= t < 170``; < 85 background, >= 170 foreground, as ``ToTensor``).

Not reproduced: the reference resizes with an interpolation drawn at random per image
(``RANDOM_INTERP = True``: nearest, bilinear, bicubic or Lanczos); here images and alphas are
resized bilinearly with antialiasing (deterministic); its unseeded dataloader draws; the random
dropping of json entries that carry an ``instance_area_ratio`` field (ICM-57's do not).

Units in every table: SAD, Grad and Conn / 1000, MSE the plain mean (no scaling), as in the
paper's tables. Metrics are means over all target images.

The core is :func:`evaluate` ``(dataset, predict_fn) -> EvalResults``; the model only enters
through ``predict_fn(reference_image, reference_mask, target_images) -> list of alphas`` (float32
HxWx3 / HxW arrays in [0, 1]; with several references per target, ``reference_image`` and
``reference_mask`` are lists), which :func:`build_predict_fn` builds from
``iconmatting_core.pipeline.load_pipeline``. A predictor may carry an ``image_size`` attribute
(the model's square input, used by the reference protocol; 768 otherwise).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import metrics as M
from .image_io import ImageReadError, read_image, read_matte, read_trimap  # noqa: F401 (public here too)

__all__ = [
    "DatasetError",
    "Sample",
    "ICM57Dataset",
    "ImageResult",
    "EvalResults",
    "load_dataset",
    "find_json",
    "reference_plan",
    "centre_crop_box",
    "crop_resize",
    "draw_references",
    "reference_jobs",
    "PROTOCOLS",
    "evaluate",
    "run_protocol",
    "format_table",
    "build_predict_fn",
    "main",
]

PredictFn = Callable[[np.ndarray, np.ndarray, List[np.ndarray]], Sequence]
METRIC_KEYS = ("sad", "mse", "grad", "conn")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".webp", ".tif", ".tiff")
MATTE_EXTS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG", ".bmp", ".tif", ".tiff")
GROUP_FIELDS = ("class", "sub_class", "HalfOrFull")
PROTOCOLS = ("project", "reference")
DEFAULT_REGION = {"project": "all", "reference": "unknown"}
DEFAULT_QUANTIZE = {"project": "none", "reference": "floor"}
Job = Tuple[str, Tuple[str, ...], List[str]]  # (group, reference names, target names)


class DatasetError(ValueError):
    """The data folder or its json does not match the ICM-57 layout."""


# --------------------------------------------------------------------------- data set


@dataclass(frozen=True)
class Sample:
    name: str
    group: str
    image_path: Path
    alpha_path: Path
    trimap_path: Optional[Path] = None


@dataclass
class ICM57Dataset:
    """ICM-57-style data set: groups (sorted by key) of samples (sorted by name)."""

    root: Path
    json_path: Path
    groups: Dict[str, List[Sample]]

    def __len__(self) -> int:
        return sum(len(v) for v in self.groups.values())

    @property
    def samples(self) -> Dict[str, Sample]:
        return {s.name: s for members in self.groups.values() for s in members}


def _find_file(folder: Path, name: str, exts: Sequence[str]) -> Optional[Path]:
    for ext in exts:
        p = folder / f"{name}{ext}"
        if p.is_file():
            return p
    p = folder / name  # a json key that already carries its extension
    if p.suffix and p.is_file():
        return p
    return None


def find_json(root: Path, json_path=None) -> Path:
    """The group json: ``json_path`` if given, else ``<root>.json``, ``root/ICM57.json``,
    ``root/<root name>.json`` (first that exists). Raises DatasetError listing what was tried."""
    if json_path is not None:
        p = Path(json_path)
        if not p.is_file():
            raise DatasetError(f"group json not found: {p}")
        return p
    root = Path(root)
    tried = [root.parent / f"{root.name}.json", root / "ICM57.json", root / f"{root.name}.json"]
    for p in tried:
        if p.is_file():
            return p
    raise DatasetError(
        "no group json found; ICM-57 needs the json describing each image's class/sub_class/HalfOrFull "
        f"(looked for {', '.join(str(p) for p in dict.fromkeys(tried))}; pass --json PATH)"
    )


def load_dataset(root, json_path=None, require_trimap: bool = False) -> ICM57Dataset:
    """Index an ICM-57-style folder (see the module docstring). Only paths are resolved here;
    images are read by :func:`evaluate`. Raises DatasetError naming any missing file."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder not found: {root}")
    for sub in ("image", "alpha") + (("trimap",) if require_trimap else ()):
        if not (root / sub).is_dir():
            raise DatasetError(f"{root} has no {sub}/ folder (ICM-57 layout: image/, alpha/, trimap/)")
    jp = find_json(root, json_path)
    try:
        with open(jp, encoding="utf-8") as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{jp} is not valid json: {e}") from None
    if not isinstance(info, dict) or not info:
        raise DatasetError(f"{jp} must be a non-empty object mapping image names to their class records")
    groups: Dict[str, List[Sample]] = {}
    for name in sorted(info):
        rec = info[name]
        if not isinstance(rec, dict) or any(k not in rec for k in GROUP_FIELDS):
            raise DatasetError(
                f"{jp}: entry {name!r} must be an object with keys {', '.join(GROUP_FIELDS)}; got {rec!r}"
            )
        group = "-".join(str(rec[k]) for k in GROUP_FIELDS)
        image = _find_file(root / "image", name, IMAGE_EXTS)
        if image is None:
            raise DatasetError(f"image {name!r} is listed in {jp.name} but {root / 'image' / (name + '.jpg')} does not exist")
        alpha = _find_file(root / "alpha", name, MATTE_EXTS)
        if alpha is None:
            raise DatasetError(
                f"no alpha matte for image {name!r}: expected {root / 'alpha' / (name + '.png')}"
            )
        trimap = _find_file(root / "trimap", name, MATTE_EXTS) if (root / "trimap").is_dir() else None
        if require_trimap and trimap is None:
            raise DatasetError(f"no trimap for image {name!r}: expected {root / 'trimap' / (name + '.png')}")
        groups.setdefault(group, []).append(Sample(name, group, image, alpha, trimap))
    return ICM57Dataset(root, jp, {k: groups[k] for k in sorted(groups)})


def reference_plan(names: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Project protocol: group members -> ``[(reference, [targets...]), ...]`` covering every
    member once as a target.

    Sorted ``[a0, a1, ..., an]``: ``a0`` is the reference for ``a1..an``, ``a1`` for ``a0``; a
    single image is its own reference.
    """
    s = sorted(names)
    if not s:
        return []
    if len(s) == 1:
        return [(s[0], [s[0]])]
    return [(s[0], s[1:]), (s[1], [s[0]])]


# --------------------------------------------------------------------------- reference protocol


def centre_crop_box(height: int, width: int) -> Tuple[int, int, int, int]:
    """The reference's ``CropResize`` square: ``(y0, y1, x0, x1)`` with ``margin = (long - short) // 2``
    cut from the start of the long side."""
    if height > width:
        m = (height - width) // 2
        return m, m + width, 0, width
    m = (width - height) // 2
    return 0, height, m, m + height


def crop_resize(x: np.ndarray, size: int) -> np.ndarray:
    """Image [H, W, 3] or matte [H, W] -> its centre square resized to ``size x size`` (bilinear,
    antialiased when shrinking), float32."""
    import torch
    import torch.nn.functional as F

    y0, y1, x0, x1 = centre_crop_box(x.shape[0], x.shape[1])
    t = torch.from_numpy(np.ascontiguousarray(x[y0:y1, x0:x1], dtype=np.float32))
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    if t.shape[-1] != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=t.shape[-1] > size)
    t = t[0].permute(1, 2, 0) if x.ndim == 3 else t[0, 0]
    return t.clamp(0, 1).numpy()


def draw_references(group: Sequence[str], target: str, k: int = 1, seed: int = 0) -> Tuple[str, ...]:
    """The reference protocol's draw: ``k`` distinct names from the target's group (sorted), the
    target excluded when the group has more than two images (the reference's rule), at most as
    many as there are candidates. Seeded by ``seed`` and the target's name: the same target always
    gets the same references, whatever else is evaluated."""
    if k < 1:
        raise ValueError(f"the number of references must be >= 1, got {k}")
    candidates = sorted(group)
    if target not in candidates:
        raise ValueError(f"target {target!r} is not in its group {candidates}")
    if len(candidates) > 2:
        candidates.remove(target)
    rng = np.random.default_rng([seed, zlib.crc32(target.encode("utf-8"))])
    picks = rng.choice(len(candidates), size=min(k, len(candidates)), replace=False)
    return tuple(candidates[int(i)] for i in picks)


def reference_jobs(groups: Dict[str, List[str]], k: int = 1, seed: int = 0) -> List[Job]:
    """Reference protocol plan: ``[(group, references, [targets])]``, every image once as a target;
    targets of a group that drew the same references share one job (one encoded context)."""
    jobs: List[Job] = []
    for group, names in groups.items():
        by_refs: Dict[Tuple[str, ...], List[str]] = {}
        for target in sorted(names):
            by_refs.setdefault(draw_references(names, target, k, seed), []).append(target)
        jobs += [(group, refs, targets) for refs, targets in by_refs.items()]
    return jobs


def project_jobs(groups: Dict[str, List[str]]) -> List[Job]:
    return [(g, (ref,), targets) for g, names in groups.items() for ref, targets in reference_plan(names)]


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


def write_csv(results, path) -> None:
    """Per-image metrics, one row per image and region (``results``: EvalResults or a list)."""
    runs = results if isinstance(results, (list, tuple)) else [results]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "group", "reference", "protocol", "region", *METRIC_KEYS])
        for run in runs:
            for r in run.images:
                w.writerow([r.name, r.group, r.reference, run.protocol, run.region,
                            *(f"{getattr(r, k):.6f}" for k in METRIC_KEYS)])


# --------------------------------------------------------------------------- table

TABLE_KEYS = ("mse", "sad", "grad", "conn")  # the paper's column order


def format_table(results, per_group: bool = False, title: str = "ICM-57") -> str:
    """Paper-style table: one row per run (protocol, references, region) with MSE (plain mean),
    SAD, Grad, Conn (/1000), means over the target images; ``per_group`` adds one block of group
    rows per run. ``results``: an EvalResults or a list of them."""
    runs = list(results) if isinstance(results, (list, tuple)) else [results]
    n_img = max((len(r.images) for r in runs), default=0)
    n_grp = max((len(r.groups) for r in runs), default=0)
    heads = ("Protocol", "Refs", "Region", "Images", "MSE", "SAD", "Grad", "Conn")

    def cells(label, refs, region, n, m):
        return [label, refs, region, str(n), f"{m['mse']:.4f}"] + [f"{m[k]:.2f}" for k in TABLE_KEYS[1:]]

    def block(rows):
        widths = [max(len(heads[i]), *(len(c[i]) for c in rows)) for i in range(len(heads))]
        line = lambda vals: "  ".join([vals[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(vals[1:], widths[1:])])  # noqa: E731
        return [line(heads), "  ".join("-" * w for w in widths)] + [line(c) for c in rows]

    out = [
        f"{title}: {n_grp} groups, {n_img} target images",
        "MSE: mean squared error (no scaling); SAD, Grad, Conn: /1000 (the paper's units)",
        "Region: unknown = trimap unknown band (85 <= t < 170), all = whole image",
    ]
    out += block([cells(r.protocol, str(r.references), r.region, len(r.images), r.mean()) for r in runs])
    if per_group:
        for r in runs:
            counts: Dict[str, int] = {}
            for img in r.images:
                counts[img.group] = counts.get(img.group, 0) + 1
            out += ["", f"per group: {r.protocol}, {r.references} reference(s), region {r.region}"]
            out += block([cells(g, str(r.references), r.region, counts[g], m) for g, m in r.group_means().items()])
    return "\n".join(out)


# --------------------------------------------------------------------------- model + CLI


def _alpha_list(outputs) -> List[np.ndarray]:
    if hasattr(outputs, "detach") and getattr(outputs, "ndim", 0) == 3:
        outputs = list(outputs.unbind(0))
    return [np.asarray(o.detach().float().cpu()) if hasattr(o, "detach") else np.asarray(o) for o in outputs]


def build_predict_fn(args) -> PredictFn:
    """``load_pipeline(matting_weights, sd_path, device, dtype)`` -> predict_fn: per call one
    ``encode_reference(reference_image(s), reference_mask(s))`` (several references: one
    context) and one ``matte(context, targets)``. Carries ``image_size``, the model's input."""
    from .pipeline import load_pipeline  # lazy: the model stack is only needed here

    pipe = load_pipeline(
        matting_weights=args.matting_weights, sd_path=args.sd, device=args.device, dtype=args.dtype
    )

    def predict(reference_image, reference_mask, target_images):
        ctx = pipe.encode_reference(reference_image, reference_mask)
        return _alpha_list(pipe.matte(ctx, list(target_images)))

    predict.image_size = getattr(getattr(pipe, "config", None), "image_size", 768)
    return predict


def _load_predictor(spec: str, args) -> PredictFn:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise SystemExit(f"--predictor must be MODULE:FACTORY, got {spec!r}")
    factory = getattr(importlib.import_module(mod_name), attr)
    return factory(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m iconmatting_core.eval",
        description="Evaluate IconMatting on ICM-57 (MSE, SAD, Grad, Conn at the original resolution).",
    )
    p.add_argument("--data", required=True, help="ICM-57 folder with image/, alpha/ (and trimap/)")
    p.add_argument("--json", default=None, help="group json (default: <DATA>.json, DATA/ICM57.json)")
    p.add_argument("--matting-weights", default=None, help="IconMatting head weights")
    p.add_argument("--sd", default=None, help="Stable Diffusion 2.1 checkpoint or diffusers folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "fp16", "bf16"],
                   help="fp32 by default, as the reference evaluated")
    p.add_argument("--protocol", nargs="+", default=["project"], choices=PROTOCOLS,
                   help="project (default: letterboxed, fixed references) and/or reference (the authors' "
                        "evaluation path: centre crop to 768, random reference; comparable with the paper)")
    p.add_argument("--references", nargs="+", type=int, default=[1], metavar="K",
                   help="reference protocol: K references drawn per target, encoded into one context; "
                        "several values give one row each (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference protocol's draws")
    p.add_argument("--image-size", type=int, default=None,
                   help="square input of the reference protocol (default: the model's, 768)")
    p.add_argument("--out", default=None, help="write predictions (<name>.png) and metrics.csv here "
                                               "(one subfolder per protocol and K when several)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N groups")
    p.add_argument("--region", nargs="+", default=None, choices=["all", "unknown"],
                   help="sum metrics over the whole image and/or the trimap unknown region "
                        "(default: all for project, unknown for reference)")
    p.add_argument("--per-group", action="store_true", help="also print one row per group")
    p.add_argument("--quantize", default=None, choices=["none", "floor", "round"],
                   help="score 8-bit predictions (floor: like the reference's saved PNGs; the default "
                        "of the reference protocol, none for project)")
    p.add_argument("--predictor", default=None, help=argparse.SUPPRESS)  # MODULE:FACTORY(args) -> predict_fn
    return p


def main(argv: Optional[Sequence[str]] = None, predict_fn: Optional[PredictFn] = None) -> int:
    """CLI entry point. ``predict_fn`` (or the hidden ``--predictor MODULE:FACTORY``) replaces the
    model, for tests and other predictors."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if any(k < 1 for k in args.references):
        parser.error("--references must be >= 1")
    if predict_fn is None and args.predictor is None and not (args.matting_weights and args.sd):
        parser.error("--matting-weights and --sd are required")
    protocols = list(dict.fromkeys(args.protocol))
    runs = [(p, k) for p in protocols for k in (dict.fromkeys(args.references) if p == "reference" else [1])]
    regions = {p: args.region or [DEFAULT_REGION[p]] for p in protocols}
    try:
        dataset = load_dataset(args.data, args.json, require_trimap=any("unknown" in r for r in regions.values()))
    except (DatasetError, ImageReadError) as e:
        raise SystemExit(f"error: {e}") from None
    if predict_fn is None:
        predict_fn = _load_predictor(args.predictor, args) if args.predictor else build_predict_fn(args)
    image_size = args.image_size or getattr(predict_fn, "image_size", None) or 768

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: List[EvalResults] = []
    try:
        for protocol, k in runs:
            out = args.out
            if out is not None and len(runs) > 1:
                out = str(Path(out) / f"{protocol}-k{k}")
            results += run_protocol(
                dataset, predict_fn, protocol, regions[protocol], references=k, seed=args.seed,
                image_size=image_size, limit=args.limit, out_dir=out,
                quantize=args.quantize or DEFAULT_QUANTIZE[protocol], progress=progress,
            )
    except (DatasetError, ImageReadError) as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(results, per_group=args.per_group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
