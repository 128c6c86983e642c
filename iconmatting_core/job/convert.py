"""``convert``: the released ``icm.ckpt`` -> ``.safetensors``."""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("convert", help="convert the released icm.ckpt to .safetensors")
    c.add_argument("src")
    c.add_argument("dst")


def run(args) -> int:
    from ..checkpoint import CheckpointError, convert_checkpoint

    try:
        dst = convert_checkpoint(args.src, args.dst)
    except CheckpointError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0
