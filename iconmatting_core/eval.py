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

Reference selection (deterministic; the reference draws one at random, see below): within a group
sorted by name ``[a0, a1, ..., an]``, ``a0`` is the reference for ``a1..an`` and ``a1`` is the
reference for ``a0``; a group of one image is evaluated with itself as reference (the reference
code does the same). Every image in the json is thus evaluated exactly once as a target. The
reference's guidance is the reference image's ground-truth alpha (``InContextDataset.__getitem__``
sets ``guidance_on_reference_image = reference alpha``), so ``predict_fn`` gets that alpha as
``reference_mask``.

Metrics (:mod:`iconmatting_core.metrics`) are computed at each image's original resolution; a
prediction of another size is first resized bilinearly (``align_corners=False``, as the
reference's ``validation_step_end``). Default region: the whole image (ICM-57 as released has no
trimaps; the reference's authors describe the trimap as only "used to assist in calculating
metrics for unknown areas"); ``--region unknown`` uses ``trimap == 128`` instead. The overall
numbers are means over all target images; SAD, Grad and Conn are /1000 and MSE is x1000.

Reference behaviours not reproduced (they make its numbers non-deterministic): the random
reference draw (``np.random.randint``; for groups of exactly two images it may even pick the
target itself, since it only excludes the target when a group has more than two images), the
random interpolation used to resize validation images (``RANDOM_INTERP = True`` in
``CropResize``), and the random dropping of json entries with an ``instance_area_ratio`` field.

The core is :func:`evaluate` ``(dataset, predict_fn) -> EvalResults``; the model only enters
through ``predict_fn(reference_image, reference_mask, target_images) -> list of alphas`` (float32
HxWx3 / HxW arrays in [0, 1]), which :func:`build_predict_fn` builds from
``iconmatting_core.pipeline.load_pipeline``.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import metrics as M

__all__ = [
    "DatasetError",
    "Sample",
    "ICM57Dataset",
    "ImageResult",
    "EvalResults",
    "load_dataset",
    "find_json",
    "reference_plan",
    "evaluate",
    "format_table",
    "build_predict_fn",
    "main",
]

PredictFn = Callable[[np.ndarray, np.ndarray, List[np.ndarray]], Sequence]
METRIC_KEYS = ("sad", "mse", "grad", "conn")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".webp", ".tif", ".tiff")
MATTE_EXTS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG", ".bmp", ".tif", ".tiff")
GROUP_FIELDS = ("class", "sub_class", "HalfOrFull")


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


def _open(path: Path):
    from PIL import Image, ImageOps

    try:
        im = Image.open(path)
        im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a data error
        raise DatasetError(f"cannot read {path}: {e}") from None
    return ImageOps.exif_transpose(im)


def read_image(path: Path) -> np.ndarray:
    """RGB image file -> float32 ``[H, W, 3]`` in [0, 1]."""
    return np.asarray(_open(path).convert("RGB"), dtype=np.float32) / 255.0


def read_matte(path: Path) -> np.ndarray:
    """Gray matte file -> float32 ``[H, W]`` in [0, 1] (8-bit / 255, 16-bit / 65535)."""
    im = _open(path)
    if im.mode.startswith("I;16"):
        return np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
    if im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float32)
        return np.clip(a / (65535.0 if a.max() > 255 else 255.0 if a.max() > 1 else 1.0), 0, 1)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def read_trimap(path: Path) -> np.ndarray:
    """Trimap file -> uint8 ``[H, W]`` (0 / 128 / 255)."""
    return np.asarray(_open(path).convert("L"), dtype=np.uint8)


