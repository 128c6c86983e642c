"""The real ComfyUI web app in a real browser: ComfyUI's own web server, frontend and Chromium.

:class:`ComfyServer` runs ComfyUI's ``main.py`` (the tree from ``comfy_harness.comfy_root()``) with
its real aiohttp server on a free port of 127.0.0.1, CPU only, serving the PyPI
``comfyui-frontend-package`` that ComfyUI's ``requirements.txt`` pins (``--front-end-root``). Its
base directory is a temporary folder holding ``custom_nodes/<pack>`` (a symlink to the pack),
``models/``, ``input/``, ``output/`` and ``user/``; test-only node modules (:data:`TEST_PACKS`) are
symlinked beside the pack.

:func:`launch_browser` starts Debian's Chromium through Python Playwright (never a downloaded
browser), headless, with every background connection switched off. :class:`ComfyApp` drives the
app the way a user does: it drops a workflow file on the canvas (a ``drop`` event carrying a
``File`` in a ``DataTransfer``), presses *Run*, opens the template browser, and collects the
console errors and dialogs the app shows.

Tiny models: :func:`prepare_workflow` finds every combo widget of a UI workflow that names a model
file (read against the server's ``/object_info``), writes a tiny random-weight model for it into
the right ``models/`` folder and points the widget at it. :data:`TINY_MODELS` is the one table
that says, per (node type, widget), which folder and which tiny model; a model widget not listed
there fails the test with a message saying to add it.

``python tests/support/frontend_harness.py templates`` regenerates each ``workflows/<name>.json`` from its API
twin (with ComfyUI 0.28.2's ``/object_info``) and its template card ``workflows/<name>.jpg``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from api_to_ui import widget_names  # noqa: E402
from comfy_harness import (DEFAULT_HOST, ComfyHost, _build_atomically, _pip, cache_dir,  # noqa: E402
                           comfy_host)

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
#: The pack's folder name under custom_nodes/ (the README's clone command); it is also the
#: template browser's category for the pack's workflows.
PACK_NAME = "comfyui-iconmatting"
CHROMIUM_ENV = "ICONMATTING_CHROMIUM"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1600, "height": 900}
#: The newest ``comfyui-frontend-package`` on PyPI (checked 2026-12): the templates must open readable in
#: it too, with its Vue nodes ("Nodes 2.0") on and off.
NEWEST_FRONTEND = "1.58.1"
#: The browser tests' frontend configurations, (host, frontend version; None = the one the host pins): each host
#: with its pinned frontend, and ComfyUI 0.28.2 with the newest.
PINNED = [("0.3.75", None), ("0.28.2", None)]
NEWEST = [("0.28.2", NEWEST_FRONTEND)]
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")
DIFFUSERS_PREFIX = "[diffusers] "


def config_id(config) -> str:
    """A configuration's part of a test id: ``comfy0.28.2-frontendpinned``."""
    host, frontend = config
    return f"comfy{host}-frontend{frontend or 'pinned'}"


# --- availability -------------------------------------------------------------------------------
def chromium_path() -> Optional[str]:
    return os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")


def pinned_frontend_version(host: Optional[ComfyHost] = None) -> str:
    """The ``comfyui-frontend-package`` version the host's requirements.txt pins."""
    host = host or comfy_host(DEFAULT_HOST)
    version = host.pinned("comfyui-frontend-package")
    if not version:
        raise RuntimeError(f"ComfyUI {host}'s requirements.txt pins no comfyui-frontend-package version")
    return version


def unavailable_reason() -> Optional[str]:
    """Why the browser test cannot run here (None when it can)."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Python package playwright (requirements-dev.txt)")
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        missing.append("Python package comfyui-frontend-package (requirements-dev.txt)")
    if not chromium_path():
        missing.append(f"a Chromium executable (apt-get install chromium, or set ${CHROMIUM_ENV})")
    return "missing " + "; ".join(missing) if missing else None


def require_browser() -> None:
    """Skip the calling test when the browser stack is missing, except in CI (CI=true), where it fails."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"real-browser test cannot run in CI: {reason}")
    pytest.skip(f"real-browser test needs the README's set-up: {reason}")


