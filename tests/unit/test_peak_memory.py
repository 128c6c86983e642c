"""benchmarks' PeakMemory on the CPU: the peak of a block (also one freed before the block ends), read from the
kernel's high-water mark, with no thread sampling beside the work being timed. Each case runs in a fresh
interpreter: in a test process whose heap earlier tests grew, freed pages can be reused without the RSS moving."""
import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
MB = 2**20

CASE = r"""
import json, sys, time
import numpy as np
import torch
sys.path.insert(0, sys.argv[1])
import comfy_bench_script
from comfy_bench_script import PeakMemory

def touch(mb):
    a = np.ones(mb * 2**20, dtype=np.uint8)  # written, so resident
    return int(a[::4096].sum())

out = {}
if sys.argv[2] == "kernel":
    touch(300)  # the process has been bigger before: that older peak must not count
    with PeakMemory(torch.device("cpu")) as small:
        touch(20)
    with PeakMemory(torch.device("cpu")) as big:
        out["thread"] = big.thread is not None
        touch(200)
    out["small"], out["big"] = small.extra, big.extra
else:
    comfy_bench_script._reset_kernel_peak_rss = lambda: False
    with PeakMemory(torch.device("cpu")) as mem:
        out["thread"] = mem.thread is not None and mem.thread.is_alive()
        a = np.ones(100 * 2**20, dtype=np.uint8)
        time.sleep(0.05)
        del a
    out["alive_after"] = mem.thread.is_alive()
    out["extra"] = mem.extra
print(json.dumps(out))
"""


def _case(kind: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CASE, str(BENCHMARKS), kind], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_peak_freed_inside_the_block_is_measured_without_a_sampling_thread():
    out = _case("kernel")
    assert out["thread"] is False  # Linux: the kernel keeps the peak
    assert 190 * MB <= out["big"] < 260 * MB
    assert out["small"] < 60 * MB


def test_where_the_kernel_keeps_no_peak_a_thread_samples_it():
    out = _case("thread")
    assert out["thread"] is True and out["alive_after"] is False
    assert 90 * MB <= out["extra"] < 160 * MB
