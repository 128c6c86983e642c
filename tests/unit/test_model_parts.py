"""Checkpoint loading, feature extraction and the stages' building blocks."""
import os
import pickle

import pytest
import torch

from core_helpers import box_blur, ours_to_reference
from iconmatting_core import checkpoint as ckpt
from iconmatting_core.clip_text import encode_empty_prompt
from iconmatting_core.config import IconMattingConfig
from iconmatting_core.features import noise_schedule
from iconmatting_core.pipeline import IconMattingPipeline, build_model, load_model
from iconmatting_core.postprocess import estimate_foreground, rgba_cutout
from iconmatting_core.preprocess import placement_for, prepare_image, restore_alpha, to_rgb
from iconmatting_core.sd_loading import load_sd_components
from oracles import prepare_mask
from sample_inputs import make_reference, make_targets
from tiny_models import save_tiny_head, tiny_config, tiny_head, tiny_text_state_dict


# --- checkpoints ---------------------------------------------------------------------------

def test_reference_checkpoint_round_trip_gives_identical_outputs(tiny_dir, pipe, tmp_path):
    """Head saved in the released (Lightning, reference-keys) layout -> load -> same alpha."""
    ref_path = save_tiny_head(tmp_path / "icm.ckpt", seed=0, layout="reference")
    state = torch.load(ref_path, weights_only=True)["state_dict"]
    assert all(k.startswith("in_context_decoder.") for k in state)
    assert "in_context_decoder.detail_decoder.matting_head.matting_convs.3.weight" in state
    other = IconMattingPipeline(load_model(ref_path, tiny_dir / "sd", "fp32", config=tiny_config()))
    image, mask = make_reference()
    a = pipe.matte(pipe.encode_reference(image, mask), make_targets(2))
    b = other.matte(other.encode_reference(image, mask), make_targets(2))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_convert_checkpoint_writes_loadable_safetensors(tmp_path):
    cfg = tiny_config()
    src = save_tiny_head(tmp_path / "icm.ckpt", cfg, seed=2, layout="reference")
    dst = ckpt.convert_checkpoint(src, tmp_path / "icm.safetensors", cfg)
    head, _ = ckpt.load_head(dst)  # the config travels in the file's metadata
    assert head.config == cfg
    expected = tiny_head(cfg, seed=2).state_dict()
    for k, v in head.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_lightning_extras_and_frozen_sd_keys_are_ignored(tmp_path):
    cfg = tiny_config()
    state = ours_to_reference(tiny_head(cfg).state_dict())
    state["feature_extractor.dift_sd.unet.conv_in.weight"] = torch.zeros(1)
    state["feature_extractor.prompt_embeds"] = torch.ones(1, 77, 32)
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": state, "optimizer_states": [{"state": {}}], "lr_schedulers": [], "epoch": 1}, path)
    head, prompt = ckpt.load_head(path, cfg)
    assert torch.equal(prompt, torch.ones(1, 77, 32))


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    cfg = tiny_config()
    state = ours_to_reference(tiny_head(cfg).state_dict())
    state.pop("in_context_decoder.detail_decoder.matting_head.matting_convs.3.weight")
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ckpt.CheckpointError, match=(
        r"broken\.ckpt does not fit the IconMatting model \(128px\): 1 keys missing "
        r"\(e\.g\. detail\.alpha_head\.3\.weight\)\. Use the IconMatting release icm\.ckpt"
    )):
        ckpt.load_head(path, cfg)

    state = ours_to_reference(tiny_head(cfg).state_dict())
    state["in_context_decoder.extra_layer.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, path)
    with pytest.raises(ckpt.CheckpointError, match=(
        r"has 1 keys the IconMatting model does not know \(e\.g\. in_context_decoder\.extra_layer\.weight\)\. Use"
    )):
        ckpt.load_head(path, cfg)

    ours = tiny_head(cfg).state_dict()
    ours["bogus.weight"] = torch.zeros(1)
    from safetensors.torch import save_file

    save_file(ours, str(tmp_path / "ours.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match=r"1 unexpected keys \(e\.g\. bogus\.weight\)\. Use"):
        ckpt.load_head(tmp_path / "ours.safetensors", cfg)


def test_wrong_config_reports_shapes(tmp_path):
    path = save_tiny_head(tmp_path / "h.ckpt", tiny_config(), layout="reference")
    with pytest.raises(ckpt.CheckpointError, match=r"tensors of the wrong shape \(e\.g\. .*\)\. Use the IconMatting release"):
        ckpt.load_head(path, IconMattingConfig())


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="weights file not found: .*nope.ckpt"):
        ckpt.load_head(tmp_path / "nope.ckpt")
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ckpt.CheckpointError, match=(
        r"Cannot read the weights file .*corrupt\.ckpt \(\w+(: [^)]*[^.])?\)\. "
        r"It is probably incomplete or not a weights file: download it again\.$"
    )):
        ckpt.load_head(bad)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"empty\.ckpt \(\w+(: [^)]*[^.])?\)\. It is"):
        ckpt.load_head(empty)
    truncated = tmp_path / "trunc.safetensors"
    save_tiny_head(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ckpt.CheckpointError, match="trunc.safetensors"):
        ckpt.load_head(truncated)
    with pytest.raises(ckpt.CheckpointError, match="Stable Diffusion weights not found"):
        load_sd_components(tmp_path / "missing_sd.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="not a diffusers Stable Diffusion folder"):
        load_sd_components(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_pickled_code_is_never_executed(tmp_path, monkeypatch, legacy):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config()
    state = ours_to_reference(tiny_head(cfg).state_dict())
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": _Evil()}, path, _use_new_zipfile_serialization=not legacy)
    head, _ = ckpt.load_head(path, cfg)  # the tensors still load
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    assert isinstance(head, torch.nn.Module)


def test_a_bare_pickle_runs_nothing_either(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_head(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


class _AttributeDict(dict):  # like Lightning's hyper-parameter container
    pass


def test_checkpoint_extras_of_dict_and_list_subclasses_load(tmp_path):
    import collections

    cfg = tiny_config()
    state = ours_to_reference(tiny_head(cfg).state_dict())
    extras = {"hyper_parameters": _AttributeDict(lr=4e-4, cfg=_AttributeDict(a=1)),
              "loops": collections.defaultdict(list, {"x": [1, 2]}), "callbacks": {"ModelCheckpoint{}": {"best": 0.1}}}
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, **extras}, path)
    head, _ = ckpt.load_head(path, cfg)
    assert head.config == cfg


def test_reference_key_layout_is_the_released_one():
    """Our full-size head, renamed to reference keys, has exactly the reference decoder's keys and shapes
    (tests/data/reference_head_keys.json was dumped from the reference modules built with config/eval.yaml)."""
    import json
    from pathlib import Path

    from iconmatting_core.matting_head import IconMattingHead

    expected = json.loads((Path(__file__).resolve().parents[1] / "data" / "reference_head_keys.json").read_text())["keys"]
    ours = {k: list(v.shape) for k, v in ours_to_reference(IconMattingHead(IconMattingConfig()).state_dict()).items()}
    assert ours == expected
    mapped, unmapped = ckpt.reference_to_ours({k: torch.zeros(0) for k in expected})
    assert not unmapped and set(mapped) == set(IconMattingHead(IconMattingConfig()).state_dict())


# --- feature extraction ----------------------------------------------------------------------

def test_recorded_layers_compute_attention_once(pipe, monkeypatch):
    """At a recorded resolution only the recorder attends (diffusers' processor is not run as well)."""
    ext = pipe.model.extractor
    calls = []
    for name, module in ext.unet.named_modules():
        if name.endswith("attn1"):
            inner = module.processor.inner
            monkeypatch.setattr(
                module.processor, "inner", lambda attn, h, *a, _inner=inner, **k: calls.append(h.shape[1]) or _inner(attn, h, *a, **k)
            )
    size = pipe.config.image_size
    ext(torch.zeros(1, 3, size, size), with_attention=True)
    recorded = {r * r for r in pipe.config.attention_resolutions}
    assert calls and not recorded & set(calls)


def test_feature_shapes_and_determinism(pipe):
    cfg = pipe.config
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    f1 = pipe.model.extractor(x, seed=3)
    f2 = pipe.model.extractor(x, seed=3)
    s32, s16 = cfg.image_size // 32, cfg.image_size // 16
    assert f1.up_features[0].shape == (2, cfg.unet_feature_channels[0], s32, s32)
    assert f1.up_features[1].shape == (2, cfg.unet_feature_channels[1], s16, s16)
    assert set(f1.attention) == {s32, s16}
    assert torch.equal(f1.up_features[1], f2.up_features[1])
    f3 = pipe.model.extractor(x, seed=4)
    assert not torch.equal(f1.up_features[1], f3.up_features[1])  # the seed drives the noise
    with pytest.raises(ValueError, match="expected images"):
        pipe.model.extractor(torch.zeros(1, 3, 64, 64))


def test_noise_schedule_matches_diffusers_ddim():
    from diffusers import DDIMScheduler

    cfg = IconMattingConfig()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    x, n = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    expected = sched.add_noise(x, n, torch.tensor([cfg.timestep]))
    a, b = noise_schedule(cfg)
    assert torch.allclose(a * x + b * n, expected, atol=1e-6)


def test_empty_prompt_same_in_hf_and_open_clip_layouts():
    from tiny_models import tiny_open_clip_text_state_dict

    e_hf = encode_empty_prompt(tiny_text_state_dict(seed=1), "hf", num_heads=2)
    e_oc = encode_empty_prompt(tiny_open_clip_text_state_dict(seed=1), "open_clip", num_heads=2)
    assert e_hf.shape == (1, 77, 32)
    assert torch.allclose(e_hf, e_oc, atol=1e-6)
    # the open_clip file's last block is never used (SD 2.x takes the penultimate layer)
    all_blocks = encode_empty_prompt(tiny_open_clip_text_state_dict(seed=1), "open_clip", num_heads=2, num_layers=3)
    assert not torch.allclose(all_blocks, e_oc, atol=1e-3)


def test_empty_prompt_matches_transformers_clip_when_available():
    transformers = pytest.importorskip("transformers")
    from tiny_models import TINY_TEXT

    cfg = transformers.CLIPTextConfig(**{k: v for k, v in TINY_TEXT.items()}, pad_token_id=0)
    model = transformers.CLIPTextModel(cfg).eval()
    sd = tiny_text_state_dict(seed=2)
    prefixed = "text_model.embeddings.token_embedding.weight" in model.state_dict()
    model.load_state_dict(sd if prefixed else {k[len("text_model."):]: v for k, v in sd.items()}, strict=True)
    assert torch.allclose(encode_empty_prompt(model.state_dict(), "hf", num_heads=2), encode_empty_prompt(sd, "hf", num_heads=2))
    ids = torch.tensor([[49406, 49407] + [0] * 75])
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    assert torch.allclose(encode_empty_prompt(sd, "hf", num_heads=2), expected, atol=1e-5)


def test_model_rejects_mismatched_parts(tiny_dir):
    sd = load_sd_components(tiny_dir / "sd")
    with pytest.raises(ValueError, match="different IconMattingConfig"):
        from iconmatting_core.sd_features import SDFeatureExtractor
        from iconmatting_core.pipeline import IconMattingModel

        IconMattingModel(SDFeatureExtractor(sd.unet, sd.vae, sd.empty_prompt_embedding, tiny_config(timestep=100)), tiny_head())
    assert build_model(sd, tiny_head()).config == tiny_config()


# --- pre/post-processing ---------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(100, 150), (150, 100), (128, 128), (30, 300)])
@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_letterbox_round_trip(hw, mode):
    h, w = hw
    mask = torch.zeros(h, w)
    mask[h // 4 : h * 3 // 4, w // 4 : w * 3 // 4] = 1
    image, placement = prepare_image(to_rgb(torch.rand(h, w, 3)), 128, mode)
    assert image.shape == (3, 128, 128) and image.min() >= -1 and image.max() <= 1
    assert placement == placement_for(h, w, 128, mode)
    m = prepare_mask(mask, placement, 128)
    back = restore_alpha(m, placement)
    assert back.shape == (h, w)
    assert ((back > 0.5) != (mask > 0.5)).float().mean() < 0.05
    if mode == "pad":
        assert m[:, placement.content_height :, :].sum() == 0 and m[:, :, placement.content_width :].sum() == 0


def test_box_blur_matches_direct_mean():
    x = torch.rand(1, 2, 9, 11, dtype=torch.float64)
    r = 2
    out = box_blur(x, r)
    for y in (0, 4, 8):
        for xx in (0, 5, 10):
            win = x[..., max(0, y - r) : y + r + 1, max(0, xx - r) : xx + r + 1]
            assert torch.allclose(out[..., y, xx], win.mean(dim=(-1, -2)))


def test_foreground_estimation_removes_background_bleed():
    h, w = 40, 40
    fg_color, bg_color = torch.tensor([1.0, 0.2, 0.2]), torch.tensor([0.0, 0.0, 1.0])
    alpha = torch.zeros(h, w)
    alpha[:, :20] = 1
    alpha[:, 20:24] = torch.linspace(0.8, 0.2, 4)
    image = alpha[..., None] * fg_color + (1 - alpha[..., None]) * bg_color
    fg = estimate_foreground(image[None], alpha[None])[0]
    edge = alpha > 0.1
    edge &= alpha < 0.9
    naive_err = (image[edge] - fg_color).abs().mean()
    est_err = (fg[edge] - fg_color).abs().mean()
    assert est_err < naive_err / 3
    rgba = rgba_cutout(image[None], alpha[None])
    assert rgba.shape == (1, h, w, 4) and torch.equal(rgba[0, ..., 3], alpha)


def test_pickle_placeholder_never_resolves_outside_allow_list():
    data = pickle.dumps(_Evil())
    import io

    obj = ckpt._InertUnpickler(io.BytesIO(data)).load()
    assert isinstance(obj, ckpt._Placeholder)


def test_attention_maps_equal_a_naive_per_layer_average(pipe):
    """Oracle in the reference's order: full per-layer probabilities, mean over copies and heads
    per image, then the mean over every self-attention layer (down, mid, up) at that resolution."""
    ext, cfg = pipe.model.extractor, pipe.config
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0])))
             for n, m in ext.unet.named_modules() if n.endswith("attn1")]
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    try:
        feats = ext(x, seed=5)
    finally:
        for h in hooks:
            h.remove()
    e = cfg.ensemble_size
    for res in cfg.attention_resolutions:
        layers = []
        for mod, hs in inputs:
            if hs.shape[1] != res * res:
                continue
            q = mod.to_q(hs).view(hs.shape[0], res * res, mod.heads, -1).permute(0, 2, 1, 3)
            k = mod.to_k(hs).view(hs.shape[0], res * res, mod.heads, -1).permute(0, 2, 1, 3)
            probs = (q @ k.transpose(-1, -2) * mod.scale).softmax(-1)  # [B*E, heads, N, N]
            layers.append(probs.view(2, e, mod.heads, res * res, res * res).mean(dim=(1, 2)))
        assert len(layers) == 5  # SD's 2 down + 3 up transformer blocks at each of these resolutions
        expected = torch.stack(layers).mean(0)
        assert torch.allclose(feats.attention[res], expected, atol=1e-6)


