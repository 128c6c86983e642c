"""The example workflows in the real ComfyUI app: ComfyUI 0.3.75's web server and its pinned
frontend (comfyui-frontend-package) in a real Chromium.

Each ``workflows/*.json`` is dropped on the canvas as a file, as a user drags it in; it must load
with no missing-node dialog, no console error and a readable default view; *Run* must execute it
and the frontend must show every output image. The template browser must list the pack's
workflows with their thumbnails. Models are tiny random-weight files (``frontend_harness.TINY_MODELS``).
Skipped when Chromium or Playwright is missing, except in CI (``CI=true``), where that fails.
"""
import json
import urllib.parse
from pathlib import Path

import pytest

from frontend_harness import (PACK_NAME, WORKFLOWS, ComfyApp, ComfyServer, launch_browser, prepare_user,
                              prepare_workflow, require_browser)
from api_to_ui import VIEW_HEIGHT, VIEW_LEFT, VIEW_TOP, VIEW_WIDTH  # tools/, on the path after frontend_harness

WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))


@pytest.fixture(scope="module")
def app(tmp_path_factory, comfy_host):
    """The app open in Chromium, and every workflow prepared: (app, {file name: (workflow, problems)}, work)."""
    require_browser()
    from playwright.sync_api import sync_playwright

    work = tmp_path_factory.mktemp("frontend")
    prepare_user(work)
    with ComfyServer(work, host=comfy_host) as server, sync_playwright() as playwright:
        object_info = server.get("/object_info")
        # Models and input files are in place before the app loads its model lists.
        prepared = {path.name: prepare_workflow(json.loads(path.read_text()), object_info, work)
                    for path in WORKFLOW_FILES}
        browser = launch_browser(playwright)
        comfy = ComfyApp(browser, server, viewport={"width": VIEW_WIDTH, "height": VIEW_HEIGHT})
        comfy.open()
        comfy.startup_errors = comfy.unexpected_errors()
        yield comfy, prepared, work
        browser.close()


def test_there_are_workflows():
    assert WORKFLOW_FILES, "workflows/*.json: no example workflows"


def test_app_starts_without_errors(app):
    comfy, _, _ = app
    assert comfy.startup_errors == []
    assert comfy.dialogs() == []


@pytest.mark.parametrize("name", [p.name for p in WORKFLOW_FILES])
def test_dropped_workflow_loads_runs_and_shows_its_outputs(app, name):
    comfy, prepared, work = app
    workflow, problems = prepared[name]
    assert problems == []
    screenshot = work / f"{Path(name).stem}.png"

    comfy.drop_workflow(workflow, name)
    assert comfy.dialogs() == [], f"dialog after dropping {name} (see {screenshot})"
    assert comfy.unexpected_errors() == []
    view = comfy.graph_view()
    comfy.screenshot(screenshot)
    # Readable as opened: litegraph draws details (not blank boxes), and every node is on screen,
    # clear of the side bar and the top bars (tools/api_to_ui.py's extra.ds).
    assert not view["low_quality"], f"{name} opens at zoom {view['scale']:.2f}: nodes render as blank boxes"
    for node_id, node in view["nodes"].items():
        x0, y0, x1, y1 = node["box"]
        assert VIEW_LEFT - 1 <= x0 and VIEW_TOP - 1 <= y0 and x1 <= view["width"] and y1 <= view["height"], \
            f"{name}: node {node_id} ({node['type']}) at {node['box']} is not in view (see {screenshot}); " \
            f"regenerate with tools/api_to_ui.py, or shorten long node titles"
        assert not node["errors"], f"{name}: node {node_id} ({node['type']}) is marked as failed"

    prompt_id = comfy.run()
    history = comfy.wait_for_history(prompt_id)
    status = history["status"]
    errors = [{k: data.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message")}
              | {"traceback": "".join(data.get("traceback") or [])[-2000:]}
              for event, data in status["messages"] if event == "execution_error"]
    assert status["status_str"] == "success", errors or status
    image_outputs = {int(node_id): out["images"] for node_id, out in history["outputs"].items() if out.get("images")}
    output_nodes = {n["id"] for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")}
    assert set(image_outputs) == output_nodes
    for node_id, images in image_outputs.items():
        shown = comfy.node_images(node_id, len(images))
        assert [im["src"].split("filename=")[1].split("&")[0] for im in shown] == [im["filename"] for im in images]
        for image in images:
            folder = work / image["type"] / image["subfolder"]
            assert (folder / image["filename"]).is_file()
    comfy.screenshot(screenshot)
    assert comfy.unexpected_errors() == []


def test_template_browser_lists_the_workflows_with_thumbnails(app):
    comfy, prepared, work = app
    names = [p.stem for p in WORKFLOW_FILES]
    cards = comfy.template_cards(PACK_NAME, names)
    comfy.screenshot(work / "templates.png")
    for name, card in cards.items():
        # Frontend 1.32.9 titles a custom node's template with its file name and describes it with
        # the file name's words; the thumbnail is workflows/<name>.jpg.
        assert card["text"][:2] == [name, name.replace("_", " ").replace("-", " ")], card
        url = f"{comfy.server.url}/api/workflow_templates/{PACK_NAME}/{urllib.parse.quote(name, safe='()')}.jpg"
        assert (200, url) in comfy.responses and card["thumbnail"]["width"] > 0, \
            f"no thumbnail workflows/{name}.jpg (python tests/frontend_harness.py templates)"

    # Opening a template loads that workflow.
    comfy.page.locator(f'[data-testid="template-workflow-{names[0]}"]').click()
    ids = sorted(n["id"] for n in json.loads(WORKFLOW_FILES[0].read_text())["nodes"])
    comfy.page.wait_for_function("ids => JSON.stringify(app.graph.nodes.map(n => n.id).sort((a, b) => a - b)) "
                                 "=== JSON.stringify(ids)", arg=ids, timeout=20000)
    assert comfy.dialogs() == []
    assert comfy.unexpected_errors() == []