def frontend_static_dir(host: Optional[ComfyHost] = None, version: Optional[str] = None) -> Path:
    """The static files of ``comfyui-frontend-package`` ``version`` (default: the one the host pins).

    The host's pinned frontend is the venv's (0.3.75: requirements-dev.txt) or the host's own copy
    (``ComfyHost.frontend_dir``); any other version (e.g. :data:`NEWEST_FRONTEND`) is installed once,
    without dependencies, into the test cache (``pip install --target``), beside the venv's.
    """
    from importlib.metadata import distributions
    from importlib.metadata import version as installed_version

    host = host or comfy_host(DEFAULT_HOST)
    pinned = pinned_frontend_version(host)
    version = version or pinned
    if version == pinned and host.frontend_dir is not None:
        dist = next(iter(distributions(path=[str(host.frontend_dir)])), None)
        if dist is None or dist.version != pinned:
            raise RuntimeError(f"{host.frontend_dir} does not hold comfyui-frontend-package {pinned}")
        return Path(host.frontend_dir) / "comfyui_frontend_package" / "static"
    if version == pinned:
        import comfyui_frontend_package

        installed = installed_version("comfyui-frontend-package")
        if installed != pinned:
            raise RuntimeError(f"comfyui-frontend-package {installed} is installed but ComfyUI {host} pins {pinned}: "
                               f"pip install comfyui-frontend-package=={pinned} (requirements-dev.txt)")
        return Path(comfyui_frontend_package.__file__).parent / "static"
    folder = cache_dir() / f"frontend-{version}"
    if not (folder / "COMPLETE").is_file():
        def build(staging: Path) -> None:
            _pip(["install", "--no-deps", "--quiet", "--target", str(staging), f"comfyui-frontend-package=={version}"],
                 f"comfyui-frontend-package=={version}")
            (staging / "COMPLETE").write_text(f"comfyui-frontend-package=={version}\n")

        _build_atomically(folder, build)
    return folder / "comfyui_frontend_package" / "static"