def reference_plan(names: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Group members -> ``[(reference, [targets...]), ...]`` covering every member once as a target.

    Sorted ``[a0, a1, ..., an]``: ``a0`` is the reference for ``a1..an``, ``a1`` for ``a0``; a
    single image is its own reference.
    """
    s = sorted(names)
    if not s:
        return []
    if len(s) == 1:
        return [(s[0], [s[0]])]
    return [(s[0], s[1:]), (s[1], [s[0]])]


# --------------------------------------------------------------------------- evaluation


@dataclass
class ImageResult:
    name: str
    group: str
    reference: str
    sad: float
    mse: float
    grad: float
    conn: float

    def metrics(self) -> Dict[str, float]:
        return {k: getattr(self, k) for k in METRIC_KEYS}


@dataclass
class EvalResults:
    region: str
    images: List[ImageResult] = field(default_factory=list)

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
    """Run ``predict_fn`` group by group (see :func:`reference_plan`) and score every target.

    dataset: from :func:`load_dataset`. predict_fn(reference_image [H, W, 3] float32,
    reference_mask [H, W] float32 (the reference's ground-truth alpha), target_images: list of
    [H, W, 3] float32) -> one [H, W] alpha in [0, 1] per target (numpy or torch; a different size
    is resized bilinearly to the target's). region: "all" (whole image) or "unknown" (trimap
    unknown band; needs trimaps). limit: evaluate only the first ``limit`` groups (sorted by name).
    out_dir: if given, predictions are written there as 8-bit PNGs ``<name>.png`` plus
    ``metrics.csv``. quantize: None (score the float prediction), "floor" (score
    ``floor(255 a) / 255`` like the reference's saved PNGs) or "round".
    """
    if region not in ("all", "unknown"):
        raise ValueError(f"region must be 'all' or 'unknown', got {region!r}")
    _quantize(np.zeros((1, 1)), quantize)  # validate early
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    groups = list(dataset.groups.items())
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        groups = groups[:limit]
    results = EvalResults(region=region)
    for gi, (group, members) in enumerate(groups):
        by_name = {s.name: s for s in members}
        for ref_name, target_names in reference_plan(list(by_name)):
            ref = by_name[ref_name]
            ref_image, ref_alpha = _load_pair(ref)
            targets = [by_name[n] for n in target_names]
            loaded = [_load_pair(t) for t in targets]
            if progress is not None:
                progress(f"[{gi + 1}/{len(groups)}] {group}: reference {ref_name} -> {', '.join(target_names)}")
            preds = predict_fn(ref_image, ref_alpha, [img for img, _ in loaded])
            preds = list(preds)
            if len(preds) != len(targets):
                raise ValueError(
                    f"predict_fn returned {len(preds)} alphas for {len(targets)} target images (group {group!r})"
                )
            for t, (img, gt), p in zip(targets, loaded, preds):
                a = _to_alpha_array(p, f"prediction for {t.name!r}")
                a = _quantize(_resize_alpha(a, gt.shape), quantize)
                trimap = None
                if region == "unknown":
                    if t.trimap_path is None:
                        raise DatasetError(f"--region unknown needs a trimap for {t.name!r} (trimap/{t.name}.png)")
                    trimap = read_trimap(t.trimap_path)
                    if trimap.shape != gt.shape:
                        raise DatasetError(
                            f"trimap {t.trimap_path} is {trimap.shape[1]}x{trimap.shape[0]} but alpha "
                            f"{t.alpha_path} is {gt.shape[1]}x{gt.shape[0]}"
                        )
                m = M.compute_all(a, gt, trimap, region=region)
                results.images.append(ImageResult(t.name, group, ref_name, **m))
                if out is not None:
                    _save_png(out / f"{t.name}.png", a)
    if out is not None:
        write_csv(results, out / "metrics.csv")
    return results


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


def write_csv(results: EvalResults, path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "group", "reference", *METRIC_KEYS])
        for r in results.images:
            w.writerow([r.name, r.group, r.reference, *(f"{getattr(r, k):.6f}" for k in METRIC_KEYS)])


# --------------------------------------------------------------------------- table


def format_table(results: EvalResults, per_group: bool = False, title: str = "ICM-57") -> str:
    """Paper-style table: SAD, MSE, Grad, Conn (SAD/Grad/Conn /1000, MSE x1000), overall mean over
    target images, optionally one row per group first."""
    region = "whole image" if results.region == "all" else "trimap unknown region"
    n_img, n_grp = len(results.images), len(results.groups)
    rows: List[Tuple[str, str, Dict[str, float]]] = []
    if per_group:
        counts: Dict[str, int] = {}
        for r in results.images:
            counts[r.group] = counts.get(r.group, 0) + 1
        rows += [(g, str(counts[g]), m) for g, m in results.group_means().items()]
    rows.append(("Overall", str(n_img), results.mean()))
    heads = ("Group" if per_group else "", "Images", "SAD", "MSE", "Grad", "Conn")
    cells = [[name, n] + [f"{m[k]:.2f}" for k in METRIC_KEYS] for name, n, m in rows]
    widths = [max(len(heads[i]), *(len(c[i]) for c in cells)) for i in range(len(heads))]

    def line(vals):
        first = vals[0].ljust(widths[0])
        return "  ".join([first] + [v.rjust(w) for v, w in zip(vals[1:], widths[1:])]).rstrip()

    out = [
        f"{title}: {n_grp} groups, {n_img} target images, region: {region}",
        "SAD, Grad, Conn: /1000; MSE: x1000 (mean squared error in units of 1e-3)",
        line(heads),
        "  ".join("-" * w for w in widths),
    ]
    for i, c in enumerate(cells):
        if per_group and i == len(cells) - 1:
            out.append("  ".join("-" * w for w in widths))
        out.append(line(c))
    return "\n".join(out)


# --------------------------------------------------------------------------- model + CLI


def _alpha_list(outputs) -> List[np.ndarray]:
    if hasattr(outputs, "detach") and getattr(outputs, "ndim", 0) == 3:
        outputs = list(outputs.unbind(0))
    return [np.asarray(o.detach().float().cpu()) if hasattr(o, "detach") else np.asarray(o) for o in outputs]


def build_predict_fn(args) -> PredictFn:
    """``load_pipeline(matting_weights, sd_path, device, dtype)`` -> predict_fn: per call one
    ``encode_reference(reference_image, reference_mask)`` and one ``matte(context, targets)``."""
    from .pipeline import load_pipeline  # lazy: the model stack is only needed here

    pipe = load_pipeline(
        matting_weights=args.matting_weights, sd_path=args.sd, device=args.device, dtype=args.dtype
    )

    def predict(reference_image, reference_mask, target_images):
        ctx = pipe.encode_reference(reference_image, reference_mask)
        return _alpha_list(pipe.matte(ctx, list(target_images)))

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
        description="Evaluate IconMatting on ICM-57 (SAD, MSE, Grad, Conn at the original resolution).",
    )
    p.add_argument("--data", required=True, help="ICM-57 folder with image/, alpha/ (and trimap/)")
    p.add_argument("--json", default=None, help="group json (default: <DATA>.json, DATA/ICM57.json)")
    p.add_argument("--matting-weights", default=None, help="IconMatting head weights")
    p.add_argument("--sd", default=None, help="Stable Diffusion 2.1 checkpoint or diffusers folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "fp16", "bf16"],
                   help="fp32 by default, as the reference evaluated")
    p.add_argument("--out", default=None, help="write predictions (<name>.png) and metrics.csv here")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N groups")
    p.add_argument("--region", default="all", choices=["all", "unknown"],
                   help="sum metrics over the whole image (default) or the trimap unknown region")
    p.add_argument("--per-group", action="store_true", help="also print one row per group")
    p.add_argument("--quantize", default="none", choices=["none", "floor", "round"],
                   help="score 8-bit predictions (floor: like the reference's saved PNGs)")
    p.add_argument("--predictor", default=None, help=argparse.SUPPRESS)  # MODULE:FACTORY(args) -> predict_fn
    return p


def main(argv: Optional[Sequence[str]] = None, predict_fn: Optional[PredictFn] = None) -> int:
    """CLI entry point. ``predict_fn`` (or the hidden ``--predictor MODULE:FACTORY``) replaces the
    model, for tests and other predictors."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if predict_fn is None and args.predictor is None and not (args.matting_weights and args.sd):
        parser.error("--matting-weights and --sd are required")
    try:
        dataset = load_dataset(args.data, args.json, require_trimap=args.region == "unknown")
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    if predict_fn is None:
        predict_fn = _load_predictor(args.predictor, args) if args.predictor else build_predict_fn(args)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        results = evaluate(
            dataset, predict_fn, region=args.region, limit=args.limit, out_dir=args.out,
            quantize=args.quantize, progress=progress,
        )
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(results, per_group=args.per_group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
