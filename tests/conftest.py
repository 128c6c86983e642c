import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from comfy_harness import HOSTS  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

#: CI=true: a test that cannot run (a missing package, tool, fixture or network) fails instead of skipping.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
CI_SKIP_PREFIX = "skipped under CI=true, where every test must run: "


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skip_in_ci(report) -> None:
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = CI_SKIP_PREFIX + _skip_reason(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The one place of the rule "CI cannot pass by skipping": under CI=true a skipped test (a
    ``pytest.skip``/``importorskip`` in the test or in a fixture, e.g. a ComfyUI host that cannot be
    prepared) is reported as failed, with its skip reason."""
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (``pytest.importorskip`` at module level):
    under CI=true it is a collection error."""
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.fixture(scope="session", params=HOSTS, ids=[f"comfy{v}" for v in HOSTS])
def comfy_host(request):
    """A ComfyUI host (``comfy_harness.ComfyHost``), once per version in ``comfy_harness.HOSTS``: every
    test using it (directly or through a fixture) runs on each host. Skips with a one-line reason when
    the host cannot be prepared here (a failure under CI=true)."""
    from comfy_harness import comfy_host as prepare

    return prepare(request.param)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny SD diffusers folder + head weights, written once per session."""
    from tiny_models import save_tiny_head, save_tiny_sd_folder

    d = tmp_path_factory.mktemp("tiny_models")
    save_tiny_sd_folder(d / "sd", seed=0)
    save_tiny_head(d / "head.safetensors", seed=0)
    return d


@pytest.fixture(scope="session")
def pipe(tiny_dir):
    from iconmatting_core.pipeline import IconMattingPipeline, load_model

    return IconMattingPipeline(load_model(tiny_dir / "head.safetensors", tiny_dir / "sd", "fp32"))


def make_reference(h=100, w=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(h, w, 3, generator=g)
    mask = torch.zeros(h, w)
    mask[h // 5 : h * 4 // 5, w // 5 : w * 4 // 5] = 1
    return image, mask


def make_targets(n=3, h=90, w=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def save_reference_and_targets(tmp_path, n=2, folder="targets"):
    """ref.png + mask.png in tmp_path and n target PNGs in tmp_path/folder (returned), for command-line tests."""
    import numpy as np
    from PIL import Image

    def save(t, path):
        Image.fromarray((t.numpy() * 255).astype(np.uint8)).save(path)

    image, mask = make_reference()
    save(image, tmp_path / "ref.png")
    save(mask, tmp_path / "mask.png")
    targets = tmp_path / folder
    targets.mkdir()
    for i, t in enumerate(make_targets(n)):
        save(t, targets / f"t{i}.png")
    return targets
