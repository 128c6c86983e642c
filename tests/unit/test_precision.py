"""The one precision rule (``iconmatting_core.precision``) on every kind of device, the device queries stubbed:
"auto" is bf16 where the device computes it natively (torch's answer, or the host's hint), fp32 elsewhere, never
fp16 unasked; an explicit choice is kept. The node's use of it (ComfyUI's hint): tests/unit/test_model_nodes.py."""
import pytest
import torch

from iconmatting_core.precision import CHOICES, DTYPES, resolve_dtype

#: compute capability per stubbed CUDA device: Volta, Turing, Ampere (A100, RTX 30), Ada, Hopper
CAPABILITY = {"cuda:0": (7, 0), "cuda:1": (7, 5), "cuda:2": (8, 0), "cuda:3": (8, 6), "cuda:4": (8, 9), "cuda:5": (9, 0)}


@pytest.fixture()
def gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: CAPABILITY[str(torch.device(d))])


def test_the_table_and_the_choices():
    assert DTYPES == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert CHOICES == ("auto", "fp32", "fp16", "bf16")


@pytest.mark.parametrize("device, expected", [
    ("cpu", torch.float32), ("meta", torch.float32), ("mps", torch.float32),
    ("cuda:0", torch.float32), ("cuda:1", torch.float32),
    ("cuda:2", torch.bfloat16), ("cuda:3", torch.bfloat16), ("cuda:4", torch.bfloat16), ("cuda:5", torch.bfloat16),
])
def test_auto_asks_torch_whether_the_device_computes_bf16_natively(gpus, device, expected):
    assert resolve_dtype("auto", torch.device(device)) == expected
    assert resolve_dtype(None, device) == expected


@pytest.mark.parametrize("device", ["cpu", "mps", "cuda:1", "cuda:3"])
def test_a_host_hint_decides_for_auto_and_never_brings_fp16(gpus, device):
    """The host knows devices torch's query does not (other makes, the user's --force-fp32): its hint decides."""
    assert resolve_dtype("auto", device, native_bf16=True) == torch.bfloat16
    assert resolve_dtype("auto", device, native_bf16=False) == torch.float32


@pytest.mark.parametrize("hint", [None, True, False])
def test_an_explicit_choice_is_kept_on_any_device(gpus, hint):
    for device in ("cpu", "cuda:1", "cuda:3"):
        assert resolve_dtype("fp16", device, native_bf16=hint) == torch.float16
        assert resolve_dtype("bf16", device, native_bf16=hint) == torch.bfloat16
        assert resolve_dtype("fp32", device, native_bf16=hint) == torch.float32
        assert resolve_dtype(torch.float16, device, native_bf16=hint) == torch.float16


def test_an_unknown_choice_names_the_choices():
    with pytest.raises(ValueError, match=r"^dtype must be one of auto, fp32, fp16, bf16; got 'half'$"):
        resolve_dtype("half", "cpu")
