"""Precision: the one table of the dtypes IconMatting runs in, and the one rule for "auto".

"auto" is bfloat16 where the device computes it natively, float32 everywhere else, and never
float16 unless asked for: SD 2.1's UNet (and the head after it) can overflow in float16, and an
overflow (NaN/inf) stops with an error recommending exactly the two that "auto" picks
(``config.OVERFLOW_ADVICE``). The reference ran float32.

Whether a device computes bfloat16 natively is the host's to say, as a hint to :func:`resolve_dtype`:
the library and command line ask torch (:func:`torch_native_bf16`: a CUDA GPU of compute capability
8.0 or newer, whose matrix units take bfloat16); the ComfyUI pack asks ComfyUI, which also knows other
makes of GPU and the user's own flags (``--force-fp32``), and passes its answer.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The precisions IconMatting runs in, by the name users choose them with."""
CHOICES = ("auto", *DTYPES)
"""What a user may ask for (the command line's --dtype, the Load node's dtype)."""
BF16_MIN_COMPUTE_CAPABILITY = 8  # Ampere: native bfloat16 matrix units


def torch_native_bf16(device: Union[str, torch.device]) -> bool:
    """Whether ``device`` computes bfloat16 natively, as far as torch tells: a CUDA GPU of compute
    capability 8.0 or newer."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= BF16_MIN_COMPUTE_CAPABILITY


def resolve_dtype(choice: Union[str, torch.dtype, None], device: Union[str, torch.device],
                  native_bf16: Optional[bool] = None) -> torch.dtype:
    """The precision to run in on ``device``: "fp32", "fp16", "bf16", a torch dtype, or "auto" (None).

    "auto": bfloat16 if the device computes it natively, else float32 (see the module docstring).
    ``native_bf16``: the host's answer to that question; None asks torch (:func:`torch_native_bf16`).
    """
    if isinstance(choice, torch.dtype):
        return choice
    if choice in (None, "auto"):
        if native_bf16 is None:
            native_bf16 = torch_native_bf16(device)
        return torch.bfloat16 if native_bf16 else torch.float32
    if choice not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(CHOICES)}; got {choice!r}")
    return DTYPES[choice]
