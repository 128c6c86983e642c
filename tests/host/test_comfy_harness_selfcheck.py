"""Self-check of the ComfyUI test harness with a throwaway node pack.

Boots each real ComfyUI host (CPU, headless) twice: once with a working dummy pack and a few
prompts (success, a node that raises, a prompt that fails validation, a model loaded through
ComfyUI's model management), once with a pack whose import fails. The first run downloads and
caches ComfyUI (see ``comfy_harness.comfy_root``); later runs take a few seconds each.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parents[1] / "support"
if str(SUPPORT) not in sys.path:  # e.g. under --import-mode=importlib
    sys.path.insert(0, str(SUPPORT))
from comfy_harness import run_comfy  # noqa: E402

DUMMY_PACK = textwrap.dedent('''
    """Throwaway V1 node pack for the harness self-check."""
    import torch

    import comfy.model_management
    import comfy.model_patcher


    class DummyInvert:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",)}}

        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "invert"
        CATEGORY = "dummy"

        def invert(self, image):
            return (1.0 - image,)


    class DummyFail:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",)}}

        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "fail"
        CATEGORY = "dummy"

        def fail(self, image):
            raise ValueError("bad input x")


    class DummyTinyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)


    class DummyModelLoader:
        """Wraps a tiny module in a ModelPatcher and loads it the ComfyUI way."""

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("DUMMY_MODEL",)
        FUNCTION = "load"
        CATEGORY = "dummy"
        OUTPUT_NODE = True

        def load(self):
            mm = comfy.model_management
            patcher = comfy.model_patcher.ModelPatcher(
                DummyTinyNet(), load_device=mm.get_torch_device(),
                offload_device=mm.unet_offload_device())
            mm.load_models_gpu([patcher])
            return {"ui": {"text": ["loaded"]}, "result": (patcher,)}


    NODE_CLASS_MAPPINGS = {
        "DummyInvert": DummyInvert,
        "DummyFail": DummyFail,
        "DummyModelLoader": DummyModelLoader,
    }
    NODE_DISPLAY_NAME_MAPPINGS = {"DummyInvert": "Dummy Invert"}
''')


def _empty_image(node_id: str = "1") -> dict:
    return {node_id: {"class_type": "EmptyImage",
                      "inputs": {"width": 8, "height": 6, "batch_size": 1, "color": 0}}}


PROMPT_OK = {
    **_empty_image(),
    "2": {"class_type": "DummyInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "selfcheck"}},
}
PROMPT_RAISES = {
    **_empty_image(),
    "2": {"class_type": "DummyFail", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
}
PROMPT_INVALID = {  # DummyInvert's required "image" input is missing
    "2": {"class_type": "DummyInvert", "inputs": {}},
    "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
}
PROMPT_MODEL = {"1": {"class_type": "DummyModelLoader", "inputs": {}}}


@pytest.fixture(scope="module")
def report(tmp_path_factory, comfy_host):
    pack = tmp_path_factory.mktemp("packs") / "dummy_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(DUMMY_PACK)
    models = tmp_path_factory.mktemp("models")
    work = tmp_path_factory.mktemp("comfy_work")
    return run_comfy(pack, [PROMPT_OK, PROMPT_RAISES, PROMPT_INVALID, PROMPT_MODEL],
                     models_dir=models, work_dir=work, host=comfy_host)


def test_pack_imports_and_registers_nodes(report, comfy_host):
    assert report["comfyui_version"] == comfy_host.version  # the host asked for is the one that ran
    pack = report["pack"]
    assert pack["import_failed"] is False, pack["import_log"]
    assert pack["nodes"] == ["DummyFail", "DummyInvert", "DummyModelLoader"]
    assert pack["display_names"]["DummyInvert"] == "Dummy Invert"


def test_object_info_matches_comfyui_v1_shape(report):
    info = report["pack"]["object_info"]["DummyInvert"]
    assert info["input"] == {"required": {"image": ["IMAGE"]}}
    assert info["input_order"] == {"required": ["image"]}
    assert info["output"] == ["IMAGE"]
    assert info["output_name"] == ["IMAGE"]
    assert info["output_is_list"] == [False]
    assert info["name"] == "DummyInvert"
    assert info["display_name"] == "Dummy Invert"
    assert info["category"] == "dummy"
    assert info["output_node"] is False
    assert info["python_module"] == "custom_nodes.dummy_pack"
    assert report["pack"]["object_info"]["DummyModelLoader"]["output_node"] is True


def test_prompt_runs_and_saves_output(report):
    res = report["prompts"][0]
    assert res["validation"]["ok"], res["validation"]
    ex = res["execution"]
    assert ex["success"], ex["error"]
    assert ex["executed_nodes"] == ["1", "2", "3"]
    # EmptyImage(color=0) is black; DummyInvert makes it white.
    inverted = ex["node_outputs"]["2"][0][0]
    assert inverted["shape"] == [1, 6, 8, 3]
    assert inverted["min"] == inverted["max"] == 1.0
    images = ex["outputs"]["3"]["images"]
    assert images[0]["type"] == "output" and images[0]["filename"].startswith("selfcheck")
    saved = [f for f in res["new_files"] if f["path"].startswith("output/")]
    assert len(saved) == 1 and saved[0]["image_size"] == [8, 6]
    assert (Path(report["folders"]["output_dir"]) / images[0]["filename"]).is_file()


def test_node_exception_is_an_execution_error(report):
    res = report["prompts"][1]
    assert res["validation"]["ok"]
    ex = res["execution"]
    assert ex["success"] is False
    err = ex["error"]
    assert err["node_id"] == "2" and err["node_type"] == "DummyFail"
    assert err["exception_type"] == "ValueError"
    assert "bad input x" in err["exception_message"]
    assert "3" not in ex["outputs"]


def test_missing_input_fails_validation(report):
    res = report["prompts"][2]
    assert res["validation"]["ok"] is False
    assert res["execution"] is None
    assert res["validation"]["error"]["type"] == "prompt_outputs_failed_validation"
    node_err = res["validation"]["node_errors"]["2"]
    assert node_err["class_type"] == "DummyInvert"
    assert [e["type"] for e in node_err["errors"]] == ["required_input_missing"]
    assert node_err["errors"][0]["details"] == "image"


def test_model_management_is_reported(report):
    res = report["prompts"][3]
    assert res["execution"]["success"], res["execution"]["error"]
    assert res["execution"]["outputs"]["1"] == {"text": ["loaded"]}
    models = res["models"]
    assert models["count"] == 1
    assert models["models"][0]["patcher_class"] == "comfy.model_patcher.ModelPatcher"
    assert models["model_classes"][0].endswith(".DummyTinyNet")
    assert report["models_after_unload_all"]["count"] == 0


def test_models_dir_is_comfyui_models_dir(report):
    folders = report["folders"]
    assert Path(folders["models_dir_resolved"]).name.startswith("models")  # mktemp("models")
    checkpoints = folders["folder_names_and_paths"]["checkpoints"]
    assert checkpoints[0] == str(Path(folders["models_dir"]) / "checkpoints")


def test_import_failure_is_reported(tmp_path, comfy_host):
    pack = tmp_path / "broken_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text("raise ImportError('missing thing y')\n")
    report = run_comfy(pack, [], host=comfy_host)
    assert report["pack"]["import_failed"] is True
    assert report["pack"]["nodes"] == []
    assert any("missing thing y" in line for line in report["pack"]["import_log"])
