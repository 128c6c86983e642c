"""The word, video and generation templates (``workflows/``) inside a real ComfyUI, on every test host.

* Every shipped workflow is checked against the host's own ``/object_info`` (node types, input names,
  link types, widget values): the word and generation workflows need core SAM 3 (``SAM3_Detect``,
  ComfyUI 0.28.2), the others load on every host.
* The video workflow runs on a short generated clip (tiny random-weight models): it must write an
  alpha video and a composited video with every frame, in order, at the clip's frame rate.
* The word workflow runs with a mask given in place of SAM 3 (no SAM 3 weights exist here): the
  IconMatting half as shipped, on photos of different sizes.
* The generation workflow runs with a painted mask in place of SAM 3, small and short (64 px, 2 images, 2
  steps): every generated image is cut out and composited; the generated batch is the same, bit for bit, with
  and without the matting branch in the prompt, with one checkpoint for both (as shipped) and with a second,
  different one for the generation; every model is loaded through ComfyUI's model management, none moved by
  the pack itself (``comfy_scripts/generation_isolation.py``). All of it in the same ComfyUI as the rest.
"""
import copy
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_harness import assert_one_matte_per_target, comfy_job, host_job, link_file

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
OBJECT_INFO_SCRIPT = ROOT / "tests" / "support" / "comfy_scripts" / "object_info.py"
ISOLATION_SCRIPT = ROOT / "tests" / "support" / "comfy_scripts" / "generation_isolation.py"
TINY_SD2_PACK = ROOT / "tests" / "support" / "comfy_tiny_sd2"
SD_FILE = "v2-1_768-ema-pruned.safetensors"
HEAD_FILE = "icm.safetensors"
WORD = "Matte a folder from a word (IconMatting, SAM 3)"
VIDEO = "Matte a video clip (IconMatting)"
GENERATE = "Generate a batch and cut it out (IconMatting, SAM 3)"
#: a second tiny SD 2.x file with other weights, for the generation branch
GENERATION_FILE = "tiny_generation.safetensors"
GEN_SIZE, GEN_BATCH, GEN_STEPS = 64, 2, 2
SAM3_FILE = "sam3.1_multiplex_fp16.safetensors"
SAM3_URL = "https://huggingface.co/Comfy-Org/sam3.1/resolve/main/checkpoints/sam3.1_multiplex_fp16.safetensors"
#: Files the README asks users to provide (input/ and the authors' weights), named by the workflows.
USER_FILES = {"icm.ckpt", "iconmatting_reference.png", "iconmatting_target_1.png", "iconmatting_background.png",
              "iconmatting_first_frame.png", "iconmatting_clip.mp4"}
#: The generated clip: 6 frames of 64x48 at 12 fps; frame 3 repeats frame 0 exactly.
CLIP_FRAMES, CLIP_W, CLIP_H, CLIP_FPS = 6, 64, 48, 12
TARGET_SIZES = [(100, 72), (60, 50)]  # (W, H)


def api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def with_tiny_head(prompt: dict) -> dict:
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "IconMattingLoad":
            node["inputs"]["matting_model"] = HEAD_FILE
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(nid for nid, n in prompt.items() if n["class_type"] == class_type)


def links_to(prompt: dict, nid: str) -> list:
    """Ids of the nodes that take an output of node ``nid``."""
    return [c for c, n in prompt.items() if any(isinstance(v, list) and v[0] == nid for v in n["inputs"].values())]


def without_sam3(prompt: dict, mask) -> dict:
    """``prompt`` with SAM 3's branch (its checkpoint, the word, the detector, the mask preview) removed and
    Encode Reference's mask taken from ``mask`` (a link) instead."""
    prompt = copy.deepcopy(prompt)
    loader = next(nid for nid, n in prompt.items()
                  if n["class_type"] == "CheckpointLoaderSimple" and n["inputs"]["ckpt_name"] == SAM3_FILE)
    detector = node_of(prompt, "SAM3_Detect")
    sam = {loader, detector, *links_to(prompt, loader)}
    for preview in [c for c in links_to(prompt, detector) if prompt[c]["class_type"] == "MaskToImage"]:
        sam |= {preview, *links_to(prompt, preview)}
    prompt[node_of(prompt, "IconMattingEncodeReference")]["inputs"]["mask"] = mask
    for nid in sam:
        del prompt[nid]
    return prompt


