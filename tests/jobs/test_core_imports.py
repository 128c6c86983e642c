"""The library and its command line import without the optional packages (Ray, PyAV), in a fresh process."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_core_imports_without_ray_or_av():
    code = ("import sys; sys.modules['ray'] = None; sys.modules['av'] = None; "
            "import iconmatting_core, iconmatting_core.__main__, iconmatting_core.job.ray_engine, iconmatting_core.video, "
            "iconmatting_core.context_file, iconmatting_core.hub; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
