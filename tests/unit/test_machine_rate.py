"""benchmarks/machine_rate.py: the FLOP counts behind the benchmarks' fractions of the machine."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from machine_rate import count_flops, stage_table  # noqa: E402


def test_cpu_attention_is_counted_as_its_two_matmuls():
    # FlopCounterMode knows the GPU attention kernels only; torch's CPU kernel is counted by our formula:
    # scores 2*B*H*Tq*Tk*D plus the weighted sum 2*B*H*Tq*Tk*Dv (by hand: 2*2*3*10*7*(8 + 5))
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 5)
    _, flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * 2 * 3 * 10 * 7 * (8 + 5)


def test_convolution_and_matmul_counts():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    _, flops = count_flops(lambda: conv(torch.randn(1, 4, 5, 5)))
    assert flops == 2 * 5 * 5 * 6 * 4 * 9  # per output pixel and channel: 4 x 3 x 3 multiply-adds
    out, flops = count_flops(lambda: torch.randn(3, 4) @ torch.randn(4, 5))
    assert out.shape == (3, 5) and flops == 2 * 3 * 4 * 5


def test_stage_table_prints_fractions_of_the_gemm_rate():
    summary = {"unet": {"gflop": 100.0, "s": 2.0, "gflops": 50.0, "of_gemm": 0.5}}
    text = stage_table({"diffusers": summary}, {"diffusers": 100e9})
    assert "   50%" in text and " 100.0 " in text and "of GEMM" in text


def test_the_gemm_yardstick_is_the_higher_of_the_start_and_the_end(monkeypatch):
    import machine_rate

    measured = iter([100e9, 150e9])  # a slow minute at the start, then the machine at its rate
    monkeypatch.setattr(machine_rate, "gemm_rate", lambda device, dtype, size=None: next(measured))
    rates = machine_rate.GemmRates(torch.device("cpu"), {torch.float32})
    assert rates[torch.float32] == 100e9  # before the end is measured: the start
    rates.measure_end()
    assert rates[torch.float32] == 150e9
    assert rates.describe(torch.float32) == (
        "torch.float32 matmul best of 5, at the start 100.0 and at the end 150.0 GFLOP/s: the higher")
    measured = iter([150e9, 100e9])  # and the other way round
    rates = machine_rate.GemmRates(torch.device("cpu"), {torch.float32})
    rates.measure_end()
    assert rates[torch.float32] == 150e9
