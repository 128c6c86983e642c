"""The example workflows in the real ComfyUI app: ComfyUI's web server and a real frontend
(comfyui-frontend-package) in a real Chromium, for each host with the frontend it pins, and ComfyUI
0.28.2 with the newest frontend on PyPI (:data:`frontend_harness.NEWEST_FRONTEND`).

* Pinned frontends (1.32.9 on 0.3.75, 1.45.21 on 0.28.2): each ``workflows/*.json`` is dropped on the
  canvas as a file, as a user drags it in; it must load with no missing-node dialog, no console error
  and a readable default view; *Run* must execute it and the frontend must show every output image.
  The word and generation workflows need SAM 3 (0.28.2): there its SAM 3 weights are left missing and
  the app must offer their download; on 0.3.75 the only missing node is SAM 3.
* Every frontend: the template browser lists the pack's workflows with their thumbnails, each card with
  its own one-sentence description (``web/template_descriptions.json``, written on the card by the pack's
  ``web/template_descriptions.js``: the frontends give a custom node pack's template none).
* Every frontend: each template opened from the template browser (the newest frontends fit the graph
  to the window) is drawn readable: litegraph's details on, every node's title drawn (read from a
  screenshot). The newest frontend also with its Vue nodes ("Nodes 2.0"): no node overlaps another
  (DOM boxes) and no text is cut.
* The newest frontend, Vue nodes on and off: what the nodes say about a run (Load Image Folder's skipped
  files, the patched-MODEL warning of Load) is drawn on the nodes and shown in a toast after the run
  (frontend 1.58 removes the host's progress text when a run ends), and is in ComfyUI's log once.

Models are tiny random-weight files (``frontend_harness.TINY_MODELS``). The apps (``app``, ``newest_app``: one
server per configuration, shared with the other browser modules) come from ``tests/browser/conftest.py``. Skipped
when Chromium or Playwright is missing, except in CI (``CI=true``), where that fails.
"""
import copy
import io
import json
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frontend_harness import LEFT_MISSING, PACK_NAME, TINY_MODELS, WORKFLOWS, overlaps, text_drawn, write_input_image
from api_to_ui import VIEW_LEFT, VIEW_TOP  # tools/, on the path after frontend_harness

WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))
NAMES = [p.name for p in WORKFLOW_FILES]
DESCRIPTIONS = json.loads((WORKFLOWS.parent / "web" / "template_descriptions.json").read_text())
VIDEO_NODES = ("SaveWEBM", "SaveVideo")


def _ids(workflow: dict):
    return [int(n["id"]) for n in workflow["nodes"]]


def _needs_sam3(workflow: dict) -> bool:
    """Core SAM 3 (``SAM3_Detect``) makes a mask in it: ComfyUI 0.28 and later (README)."""
    return any(n["type"] == "SAM3_Detect" for n in workflow["nodes"])


def test_there_are_workflows():
    assert WORKFLOW_FILES, "workflows/*.json: no example workflows"


def test_app_starts_without_errors(app):
    comfy, _, _ = app
    assert comfy.startup_errors == []
    assert comfy.dialogs() == []


def test_newest_frontend_starts_without_errors(newest_app):
    test_app_starts_without_errors(newest_app)


