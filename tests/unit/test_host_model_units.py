"""The host model wrapper and the empty-prompt source in pieces, fast, with stand-ins for the host's SD
(the real ones run inside ComfyUI in tests/host): the fingerprint a host head gives (the trained
weights', as the command line computes it), the patchers it hands ComfyUI, the MODEL's config passed to
the empty-prompt computation, and which CLIPs and files that computation looks at."""
import importlib
import logging
import types

import pytest
import torch

from iconmatting_core.context_file import model_fingerprint
from tiny_models import tiny_config, tiny_head


def _host(pack, name):
    return importlib.import_module(pack.model_nodes.__package__ + "." + name)


class StandInExtractor:
    """What IconMattingOnHost needs of ComfyFeatureExtractor: fingerprint tensors and the patchers."""

    def __init__(self, model, vae, empty_prompt, config, companions):
        self.config, self.companions = config, companions
        self.patcher = "unet patcher"
        self.vae = types.SimpleNamespace(patcher="vae patcher")

    def fingerprint_tensors(self):
        return {"unet.conv_in.weight": torch.arange(6.0).reshape(2, 3), "vae.encoder.conv_in.weight": torch.ones(4)}


@pytest.fixture()
def on_host(pack, monkeypatch):
    host = _host(pack, "host_model")
    monkeypatch.setattr(host, "ComfyFeatureExtractor", StandInExtractor)
    return host.IconMattingOnHost(None, None, torch.zeros(1, 77, 8), tiny_config(), "fp32")


def test_a_host_heads_fingerprint_is_the_trained_weights_as_the_command_line_gives_it(on_host):
    """The head is folded on the host, but its fingerprint is the unfolded trained head's (with the same SD):
    a context saved on the host loads on the command line and back."""
    trained = tiny_head(seed=3)
    on_host.load_weights(trained.state_dict())
    assert on_host.model.fingerprint() == model_fingerprint(trained, StandInExtractor(None, None, None, None, []))


def test_a_host_model_hands_comfyui_the_heads_the_unets_and_the_vaes_patchers(on_host):
    assert on_host.get_models() == [on_host.patcher, "unet patcher", "vae patcher"]


def test_weights_without_a_prompt_take_clips_with_the_models_text_encoder_layout(pack, monkeypatch):
    """The MODEL's config (which knows where the checkpoint keeps its text encoder) goes to the empty-prompt
    computation with the CLIP."""
    host = _host(pack, "host_model")
    config = tiny_config()
    got = []
    monkeypatch.setattr(host, "read_head_weights", lambda path: ({}, config, None))
    monkeypatch.setattr(host, "empty_prompt_from_clip", lambda *args: got.append(args) or torch.zeros(1))

    class Built:
        def __init__(self, *args):
            self.args = args

        def load_weights(self, state):
            pass

    monkeypatch.setattr(host, "IconMattingOnHost", Built)
    model_config = object()
    model = types.SimpleNamespace(model=types.SimpleNamespace(model_config=model_config))
    host.load_on_host(model, "clip", "vae", "head.safetensors")
    assert got == [("clip", model_config)]


class StandInClip:
    """A CLIP whose text encoder holds ``dtypes`` weights; its embedding of "" is 7s."""

    def __init__(self, *dtypes):
        self.cond_stage_model = torch.nn.Module()
        for i, dtype in enumerate(dtypes):
            self.cond_stage_model.register_buffer(f"w{i}", torch.zeros(2, dtype=dtype))
        self.patcher = None

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens):
        return torch.full((1, 2, 3), 7.0, dtype=torch.float16), None


def test_a_clip_with_any_rounded_weights_looks_for_its_float32_source(pack, monkeypatch, caplog):
    """One fp16 tensor among float32 ones: the embedding is not float32's, so a source file is looked for (none
    here: the warning says so). All float32: the CLIP's own embedding, no warning."""
    ep = _host(pack, "empty_prompt")
    monkeypatch.setattr(ep, "_candidate_files", lambda clip: iter(()))
    with caplog.at_level(logging.WARNING, logger="IconMatting"):
        out = ep.empty_prompt_from_clip(StandInClip(torch.float32, torch.float16), model_config=object())
    assert out.dtype == torch.float32 and bool((out == 7).all())
    assert "float16/float32 weights and no checkpoint" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="IconMatting"):
        ep.empty_prompt_from_clip(StandInClip(torch.float32, torch.float32), model_config=object())
    assert caplog.text == ""


def test_checkpoint_files_with_an_upper_case_extension_are_candidates(pack, monkeypatch):
    import folder_paths

    ep = _host(pack, "empty_prompt")
    monkeypatch.setattr(folder_paths, "get_filename_list", lambda folder: ["A.SAFETENSORS", "b.ckpt", "c.safetensors"])
    monkeypatch.setattr(folder_paths, "get_full_path", lambda folder, name: f"/models/{folder}/{name}")
    assert list(ep._candidate_files(StandInClip())) == ["/models/checkpoints/A.SAFETENSORS",
                                                        "/models/checkpoints/c.safetensors"]
