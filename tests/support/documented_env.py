"""The documented command-line environment for the tests' own Python subprocesses (the README's commands, the
command line started as a process, torchrun's ranks, a local Ray's workers).

The test venv holds packages that ``requirements-cli.txt`` and the extras do not (ComfyUI's and the tests' own):
:data:`HIDDEN` are made unimportable in those processes by ``readme_site/sitecustomize.py`` (first on their
``PYTHONPATH``), so that they import as a user's do -- and do not pay for them: diffusers imports transformers and
scipy whenever they are installed, ~2.7 s of CPU per process on this project's 2-core machine.
tests/jobs/test_readme_commands.py checks that no documented requirement needs them.
"""
import os
from pathlib import Path
from typing import Mapping, Optional

SITE = Path(__file__).resolve().parent / "readme_site"
HIDDEN = ("transformers", "scipy")


def documented_env(env: Optional[Mapping[str, str]] = None) -> dict:
    """``env`` (default: this process's environment) with :data:`HIDDEN` hidden from Python processes started with it."""
    out = dict(os.environ if env is None else env)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), out.get("PYTHONPATH")]))
    out["ICONMATTING_HIDDEN_PACKAGES"] = ",".join(HIDDEN)
    return out
