"""Command line: ``python -m iconmatting_core matte ...`` and ``python -m iconmatting_core convert ...``.

matte: one reference image + its mask, a folder / glob / list of targets -> ``<name>_alpha.png``
and ``<name>_rgba.png`` per target in ``--out``. Targets whose outputs exist are skipped (re-run
to resume); a target that fails is reported and skipped; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MODELS_ENV = "ICONMATTING_MODELS"
MATTING_NAMES = ("icm.safetensors", "icm.ckpt")
SD_NAMES = ("v2-1_768-ema-pruned.safetensors", "v2-1_768-ema-pruned.ckpt", "stable-diffusion-2-1")


def default_models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or Path.home() / ".cache" / "iconmatting" / "models")


def find_model_files(models_dir: Path, matting: Optional[str], sd: Optional[str]):
    """Explicit paths win; otherwise look for the usual file names in models_dir."""
    def pick(explicit, names):
        if explicit:
            return Path(explicit) if Path(explicit).exists() else None
        return next((models_dir / n for n in names if (models_dir / n).exists()), None)

    m, s = pick(matting, MATTING_NAMES), pick(sd, SD_NAMES)
    problems = []
    if m is None:
        problems.append(
            f"IconMatting weights: {matting or ' or '.join(str(models_dir / n) for n in MATTING_NAMES)} not found. "
            "Download icm.ckpt (the authors' release, linked from github.com/tiny-smart/in-context-matting) "
            f"into {models_dir}, or pass --matting-weights PATH."
        )
    if s is None:
        problems.append(
            f"Stable Diffusion 2.1: {sd or str(models_dir / SD_NAMES[0])} not found. Download "
            "v2-1_768-ema-pruned.safetensors (stabilityai/stable-diffusion-2-1) or the diffusers folder "
            f"stable-diffusion-2-1 into {models_dir}, or pass --sd PATH."
        )
    return m, s, problems


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA"):
            im = im.getchannel("A")
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def list_targets(specs: Sequence[str]) -> List[Path]:
    out: List[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            out.append(p)
        else:
            out += sorted(Path(q) for q in glob.glob(spec) if Path(q).suffix.lower() in IMAGE_EXTENSIONS)
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def output_paths(out_dir: Path, target: Path):
    return out_dir / f"{target.stem}_alpha.png", out_dir / f"{target.stem}_rgba.png"


def _progress(i: int, n: int, name: str, status: str, started: float) -> None:
    width = 30
    filled = int(width * i / max(n, 1))
    rate = (time.time() - started) / max(i, 1)
    print(f"[{'#' * filled}{'.' * (width - filled)}] {i}/{n} {name}: {status} ({rate:.1f}s/img)", file=sys.stderr)


def run_matte(args, pipe_factory=None) -> int:
    from PIL import Image

    targets = list_targets(args.targets)
    if not targets:
        print(f"error: no target images found in {' '.join(args.targets)}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [t for t in targets if not all(p.exists() for p in output_paths(out_dir, t))]
    if len(todo) < len(targets):
        print(f"skipping {len(targets) - len(todo)} target(s) with existing outputs in {out_dir}", file=sys.stderr)
    if not todo:
        return 0

    if pipe_factory is None:
        models_dir = Path(args.models_dir) if args.models_dir else default_models_dir()
        matting, sd, problems = find_model_files(models_dir, args.matting_weights, args.sd)
        if problems:
            print("error: model files missing:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 2
        from .pipeline import load_pipeline

        pipe = load_pipeline(matting, sd, device=args.device, dtype=args.dtype)
    else:
        pipe = pipe_factory()

    try:
        context = pipe.encode_reference(read_image(Path(args.reference)), read_mask(Path(args.mask)),
                                        pooling=args.pooling, resize_mode=args.resize_mode, seed=args.seed)
    except (OSError, ValueError) as exc:
        print(f"error: reference: {exc}", file=sys.stderr)
        return 2

    failed = []
    started = time.time()
    for i, target in enumerate(todo, 1):
        try:
            image = read_image(target)
            alpha = pipe.matte(context, image, resize_mode=args.resize_mode)[0]
            rgba = pipe.cutout(image, alpha, estimate_colors=not args.no_foreground)
            alpha_path, rgba_path = output_paths(out_dir, target)
            Image.fromarray((alpha.cpu().numpy() * 255 + 0.5).astype(np.uint8), "L").save(alpha_path)
            Image.fromarray((rgba.cpu().numpy() * 255 + 0.5).astype(np.uint8), "RGBA").save(rgba_path)
            _progress(i, len(todo), target.name, "ok", started)
        except Exception as exc:  # one bad image must not lose the others
            failed.append((target, exc))
            _progress(i, len(todo), target.name, f"FAILED: {type(exc).__name__}: {exc}", started)
    print(f"done: {len(todo) - len(failed)} matted, {len(failed)} failed, outputs in {out_dir}", file=sys.stderr)
    for target, exc in failed:
        print(f"  failed: {target}: {exc}", file=sys.stderr)
    return 1 if failed else 0


def run_convert(args) -> int:
    from .checkpoint import CheckpointError, convert_checkpoint

    try:
        dst = convert_checkpoint(args.src, args.dst)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iconmatting_core", description="In-context matting (IconMatting).")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("matte", help="matte a batch of targets with one marked reference")
    m.add_argument("--reference", required=True, help="reference image")
    m.add_argument("--mask", required=True, help="foreground mask of the reference (white = foreground; or an image's alpha)")
    m.add_argument("--targets", required=True, nargs="+", help="folder(s), glob(s) or image files")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--matting-weights", help="IconMatting weights (.ckpt or .safetensors)")
    m.add_argument("--sd", help="Stable Diffusion 2.1 checkpoint file or diffusers folder")
    m.add_argument("--models-dir", help=f"where to look for model files (default ${MODELS_ENV} or ~/.cache/iconmatting/models)")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    m.add_argument("--pooling", default="mask", choices=["mask", "scribble"], help="'scribble' for strokes/points")
    m.add_argument("--resize-mode", default="pad", choices=["pad", "stretch"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-foreground", action="store_true", help="do not estimate foreground colours for the RGBA cut-outs")
    c = sub.add_parser("convert", help="convert the released .ckpt to .safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    return parser


def main(argv: Optional[Sequence[str]] = None, pipe_factory=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        return run_convert(args)
    return run_matte(args, pipe_factory)


if __name__ == "__main__":
    sys.exit(main())
