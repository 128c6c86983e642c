"""benchmarks' PeakMemory on the CPU: the peak of a block (also one freed before the block ends), read from the
kernel's high-water mark, with no thread sampling beside the work being timed."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from comfy_bench_script import PeakMemory  # noqa: E402

MB = 2**20


def _touch(mb: int) -> int:
    a = np.ones(mb * MB, dtype=np.uint8)  # written, so resident
    return int(a[::4096].sum())


def test_a_peak_freed_inside_the_block_is_measured_without_a_sampling_thread():
    _touch(300)  # the process has been bigger before: that older peak must not count
    with PeakMemory(torch.device("cpu")) as small:
        _touch(20)
    with PeakMemory(torch.device("cpu")) as big:
        assert big.thread is None  # Linux: the kernel keeps the peak
        _touch(200)
    assert 190 * MB <= big.extra < 260 * MB
    assert small.extra < 60 * MB


def test_where_the_kernel_keeps_no_peak_a_thread_samples_it(monkeypatch):
    import comfy_bench_script

    monkeypatch.setattr(comfy_bench_script, "_reset_kernel_peak_rss", lambda: False)
    with PeakMemory(torch.device("cpu")) as mem:
        assert mem.thread is not None and mem.thread.is_alive()
        a = np.ones(100 * MB, dtype=np.uint8)
        import time
        time.sleep(0.05)
        del a
    assert not mem.thread.is_alive()
    assert 90 * MB <= mem.extra < 160 * MB