# --- ComfyUI's web server -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's ``main.py`` with its web server, in a subprocess; use as a context manager."""

    def __init__(self, work: Path, pack_dir: Path = ROOT, pack_name: str = PACK_NAME,
                 extra_packs: Optional[List[Path]] = None, startup_timeout: float = 120,
                 host: Optional[ComfyHost] = None, frontend: Optional[str] = None):
        """``host``: the ComfyUI to run (default 0.3.75); ``frontend``: a comfyui-frontend-package
        version to serve (default: the one the host pins)."""
        self.host = host or comfy_host(DEFAULT_HOST)
        self.frontend = frontend or pinned_frontend_version(self.host)
        self.work, self.pack_dir, self.pack_name = Path(work), Path(pack_dir), pack_name
        self.host = host or comfy_host(DEFAULT_HOST)
        self.extra_packs = [Path(p) for p in (TEST_PACKS if extra_packs is None else extra_packs)]
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.work / "comfyui.log"

    def __enter__(self) -> "ComfyServer":
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        for name, path in [(self.pack_name, self.pack_dir)] + [(p.name, p) for p in self.extra_packs]:
            link = self.work / "custom_nodes" / name
            if not link.is_symlink():
                link.symlink_to(path.resolve(), target_is_directory=path.is_dir())
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.work),
               "--front-end-root", str(frontend_static_dir(self.host, self.frontend)),
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--disable-auto-launch",
               *self.host.comfy_args]
        env = dict(os.environ, PYTHONPATH=self.host.pythonpath, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.host.root, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}) while starting:\n{self.log()[-6000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"ComfyUI did not serve {self.url} in {self.startup_timeout}s:\n{self.log()[-6000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())


# --- workflows: widgets, tiny models, input images -----------------------------------------------
def names_a_model(value) -> bool:
    return isinstance(value, str) and (value.lower().endswith(MODEL_EXTENSIONS) or value.startswith(DIFFUSERS_PREFIX))


def _tiny_head(models: Path) -> str:
    """Tiny matting-head weights sized for :func:`_tiny_sd2_checkpoint`'s UNet (128-channel up blocks)."""
    from tiny_models import save_tiny_head, tiny_config

    if not (models / "iconmatting" / "tiny-icm.safetensors").is_file():
        save_tiny_head(models / "iconmatting" / "tiny-icm.safetensors", tiny_config(unet_feature_channels=(128, 128)))
    return "tiny-icm.safetensors"


def _tiny_sd2_checkpoint(models: Path) -> str:
    """A tiny SD 2.x single file for ComfyUI's Load Checkpoint (needs :data:`TEST_PACKS` loaded), under
    the real SD 2.1 file's name: the workflows declare that file (with its download address), and the
    frontend's missing-models check must find it present."""
    from tiny_sd2_checkpoint import save_tiny_comfy_sd2_checkpoint

    name = "v2-1_768-ema-pruned.safetensors"
    if not (models / "checkpoints" / name).is_file():
        save_tiny_comfy_sd2_checkpoint(models / "checkpoints" / name)
    return name


#: (node type, widget name) -> writes a tiny model under ``models/`` (once) and returns the
#: widget value that selects it. The one place to adapt when workflows name other models.
TINY_MODELS: Dict[Tuple[str, str], Callable[[Path], str]] = {
    ("IconMattingLoad", "matting_model"): _tiny_head,
    ("CheckpointLoaderSimple", "ckpt_name"): _tiny_sd2_checkpoint,
}
#: Test-only custom node modules loaded beside the pack: ComfyUI learns the tiny SD 2.x file.
TEST_PACKS = [ROOT / "tests" / "support" / "comfy_tiny_sd2"]


def write_input_image(path: Path, seed: int) -> None:
    """An RGBA PNG (random colours, a few sizes) whose alpha holds a painted rectangle (ComfyUI's
    mask editor convention: transparent = masked), so its MASK output is a usable reference mask."""
    rng = np.random.default_rng(seed)
    h, w = 64 + 8 * (seed % 5), 80 + 12 * (seed % 4)
    rgba = (rng.random((h, w, 4)) * 255).astype(np.uint8)
    rgba[..., 3] = 255
    rgba[h // 5: h * 4 // 5, w // 4: w * 3 // 4, 3] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)


def _input_image(input_dir: Path, value: str) -> str:
    if not (input_dir / value).exists():
        write_input_image(input_dir / value, seed=len(value) + sum(map(ord, value)))
    return value


def _input_folder(input_dir: Path, value: str) -> str:
    for i in range(2):
        if not (input_dir / value / f"target_{i}.png").exists():
            write_input_image(input_dir / value / f"target_{i}.png", seed=10 + i)
    return value


def _input_video(input_dir: Path, value: str) -> str:
    """A 4-frame 64x48 clip at 8 fps (a square moving over noise)."""
    import av

    if not (input_dir / value).exists():
        rng = np.random.default_rng(7)
        input_dir.mkdir(parents=True, exist_ok=True)
        with av.open(str(input_dir / value), "w") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for k in range(4):
                frame = (rng.random((48, 64, 3)) * 120).astype(np.uint8)
                frame[12:36, 8 + 6 * k: 32 + 6 * k] = (230, 200, 40)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    return value


#: (node type, widget name) -> writes the input file(s) the widget names under ``input/`` (once)
#: and returns the widget value (unchanged).
TEST_INPUTS: Dict[Tuple[str, str], Callable[[Path, str], str]] = {
    ("LoadImage", "image"): _input_image,
    ("IconMattingLoadImageFolder", "folder"): _input_folder,
    ("LoadVideo", "file"): _input_video,
}
#: Model files no tiny stand-in exists for: left missing, so the frontend's missing-model panel must
#: offer their download (the workflows declare it). SAM 3.1 (core SAM3_Detect's weights).
LEFT_MISSING = {"sam3.1_multiplex_fp16.safetensors"}


def prepare_workflow(workflow: dict, object_info: dict, work: Path) -> Tuple[dict, List[str]]:
    """Copy of a UI workflow whose model widgets select tiny models written under ``work/models``
    (:data:`TINY_MODELS`), with the input files its widgets name written under ``work/input``
    (:data:`TEST_INPUTS`).

    Returns the copy and the problems found: a node type the server does not know, widget values
    that do not match the node's widgets, a model widget missing from TINY_MODELS.
    """
    workflow = json.loads(json.dumps(workflow))
    problems = []
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"node {node['id']}: ComfyUI has no node type {node['type']!r}")
            continue
        names, values = widget_names(info), node.get("widgets_values", [])
        if len(names) != len(values):
            problems.append(f"node {node['id']} ({node['type']}): widgets_values {values} do not match "
                            f"the widgets {names}; regenerate it with tools/api_to_ui.py")
            continue
        for i, (name, value) in enumerate(zip(names, values)):
            key = (node["type"], name)
            if key in TEST_INPUTS:
                node["widgets_values"][i] = TEST_INPUTS[key](work / "input", value)
            elif names_a_model(value) and value not in LEFT_MISSING:
                if key not in TINY_MODELS:
                    problems.append(f"node {node['id']} ({node['type']}) widget {name!r} names the model "
                                    f"{value!r}: add {key!r} to TINY_MODELS in tests/support/frontend_harness.py")
                    continue
                node["widgets_values"][i] = TINY_MODELS[key](work / "models")
    return workflow, problems


# --- the browser --------------------------------------------------------------------------------
def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)


#: Console errors the app logs in any fresh ComfyUI 0.3.75 + frontend 1.32.9 under test, none of
#: them about this pack: the frontend's lookups in the Comfy registry (blocked by the
#: Content-Security-Policy that ``--disable-api-nodes`` sets: tests never leave 127.0.0.1), and a
#: frontend 1.32.9 start-up bug (a setting changed before its definition is registered).
#: Failed HTTP requests are checked by URL instead (:data:`EXPECTED_HTTP_ERRORS`).
KNOWN_CONSOLE_ERRORS = (
    re.compile(r"^Failed to load resource: the server responded with a status of"),
    re.compile(r"^Connecting to 'https://api\.comfy\.org/.*Content Security Policy", re.S),
    re.compile(r"^TypeError: Cannot read properties of undefined \(reading 'id'\)\n\s+at onChange "),
    # frontend 1.45.21 (ComfyUI 0.28.2's pin) reads its graph once before creating it, with no pack loaded too
    re.compile(r"^ComfyApp graph accessed before initialization$"),
    # frontend 1.45.21's template browser asks for the sizes of the models of ComfyUI 0.28.2's own
    # blueprints (blueprints/*.json: Comfy-Org's files on huggingface.co), blocked by the same policy
    re.compile(r"^(Connecting to '|Fetch API cannot load )https://huggingface\.co/Comfy-Org/.*Content Security Policy", re.S),
)
#: Requests a fresh ComfyUI user gets 404 for (no custom CSS, no saved template settings).
EXPECTED_HTTP_ERRORS = (
    re.compile(r"/(api/userdata/)?user\.css$"),
    re.compile(r"/api/userdata/comfy\.templates\.json$"),
)
#: Settings of the test user: no first-run template dialog, no release notes pop-up.
USER_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Release.Version": "9.9.9"}


def prepare_user(work: Path) -> None:
    """ComfyUI's default user with its folders and :data:`USER_SETTINGS`."""
    user = work / "user" / "default"
    for sub in ("workflows", "subgraphs"):
        (user / sub).mkdir(parents=True, exist_ok=True)
    (user / "comfy.settings.json").write_text(json.dumps(USER_SETTINGS))


class ComfyApp:
    """One page of the ComfyUI app; records console errors and failed requests."""

    def __init__(self, browser, server: ComfyServer, viewport: Optional[dict] = None):
        self.server = server
        self.context = browser.new_context(viewport=viewport or VIEWPORT)
        self.page = self.context.new_page()
        self.console_errors: List[str] = []
        self.http_errors: List[str] = []
        self.responses: List[Tuple[int, str]] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(f"uncaught: {e}"))
        self.page.on("response", self._record_response)
        # Nothing outside 127.0.0.1 is reachable in tests: refuse it at once instead of timing out.
        self.page.route(re.compile(r"^(?!https?://127\.0\.0\.1[:/]).*"), lambda route: route.abort())
        # The core templates package (comfyui-workflow-templates) is not installed: an empty index
        # (frontend 1.45 also reads its search options and logo index there).
        self.page.route(re.compile(r"/templates/index(\.\w+)?\.json$"), lambda route: route.fulfill(json=[]))
        self.page.route(re.compile(r"/templates/(fuse_options|index_logo)\.json$"), lambda route: route.fulfill(json={}))

    def _record_response(self, response) -> None:
        self.responses.append((response.status, response.url))
        if response.status >= 400:
            self.http_errors.append(f"{response.status} {response.url}")

    def unexpected_errors(self) -> List[str]:
        """Console errors and failed requests not in the known lists; clears both records."""
        errors = [e for e in self.console_errors if not any(p.search(e) for p in KNOWN_CONSOLE_ERRORS)]
        errors += [f"HTTP {e}" for e in self.http_errors if not any(p.search(e) for p in EXPECTED_HTTP_ERRORS)]
        self.console_errors.clear()
        self.http_errors.clear()
        return errors

    def open(self, timeout_ms: int = 60000) -> None:
        self.page.goto(self.server.url + "/", wait_until="load", timeout=timeout_ms)
        self.page.wait_for_function("() => window.app?.graph && window.app.canvas && window.app.extensionManager",
                                    timeout=timeout_ms)
        self.page.wait_for_load_state("networkidle", timeout=timeout_ms)

    def drop_workflow(self, workflow: dict, filename: str, timeout_ms: int = 20000) -> None:
        """Drop ``workflow`` as a JSON file on the canvas, as a drag from a file manager does."""
        self.page.evaluate("""([text, filename]) => {
            const data = new DataTransfer();
            data.items.add(new File([text], filename, {type: 'application/json'}));
            const canvas = document.querySelector('#graph-canvas');
            for (const type of ['dragenter', 'dragover', 'drop'])
                canvas.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));
        }""", [json.dumps(workflow), filename])
        ids = sorted(n["id"] for n in workflow["nodes"])
        self.wait_for_graph(ids, timeout_ms)
        self.page.wait_for_load_state("networkidle", timeout=timeout_ms)

    def wait_for_graph(self, ids: List[int], timeout_ms: int = 20000) -> None:
        """Wait until the canvas holds exactly the nodes ``ids`` (frontends >= 1.4x keep ids as strings)."""
        self.page.wait_for_function("ids => JSON.stringify(app.graph.nodes.map(n => Number(n.id)).sort((a, b) => a - b)) "
                                    "=== JSON.stringify(ids)", arg=sorted(ids), timeout=timeout_ms)

    def set_setting(self, key: str, value) -> None:
        self.page.evaluate("([k, v]) => app.extensionManager.setting.set(k, v)", [key, value])

    def open_template(self, module: str, name: str, ids: List[int], timeout_ms: int = 20000) -> None:
        """Open workflow ``name`` from the template browser's ``module`` category, as a user does."""
        self.page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        self.page.locator('[role=dialog]').get_by_text(module, exact=True).first.click(timeout=timeout_ms)
        card = self.page.locator(f'[data-testid="template-workflow-{name}"]')
        card.scroll_into_view_if_needed(timeout=timeout_ms)
        card.click(timeout=timeout_ms)
        self.wait_for_graph(ids, timeout_ms)
        self.page.wait_for_load_state("networkidle", timeout=timeout_ms)
        self.page.wait_for_timeout(500)  # the camera is set on the next frame

    def vue_nodes(self) -> Dict[str, dict]:
        """Vue nodes ("Nodes 2.0") on screen: per node id, its DOM box [x0, y0, x1, y1] and the texts
        cut by their box (shown with an ellipsis: wider than the element that clips them)."""
        return self.page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('[data-node-id]')].map(el => {
            const r = el.getBoundingClientRect();
            const cut = [...el.querySelectorAll('*')].filter(e => e.children.length === 0 && e.innerText?.trim()
                && e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflow !== 'visible')
                .map(e => e.innerText.trim());
            return [el.dataset.nodeId, {box: [r.left, r.top, r.right, r.bottom], cut}];
        }))""")

    def missing_models_panel(self, timeout_ms: int = 10000) -> str:
        """Open the frontend's missing-models panel from its error toast ("Show missing models" in 1.45,
        "View details" in 1.58) and return the page's text with it open ("" when no toast offers it)."""
        button = self.page.get_by_role("button", name=re.compile(r"^(Show missing models|View details)$"))
        try:
            button.first.wait_for(timeout=timeout_ms)
        except Exception:
            return ""
        button.first.click()
        self.page.get_by_text(re.compile("Missing Models", re.I)).first.wait_for(timeout=timeout_ms)
        text = self.page.inner_text("body")
        self.page.get_by_role("button", name="Toggle properties panel").click()  # closed again
        self.page.wait_for_timeout(300)
        return text

    def dialogs(self) -> List[str]:
        """Texts of the dialogs on screen (missing nodes, missing models, errors, ...)."""
        return self.page.evaluate("""() => [...document.querySelectorAll('.p-dialog, [role=dialog]')]
            .filter(d => d.offsetParent !== null || d.getClientRects().length)
            .map(d => d.innerText.trim().slice(0, 500))""")

    def graph_view(self) -> dict:
        """The canvas after loading: zoom, whether litegraph draws low-quality boxes, node boxes and
        title bars on the canvas, and the canvas's place on the page (``canvas_box``)."""
        return self.page.evaluate("""() => {
            const c = app.canvas, ds = c.ds, el = c.canvas, T = LiteGraph.NODE_TITLE_HEIGHT;
            const screen = ([x, y]) => [(x + ds.offset[0]) * ds.scale, (y + ds.offset[1]) * ds.scale];
            const box = n => {
                const [x, y] = screen([n.pos[0], n.pos[1] - T]);
                return [x, y, x + n.size[0] * ds.scale, y + (n.size[1] + T) * ds.scale];
            };
            const r = el.getBoundingClientRect();
            return {scale: ds.scale, low_quality: !!c.low_quality, width: el.clientWidth, height: el.clientHeight,
                    canvas_box: [r.left, r.top, r.right, r.bottom], title_height: T * ds.scale,
                    nodes: Object.fromEntries(app.graph.nodes.map(n => [n.id, {type: n.type, title: n.title, box: box(n),
                        errors: !!n.has_errors}]))};
        }""")

    def run(self, timeout_ms: int = 60000) -> str:
        """Press Run; return the prompt id ComfyUI answered with."""
        button = self.page.get_by_test_id("queue-button")  # frontend 1.45: "Run" also names its mode menu
        if not button.count():
            button = self.page.get_by_role("button", name="Run", exact=True)
        with self.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST",
                                       timeout=timeout_ms) as response:
            button.click()
        body = response.value.json()
        if response.value.status != 200:
            raise AssertionError(f"ComfyUI refused the prompt: {json.dumps(body)[:3000]}")
        return body["prompt_id"]

    def wait_for_history(self, prompt_id: str, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.server.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout_s}s:\n{self.server.log()[-4000:]}")

    def node_images(self, node_id: int, count: int, timeout_ms: int = 20000) -> List[dict]:
        """The images the frontend shows on a node once they are loaded (src, width, height)."""
        self.page.wait_for_function("""([id, count]) => {
            const imgs = app.graph.getNodeById(id)?.imgs || [];
            return imgs.length >= count && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""", arg=[node_id, count], timeout=timeout_ms)
        return self.page.evaluate("""id => app.graph.getNodeById(id).imgs.map(i =>
            ({src: i.src, width: i.naturalWidth, height: i.naturalHeight}))""", node_id)

    def template_cards(self, module: str, names: List[str], timeout_ms: int = 20000,
                       expect_text: Optional[Dict[str, str]] = None) -> Dict[str, dict]:
        """Open the template browser on ``module``'s category; per template: the card's text lines
        (title, description), those of them cut short, and its thumbnail's size (0 when none loaded). ``expect_text``: per template,
        a line the card should show once the page has drawn it: waited for (up to ``timeout_ms``), not
        required."""
        self.page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        self.page.locator('[role=dialog]').get_by_text(module, exact=True).first.click(timeout=timeout_ms)
        cards = {}
        for name in names:
            card = self.page.locator(f'[data-testid="template-workflow-{name}"]')
            card.wait_for(timeout=timeout_ms)
            if name in (expect_text or {}):
                try:
                    card.get_by_text(expect_text[name], exact=True).first.wait_for(timeout=timeout_ms)
                except Exception:  # the caller's assertion says what the card shows instead
                    pass
            img = card.locator("img").first
            img.wait_for(timeout=timeout_ms)
            self.page.wait_for_function("img => img.complete", arg=img.element_handle(), timeout=timeout_ms)
            cards[name] = {
                "text": [line for line in card.inner_text().splitlines() if line.strip()],
                # texts cut short by their box (an ellipsis: line-clamped, or wider than the box)
                "cut": card.evaluate("""c => [...c.querySelectorAll('*')].filter(e => e.children.length === 0
                    && e.innerText?.trim() && (e.scrollHeight > e.clientHeight + 1 || e.scrollWidth > e.clientWidth + 1))
                    .map(e => e.innerText.trim())"""),
                "thumbnail": img.evaluate("i => ({width: i.naturalWidth, height: i.naturalHeight})"),
            }
        return cards

    def close_dialogs(self) -> None:
        """Close what dialogs show (Escape, then their close buttons), as a user does."""
        self.page.keyboard.press("Escape")
        self.page.wait_for_timeout(200)
        for _ in range(3):
            if not self.dialogs():
                return
            self.page.evaluate("""() => [...document.querySelectorAll('.p-dialog, [role=dialog]')]
                .flatMap(d => [...d.querySelectorAll('.p-dialog-close-button, button[aria-label=Close], button[aria-label=close]')])
                .forEach(b => b.click())""")
            self.page.wait_for_timeout(300)

    def screenshot(self, path) -> None:
        self.page.screenshot(path=str(path))


