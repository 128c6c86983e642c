"""How the suite is split over processes (pytest-xdist, ``-n 2 --dist loadscope`` in pyproject.toml; the hooks are
in tests/conftest.py): which tests one process runs whole, and what a test shares that makes it so."""
import re
from typing import Optional

from comfy_harness import HOSTS

#: Which folder's work units start first: the few long ones (a ComfyUI boot per host, a server per frontend, the
#: subprocess jobs) before the many short unit modules, which then fill the gaps; units keep their order within.
FOLDER_ORDER = ("tests/host/", "tests/browser/", "tests/jobs/", "tests/unit/")
_HOST_ID = re.compile(r"\bcomfy(\d+(?:\.\d+)+)\b(?!-frontend)")
_APP_ID = re.compile(r"\bcomfy\d+(?:\.\d+)+-frontend(?:pinned|\d+(?:\.\d+)*)")


def work_unit(nodeid: str) -> str:
    """The unit of work one process runs whole, from a test's id (all the controller of a split run sees): a
    host test's ComfyUI version (``[comfy0.3.75]``: one boot per host runs every host job), a browser test's
    frontend configuration (``comfy0.28.2-frontendpinned``: one server each), else the test's module (its module
    fixtures set up once). ``pytest_collection_modifyitems`` in tests/conftest.py checks it against what the tests share."""
    module, _, rest = nodeid.partition("::")
    params = rest[rest.find("["):] if "[" in rest else ""
    app, host = _APP_ID.search(params), _HOST_ID.search(params)
    if module.startswith("tests/browser/") and app:
        return app.group(0)
    if module.startswith("tests/host/") and host:
        return f"comfy{host.group(1)}"
    return module


def shared_setup(item) -> Optional[str]:
    """What a test shares with others in a session fixture that one process must set up once, from its fixtures:
    ``comfy<version>`` (the host jobs' boot, ``comfy_jobs``), the frontend configuration (``app``,
    ``newest_app``), or None."""
    from frontend_harness import config_id

    params = getattr(getattr(item, "callspec", None), "params", {})
    if "comfy_jobs" in item.fixturenames:
        versions = [v for v in (str(getattr(p, "version", p)) for p in params.values()) if v in HOSTS]
        return f"comfy{versions[0]}" if versions else "comfy"
    for fixture in ("app", "newest_app"):
        if fixture in item.fixturenames and params.get(fixture) is not None:
            return config_id(params[fixture])
    return None


def folder_rank(item) -> int:
    """Where a test's folder comes in :data:`FOLDER_ORDER` (a folder not listed: last)."""
    return next((i for i, folder in enumerate(FOLDER_ORDER) if item.nodeid.startswith(folder)), len(FOLDER_ORDER))
