"""Who is the reference for whom: the project protocol's plan, the reference protocol's crop, resize and
seeded draw (see the package docstring)."""
from __future__ import annotations

import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

PROTOCOLS = ("project", "reference")
DEFAULT_REGION = {"project": "all", "reference": "unknown"}
DEFAULT_QUANTIZE = {"project": "none", "reference": "floor"}
Job = Tuple[str, Tuple[str, ...], List[str]]  # (group, reference names, target names)


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
