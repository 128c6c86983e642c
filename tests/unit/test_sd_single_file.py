"""Stable Diffusion from one original-layout (LDM/CompVis) checkpoint file, as v2-1_768-ema-pruned.safetensors.

Tiny random diffusers models are written back into the LDM key layout by the small converter of
``tests/support/ldm_keys.py`` (the inverse of diffusers' ``convert_ldm_*_checkpoint``), saved as one file and loaded through
``load_sd_components``: every weight, the UNet output and the empty-prompt embedding must come back exactly.
"""
import re
from typing import Dict

import pytest
import torch

from iconmatting_core.checkpoint import CheckpointError
from iconmatting_core.clip_text import OPEN_CLIP_PREFIX, encode_empty_prompt
from iconmatting_core.pipeline import IconMattingPipeline, build_model
from iconmatting_core.sd_loading import UNET_PREFIX, VAE_PREFIX, load_sd_components
from ldm_keys import ldm_unet_state_dict, ldm_vae_state_dict
from sample_inputs import make_reference, make_targets
from tiny_models import (
    TINY_TEXT, randomise, tiny_head, tiny_open_clip_text_state_dict, tiny_text_state_dict, tiny_unet_config, tiny_vae_config,
)

TINY_CONFIGS = dict(unet_config=tiny_unet_config(), vae_config=tiny_vae_config(), text_encoder_config=TINY_TEXT)

# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def originals():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = randomise(UNet2DConditionModel.from_config(tiny_unet_config()), 1)
    vae = randomise(AutoencoderKL.from_config(tiny_vae_config()), 2)
    return unet, vae


@pytest.fixture(scope="module")
def ldm_state(originals) -> Dict[str, torch.Tensor]:
    unet, vae = originals
    state = ldm_unet_state_dict(unet.state_dict(), tiny_unet_config())
    state.update(ldm_vae_state_dict(vae.state_dict(), tiny_vae_config()))
    state.update(tiny_open_clip_text_state_dict())
    state.update(betas=torch.linspace(1e-4, 2e-2, 1000), alphas_cumprod=torch.linspace(1, 0, 1000))  # ignored extras
    return state


def save(state: Dict[str, torch.Tensor], path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 110000}, path)
    return path


@pytest.fixture(scope="module")
def single_file(ldm_state, tmp_path_factory):
    return save(ldm_state, tmp_path_factory.mktemp("sd_single") / "v2-1_tiny.safetensors")


# --- the converter itself ----------------------------------------------------------------------

