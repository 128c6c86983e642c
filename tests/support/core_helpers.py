"""Views of the library that only the tests need, kept out of ``iconmatting_core``.

* :func:`box_blur`: ``postprocess``'s box mean over a whole image (the library only ever blurs tiles);
* :func:`ours_to_reference`: head keys -> the released checkpoint's keys, to write tiny heads in the
  reference layout (the library only reads that layout: ``checkpoint.reference_to_ours``).
"""
from typing import Dict

import torch

from iconmatting_core.checkpoint import _PREFIX_PAIRS, _rename, _rules
from iconmatting_core.postprocess import _box_mean

_OURS_TO_REFERENCE = _rules(_PREFIX_PAIRS, forward=False)


def box_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window clipped to the image. x: [B, C, H, W] -> [B, C, H, W]."""
    b, c, h, w = x.shape
    out = _box_mean(x.reshape(b * c, h, w), (0, h, 0, w), (0, h, 0, w), radius, (h, w))
    return out.reshape(b, c, h, w)


def ours_to_reference(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """IconMattingHead keys -> the reference model's keys (the released checkpoint's layout)."""
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, _OURS_TO_REFERENCE)
        if new is None:
            raise KeyError(f"no reference name for {key}")
        out[new] = value
    return out
