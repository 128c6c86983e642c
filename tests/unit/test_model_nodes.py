"""Node 1 (IconMatting 1 · Load) in pieces, fast: the UNet widths read from a stand-in ComfyUI UNet built
of ComfyUI's own Upsample blocks, ``execute`` over a stand-in for the load (the real load over a host's SD 2.1
runs in tests/host/test_comfy_pack.py), and the head's precision from ComfyUI's hint."""
import logging
import types

import pytest
import torch

WEIGHTS = "head.safetensors"


def fake_model(*up_blocks):
    """A ComfyUI MODEL whose UNet's output blocks are, per up block, a plain block and a block ending with
    an Upsample (channels in, channels out): ComfyUI's layout of output_blocks, in miniature."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

    blocks = torch.nn.ModuleList()
    for channels, out_channels in up_blocks:
        blocks.append(torch.nn.Sequential(torch.nn.Identity()))
        blocks.append(torch.nn.Sequential(torch.nn.Identity(), Upsample(channels, False, out_channels=out_channels)))
    blocks.append(torch.nn.Sequential(torch.nn.Identity()))  # the last up block has no upsampler
    unet = torch.nn.Module()
    unet.input_blocks, unet.middle_block, unet.output_blocks = torch.nn.ModuleList(), None, blocks
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))


def test_unet_widths_are_the_outputs_of_the_first_two_upsamplers(pack):
    read = pack.model_nodes.unet_up_channels
    assert read(fake_model((32, 96), (24, 48), (8, 16))) == (96, 48)
    assert read(fake_model((7, 5), (3, 2))) == (5, 2)


def test_unet_widths_of_what_is_no_sd_unet_are_none(pack):
    read = pack.model_nodes.unet_up_channels
    assert read(fake_model((32, 96))) is None  # one up block: not SD's layout
    assert read(types.SimpleNamespace()) is None  # no .model
    assert read(types.SimpleNamespace(model=types.SimpleNamespace())) is None  # no diffusion_model
    assert read(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))) is None


@pytest.fixture()
def weights_dir(pack, tmp_path):
    """ComfyUI/models/iconmatting pointed at two temporary folders, the first holding an (empty) weights file."""
    import folder_paths

    saved = folder_paths.folder_names_and_paths["iconmatting"]
    folder = tmp_path / "iconmatting"
    folder.mkdir()
    (folder / WEIGHTS).write_bytes(b"")
    folder_paths.folder_names_and_paths["iconmatting"] = ([str(folder), str(tmp_path / "more")], {".safetensors", ".ckpt"})
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.pop("iconmatting", None)
    yield folder
    folder_paths.folder_names_and_paths["iconmatting"] = saved
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.pop("iconmatting", None)


@pytest.fixture()
def loads(pack, monkeypatch):
    """The load (``host_model.load_on_host``) replaced by a stand-in: the calls it got; ``loads.channels`` are the UNet widths
    its head was built for, ``loads.error`` what it raises."""
    calls = []
    state = types.SimpleNamespace(calls=calls, channels=(96, 48), error=None)

    class Loaded:
        def __init__(self, *args):
            if state.error is not None:
                raise state.error
            calls.append(args)
            self.model = types.SimpleNamespace(config=types.SimpleNamespace(unet_feature_channels=list(state.channels)))

    monkeypatch.setattr(pack.model_nodes, "load_on_host", Loaded)
    return state


def test_load_builds_the_model_from_the_chosen_weights_file(pack, weights_dir, loads):
    node = pack.model_nodes.IconMattingLoad
    model = fake_model((32, 96), (24, 48), (8, 16))
    out = node.execute(model, "clip", "vae", WEIGHTS)
    assert loads.calls == [(model, "clip", "vae", str(weights_dir / WEIGHTS), "auto")]
    assert len(out.result) == 1 and out.result[0].model.config.unet_feature_channels == [96, 48]
    assert out.ui is None
    for dtype in ("fp32", "fp16", "bf16", "auto"):
        node.execute(model, "clip", "vae", WEIGHTS, dtype)
    assert [c[4] for c in loads.calls[1:]] == ["fp32", "fp16", "bf16", "auto"]
    assert node.validate_inputs(WEIGHTS) is True


def test_load_refuses_an_unknown_dtype_naming_the_choices(pack, weights_dir, loads):
    with pytest.raises(ValueError) as info:
        pack.model_nodes.IconMattingLoad.execute(fake_model(), "clip", "vae", WEIGHTS, "fp64")
    assert str(info.value) == "dtype must be one of auto, fp32, fp16, bf16; got 'fp64'."
    assert loads.calls == []


def test_load_refuses_a_head_for_other_unet_widths(pack, weights_dir, loads):
    loads.channels = (64, 64)
    with pytest.raises(ValueError) as info:
        pack.model_nodes.IconMattingLoad.execute(fake_model((32, 96), (24, 48), (8, 16)), "clip", "vae", WEIGHTS)
    assert str(info.value) == (
        "The IconMatting weights 'head.safetensors' were built for UNet features of (64, 64) channels, but the MODEL's UNet "
        "gives (96, 48). Connect SD 2.1 (v2-1_768-ema-pruned.safetensors) to the MODEL input, or choose weights made for "
        "this model.")


@pytest.mark.parametrize("error", ["CheckpointError", "NotStableDiffusion2"])
def test_load_turns_unusable_weights_or_models_into_a_plain_value_error(pack, weights_dir, loads, error):
    loads.error = getattr(pack.model_nodes, error)("These weights are no IconMatting head.")
    with pytest.raises(ValueError) as info:
        pack.model_nodes.IconMattingLoad.execute(fake_model(), "clip", "vae", WEIGHTS)
    assert type(info.value) is ValueError and str(info.value) == "These weights are no IconMatting head."


def test_load_of_a_patched_model_shows_the_warning_on_the_node_and_in_the_log_once(pack, weights_dir, loads, caplog):
    caplog.set_level(logging.INFO, logger="IconMatting")
    model = fake_model((32, 96), (24, 48), (8, 16))
    model.patches = {"lora.a": 1, "lora.b": 2, "lora.c": 3}
    out = pack.model_nodes.IconMattingLoad.execute(model, "clip", "vae", WEIGHTS)
    warning = ("The MODEL carries 3 weight patches (e.g. a LoRA). IconMatting was trained on plain SD 2.1 features: "
               "connect Load Checkpoint's MODEL directly for faithful mattes.")
    assert out.ui == {"text": [warning], "iconmatting_warning": [True]}
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", "IconMatting: " + warning)]
    assert len(out.result) == 1 and loads.calls[0][0] is model


def test_load_of_missing_weights_names_the_folder_and_the_download(pack, weights_dir, loads):
    node = pack.model_nodes.IconMattingLoad
    with pytest.raises(FileNotFoundError) as info:
        node.execute(fake_model(), "clip", "vae", "gone.ckpt")
    where = f"{weights_dir}, {weights_dir.parent / 'more'}"
    assert str(info.value).startswith(f"'gone.ckpt' is not in {where}. Download icm.ckpt")
    message = node.validate_inputs("gone.ckpt")
    assert message.startswith(f"IconMatting weights 'gone.ckpt' are not in {where}. Download icm.ckpt"), message
    assert message.endswith("into ComfyUI/models/iconmatting/.")
    empty = node.validate_inputs("")
    assert empty == ("The input 'matting_model' of IconMatting 1 · Load is empty. Choose a value (API clients: send it in "
                     "the prompt). Download icm.ckpt (the IconMatting release, linked from "
                     "github.com/tiny-smart/in-context-matting) into ComfyUI/models/iconmatting/.")
    assert node.validate_inputs(3) == empty


def test_the_load_nodes_dtype_choices_are_the_cores(pack):
    import json

    schema = pack.model_nodes.IconMattingLoad.define_schema()
    (dtype,) = [i for i in schema.inputs if i.id == "dtype"]
    assert list(dtype.options) == ["auto", "fp32", "fp16", "bf16"] and dtype.default == "auto"
    assert "never fp16 unless chosen" in json.dumps(dtype.tooltip)


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_heads_auto_precision_is_the_core_rule_with_comfyuis_hint(pack, monkeypatch, bf16, expected):
    """auto: bf16 where ComfyUI says the device computes it natively, else fp32; never fp16, even where ComfyUI
    would run a UNet in fp16."""
    import importlib

    host = importlib.import_module(pack.model_nodes.__package__ + ".host_model")
    asked = []
    monkeypatch.setattr(host.mm, "should_use_fp16", lambda *a, **k: True)
    monkeypatch.setattr(host.mm, "should_use_bf16", lambda device=None, *a, **k: asked.append(str(device)) or bf16)
    assert host.head_dtype("auto", torch.device("cuda:1")) == expected
    assert asked == ["cuda:1"]
    assert [host.head_dtype(c, torch.device("cuda:1")) for c in ("fp32", "fp16", "bf16")] == [
        torch.float32, torch.float16, torch.bfloat16]


def test_the_heads_auto_precision_on_the_cpu_is_fp32(pack):
    import importlib

    host = importlib.import_module(pack.model_nodes.__package__ + ".host_model")
    assert host.head_dtype("auto", torch.device("cpu")) == torch.float32  # ComfyUI's own answer for the CPU


def test_a_model_with_an_empty_patch_table_gets_no_warning(pack):
    """ComfyUI's clones carry ``patches = {}``: no patch, no warning."""
    warn = pack.model_nodes.patches_warning
    assert warn(types.SimpleNamespace(patches={})) is None and warn(types.SimpleNamespace()) is None
    assert warn(types.SimpleNamespace(patches={"a": 1})).startswith("The MODEL carries 1 weight patches")