@pytest.mark.slow  # runs each workflow in the browser: up to ~100 s each
@pytest.mark.parametrize("name", NAMES)
def test_dropped_workflow_loads_runs_and_shows_its_outputs(app, name):
    comfy, prepared, work = app
    workflow, problems = prepared[name]
    screenshot = work / f"{Path(name).stem}.png"
    if _needs_sam3(workflow) and not comfy.has_sam3:
        # ComfyUI before SAM 3 (0.3.75): the one node the app misses is SAM 3's (README: ComfyUI 0.28+)
        assert problems == [f"node {n['id']}: ComfyUI has no node type 'SAM3_Detect'"
                            for n in workflow["nodes"] if n["type"] == "SAM3_Detect"]
        comfy.drop_workflow(workflow, name)
        text = " ".join(comfy.dialogs())
        assert "SAM3_Detect" in text and not any(t in text for t in ("IconMatting", "CLIPTextEncode")), text
        comfy.close_dialogs()
        comfy.unexpected_errors()
        return
    assert problems == []

    comfy.drop_workflow(workflow, name)
    assert comfy.dialogs() == [], f"dialog after dropping {name} (see {screenshot})"  # no missing nodes
    assert comfy.unexpected_errors() == []
    view = comfy.graph_view()
    comfy.screenshot(screenshot)
    missing = sorted(v for n in workflow["nodes"] for v in n["widgets_values"] if v in LEFT_MISSING)
    # 1.45.21 may mark the loader of a missing model as failed once its own model check ends (timing): those alone
    loads_missing = {str(n["id"]) for n in workflow["nodes"] if any(v in LEFT_MISSING for v in n["widgets_values"])}
    if missing:
        # The SAM 3 weights are not here (nor downloadable in tests): the missing-models panel names
        # them, in their folder, with a Download button (the workflow declares the address).
        text = comfy.missing_models_panel()
        comfy.screenshot(work / f"{Path(name).stem}-missing-models.png")
        assert "checkpoints" in text and "Download" in text and all(m[:12] in text for m in missing), text[-1500:]
    # Readable as opened: litegraph draws details (not blank boxes), and every node is on screen,
    # clear of the side bar and the top bars (tools/api_to_ui.py's extra.ds).
    assert not view["low_quality"], f"{name} opens at zoom {view['scale']:.2f}: nodes render as blank boxes"
    for node_id, node in view["nodes"].items():
        x0, y0, x1, y1 = node["box"]
        assert VIEW_LEFT - 1 <= x0 and VIEW_TOP - 1 <= y0 and x1 <= view["width"] and y1 <= view["height"], \
            f"{name}: node {node_id} ({node['type']}) at {node['box']} is not in view (see {screenshot}); " \
            f"regenerate with tools/api_to_ui.py, or shorten long node titles"
        assert not node["errors"] or str(node_id) in loads_missing, \
            f"{name}: node {node_id} ({node['type']}) is marked as failed"
    if missing:
        return  # SAM 3 cannot run here: tests/host/test_workflows.py runs the rest with a stand-in mask

    prompt_id = comfy.run()
    history = comfy.wait_for_history(prompt_id, timeout_s=240)
    status = history["status"]
    errors = [{k: data.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message")}
              | {"traceback": "".join(data.get("traceback") or [])[-2000:]}
              for event, data in status["messages"] if event == "execution_error"]
    assert status["status_str"] == "success", errors or status
    outputs = {int(node_id): out["images"] for node_id, out in history["outputs"].items() if out.get("images")}
    output_nodes = {n["id"] for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage") + VIDEO_NODES}
    assert set(outputs) == output_nodes
    types = {n["id"]: n["type"] for n in workflow["nodes"]}
    for node_id, images in outputs.items():
        if types[node_id] not in VIDEO_NODES:  # the frontend plays videos in a <video>, not as node images
            shown = comfy.node_images(node_id, len(images))
            assert [im["src"].split("filename=")[1].split("&")[0] for im in shown] == [im["filename"] for im in images]
        for image in images:
            folder = work / image["type"] / image["subfolder"]
            assert (folder / image["filename"]).is_file()
    comfy.screenshot(screenshot)
    assert comfy.unexpected_errors() == []


def _open_template(comfy, workflow, name):
    comfy.open_template(PACK_NAME, Path(name).stem, _ids(workflow), timeout_ms=40000)
    comfy.close_dialogs()  # a missing-model panel (SAM 3) is checked above


@pytest.mark.parametrize("name", NAMES)
def test_template_opens_readable(app, name):
    """Opened from the template browser, every node is drawn with its title and widgets, not as a
    blank box: read from a screenshot."""
    comfy, prepared, work = app
    workflow, _ = prepared[name]
    if _needs_sam3(workflow) and not comfy.has_sam3:
        # ComfyUI before SAM 3 (0.3.75): the template opens with SAM 3 as its one missing node
        comfy.open_template(PACK_NAME, Path(name).stem, _ids(workflow), timeout_ms=40000)
        text = " ".join(comfy.dialogs())
        assert "SAM3_Detect" in text and not any(t in text for t in ("IconMatting", "CLIPTextEncode")), text
        comfy.close_dialogs()
        comfy.unexpected_errors()
        return
    _check_template_readable(comfy, workflow, name, work)


@pytest.mark.parametrize("name", NAMES)
def test_template_opens_readable_in_the_newest_frontend(newest_app, name):
    """Frontend 1.45+ fits the whole graph into the window when a template opens: still readable."""
    comfy, prepared, work = newest_app
    _check_template_readable(comfy, prepared[name][0], name, work)


def _check_template_readable(comfy, workflow, name, work):
    _open_template(comfy, workflow, name)
    view = comfy.graph_view()
    screenshot = work / f"template-{Path(name).stem}.png"
    png = comfy.page.screenshot(path=str(screenshot))
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert not view["low_quality"], f"{name} opens at zoom {view['scale']:.2f}: blank boxes (see {screenshot})"
    cx, cy = view["canvas_box"][:2]
    blank = [node["title"] for node in view["nodes"].values()
             if not text_drawn(shot, [node["box"][0] + cx + 4, node["box"][1] + cy + 2,
                                      node["box"][2] + cx - 4, node["box"][1] + cy + view["title_height"] - 2])]
    assert blank == [], f"{name}: no title drawn on {blank} at zoom {view['scale']:.2f} (see {screenshot})"
    comfy.unexpected_errors()


@pytest.mark.parametrize("name", NAMES)
def test_vue_nodes_do_not_overlap_or_cut_text(newest_app, name):
    """Frontend 1.58's Vue nodes ("Nodes 2.0") are taller than litegraph's (a badge row, the "Show
    advanced inputs" footer): the shipped layout leaves room for them, and shows file names whole."""
    comfy, prepared, work = newest_app
    workflow, _ = prepared[name]
    comfy.set_setting("Comfy.VueNodes.Enabled", True)
    try:
        _open_template(comfy, workflow, name)
        nodes = comfy.vue_nodes()
        comfy.screenshot(work / f"vue-{Path(name).stem}.png")
    finally:
        comfy.set_setting("Comfy.VueNodes.Enabled", False)
    assert sorted(map(int, nodes)) == sorted(_ids(workflow)), "Vue nodes are not drawn"
    titles = {str(n["id"]): n["title"] for n in workflow["nodes"]}
    assert [(titles[a], titles[b], h) for a, b, h in overlaps({k: v["box"] for k, v in nodes.items()})] == []
    assert {titles[k]: v["cut"] for k, v in nodes.items() if v["cut"]} == {}
    comfy.unexpected_errors()


def test_template_browser_lists_the_workflows_with_thumbnails(app):
    _check_template_cards(app)


def test_template_browser_cards_in_the_newest_frontend(newest_app):
    _check_template_cards(newest_app)


def _check_template_cards(app):
    comfy, prepared, work = app
    names = [p.stem for p in WORKFLOW_FILES]
    cards = comfy.template_cards(PACK_NAME, names, expect_text=DESCRIPTIONS)
    comfy.screenshot(work / "templates.png")
    for name, card in cards.items():
        # The frontend titles a custom node's template with its file name (1.32.9 and 1.45.21 describe
        # it with the file name again, 1.58.1 not at all); the pack's sentence is the line under the
        # title; the thumbnail is workflows/<name>.jpg.
        lines = card["text"]
        assert name in lines and lines[lines.index(name) + 1:][:1] == [DESCRIPTIONS[name]], (name, lines)
        assert DESCRIPTIONS[name] not in card["cut"], f"{name}: its description is cut short on the card"
        url = f"{comfy.server.url}/api/workflow_templates/{PACK_NAME}/{urllib.parse.quote(name, safe='(),')}.jpg"
        assert (200, url) in comfy.responses and card["thumbnail"]["width"] > 0, \
            f"no thumbnail workflows/{name}.jpg (python tests/support/frontend_harness.py templates)"
    comfy.close_dialogs()
    assert comfy.unexpected_errors() == []


def test_text_drawn_reads_a_blank_box_as_blank():
    """The screenshot check itself: a flat title bar (litegraph's low-quality box) has no text, a bar
    with light glyph strokes on it has."""
    bar = np.full((40, 200, 3), 53, np.uint8)
    assert not text_drawn(bar, [0, 0, 200, 40])
    bar[14:26, 20:120:3] = 220
    assert text_drawn(bar, [0, 0, 200, 40])


def test_overlaps_finds_boxes_that_overlap():
    boxes = {"a": [0, 0, 100, 100], "b": [0, 95, 100, 150], "c": [0, 150, 100, 200]}
    assert overlaps(boxes) == [("a", "b", 5)]


def _folder_note(folder: str) -> str:
    return (f"Found 3 image(s) in '{folder}' (1 in subfolders); loaded 2. Skipped 1 unreadable file(s): broken.png "
            "(cannot identify image file 'broken.png').")


def _patch_warning(work: Path) -> str:
    """The warning for the tiny SD 2.x MODEL merged with itself: Model Merge Simple patches every UNet weight
    of the file (its keys under model.diffusion_model., counted here from the file itself)."""
    from safetensors import safe_open

    with safe_open(str(work / "models" / "checkpoints" / "v2-1_768-ema-pruned.safetensors"), "pt") as f:
        patches = sum(k.startswith("model.diffusion_model.") for k in f.keys())
    return (f"The MODEL carries {patches} weight patches (e.g. a LoRA). IconMatting was trained on plain SD 2.1 "
            "features: connect Load Checkpoint's MODEL directly for faithful mattes.")


def _notes_prompt(work: Path, folder_name: str, ratio: float) -> dict:
    """The folder template as an API prompt, over a folder with an unreadable file and a photo in a subfolder,
    and with Load's MODEL patched (Load Checkpoint's MODEL merged with itself at ``ratio``)."""
    folder = work / "input" / folder_name
    write_input_image(folder / "good.png", seed=31)
    write_input_image(folder / "sub" / "good.png", seed=32)
    (folder / "broken.png").write_bytes(b"not an image")
    prompt = copy.deepcopy(json.loads((WORKFLOWS / "api" / "Matte a folder of photos (IconMatting).json").read_text()))
    for node in prompt.values():
        if node["class_type"] == "IconMattingLoad":
            node["inputs"]["matting_model"] = TINY_MODELS[("IconMattingLoad", "matting_model")](work / "models")
            node["inputs"]["model"] = ["90", 0]
        if node["class_type"] == "IconMattingLoadImageFolder":
            node["inputs"]["folder"] = folder_name
    prompt["90"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["1", 0], "ratio": ratio}}
    return prompt


#: per IconMatting node on the canvas: the note it holds, and whether a text box on screen shows that text (the
#: litegraph canvas draws the widget's own element, the Vue nodes a text box of their own)
SHOWN_NOTES = """() => Object.fromEntries(app.graph.nodes.filter(n => n.comfyClass?.startsWith('IconMatting')).map(n => {
    const boxes = [...document.querySelectorAll('textarea')].filter(e => {
        const r = e.getBoundingClientRect();
        return r.width > 0 && r.height > 0 && r.bottom > 0 && r.right > 0 && r.top < innerHeight && r.left < innerWidth
            && getComputedStyle(e).visibility !== 'hidden' && getComputedStyle(e).display !== 'none';
    }).map(e => e.value);
    const text = (n.widgets || []).find(w => w.name === 'iconmatting_note')?.value ?? null;
    return [n.comfyClass, {text, drawn: text !== null && boxes.includes(text)}];
}))"""


def _run_and_read(comfy, work: Path, shot: str):
    """Run the graph on the canvas; (the notes shown on its nodes, the page's text, the log lines of the run)."""
    log_before = len(comfy.server.log().splitlines())
    history = comfy.wait_for_history(comfy.run(), timeout_s=600)
    assert history["status"]["status_str"] == "success", history["status"]
    comfy.page.wait_for_function("() => app.graph.nodes.filter(n => (n.widgets || []).some(w => w.name === 'iconmatting_note'))"
                                 ".length >= 2", timeout=20000)
    comfy.page.wait_for_timeout(500)
    comfy.screenshot(work / shot)
    return comfy.page.evaluate(SHOWN_NOTES), comfy.page.inner_text("body"), comfy.server.log().splitlines()[log_before:]


def _dismiss_toasts(comfy):
    comfy.page.evaluate("() => { const t = app.extensionManager.toast; (t.dismissAll || t.removeAll)?.call(t) }")
    comfy.page.wait_for_timeout(300)


@pytest.mark.slow  # runs the folder workflow twice in the browser: ~60-100 s
@pytest.mark.parametrize("vue", [True, False], ids=["vue-nodes", "classic-nodes"])
def test_what_the_nodes_say_is_shown_on_them_and_in_a_toast_in_the_newest_frontend(newest_app, vue):
    """Skipped files and a patched MODEL: each note on its node and in a toast after the run, in the log once;
    run again unchanged (every node cached), the notes are still on the nodes, and nothing is logged again."""
    comfy, _, work = newest_app
    folder = "iconmatting_skips_vue" if vue else "iconmatting_skips_classic"  # each renderer gets a fresh run
    prompt = _notes_prompt(work, folder, 0.5 if vue else 0.25)
    warning, folder_note = _patch_warning(work), _folder_note(folder)
    kind = "vue" if vue else "classic"
    comfy.set_setting("Comfy.VueNodes.Enabled", vue)
    try:
        comfy.page.evaluate("api => app.loadApiJson(api, 'notes.json')", prompt)
        comfy.wait_for_graph([int(k) for k in prompt])
        notes, page, log = _run_and_read(comfy, work, f"notes-{kind}.png")
        _dismiss_toasts(comfy)
        cached_notes, cached_page, cached_log = _run_and_read(comfy, work, f"notes-{kind}-cached.png")
    finally:
        _dismiss_toasts(comfy)
        comfy.set_setting("Comfy.VueNodes.Enabled", False)
    for shown in (notes, cached_notes):
        assert shown["IconMattingLoadImageFolder"] == {"text": folder_note, "drawn": True}
        assert shown["IconMattingLoad"] == {"text": warning, "drawn": True}
        assert all(v["text"] is None for k, v in shown.items() if k not in ("IconMattingLoadImageFolder", "IconMattingLoad"))
    assert folder_note in page and warning in page  # the two warnings, in toasts when the run ended
    assert folder_note not in cached_page and warning not in cached_page  # once per text, not on every run
    # in the log, once (after the host's level prefix); a cached node says nothing again
    assert [line.endswith(f"IconMatting: {warning}") for line in log if "weight patches" in line] == [True]
    assert [line.endswith(f"IconMatting: {folder_note}") for line in log if "unreadable" in line] == [True]
    assert [line for line in cached_log if "IconMatting:" in line] == []
    assert comfy.unexpected_errors() == []
