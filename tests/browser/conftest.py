"""What the browser tests share: one Chromium per run and one ComfyUI web server (with the app open in it) per
frontend configuration, whichever module's tests use it.

``app`` is each host with the frontend it pins (``frontend_harness.PINNED``), ``newest_app`` ComfyUI 0.28.2 with
the newest frontend on PyPI (``frontend_harness.NEWEST``). Both are session fixtures parametrized by configuration, so pytest runs
the tests of one configuration together, from every module, and starts its server once; a module that needs
only some configurations narrows ``app`` with ``pytest.mark.parametrize("app", [...], indirect=True)``.
Each yields ``(comfy, prepared, work)``: the open :class:`frontend_harness.ComfyApp`, every ``workflows/*.json``
prepared with tiny models and input files (``{file name: (workflow, problems)}``), and the server's base folder.
The browser folder runs last (``testpaths`` in pyproject.toml), so the servers end with the session.
"""
import json

import pytest

from comfy_harness import comfy_host, link_file
from frontend_harness import (NEWEST, PINNED, WORKFLOWS, ComfyApp, ComfyServer, config_id, launch_browser,
                              prepare_user, require_browser)
from api_to_ui import VIEW_HEIGHT, VIEW_WIDTH  # tools/, on the path after frontend_harness

SD_FILE = "v2-1_768-ema-pruned.safetensors"


@pytest.fixture(scope="session")
def browser():
    """One Chromium for every app (Playwright's sync API allows one instance at a time)."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_browser(playwright)
        yield chromium
        chromium.close()


def _start_app(config, browser, tmp_path_factory, checkpoint):
    """The app open in Chromium, and every workflow prepared: (app, {file name: (workflow, problems)}, work)."""
    from frontend_harness import prepare_workflow

    version, frontend = config
    host = comfy_host(version)
    work = tmp_path_factory.mktemp("frontend")
    prepare_user(work)
    link_file(work / "models" / "checkpoints" / SD_FILE, checkpoint)  # the tiny file TINY_MODELS would write
    with ComfyServer(work, host=host, frontend=frontend) as server:
        object_info = server.get("/object_info")
        # Models and input files are in place before the app loads its model lists.
        prepared = {path.name: prepare_workflow(json.loads(path.read_text()), object_info, work)
                    for path in sorted(WORKFLOWS.glob("*.json"))}
        comfy = ComfyApp(browser, server, viewport={"width": VIEW_WIDTH, "height": VIEW_HEIGHT})
        comfy.open()
        comfy.startup_errors = comfy.unexpected_errors()
        comfy.has_sam3 = "SAM3_Detect" in object_info
        yield comfy, prepared, work
        comfy.context.close()


@pytest.fixture(scope="session", params=PINNED, ids=[config_id(c) for c in PINNED])
def app(request, browser, tmp_path_factory, tiny_comfy_checkpoint):
    """Each host with the frontend it pins: workflows run, cards, readable templates, node search."""
    yield from _start_app(request.param, browser, tmp_path_factory, tiny_comfy_checkpoint)


@pytest.fixture(scope="session", params=NEWEST, ids=[config_id(c) for c in NEWEST])
def newest_app(request, browser, tmp_path_factory, tiny_comfy_checkpoint):
    """The newest frontend on PyPI (layout only: templates readable, Vue nodes)."""
    yield from _start_app(request.param, browser, tmp_path_factory, tiny_comfy_checkpoint)
