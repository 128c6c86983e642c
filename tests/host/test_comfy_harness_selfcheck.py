"""Self-check of the ComfyUI test harness with a throwaway node pack.

Host jobs (``comfy_harness.host_job``), run in the one ComfyUI boot per host that every host test shares:
a working dummy pack and a few prompts (success, a node that raises, a prompt that fails validation, a model
loaded through ComfyUI's model management), a pack whose import fails, and two jobs that must not see each
other's models or cached outputs. The first run downloads and caches ComfyUI (see ``comfy_harness.comfy_root``).
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

SUPPORT = Path(__file__).resolve().parents[1] / "support"
if str(SUPPORT) not in sys.path:  # e.g. under --import-mode=importlib
    sys.path.insert(0, str(SUPPORT))
from comfy_harness import comfy_job, host_job  # noqa: E402

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


@host_job
def report(tmp_path_factory, comfy_host):
    pack = tmp_path_factory.mktemp("packs") / "dummy_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(DUMMY_PACK)
    models = tmp_path_factory.mktemp("models")
    work = tmp_path_factory.mktemp("comfy_work")
    return comfy_job(pack, [PROMPT_OK, PROMPT_RAISES, PROMPT_INVALID, PROMPT_MODEL],
                     models_dir=models, work_dir=work, host=comfy_host)


@host_job
def broken_report(tmp_path):
    pack = tmp_path / "broken_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text("raise ImportError('missing thing y')\n")
    return comfy_job(pack, [])


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


def test_import_failure_is_reported(broken_report):
    report = broken_report
    assert report["pack"]["import_failed"] is True
    assert report["pack"]["nodes"] == []
    assert any("missing thing y" in line for line in report["pack"]["import_log"])


# --- jobs sharing one boot: each sees only its own models and computes its own outputs ------------
LISTER_PACK = textwrap.dedent('''
    """Throwaway V1 node pack: a node whose combo lists models/checkpoints, and a pass-through."""
    import folder_paths


    class DummyListCheckpoints:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),),
                                 "image": ("IMAGE",)}}

        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "run"
        CATEGORY = "dummy"

        def run(self, ckpt_name, image):
            return (image,)


    NODE_CLASS_MAPPINGS = {"DummyListCheckpoints": DummyListCheckpoints}
''')


def _lister_pack(tmp_path_factory) -> Path:
    """One folder for every job of the session: two jobs sharing a boot may not bring two packs under one name."""
    pack = tmp_path_factory.getbasetemp() / "lister_pack"
    if not pack.is_dir():
        pack.mkdir()
        (pack / "__init__.py").write_text(LISTER_PACK)
    return pack


def _listing_job(tmp_path, tmp_path_factory, checkpoint):
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / checkpoint).write_bytes(b"")
    prompt = {**_empty_image(),
              "2": {"class_type": "DummyListCheckpoints", "inputs": {"ckpt_name": checkpoint, "image": ["1", 0]}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "listed"}}}
    return comfy_job(_lister_pack(tmp_path_factory), [prompt], models_dir=tmp_path / "models", work_dir=tmp_path / "work")


@host_job
def listing_a(tmp_path, tmp_path_factory):
    return _listing_job(tmp_path, tmp_path_factory, "a.safetensors")


@host_job
def listing_b(tmp_path, tmp_path_factory):
    return _listing_job(tmp_path, tmp_path_factory, "b.safetensors")


def test_jobs_in_one_boot_see_only_their_own_models_and_outputs(listing_a, listing_b):
    for report, name in ((listing_a, "a.safetensors"), (listing_b, "b.safetensors")):
        assert report["pack"]["object_info"]["DummyListCheckpoints"]["input"]["required"]["ckpt_name"][0] == [name]
        run = report["prompts"][0]
        assert run["validation"]["ok"], run["validation"]  # the other job's checkpoint would not validate
        assert run["execution"]["executed_nodes"] == ["1", "2", "3"]  # nothing reused from the other job's cache
        (saved,) = run["execution"]["outputs"]["3"]["images"]
        assert (Path(report["work_dir"]) / "output" / saved["filename"]).is_file()
    assert listing_a["comfyui_version"] == listing_b["comfyui_version"]


def test_a_job_during_which_comfyui_dies_fails_alone_and_the_jobs_after_it_still_run(tmp_path, tmp_path_factory):
    """Its own boots (default host): the job that kills ComfyUI fails with the exit status; the job after it
    gets a new process."""
    from comfy_harness import BOOTS, ComfyRunError, run_jobs

    (tmp_path / "exit.py").write_text("import os\n\n\ndef run(ctx):\n    os._exit(3)\n")
    prompt = {**_empty_image(), "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    pack = _lister_pack(tmp_path_factory)
    boots = len(BOOTS)
    before, dying, after = run_jobs([comfy_job(pack, [prompt]), comfy_job(pack, [], scripts=[tmp_path / "exit.py"]),
                                     comfy_job(pack, [prompt])])
    assert isinstance(dying, ComfyRunError) and "exited (3) while running this job" in str(dying), dying
    assert before["prompts"][0]["execution"]["success"] and after["prompts"][0]["execution"]["success"]
    assert len(BOOTS) - boots == 2