def test_reference_and_targets_draw_independent_noise(pipe, monkeypatch):
    from iconmatting_core.features import REFERENCE_NOISE, TARGET_NOISE

    ext = pipe.model.extractor
    x = torch.zeros(1, 3, pipe.config.image_size, pipe.config.image_size)
    assert not torch.allclose(ext.noisy_latents(x, 0, TARGET_NOISE), ext.noisy_latents(x, 0, REFERENCE_NOISE))
    streams = []
    original = type(ext).forward

    def spy(self, images, seed=0, with_attention=True, noise_stream=TARGET_NOISE):
        streams.append(noise_stream)
        return original(self, images, seed, with_attention, noise_stream)

    monkeypatch.setattr(type(ext), "forward", spy)
    image, mask = make_reference()
    pipe.matte(pipe.encode_reference(image, mask), make_targets(1))
    assert streams == [REFERENCE_NOISE, TARGET_NOISE]


def test_overflowing_features_are_an_error_not_a_nan_matte(pipe, monkeypatch):
    ext = pipe.model.extractor
    monkeypatch.setattr(ext, "noisy_latents", lambda images, seed, stream=0: torch.full(
        (images.shape[0] * pipe.config.ensemble_size, 4, pipe.config.image_size // 8, pipe.config.image_size // 8), float("inf")))
    with pytest.raises(FloatingPointError, match="fp32 or bf16"):
        ext(torch.zeros(1, 3, pipe.config.image_size, pipe.config.image_size))
    assert ext._pass is None and ext.recorder.sums == {}


def test_sd1_diffusers_folder_is_refused(tmp_path):
    import json

    from tiny_models import save_tiny_sd_folder

    root = save_tiny_sd_folder(tmp_path / "sd1")
    cfg_path = root / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_act"] = "quick_gelu"  # SD 1.x's CLIP ViT-L
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="quick_gelu.*Stable Diffusion 2.1"):
        load_sd_components(root)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_converted_file_is_a_normal_file_for_the_umask(tmp_path, umask, mode):
    import stat

    cfg = tiny_config()
    src = save_tiny_head(tmp_path / "icm.ckpt", cfg, seed=2, layout="reference")
    old = os.umask(umask)
    try:
        dst = ckpt.convert_checkpoint(src, tmp_path / "icm.safetensors", cfg)
    finally:
        os.umask(old)
    assert stat.S_IMODE(dst.stat().st_mode) == mode


def test_latents_are_a_posterior_sample_not_its_mean(pipe, monkeypatch):
    """As the authors encode (a sample of the VAE posterior, times the scaling factor, then noised to the
    timestep): with a posterior of mean 0 and std 1 the latent before the diffusion noise is the posterior
    noise itself, drawn first from the generator seeded 2 * seed + stream, the diffusion noise after it."""
    from iconmatting_core.features import TARGET_NOISE

    ex = pipe.model.extractor
    size, e = ex.config.image_size, ex.config.ensemble_size
    shape = (1, 4, size // 8, size // 8)
    monkeypatch.setattr(ex, "posterior", lambda images: (torch.zeros(shape), torch.ones(shape)))
    got = ex.noisy_latents(torch.zeros(1, 3, size, size), seed=5, stream=TARGET_NOISE)
    gen = torch.Generator().manual_seed(2 * 5 + TARGET_NOISE)
    post, diffusion = torch.randn((e, *shape[1:]), generator=gen), torch.randn((e, *shape[1:]), generator=gen)
    expected = ex.signal_scale * post * ex.latent_scaling_factor + ex.noise_scale * diffusion
    assert torch.allclose(got, expected, atol=1e-6)
