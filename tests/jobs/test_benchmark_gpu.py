"""benchmarks/benchmark_gpu.py end to end in its CPU smoke mode: random SD 2.x with tiny channel counts in the
real layouts (``--model-size tiny``) in the test ComfyUI, both paths, half precision and fp32 (what a rented GPU runs
full-size at 768 px in fp16 and fp32, here at 128 px on the CPU, in bf16: CPUs without fp16 arithmetic run fp16
convolutions ~100x slower than fp32; without bf16 arithmetic, bf16 ones too, hence the tiny models)."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # boots ComfyUI for itself, and the diffusers path runs in bf16 (emulated on most CPUs): ~30 s
def test_gpu_benchmark_runs_end_to_end_in_cpu_smoke_mode(tmp_path):
    out_path = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark_gpu.py"), "--device", "cpu", "--model-size", "tiny",
         "--image-size", "128", "--targets", "1", "--repeats", "1", "--json", str(out_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(out_path.read_text())
    assert out["device"] == "cpu"
    # on the CPU the pack replaces ComfyUI's default sub-quadratic attention with torch's SDPA
    assert out["host_attention"] == "attention_sub_quad" and out["feature_attention"] == "attention_pytorch"
    assert set(out["runs"]) == {"bf16", "fp32"}
    for dtype, run in out["runs"].items():
        for path in ("native", "diffusers"):
            r = run[path]
            assert r["floor"] > 0 and r["per_target"] > 0 and math.isclose(r["targets_per_s"], 1 / r["per_target"])
            assert isinstance(r["extra_peak_bytes"], int) and r["extra_peak_bytes"] >= 0
            # every stage a target pays for, counted and timed, against the device's own matmul rate
            assert run["gemm_flops"][path] > 0
            # measured at the start and at the end of the run, the higher one the yardstick (both printed)
            start, end = run["gemm_measured"][path]
            assert run["gemm_flops"][path] == max(start, end) and min(start, end) > 0
            assert re.search(r"at the start [\d.]+ and at the end [\d.]+ GFLOP/s", run["gemm"][path])
            stages = r["stages"]
            assert list(stages) == ["vae", "unet", "matching", "head", "stages", "matte"]
            for row in stages.values():
                assert row["gflop"] > 0 and row["s"] > 0
                assert math.isclose(row["of_gemm"], row["gflop"] * 1e9 / row["s"] / run["gemm_flops"][path], rel_tol=1e-9)
            assert math.isclose(stages["stages"]["gflop"], sum(stages[k]["gflop"] for k in ("vae", "unet", "matching", "head")))
            assert stages["matte"]["s"] == r["per_target"]
            assert stages["unet"]["gflop"] > stages["head"]["gflop"]  # the UNet pass dominates a target's work
    assert out["runs"]["bf16"]["native_unet_dtype"] == "torch.float32"  # bf16 weights; ComfyUI computes fp32 on the CPU
    assert out["runs"]["bf16"]["diffusers_dtype"] == "torch.bfloat16"
    # random SD 2.x, the same weights: the two paths give the same fp32 alpha
    assert out["runs"]["fp32"]["alpha_max_diff"] <= 1e-4, out["runs"]["fp32"]["alpha_max_diff"]
    diffs = out["bf16_vs_fp32_alpha_max_diff"]
    assert set(diffs) == {"native", "diffusers"} and all(0 <= d <= 1 for d in diffs.values())
    assert "targets/s" in proc.stdout and "of GEMM" in proc.stdout and "alpha max |bf16 - fp32|, native" in proc.stdout