# --- reading the screen ---------------------------------------------------------------------------
def overlaps(boxes: Dict[str, List[float]], tolerance: float = 1.0) -> List[Tuple[str, str, float]]:
    """Pairs of boxes [x0, y0, x1, y1] that overlap by more than ``tolerance`` px each way, with the
    overlap's height."""
    found, ids = [], sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
            w, h = min(ax1, bx1) - max(ax0, bx0), min(ay1, by1) - max(ay0, by0)
            if w > tolerance and h > tolerance:
                found.append((a, b, round(h, 1)))
    return found


def text_drawn(screenshot: np.ndarray, box: List[float], min_fraction: float = 0.01) -> bool:
    """Whether a region of a screenshot (``box`` [x0, y0, x1, y1] in px) holds drawn text: enough
    pixels far from the region's own background (its median colour). A node drawn as a blank box
    (litegraph's low-quality mode) has a flat title bar."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    region = screenshot[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0), :3].astype(np.int16)
    if region.size == 0:
        return False
    far = np.abs(region - np.median(region.reshape(-1, 3), axis=0)).sum(-1) > 90
    return far.mean() >= min_fraction


# --- templates: UI files and cards for ComfyUI's template browser ---------------------------------
#: The host whose /object_info the UI files are written from: the newest, which has every node the
#: workflows use (SAM 3 and the video nodes); the browser test loads them in both hosts' frontends.
TEMPLATE_HOST = "0.28.2"


def write_templates(workflows_dir: Path = WORKFLOWS) -> List[Path]:
    """Regenerate each ``workflows/<name>.json`` from ``workflows/api/<name>.json`` (tools/api_to_ui.py,
    with the test ComfyUI's object_info) and its template card ``workflows/<name>.jpg``
    (tools/template_cards.py)."""
    import api_to_ui
    import template_cards

    written = []
    with tempfile.TemporaryDirectory(prefix="iconmatting-templates-") as tmp, \
            ComfyServer(Path(tmp), host=comfy_host(TEMPLATE_HOST)) as server:
        object_info = server.get("/object_info")
        for api_path in sorted((workflows_dir / "api").glob("*.json")):
            ui_path = workflows_dir / api_path.name
            api_to_ui.write(api_to_ui.convert(json.loads(api_path.read_text()), object_info), ui_path)
            written.append(ui_path)
    return written + template_cards.write_cards(workflows_dir)


if __name__ == "__main__":
    if sys.argv[1:] != ["templates"]:
        sys.exit("usage: python tests/support/frontend_harness.py templates")
    for path in write_templates():
        print(path.relative_to(ROOT))