def word_with_stand_in_mask(prompt: dict) -> dict:
    """The word workflow with SAM 3's mask replaced by the reference photo's own (painted) mask."""
    encode = prompt[node_of(prompt, "IconMattingEncodeReference")]
    return without_sam3(prompt, [encode["inputs"]["image"][0], 1])  # Load Image's MASK output


def generation_for_tests(prompt: dict, features_file: str) -> dict:
    """The generation workflow, small and short (:data:`GEN_SIZE`, :data:`GEN_BATCH`, :data:`GEN_STEPS`), with a
    painted rectangle (the middle half of the reference) in place of SAM 3's mask; its generation Load Checkpoint
    (the one whose MODEL goes to the KSampler) loads :data:`GENERATION_FILE`, IconMatting's ``features_file``."""
    prompt = with_tiny_head(prompt)
    latent = prompt[node_of(prompt, "EmptyLatentImage")]["inputs"]
    latent.update(width=GEN_SIZE, height=GEN_SIZE, batch_size=GEN_BATCH)
    sampler = prompt[node_of(prompt, "KSampler")]["inputs"]
    sampler["steps"] = GEN_STEPS
    prompt[sampler["model"][0]]["inputs"]["ckpt_name"] = GENERATION_FILE
    prompt[prompt[node_of(prompt, "IconMattingLoad")]["inputs"]["model"][0]]["inputs"]["ckpt_name"] = features_file
    prompt = without_sam3(prompt, ["42", 0])
    prompt["40"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": GEN_SIZE, "height": GEN_SIZE}}
    prompt["41"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": GEN_SIZE // 2, "height": GEN_SIZE // 2}}
    prompt["42"] = {"class_type": "MaskComposite", "inputs": {"destination": ["40", 0], "source": ["41", 0],
                                                              "x": GEN_SIZE // 4, "y": GEN_SIZE // 4, "operation": "add"}}
    return prompt


def generation_only(prompt: dict) -> dict:
    """The generation branch of ``prompt`` alone: the Save Image of the decoded batch and what feeds it."""
    save = next(nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"
                and prompt[n["inputs"]["images"][0]]["class_type"] == "VAEDecode")
    keep, todo = set(), [save]
    while todo:
        nid = todo.pop()
        if nid not in keep:
            keep.add(nid)
            todo += [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list)]
    return {nid: copy.deepcopy(n) for nid, n in prompt.items() if nid in keep}


def generation_nodes(prompt: dict) -> dict:
    """The node ids comfy_scripts/generation_isolation.py reads outputs of."""
    decode = node_of(prompt, "VAEDecode")
    load = node_of(prompt, "IconMattingLoad")
    return {"decode": decode, "load": load, "generation_loader": prompt[node_of(prompt, "KSampler")]["inputs"]["model"][0],
            "features_loader": prompt[load]["inputs"]["model"][0]}


# --- the graph against a host's /object_info ----------------------------------------------------
def _spec(info: dict, name: str):
    return {**info["input"].get("optional", {}), **info["input"].get("required", {})}.get(name)


def _types_match(output_type: str, input_type: str) -> bool:
    if "*" in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def graph_problems(prompt: dict, object_info: dict, declared_files=()) -> list:
    """What in an API-format workflow the host would not accept: unknown node types or inputs,
    missing required inputs, links between mismatched types or to missing outputs, widget values
    outside the host's options or ranges (a file name passes when the user provides it or the
    workflow declares its download)."""
    problems = []
    for nid, node in prompt.items():
        ctype = node["class_type"]
        info = object_info.get(ctype)
        if info is None:
            problems.append(f"node {nid}: the host has no node type {ctype}")
            continue
        problems += [f"node {nid} ({ctype}): required input {name!r} is not set"
                     for name in info["input"].get("required", {}) if name not in node["inputs"]]
        for name, value in node["inputs"].items():
            spec = _spec(info, name)
            if spec is None:
                problems.append(f"node {nid} ({ctype}): the host has no input {name!r}")
                continue
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(value, list):
                src = prompt.get(value[0])
                src_info = object_info.get(src["class_type"]) if src else None
                if src and src_info is None:
                    continue  # reported at the source node: the host lacks its type
                if src_info is None or not 0 <= value[1] < len(src_info["output"]):
                    problems.append(f"node {nid} ({ctype}) input {name!r}: links to a missing output {value}")
                elif not _types_match(src_info["output"][value[1]], kind):
                    problems.append(f"node {nid} ({ctype}) input {name!r} ({kind}) is linked to a "
                                    f"{src_info['output'][value[1]]} output")
            elif kind == "COMBO":
                choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
                if value not in choices and value not in USER_FILES and value not in declared_files:
                    problems.append(f"node {nid} ({ctype}) {name}={value!r} is not one of the host's options")
            elif kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not isinstance(value, int)):
                    problems.append(f"node {nid} ({ctype}) {name}={value!r} is not an {kind}")
                elif not options.get("min", -np.inf) <= value <= options.get("max", np.inf):
                    problems.append(f"node {nid} ({ctype}) {name}={value!r} is outside [{options.get('min')}, {options.get('max')}]")
            elif kind == "BOOLEAN" and not isinstance(value, bool) or kind == "STRING" and not isinstance(value, str):
                problems.append(f"node {nid} ({ctype}) {name}={value!r} is not a {kind}")
            elif kind not in ("BOOLEAN", "STRING"):
                problems.append(f"node {nid} ({ctype}) input {name!r} ({kind}) needs a link, not the value {value!r}")
    return problems


def declared_models(workflow_ui: dict) -> list:
    declared = list(workflow_ui.get("models", []))
    for node in workflow_ui["nodes"]:
        declared += node.get("properties", {}).get("models", [])
    return declared


def test_graph_check_finds_what_a_host_refuses():
    """The checker itself: each kind of mistake is reported (so a clean report means something)."""
    info = {
        "A": {"input": {"required": {"n": ["INT", {"min": 0, "max": 4}], "c": [["x", "y"], {}]}}, "output": ["IMAGE"]},
        "B": {"input": {"required": {"images": ["IMAGE", {}]}, "optional": {"mask": ["MASK", {}]}}, "output": []},
    }
    good = {"1": {"class_type": "A", "inputs": {"n": 4, "c": "y"}}, "2": {"class_type": "B", "inputs": {"images": ["1", 0]}}}
    assert graph_problems(good, info) == []
    bad = {"1": {"class_type": "A", "inputs": {"n": 5, "c": "z", "extra": 1}},
           "2": {"class_type": "B", "inputs": {"mask": ["1", 0]}},
           "3": {"class_type": "B", "inputs": {"images": ["1", 1]}},
           "4": {"class_type": "Nope", "inputs": {}}}
    found = "\n".join(graph_problems(bad, info))
    for words in ("n=5 is outside", "c='z' is not one", "no input 'extra'", "'images' is not set",
                  "'mask' (MASK) is linked to a IMAGE", "missing output ['1', 1]", "no node type Nope"):
        assert words in found, (words, found)


# --- one host job: object_info, the video and the word workflows -----------------------------------
def write_clip(input_dir: Path) -> np.ndarray:
    """input/iconmatting_clip.mp4 (lossless H.264) and its first frame with the foreground painted
    (input/iconmatting_first_frame.png, mask editor convention: painted = transparent). Returns the frames."""
    import av

    rng = np.random.default_rng(3)
    base = (rng.random((CLIP_H, CLIP_W, 3)) * 120).astype(np.uint8)
    frames = []
    for k in range(CLIP_FRAMES):
        frame = base.copy()
        x = 8 + 6 * (k % 3)  # the square moves, frame 3 returns to frame 0
        frame[12:36, x:x + 24] = (230, 200, 40)
        frames.append(frame)
    input_dir.mkdir(parents=True, exist_ok=True)
    with av.open(str(input_dir / "iconmatting_clip.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = CLIP_W, CLIP_H, "yuv444p"
        stream.options = {"qp": "0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    first = np.dstack([frames[0], np.full((CLIP_H, CLIP_W), 255, np.uint8)])
    first[12:36, 8:32, 3] = 0
    Image.fromarray(first, "RGBA").save(input_dir / "iconmatting_first_frame.png")
    return np.stack(frames)


def write_photos(input_dir: Path) -> None:
    rng = np.random.default_rng(0)
    ref = (rng.random((96, 128, 4)) * 255).astype(np.uint8)
    ref[..., 3] = 255
    ref[20:80, 30:100, 3] = 0
    Image.fromarray(ref, "RGBA").save(input_dir / "iconmatting_reference.png")
    (input_dir / "iconmatting_targets").mkdir(exist_ok=True)
    for i, (w, h) in enumerate(TARGET_SIZES, 1):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(input_dir / "iconmatting_targets" / f"photo_{i}.png")
    Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(input_dir / "iconmatting_background.png")


def read_video(path: Path):
    """(frames [N, H, W, 3] uint8, average frame rate) of a video file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return frames, rate


@host_job
def host_run(comfy_host, tmp_path_factory, tiny_comfy_checkpoint):
    from tiny_models import save_tiny_head, tiny_config
    from tiny_sd2_checkpoint import save_tiny_comfy_sd2_checkpoint

    base = tmp_path_factory.mktemp(f"workflows-{comfy_host}")
    models, work = base / "models", base / "work"
    link_file(models / "checkpoints" / SD_FILE, tiny_comfy_checkpoint)
    save_tiny_head(models / "iconmatting" / HEAD_FILE, tiny_config(unet_feature_channels=(128, 128)))
    save_tiny_comfy_sd2_checkpoint(models / "checkpoints" / GENERATION_FILE, seed=1)
    frames = write_clip(work / "input")
    write_photos(work / "input")
    prompts = [with_tiny_head(api(VIDEO)), with_tiny_head(word_with_stand_in_mask(api(WORD)))]
    # SD 2.1 for the features and another checkpoint for the generation; then, as shipped, one checkpoint for both
    # (the two Load Checkpoint nodes name one file): first with another seed, then with the same seed again on the
    # MODEL that first matting used. All generate with GENERATION_FILE: one batch to compare with.
    one, two = generation_for_tests(api(GENERATE), GENERATION_FILE), generation_for_tests(api(GENERATE), SD_FILE)
    first = copy.deepcopy(one)
    first[node_of(first, "KSampler")]["inputs"]["seed"] += 1
    isolation = {"nodes": generation_nodes(one), "pack_dirs": [str(ROOT / "nodes"), str(ROOT / "iconmatting_core")],
                 "generation_only": generation_only(one),
                 "with_matting": [{"name": "two checkpoints", "prompt": two, "fresh": True, "compare": True},
                                  {"name": "one checkpoint, first", "prompt": first, "fresh": True, "compare": False},
                                  {"name": "one checkpoint", "prompt": one, "fresh": False, "compare": True}]}
    result = yield comfy_job(ROOT, prompts, models_dir=models, work_dir=work, pack_name="comfyui-iconmatting", timeout=900,
                             extra_packs=[TINY_SD2_PACK], comfy_args=["--fp32-text-enc"], host=comfy_host,
                             scripts=[{"path": str(OBJECT_INFO_SCRIPT), "args": {}},
                                      {"path": str(ISOLATION_SCRIPT), "args": isolation}])
    for script in result["scripts"]:
        assert not script.get("error"), script
    return result, work, frames, result["scripts"][0]["result"]["object_info"], str(comfy_host)


@pytest.mark.parametrize("name", sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")))
def test_workflow_graph_matches_the_hosts_object_info(host_run, name):
    _, _, _, object_info, version = host_run
    problems = graph_problems(api(name), object_info, {m["name"] for m in declared_models(ui(name))})
    if name in (WORD, GENERATE) and "SAM3_Detect" not in object_info:
        # ComfyUI before SAM 3 (0.3.75): the only thing missing is SAM 3 itself (README: needs 0.28+)
        assert problems == [f"node {nid}: the host has no node type SAM3_Detect"
                            for nid, n in api(name).items() if n["class_type"] == "SAM3_Detect"], problems
        assert version == "0.3.75"
    else:
        assert problems == []


def test_word_workflow_declares_the_sam3_download():
    declared = [m for m in declared_models(ui(WORD)) if m["name"] == SAM3_FILE]
    assert declared and all(m == {"name": SAM3_FILE, "url": SAM3_URL, "directory": "checkpoints"} for m in declared)
    loaders = [n for n in ui(WORD)["nodes"] if n["type"] == "CheckpointLoaderSimple" and n["widgets_values"] == [SAM3_FILE]]
    assert len(loaders) == 1 and loaders[0]["properties"]["models"][0]["url"] == SAM3_URL
    prompt = api(WORD)
    sam = next(n for n in prompt.values() if n["class_type"] == "SAM3_Detect")
    text = prompt[sam["inputs"]["conditioning"][0]]
    assert text["class_type"] == "CLIPTextEncode" and text["inputs"]["text"] == "person"
    encode = next(n for n in prompt.values() if n["class_type"] == "IconMattingEncodeReference")
    assert prompt[encode["inputs"]["mask"][0]]["class_type"] == "SAM3_Detect"  # the user paints nothing


def test_video_workflow_saves_alpha_and_composited_videos_at_the_clips_frame_rate(host_run):
    result, work, frames, _, _ = host_run
    run = result["prompts"][0]
    assert run["validation"]["ok"], run["validation"]
    assert run["execution"]["success"], run["execution"]["error"]
    videos = sorted(Path(f["path"]).name for f in run["new_files"] if f["path"].endswith(".webm"))
    assert len(videos) == 2 and videos[0].startswith("alpha") and videos[1].startswith("composite"), videos
    alpha, alpha_rate = read_video(work / "output" / "iconmatting" / videos[0])
    comp, comp_rate = read_video(work / "output" / "iconmatting" / videos[1])
    for video, rate in ((alpha, alpha_rate), (comp, comp_rate)):
        assert video.shape == (CLIP_FRAMES, CLIP_H, CLIP_W, 3)
        assert Fraction(rate) == CLIP_FPS
    # Frame k of the mattes belongs to frame k of the clip: frame k + 3 repeats frame k (lossless
    # clip), so Decode Alpha's mattes for them are equal, and differ from those of moved frames.
    decode = next(nid for nid, n in api(VIDEO).items() if n["class_type"] == "IconMattingDecodeAlpha")
    mattes = run["execution"]["node_outputs"][decode][0]
    assert [m["shape"] for m in mattes] == [[1, CLIP_H, CLIP_W]] * CLIP_FRAMES
    means = [m["mean"] for m in mattes]
    assert means[:3] == means[3:] and len(set(means[:3])) == 3, means
    # The alpha video holds those mattes, in that order (grey, up to the codec's rounding).
    grey = alpha.astype(np.float64)
    assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 8
    np.testing.assert_allclose(grey.mean(axis=(1, 2, 3)) / 255, means, atol=1.5 / 255)


def test_word_workflow_mattes_photos_of_different_sizes_with_a_stand_in_mask(host_run):
    result, _, _, _, _ = host_run
    run = result["prompts"][1]
    assert_one_matte_per_target(run, TARGET_SIZES)


@pytest.mark.parametrize("name", sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")))
def test_ui_workflow_is_the_twin_of_the_api_workflow(host_run, name):
    """The drag-and-drop file holds exactly the graph of its API twin (node types, links, widget values
    in the order the host's widgets take them)."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from api_to_ui import widget_names

    _, _, _, object_info, _ = host_run
    prompt, workflow = api(name), ui(name)
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    assert set(nodes) == set(prompt)
    links = {link[0]: link for link in workflow["links"]}
    for nid, node in prompt.items():
        u = nodes[nid]
        assert u["type"] == node["class_type"] and u["title"] == node["_meta"]["title"]
        if u["type"] not in object_info:
            assert u["type"] == "SAM3_Detect"  # checked on the host that has it
            continue
        widgets = widget_names(object_info[u["type"]])
        assert len(widgets) == len(u["widgets_values"]), (nid, widgets, u["widgets_values"])
        values = dict(zip(widgets, u["widgets_values"]))
        for key, value in node["inputs"].items():
            if isinstance(value, list):
                link = links[next(i["link"] for i in u["inputs"] if i["name"] == key)]
                assert [str(link[1]), link[2], str(link[3])] == [value[0], value[1], nid]
            else:
                assert values[key] == value, (nid, key)


# --- the generation template ---------------------------------------------------------------------
def test_generation_workflow_mattes_every_generated_image():
    """As shipped: the batch (more than one image) goes to Match Targets whole; the reference is one image of
    that same batch, its mask from SAM 3 and the word; a Load Checkpoint for the generation and one (SD 2.1,
    with its download) for IconMatting; the cut-outs are composited on a background and saved."""
    prompt = api(GENERATE)
    decode = node_of(prompt, "VAEDecode")
    latent = prompt[prompt[node_of(prompt, "KSampler")]["inputs"]["latent_image"][0]]
    assert latent["class_type"] == "EmptyLatentImage" and latent["inputs"]["batch_size"] > 1
    assert prompt[node_of(prompt, "IconMattingMatchTargets")]["inputs"]["images"] == [decode, 0]
    encode = prompt[node_of(prompt, "IconMattingEncodeReference")]["inputs"]
    reference = prompt[encode["image"][0]]
    assert reference["class_type"] == "ImageFromBatch" and reference["inputs"]["image"] == [decode, 0]
    assert prompt[encode["mask"][0]]["class_type"] == "SAM3_Detect"
    assert prompt[prompt[encode["mask"][0]]["inputs"]["image"][0]] is reference
    nodes = generation_nodes(prompt)
    assert nodes["generation_loader"] != nodes["features_loader"]
    assert prompt[nodes["features_loader"]]["inputs"]["ckpt_name"] == SD_FILE
    composite = prompt[node_of(prompt, "IconMattingComposite")]["inputs"]
    assert prompt[composite["rgba"][0]]["class_type"] == "IconMattingDecodeAlpha"
    assert prompt[composite["background"][0]]["class_type"] == "LoadImage"
    assert {prompt[n["inputs"]["images"][0]]["class_type"] for n in prompt.values() if n["class_type"] == "SaveImage"} \
        == {"VAEDecode", "IconMattingDecodeAlpha", "IconMattingComposite"}


@pytest.fixture(scope="module")
def isolation(host_run):
    result, _, _, _, _ = host_run
    return result["scripts"][1]["result"]


def test_generation_workflow_cuts_out_and_composites_every_generated_image(isolation):
    run = isolation["runs"]["one checkpoint, first"]["entry"]
    assert run["validation"]["ok"], run["validation"]
    assert run["execution"]["success"], run["execution"]["error"]
    saved = {}
    for f in run["new_files"]:
        name = Path(f["path"]).name
        saved.setdefault(name.split("_")[0], []).append((f.get("image_size"), f.get("image_mode")))
    size = [GEN_SIZE, GEN_SIZE]
    assert saved.get("generated") == [(size, "RGB")] * GEN_BATCH, saved
    assert saved.get("cutout") == [(size, "RGBA")] * GEN_BATCH, saved
    assert saved.get("composite") == [(size, "RGB")] * GEN_BATCH, saved


@pytest.mark.parametrize("config", ["one checkpoint", "two checkpoints"])
def test_matting_never_disturbs_generation(isolation, config):
    """The generated batch is the same, bit for bit, with and without the matting branch in the prompt (with one
    checkpoint also after a first prompt matted with that MODEL); no patcher comes out of the prompt with a patch set on
    it, neither the user's MODELs nor the clone IconMatting loads the features UNet under (its patches go with each of
    its own UNet calls: nodes/native_features.py)."""
    run = isolation["generation_only"]
    assert run["execution"] and run["execution"]["success"], run["validation"] if not run["execution"] else run["execution"]["error"]
    assert isolation["generated_shape"] == [GEN_BATCH, GEN_SIZE, GEN_SIZE, 3]
    result = isolation["runs"][config]
    assert result["entry"]["execution"]["success"], result["entry"]["execution"]["error"]
    assert result["bit_identical"], result["max_abs_diff"]
    clean = {"patches": [], "patches_replace": {}, "weight_patches": 0, "object_patches": 0}
    assert result["generation_model_state"] == clean
    assert result["features_model_state"] == clean
    assert not result["clone_is_the_users_model"] and result["clone_state"] == clean
    # with one file in both Load Checkpoint nodes (as shipped), ComfyUI gives them one MODEL: one checkpoint for both
    assert result["shared_model_object"] is (config == "one checkpoint")


@pytest.mark.parametrize("config", ["one checkpoint, first", "two checkpoints"])
def test_every_model_is_loaded_through_comfyuis_model_management(isolation, config):
    """Each model (the generation's UNet and VAE, SD 2.1's UNet and VAE, the matting head) is loaded by
    ``load_models_gpu``; the pack loads SD 2.1's UNet as its clone and never the generation's model, and moves no
    host model itself (its control: such a move is seen)."""
    result = isolation["runs"][config]
    assert result["loaded_through_model_management"] == {
        "generation UNet": True, "generation VAE": True, "features UNet": True, "features VAE": True, "matting head": True}
    assert result["pack_loads"] > 0 and result["pack_loads_features_unet_as"] == ["IconMatting's clone"]
    assert result["pack_loads_generation_unet"] is False
    assert result["direct_moves_of_host_models"] == []
    assert result["control_move_seen"] is True
