"""The node pack inside a real ComfyUI (0.3.75): registration, example workflows, errors, memory."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_harness import run_comfy

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
TINY_SD = "[diffusers] tiny-sd"
NODES = {
    "IconMattingModelLoader": (["matting_model", "sd_model", "dtype"], ["ICONMATTING_MODEL"]),
    "IconMattingEncodeReference": (["iconmatting_model", "image", "mask", "guidance", "resize_mode", "seed"], ["ICONMATTING_CONTEXT"]),
    "IconMattingMatchTargets": (["iconmatting_model", "context", "images", "resize_mode", "chunk_size"], ["ICONMATTING_MATCH", "IMAGE"]),
    "IconMattingDecodeAlpha": (["iconmatting_model", "match", "estimate_foreground", "chunk_size"], ["MASK", "IMAGE"]),
    "IconMattingComposite": (["rgba", "background"], ["IMAGE"]),
}


def load_api(name):
    prompt = json.loads((WORKFLOWS / "api" / name).read_text())
    for node in prompt.values():
        if node["class_type"] == "IconMattingModelLoader":
            node["inputs"]["sd_model"] = TINY_SD  # the tiny test model instead of the real SD 2.1 file
    return prompt


def _write_inputs(input_dir: Path):
    rng = np.random.default_rng(0)
    input_dir.mkdir(parents=True, exist_ok=True)
    ref = (rng.random((96, 128, 4)) * 255).astype(np.uint8)
    ref[..., 3] = 255
    ref[20:80, 30:100, 3] = 0  # mask editor convention: painted (transparent) = mask 1
    Image.fromarray(ref, "RGBA").save(input_dir / "iconmatting_reference.png")
    Image.fromarray((rng.random((72, 100, 3)) * 255).astype(np.uint8)).save(input_dir / "iconmatting_target_1.png")
    Image.fromarray((rng.random((50, 60, 3)) * 255).astype(np.uint8)).save(input_dir / "iconmatting_target_2.png")
    Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(input_dir / "iconmatting_background.png")


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory):
    from iconmatting_core.testing import save_tiny_head, save_tiny_sd_folder

    base = tmp_path_factory.mktemp("comfy")
    models = base / "models"
    save_tiny_head(models / "iconmatting" / "icm.safetensors")
    save_tiny_sd_folder(models / "diffusers" / "tiny-sd")
    work = base / "work"
    _write_inputs(work / "input")

    batch = load_api("iconmatting_batch.json")
    composite = load_api("iconmatting_composite.json")
    bad_mask = copy.deepcopy(batch)
    bad_mask["6"]["inputs"]["image"] = ["3", 0]  # target 1 (100x72) with the reference's mask (128x96)
    missing = copy.deepcopy(batch)
    missing["1"]["inputs"]["matting_model"] = "not_downloaded.safetensors"
    unpainted = copy.deepcopy(batch)
    unpainted["6"]["inputs"]["image"] = ["3", 0]
    unpainted["6"]["inputs"]["mask"] = ["3", 1]  # a PNG without painted mask: LoadImage's empty 64x64 mask
    result = run_comfy(ROOT, [batch, composite, bad_mask, missing, unpainted], models_dir=models, work_dir=work,
                       pack_name="comfyui-iconmatting", timeout=900)
    return result, work


def test_pack_imports_and_registers_every_node(comfy_run):
    result, _ = comfy_run
    pack = result["pack"]
    assert not pack["import_failed"], pack["import_log"]
    assert sorted(pack["nodes"]) == sorted(NODES)
    for name, (inputs, outputs) in NODES.items():
        info = pack["object_info"][name]
        assert list(info["input"]["required"]) == inputs
        assert info["output"] == outputs
        assert info["category"] == "IconMatting"
    loader = pack["object_info"]["IconMattingModelLoader"]["input"]["required"]
    assert loader["matting_model"][0] == ["icm.safetensors"]
    assert TINY_SD in loader["sd_model"][0]


def test_batch_workflow_runs_end_to_end(comfy_run):
    result, work = comfy_run
    run = result["prompts"][0]
    assert run["validation"]["ok"], run["validation"]
    assert run["execution"]["success"], run["execution"]["error"]
    outputs = run["execution"]["node_outputs"]
    alpha = outputs["8"][0][0]  # node -> output slot -> list of values
    assert alpha["shape"] == [2, 72, 100] and 0 <= alpha["min"] <= alpha["max"] <= 1
    assert outputs["8"][1][0]["shape"] == [2, 72, 100, 4]
    assert outputs["7"][1][0]["shape"] == [2, 72, 100, 3]  # guidance preview
    files = {Path(f["path"]).name: f for f in run["new_files"]}
    cutouts = [f for n, f in files.items() if n.startswith("cutout")]
    alphas = [f for n, f in files.items() if n.startswith("alpha")]
    assert len(cutouts) == 2 and len(alphas) == 2
    assert all(f["image_mode"] == "RGBA" and tuple(f["image_size"]) == (100, 72) for f in cutouts)
    # progress reached ComfyUI for the matching node: one step per target
    progress = [d for e, d in run["execution"]["events"] if e == "progress" and d.get("node") == "7"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 2


def test_model_is_managed_by_comfyui(comfy_run):
    result, _ = comfy_run
    loaded = result["prompts"][0]["models"]
    assert loaded["count"] == 1 and loaded["model_classes"][0].endswith("iconmatting_core.pipeline.IconMattingModel")
    assert loaded["models"][0]["patcher_class"] == "comfy.model_patcher.ModelPatcher"
    assert result["models_after_unload_all"]["count"] == 0


def test_composite_workflow_runs(comfy_run):
    result, _ = comfy_run
    run = result["prompts"][1]
    assert run["execution"]["success"], run["execution"]["error"]
    assert run["execution"]["node_outputs"]["8"][0][0]["shape"] == [1, 72, 100, 3]
    assert any(Path(f["path"]).name.startswith("composite") for f in run["new_files"])


def test_mismatched_mask_is_a_node_error_not_a_crash(comfy_run):
    result, _ = comfy_run
    run = result["prompts"][2]
    assert run["validation"]["ok"]
    err = run["execution"]["error"]
    assert not run["execution"]["success"] and err["node_id"] == "6"
    assert "reference mask 0 is 128x96 (WxH) but its image is 100x72" in err["exception_message"]
    # the server went on: the next prompt was still validated
    assert result["prompts"][3]["validation"] is not None


def test_unpainted_reference_says_how_to_paint_the_mask(comfy_run):
    result, _ = comfy_run
    err = result["prompts"][4]["execution"]["error"]
    assert err["node_id"] == "6" and "Open in MaskEditor" in err["exception_message"]


def test_missing_model_file_names_what_to_download(comfy_run):
    result, _ = comfy_run
    run = result["prompts"][3]
    assert not run["validation"]["ok"]
    text = json.dumps(run["validation"]["node_errors"])
    assert "not_downloaded.safetensors" in text and "models/iconmatting" in text and "v2-1_768-ema-pruned" in text


CORE_WIDGETS = {"LoadImage": ["image", "upload"], "SaveImage": ["filename_prefix"], "ImageBatch": [], "PreviewImage": [], "MaskToImage": []}


def _widget_names(info):
    """Widget inputs of a node, in the order the UI stores their values (seed adds its control)."""
    names = []
    for name in info["input_order"]["required"]:
        spec = info["input"]["required"][name]
        if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
            names.append(name)
            if name == "seed":
                names.append("control_after_generate")
    return names


@pytest.mark.parametrize("name", ["iconmatting_batch.json", "iconmatting_composite.json"])
def test_ui_workflow_is_the_twin_of_the_api_workflow(comfy_run, name):
    """The drag-and-drop file describes exactly the graph that was executed above."""
    result, _ = comfy_run
    info = result["pack"]["object_info"]
    api = json.loads((WORKFLOWS / "api" / name).read_text())
    ui = json.loads((WORKFLOWS / name).read_text())
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(nodes) == set(api)
    links = {link[0]: link for link in ui["links"]}
    for nid, node in api.items():
        u = nodes[nid]
        assert u["type"] == node["class_type"]
        widgets = _widget_names(info[u["type"]]) if u["type"] in info else CORE_WIDGETS[u["type"]]
        values = dict(zip(widgets, u["widgets_values"]))
        assert len(widgets) == len(u["widgets_values"])
        for key, value in node["inputs"].items():
            if isinstance(value, list):
                link = links[next(i["link"] for i in u["inputs"] if i["name"] == key)]
                assert [str(link[1]), link[2], str(link[3])] == [value[0], value[1], nid]
            else:
                assert values[key] == value, (nid, key)
