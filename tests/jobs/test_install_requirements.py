"""Installing the pack never changes a package of the user's ComfyUI.

For each supported host, a virtual environment pinned like a user's ComfyUI of that host's era
(``tests/host_envs/comfyui-<version>.txt``: the host's requirements resolved as of its release date) is
built once into the test cache; then ``pip install -r requirements.txt`` -- what the README and
ComfyUI-Manager run -- is asked for a dry-run report, which must up- or downgrade nothing, and is run for
real, after which the environment must be identical and ComfyUI's own imports (transformers and its
hub, tokenizers, safetensors, numpy, Pillow, einops) must still work. Before this rule,
``diffusers>=0.27`` pulled diffusers 0.42 and huggingface-hub 1.x/2.x into a 0.3.75-era environment
(transformers 4.57 needs huggingface-hub < 1.0), and ComfyUI no longer started.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from comfy_harness import HOSTS, cache_dir, run_or_skip_offline

ROOT = Path(__file__).resolve().parents[2]
HOST_ENVS = ROOT / "tests" / "host_envs"
pytestmark = pytest.mark.slow  # builds a venv per host and installs into it: ~20-45 s per test
#: What ComfyUI imports at start-up from the packages the pack's requirements could touch.
HOST_IMPORTS = ("import numpy, PIL.Image, safetensors.numpy, einops, tokenizers, huggingface_hub, yaml\n"
                "import transformers\n"
                "from transformers import CLIPTextModel, CLIPTokenizer, T5TokenizerFast\n")


def _run(cmd, what, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    proc = run_or_skip_offline(cmd, f"no network: cannot {what}", env=env, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def _installed(python: Path) -> dict:
    proc = _run([python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"], "list packages")
    return {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in json.loads(proc.stdout)}


def _host_env(version: str) -> Path:
    """The Python of a venv holding ``host_envs/comfyui-<version>.txt`` exactly (no torch: never needed by
    the pack's requirements; installed with --no-deps, so nothing else comes in), built once per pin file."""
    pins = HOST_ENVS / f"comfyui-{version}.txt"
    digest = hashlib.sha256(pins.read_bytes()).hexdigest()[:12]
    final = cache_dir() / f"host-env-{version}-{digest}"
    python = final / "bin" / "python"
    if (final / "COMPLETE").is_file():
        return python
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", final], f"create a venv for ComfyUI {version}")
    install = ["install", "--quiet", "--no-deps", "--only-binary", ":all:", "-r", pins]
    uv = Path(sys.executable).with_name("uv")  # requirements-dev.txt: ten times faster than pip here
    if uv.is_file():
        # --system-certs: the platform certificate store, as pip uses (a proxy's own CA included)
        _run([uv, "pip", *install, "--system-certs", "--python", python], f"install ComfyUI {version}'s pinned packages ({pins.name})")
    else:
        _run([python, "-m", "pip", *install, "--disable-pip-version-check"],
             f"install ComfyUI {version}'s pinned packages ({pins.name})")
    (final / "COMPLETE").write_text(pins.name + "\n")
    return python


def _changes(python: Path, before: dict, report: dict) -> list:
    """``name old -> new`` for each installed package the pip report would replace."""
    changes = []
    for item in report.get("install", []):
        name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
        if name in before and before[name] != item["metadata"]["version"]:
            changes.append(f"{name} {before[name]} -> {item['metadata']['version']}")
    return changes


@pytest.fixture(scope="module", params=HOSTS, ids=[f"comfy{v}" for v in HOSTS])
def host_env(request):
    return request.param, _host_env(request.param)


def test_the_host_environments_are_pinned_like_the_users(host_env):
    version, python = host_env
    installed = _installed(python)
    pins = dict(line.split("==") for line in (HOST_ENVS / f"comfyui-{version}.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}.items() <= installed.items()
    hub = {"0.3.75": "0.36.0", "0.28.2": "1.24.0"}[version]  # what that era's transformers accepts
    assert installed["huggingface-hub"] == hub and "diffusers" not in installed


def test_installing_the_requirements_changes_no_package_and_the_host_still_imports(host_env, tmp_path):
    version, python = host_env
    before = _installed(python)
    report_path = tmp_path / "report.json"
    _run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
          "--report", report_path, "-r", ROOT / "requirements.txt"], "resolve requirements.txt")
    report = json.loads(report_path.read_text())
    changes = _changes(python, before, report)
    assert changes == [], f"pip install -r requirements.txt would change ComfyUI {version}'s packages: {changes}"
    new = sorted(item["metadata"]["name"] for item in report.get("install", []))
    assert new == [], f"requirements.txt asks for packages ComfyUI {version} does not have: {new}"

    # The real install (nothing to change, so the cached environment stays as pinned), then ComfyUI's imports.
    _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", ROOT / "requirements.txt"],
         "pip install -r requirements.txt")
    assert _installed(python) == before
    with tempfile.TemporaryDirectory() as cwd:
        _run([python, "-c", HOST_IMPORTS], "import ComfyUI's packages",
             cwd=cwd)


def test_the_command_line_needs_live_outside_requirements_txt():
    """diffusers (what broke ComfyUI 0.3.75-era installs) is the command line's, in requirements-cli.txt and
    the [cli] extra, never in requirements.txt."""
    nodes = (ROOT / "requirements.txt").read_text()
    assert not re.search(r"^\s*(diffusers|huggingface[-_]hub|transformers|torch)\b", nodes, re.M | re.I)
    assert re.search(r"^diffusers>=", (ROOT / "requirements-cli.txt").read_text(), re.M)
