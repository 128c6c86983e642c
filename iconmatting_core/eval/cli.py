"""``python -m iconmatting_core.eval``: arguments, the model's predictor, one table."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..image_io import ImageReadError
from .dataset import DatasetError, load_dataset
from .protocols import DEFAULT_QUANTIZE, DEFAULT_REGION, PROTOCOLS
from .report import format_table
from .scoring import EvalResults, PredictFn, run_protocol

# --------------------------------------------------------------------------- model + CLI


def _alpha_list(outputs) -> List[np.ndarray]:
    if hasattr(outputs, "detach") and getattr(outputs, "ndim", 0) == 3:
        outputs = list(outputs.unbind(0))
    return [np.asarray(o.detach().float().cpu()) if hasattr(o, "detach") else np.asarray(o) for o in outputs]


def build_predict_fn(args) -> PredictFn:
    """``load_pipeline(matting_weights, sd_path, device, dtype)`` -> predict_fn: per call one
    ``encode_reference(reference_image(s), reference_mask(s))`` (several references: one
    context) and one ``matte(context, targets)``. Carries ``image_size``, the model's input."""
    from ..pipeline import load_pipeline  # lazy: the model stack is only needed here

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
