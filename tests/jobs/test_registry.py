"""Comfy Registry readiness: what ``comfy node pack``/``publish`` would upload, checked with the Registry's tools.

* The archive (comfy-cli's own ``zip_files``: git-tracked files minus ``.comfyignore``) holds the pack only.
* ``comfy node validate`` passes on pyproject.toml (and fails on one without a version: the check can fail).
* ``comfy-import-guard check`` on the archive's files, against a git checkout of each tested ComfyUI built
  from the test host's tree: SAFE on 0.28.2; on 0.3.75 nothing but names the pack reads behind feature
  detection (``getattr`` with a fallback, found in the source independently of the guard).
* pyproject.toml's Registry fields: requires-comfyui = the oldest tested host, Icon 400x400, Banner 21:9.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from comfy_harness import HOSTS

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PACK_NAME = "comfyui-iconmatting"
#: The top level of the published archive: the node pack, its launcher, docs and the requirements the README names.
PUBLISHED = {"__init__.py", "nodes", "iconmatting_core", "web", "workflows", "iconmatting.py", "README.md", "LICENSE",
             "pyproject.toml", "requirements.txt", "requirements-cli.txt", "requirements-ray.txt"}


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed (requirements-dev.txt)")
    return path


def _run(cmd, cwd, check=True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """The published file set, unpacked as ComfyUI would hold it: custom_nodes/comfyui-iconmatting/."""
    _tool("comfy")
    tmp = tmp_path_factory.mktemp("registry")
    _run([sys.executable, "-c", f"from comfy_cli.file_utils import zip_files; zip_files({str(tmp / 'node.zip')!r})"], ROOT)
    pack = tmp / "install" / "custom_nodes" / PACK_NAME
    pack.mkdir(parents=True)
    with zipfile.ZipFile(tmp / "node.zip") as zf:
        zf.extractall(pack)
    return pack


def test_the_archive_holds_the_pack_only(archive):
    top = {p.name for p in archive.iterdir()}
    assert top == PUBLISHED, f"unexpected {sorted(top - PUBLISHED)}, missing {sorted(PUBLISHED - top)}"
    assert not list(archive.rglob("test_*.py")) and not list(archive.rglob("*.safetensors"))


def test_comfy_node_validate_passes_and_can_fail(tmp_path):
    comfy = _tool("comfy")
    ok = _run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], ROOT)
    output = ok.stdout + ok.stderr  # rich prints to either
    assert "All validation checks passed" in output and "Security warnings" not in output, output
    broken = tomllib.loads((ROOT / "pyproject.toml").read_text())
    text = (ROOT / "pyproject.toml").read_text().replace('[tool.comfy.version]\npath = "iconmatting_core/_version.py"', "")
    assert "dynamic" in broken["project"] and text != (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text)  # no version anywhere
    bad = _run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], tmp_path, check=False)
    assert bad.returncode != 0 and "version" in (bad.stdout + bad.stderr).lower(), bad.stdout + bad.stderr


def _git_checkout(tree: Path, dest: Path) -> Path:
    """A one-commit git repository of ComfyUI's tree (what comfy-import-guard reads), at dest/ComfyUI."""
    repo = dest / "ComfyUI"
    shutil.copytree(tree, repo, ignore=shutil.ignore_patterns("__pycache__", "custom_nodes", "models", "output",
                                                               "input", "temp", "user"))
    git = ["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost", "-c", "init.defaultBranch=master"]
    _run([*git, "init", "-q"], repo)
    _run([*git, "add", "-A"], repo)
    _run([*git, "commit", "-q", "-m", "ComfyUI test host"], repo)
    return dest


def _feature_detected(pack: Path, ref: dict) -> bool:
    """Whether ``ref`` (a guard finding) is read as ``getattr(module, "Name", fallback)`` at its line."""
    tree = ast.parse((pack / ref["file"]).read_text())
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "getattr" and len(n.args) == 3
               and isinstance(n.args[1], ast.Constant) and n.args[1].value == ref["symbol"] and n.lineno == ref["line"]
               for n in ast.walk(tree))


def test_comfy_import_guard_on_the_published_files(archive, comfy_host, tmp_path):
    guard = _tool("comfy-import-guard")
    cache = _git_checkout(comfy_host.root, tmp_path / "guard-cache")
    proc = _run([guard, "--offline", "--quiet", "check", "--cache-dir", cache, "--comfy-dir", archive.parents[1],
                 "--target", "HEAD", "--no-update", "--json"], tmp_path, check=False)
    report = json.loads(proc.stdout)
    (pack,) = report["packs"]
    assert pack["pack"] == PACK_NAME and pack["python_files"] > 20 and pack["references"] > 0
    assert not pack["unparseable"] and not pack["signature_drift"] and not pack["vendored_comfy"]
    if comfy_host.version == HOSTS[-1]:
        assert pack["verdict"] == "SAFE" and not pack["breaking"] and not pack["soft"], pack
    else:  # older hosts: only names read behind feature detection may be missing
        unguarded = [ref for ref in pack["breaking"] + pack["soft"] if not _feature_detected(archive, ref)]
        assert unguarded == [], unguarded


def test_pyproject_has_the_registry_fields():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = config["tool"]["comfy"]
    assert comfy["requires-comfyui"] == f">={HOSTS[0]}"  # the oldest host the tests run the pack on
    assert config["project"]["urls"]["Repository"].startswith("https://")
    for key, name, check in (("Icon", "icon.png", lambda w, h: (w, h) == (400, 400)),
                             ("Banner", "banner.png", lambda w, h: abs(w / h - 21 / 9) < 0.01)):
        assert comfy[key].endswith(f"/assets/{name}")
        path = ROOT / "assets" / name
        assert path.stat().st_size < 400_000
        with Image.open(path) as im:
            assert check(*im.size), (name, im.size)