def test_converter_writes_the_sd21_file_layout(ldm_state):
    unet_keys = ("time_embed.2.weight", "input_blocks.3.0.op.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                 "middle_block.2.emb_layers.1.bias", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                 "output_blocks.3.0.skip_connection.weight", "out.2.bias")
    vae_keys = ("encoder.down.1.downsample.conv.weight", "decoder.up.3.upsample.conv.bias", "encoder.norm_out.weight",
                "decoder.up.1.block.0.nin_shortcut.weight", "decoder.mid.attn_1.norm.bias")
    for key in [UNET_PREFIX + k for k in unet_keys] + [VAE_PREFIX + k for k in vae_keys]:
        assert key in ldm_state, key
    assert OPEN_CLIP_PREFIX + "transformer.resblocks.2.attn.in_proj_weight" in ldm_state  # the unused last block
    assert ldm_state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert ldm_state["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    # decoder levels reversed: the LDM's up.0 is the full-resolution level (fewest channels)
    assert ldm_state["first_stage_model.decoder.up.0.block.0.conv1.weight"].shape[0] == 8
    assert ldm_state["first_stage_model.decoder.up.3.block.0.conv1.weight"].shape[0] == 16


# --- loading -----------------------------------------------------------------------------------

def _assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module, what: str):
    got, want = loaded.state_dict(), original.state_dict()
    assert got.keys() == want.keys(), what
    wrong = [k for k in want if not torch.equal(got[k], want[k])]
    assert not wrong, f"{what}: {len(wrong)} tensors differ, e.g. {wrong[:3]}"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_every_weight_exactly(originals, ldm_state, single_file, tmp_path, suffix):
    path = single_file if suffix == ".safetensors" else save(ldm_state, tmp_path / "v2-1_tiny.ckpt")
    sd = load_sd_components(path, torch.float32, **TINY_CONFIGS)
    unet, vae = originals
    _assert_same_weights(sd.unet, unet, "UNet")
    _assert_same_weights(sd.vae, vae, "VAE")

    gen = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(sd.unet(latents, 500, encoder_hidden_states=cond).sample,
                           unet(latents, 500, encoder_hidden_states=cond).sample)
        image = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
        assert torch.equal(sd.vae.encode(image).latent_dist.mean, vae.encode(image).latent_dist.mean)

    expected = encode_empty_prompt(tiny_text_state_dict(), "hf", num_heads=2)
    assert sd.empty_prompt_embedding.shape == (1, 77, 32)
    assert torch.allclose(sd.empty_prompt_embedding, expected, atol=1e-6)


def test_single_file_in_half_precision(single_file):
    sd = load_sd_components(single_file, torch.float16, **TINY_CONFIGS)
    assert next(sd.unet.parameters()).dtype == torch.float16 and next(sd.vae.parameters()).dtype == torch.float16
    assert sd.empty_prompt_embedding.dtype == torch.float32


def test_weight_check_catches_a_wrong_vae_attention_layout(originals, ldm_state, tmp_path):
    """The checks above can fail: a transposed VAE attention 1x1 conv still loads, but the weights differ."""
    state = dict(ldm_state)
    key = "first_stage_model.encoder.mid.attn_1.q.weight"
    state[key] = state[key].transpose(0, 1).contiguous()
    sd = load_sd_components(save(state, tmp_path / "swapped.safetensors"), **TINY_CONFIGS)
    with pytest.raises(AssertionError, match=r"VAE: 1 tensors differ, e\.g\. \['encoder\.mid_block\.attentions\.0\.to_q\.weight'\]"):
        _assert_same_weights(sd.vae, originals[1], "VAE")


# --- files that are not SD 2.x ---------------------------------------------------------------

def test_file_without_unet_is_rejected(ldm_state, tmp_path):
    path = save({k: v for k, v in ldm_state.items() if not k.startswith(UNET_PREFIX)}, tmp_path / "vae_only.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r" is not a Stable Diffusion checkpoint"):
        load_sd_components(path, **TINY_CONFIGS)


def test_sd1_file_without_open_clip_is_rejected(ldm_state, tmp_path):
    state = {k: v for k, v in ldm_state.items() if not k.startswith(OPEN_CLIP_PREFIX)}
    hf = tiny_text_state_dict()
    state.update({"cond_stage_model.transformer." + k: v for k, v in hf.items()})  # SD 1.x: HF CLIP layout
    path = save(state, tmp_path / "v1-5-tiny.ckpt")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r" has no OpenCLIP text encoder.*not an SD 2\.x checkpoint"):
        load_sd_components(path, **TINY_CONFIGS)


def test_missing_unet_and_vae_keys_are_reported(ldm_state, tmp_path):
    state = dict(ldm_state)
    del state["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"]
    path = save(state, tmp_path / "no_key.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r": the UNet weights do not fit .*"
                       r"missing 1 keys, e\.g\. \['down_blocks\.0\.resnets\.0\.norm1\.weight'\]"):
        load_sd_components(path, **TINY_CONFIGS)

    state = dict(ldm_state)
    del state["first_stage_model.decoder.up.1.block.0.nin_shortcut.bias"]  # LDM up.1 = diffusers up_blocks.2
    path = save(state, tmp_path / "no_vae_key.safetensors")
    with pytest.raises(CheckpointError, match=r"the VAE weights do not fit .*"
                       r"missing 1 keys, e\.g\. \['decoder\.up_blocks\.2\.resnets\.0\.conv_shortcut\.bias'\]"):
        load_sd_components(path, **TINY_CONFIGS)


def test_wrong_shapes_are_a_checkpoint_error(ldm_state, tmp_path):
    """E.g. an SD 2 inpainting UNet (9 input channels): a CheckpointError naming the file, not torch's RuntimeError."""
    state = dict(ldm_state)
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    path = save(state, tmp_path / "inpainting.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r": the UNet weights do not fit .*"
                       r"1 tensors of the wrong shape, e\.g\. \['conv_in\.weight'\]"):
        load_sd_components(path, **TINY_CONFIGS)


# --- end to end ----------------------------------------------------------------------------------

def test_pipeline_from_single_file_equals_diffusers_folder(originals, single_file, tmp_path):
    """Single file and a diffusers folder holding the same weights give the same alphas."""
    import json

    from safetensors.torch import save_file

    unet, vae = originals
    folder = tmp_path / "sd"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    (folder / "text_encoder").mkdir()
    save_file(tiny_text_state_dict(), str(folder / "text_encoder" / "model.safetensors"))
    (folder / "text_encoder" / "config.json").write_text(json.dumps(TINY_TEXT))

    image, mask = make_reference()
    targets = make_targets(2)
    alphas = []
    for source, kw in ((single_file, TINY_CONFIGS), (folder, {})):
        pipe = IconMattingPipeline(build_model(load_sd_components(source, **kw), tiny_head()))
        alphas.append(pipe.matte(pipe.encode_reference(image, mask), targets))
    for a, b in zip(*alphas):
        assert a.shape == (90, 60) and torch.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
        assert torch.equal(a, b)


def test_our_conversion_equals_diffusers_from_single_file_offline(single_file, tmp_path, monkeypatch):
    """diffusers' own single-file loader, given the configs as folders and no network, builds the
    same UNet and VAE tensors as our one-read conversion (which load_sd_components keeps: one read of
    the file for all three parts, config dicts, strict key report, pickle-safe .ckpt reading)."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for sub, cfg in (("unet", tiny_unet_config()), ("vae", tiny_vae_config())):
        (tmp_path / "configs" / sub).mkdir(parents=True)
        (tmp_path / "configs" / sub / "config.json").write_text(json.dumps(cfg))
    ours = load_sd_components(single_file, torch.float32, **TINY_CONFIGS)
    kw = dict(config=str(tmp_path / "configs"), local_files_only=True)
    theirs = {
        "unet": UNet2DConditionModel.from_single_file(str(single_file), subfolder="unet", **kw),
        "vae": AutoencoderKL.from_single_file(str(single_file), subfolder="vae", **kw),
    }
    for name, module in (("unet", ours.unet), ("vae", ours.vae)):
        a, b = module.state_dict(), theirs[name].state_dict()
        assert set(a) == set(b), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
