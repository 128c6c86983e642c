"""The tiny SD 2.x single file loads in the real ComfyUI 0.3.75 (stock Load Checkpoint) and in our core
alike, with the same weights: UNet output, VAE encoder moments and the empty-prompt conditioning agree.

A host job (in the ComfyUI boot all host tests share) runs ``tests/support/comfy_tiny_sd2/checks.py`` in-process, with the
test-only ``tests/support/comfy_tiny_sd2`` module registering the tiny model type (``extra_packs``). ComfyUI runs
its text encoder in float16 on CPU by default; ``--fp32-text-enc`` makes the comparison float32 throughout.
"""
import re
from pathlib import Path

import pytest

from comfy_harness import comfy_job, host_job, link_file
from iconmatting_core.clip_text import OPEN_CLIP_PREFIX
from iconmatting_core.sd_loading import UNET_PREFIX, VAE_PREFIX

ROOT = Path(__file__).resolve().parents[2]
TINY_SD2_PACK = ROOT / "tests" / "support" / "comfy_tiny_sd2"
CHECKS = TINY_SD2_PACK / "checks.py"
CHECKPOINT = "tiny_sd2.safetensors"
TOLERANCE = 1e-5
LOAD_PROBLEM = re.compile(r"missing|unexpected|left over keys|leftover", re.IGNORECASE)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_comfy_checkpoint) -> Path:
    models = tmp_path_factory.mktemp("models")
    return link_file(models / "checkpoints" / CHECKPOINT, tiny_comfy_checkpoint)


@host_job
def checks(tmp_path, tiny_comfy_checkpoint, comfy_host):
    tiny_checkpoint = link_file(tmp_path / "models" / "checkpoints" / CHECKPOINT, tiny_comfy_checkpoint)
    report = yield comfy_job(ROOT, [], models_dir=tiny_checkpoint.parents[1], pack_name="comfyui-iconmatting",
                             extra_packs=[TINY_SD2_PACK], comfy_args=["--fp32-text-enc"], host=comfy_host,
                             scripts=[{"path": CHECKS, "args": {"checkpoint": CHECKPOINT, "repo_root": str(ROOT)}}])
    assert report["extra_packs"][0]["import_failed"] is False, report["extra_packs"]
    (script,) = report["scripts"]
    assert script["ok"], script["error"] + "\n".join(script["log"][-30:])
    return script["result"]


def test_tiny_checkpoint_layout(tiny_checkpoint):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), "pt") as f:
        keys = list(f.keys())
        vae_dtypes = {f.get_slice(k).get_dtype() for k in keys if k.startswith(VAE_PREFIX)}
    prefixes = {p for p in (UNET_PREFIX, VAE_PREFIX, OPEN_CLIP_PREFIX) for k in keys if k.startswith(p)}
    assert prefixes == {UNET_PREFIX, VAE_PREFIX, OPEN_CLIP_PREFIX}
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, OPEN_CLIP_PREFIX)) for k in keys)
    assert vae_dtypes == {"F16"}


def test_comfyui_loads_it_as_tiny_sd2_without_key_problems(checks):
    assert checks["model_config"] == "TinySD2"
    assert checks["model_type"] == "V_PREDICTION"  # ComfyUI's own SD 2.x check, as for SD 2.1 768
    assert checks["clip_model"] == "TinySD2ClipModel"
    assert checks["unet_dtype"] == checks["vae_dtype"] == "torch.float32"
    assert checks["clip_dtypes"] == ["torch.float32"]
    assert checks["sd21_config_matches"] == "SD20"  # a real SD 2.1 UNet never matches TinySD2
    assert not [line for line in checks["log"] if LOAD_PROBLEM.search(line)], checks["log"]
    assert any("left over keys" in line for line in checks["control_log"])  # the debug log is captured


def test_unet_forward_equals_diffusers(checks):
    assert checks["unet_out_abs_max"] > 0.1
    assert checks["unet_max_diff"] <= TOLERANCE


def test_vae_encoder_equals_diffusers(checks):
    assert checks["vae_mean_abs_max"] > 0.1
    assert checks["vae_mean_max_diff"] <= TOLERANCE
    assert checks["vae_std_max_diff"] <= TOLERANCE
    assert checks["vae_encode_max_diff"] <= TOLERANCE


def test_sd2_clip_conditioning_equals_core_empty_prompt(checks):
    """ComfyUI's SD 2.x CLIP conditioning of "" (penultimate layer, final layer norm, pad id 0), via the
    CLIP Text Encode node and via ``clip.encode_from_tokens``, equals the core's empty-prompt embedding."""
    assert checks["clip_abs_max"] > 0.1
    assert checks["clip_node_max_diff"] <= TOLERANCE
    assert checks["clip_api_max_diff"] <= TOLERANCE
