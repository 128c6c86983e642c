"""ICM-57 data set: the json of groups, the files of each image, reading them (see the package docstring)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..image_io import ImageReadError, read_image, read_matte, read_trimap  # noqa: F401 (public here too)

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
