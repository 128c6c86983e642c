"""``encode``: reference image(s) + mask(s) -> a context file (``.safetensors``, see ``context_file``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .cli_args import add_model_args, add_reference_args, check_reference_files, encode_reference, load_pipe, set_threads
from .outputs import OutputError, check_writable
from .record import reference_recipe


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("encode", help="encode a marked reference once into a context file")
    add_reference_args(e, required=True)
    e.add_argument("--out", required=True, help="context file to write (.safetensors)")
    e.add_argument("--resize-mode", choices=["pad", "stretch"], help="default pad; stored in the file for matte")
    add_model_args(e)


def check_out_file(out: Path) -> None:
    """OutputError when the context file cannot be written there (a folder, an unwritable folder)."""
    if out.is_dir():
        raise OutputError(f"encode --out {out} is a folder; give a file name such as {out / 'context.safetensors'}")
    check_writable(out.parent, "the folder of encode --out")
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"encode --out {out} is read-only; pick another file name")


def run(args) -> int:
    from ..context_file import save_context

    out = Path(args.out)
    check_out_file(out)
    set_threads(args.threads)
    try:
        check_reference_files(args)
    except ValueError as exc:
        print(f"error: reference: {exc}", file=sys.stderr)
        return 2
    pipe, files = load_pipe(args)
    resize_mode = args.resize_mode or "pad"
    try:
        context = encode_reference(pipe, args, resize_mode)
        reference = reference_recipe(args.reference, args.mask, args.pooling, args.seed, resize_mode)
    except (OSError, ValueError) as exc:
        print(f"error: reference: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    # the reference's recipe, as `matte --reference/--mask` records it: outputs of both agree
    path = save_context(out, context, pipe.fingerprint, {"resize_mode": resize_mode, **files, "reference": reference})
    print(f"wrote {path} ({context.tokens.shape[0]} tokens from {context.num_references} reference(s))")
    return 0
