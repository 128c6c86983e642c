"""The library and the ``iconmatting`` command are pip-installable; the ComfyUI launcher still works.

``pip wheel`` builds the project (from a copy holding only what the wheel is made of), the wheel goes into
a fresh venv, and the installed ``iconmatting`` command prints its help and mattes a tiny job with
random-weight models. The fresh venv reuses this environment's packages (torch, diffusers, av, ray) through
a ``.pth`` file instead of downloading them again; that its ``[video,ray]`` dependencies are all met is
checked by pip itself, offline. ``iconmatting.py`` (no ``sys.path`` shim) runs from a ComfyUI folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sample_inputs import save_reference_and_targets


ROOT = Path(__file__).resolve().parents[2]
WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "iconmatting_core")


def _run(cmd, cwd, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv folder, wheel path): the built wheel installed in a fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in WHEEL_SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    shutil.rmtree(src / "iconmatting_core" / "__pycache__", ignore_errors=True)
    build = ["--no-build-isolation"] if _has("setuptools") else []  # offline when the venv has setuptools
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *build, "-w", tmp / "dist", src], tmp)
    (wheel,) = (tmp / "dist").glob("*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    # this environment's packages (torch, diffusers, ...) after the venv's own, never the repository
    (site / "reuse_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], tmp)
    return venv, wheel


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_the_wheel_holds_the_library_and_declares_the_command_and_extras(installed):
    import zipfile

    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {n.split("/")[0] for n in names} == {"iconmatting_core", dist_info}
    assert "iconmatting_core/sd_configs/unet_config.json" in names  # package data
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "iconmatting_core").rglob("*.py")}
    assert sources - set(names) == set()  # every module, subpackages (job/, eval/, training/) included
    # no test helpers: tests/support/tiny_models.py, ldm_keys.py, tiny_sd2_checkpoint.py (the package's testing.py of old)
    assert not [n for n in names if re.search(r"(^|/)(testing|tiny_\w+|ldm_keys)\.py$", n)], names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "iconmatting = iconmatting_core.__main__:main" in entry
    version = re.search(r'^__version__ = "(.+)"$', (ROOT / "iconmatting_core" / "_version.py").read_text(), re.M).group(1)
    assert f"\nVersion: {version}\n" in meta and f"-{version}-" in wheel.name  # the one version source
    assert {"cli", "video", "ray"} <= set(re.findall(r"^Provides-Extra: (\S+)$", meta, re.M))
    base = re.findall(r"^Requires-Dist: ([^;\n]+)$", meta, re.M)  # without an extra: what the nodes need
    assert not any(re.match(r"(diffusers|torch|huggingface)", r, re.I) for r in base), base


def test_the_video_and_ray_extras_are_satisfied_offline(installed, tmp_path):
    venv, wheel = installed
    report = tmp_path / "report.json"
    _run([venv / "bin" / "python", "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--report", report,
          f"{wheel}[video,ray]"], tmp_path)
    to_install = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert to_install == [], f"pip would still install {to_install}"


@pytest.mark.slow  # more than ~20 s on its own
def test_the_installed_command_prints_help_and_mattes_a_tiny_job(installed, tmp_path, tiny_dir):
    venv, _ = installed
    command = venv / "bin" / "iconmatting"
    origin = _run([venv / "bin" / "python", "-c", "import iconmatting_core; print(iconmatting_core.__file__)"], tmp_path)
    assert Path(origin.stdout.strip()).is_relative_to(venv)  # the installed copy, not the repository
    help_text = _run([command, "--help"], tmp_path).stdout
    assert all(word in help_text for word in ("encode", "matte", "convert"))

    targets = save_reference_and_targets(tmp_path, n=2)
    out = tmp_path / "out"
    _run([command, "matte", "--reference", tmp_path / "ref.png", "--mask", tmp_path / "mask.png", "--targets", targets,
          "--out", out, "--matting-weights", tiny_dir / "head.safetensors", "--sd", tiny_dir / "sd", "--device", "cpu"],
         tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["iconmatting-job.jsonl", "t0_alpha.png", "t0_rgba.png", "t1_alpha.png",
                                                  "t1_rgba.png"]


def test_the_launcher_runs_from_a_comfyui_folder(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "custom_nodes" / "comfyui-iconmatting").symlink_to(ROOT, target_is_directory=True)
    proc = _run([sys.executable, "custom_nodes/comfyui-iconmatting/iconmatting.py", "--help"], comfy)
    assert "matte" in proc.stdout and "convert" in proc.stdout
    assert "sys.path" not in (ROOT / "iconmatting.py").read_text().split('"""', 2)[2]  # no shim needed
