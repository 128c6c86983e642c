import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

# Tests run many small torch ops on two shared cores. OpenMP threads that spin while they wait for work take the
# cores from whatever else runs (the ComfyUI, CLI or Ray process a test waits for, or other jobs on the machine):
# a tiny UNet pass measured 25x slower so. Waiting threads sleep instead, here and in every process the tests start
# (they inherit the environment). Set before torch loads its OpenMP runtime, which reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "tests" / "support"  # the tests' helpers (tiny models, sample inputs, the ComfyUI and browser harnesses)
for _path in (ROOT, SUPPORT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from comfy_harness import HOSTS  # noqa: E402
from work_units import folder_rank, shared_setup, work_unit  # noqa: E402

# At most two threads, shared out among the processes of a split run (pytest-xdist sets the count), so that two
# processes on two cores do not each start two.
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

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


# --- the run split over processes (pytest-xdist, ``-n 2 --dist loadscope`` in pyproject.toml) -------------------
@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """In a process of a split run: every test that shares a session fixture must fall in that fixture's work
    unit (:func:`work_unit`, else the fixture is set up in each process: a usage error naming the test), and once
    every hook has ordered the tests, the folders go in ``work_units.FOLDER_ORDER`` (the order units are handed out)."""
    result = yield
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for item in items:
            shared = shared_setup(item)
            if shared is not None and work_unit(item.nodeid) != shared:
                raise pytest.UsageError(f"{item.nodeid} shares {shared!r} but its id puts it in work unit "
                                        f"{work_unit(item.nodeid)!r}: name the host or frontend in its id "
                                        "(tests/support/work_units.py)")
        items.sort(key=folder_rank)  # stable: pytest's order within a folder is kept
    return result


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` with this suite's work units (:func:`work_unit`) as the scopes, handed out in
    collection order."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedSetupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False
    return SharedSetupScheduling(config, log)


@pytest.fixture(scope="session", params=HOSTS, ids=[f"comfy{v}" for v in HOSTS])
def comfy_host(request):
    """A ComfyUI host (``comfy_harness.ComfyHost``), once per version in ``comfy_harness.HOSTS``: every
    test using it (directly or through a fixture) runs on each host. Skips with a one-line reason when
    the host cannot be prepared here (a failure under CI=true)."""
    from comfy_harness import comfy_host as prepare

    return prepare(request.param)


@pytest.fixture(scope="session")
def comfy_jobs(request):
    """The jobs of every selected test that uses a ``comfy_harness.host_job`` fixture, run in one ComfyUI
    boot per host (``comfy_harness.HostJobs``)."""
    from comfy_harness import HostJobs

    return HostJobs(request)


def pytest_sessionfinish(session):
    """A process of a split run hands its ComfyUI boots to the controller (:func:`pytest_testnodedown`)."""
    from comfy_harness import BOOTS

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["comfy_boots"] = [list(b) for b in BOOTS]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    from comfy_harness import BOOTS

    BOOTS.extend(tuple(b) for b in getattr(node, "workeroutput", {}).get("comfy_boots", []))


def pytest_terminal_summary(terminalreporter):
    """How many ComfyUI processes this run started (one per host for all host jobs, see comfy_harness), in all its
    processes."""
    from comfy_harness import BOOTS

    if BOOTS:
        per_host = ", ".join(f"{v}: {sum(1 for b in BOOTS if b[0] == v)}" for v in dict.fromkeys(b[0] for b in BOOTS))
        terminalreporter.write_line(f"ComfyUI boots: {len(BOOTS)} ({per_host}) for {sum(b[1] for b in BOOTS)} job(s), "
                                    f"{sum(b[2] for b in BOOTS):.0f} s")


@pytest.fixture()
def one_torch_thread():
    """Torch on one thread for the test: tiny convolutions run fastest so, and do not fight other tests for the
    cores (modules that want it: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny SD diffusers folder + head weights, written once per session."""
    from tiny_models import save_tiny_head, save_tiny_sd_folder

    d = tmp_path_factory.mktemp("tiny_models")
    save_tiny_sd_folder(d / "sd", seed=0)
    save_tiny_head(d / "head.safetensors", seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_comfy_checkpoint(tmp_path_factory):
    """The tiny SD 2.x single file ComfyUI's own loader reads (``tiny_sd2_checkpoint``), under the real SD 2.1
    file's name, written once per session: host jobs and browser tests link it into their models folders."""
    from tiny_sd2_checkpoint import save_tiny_comfy_sd2_checkpoint

    return save_tiny_comfy_sd2_checkpoint(tmp_path_factory.mktemp("tiny_comfy") / "v2-1_768-ema-pruned.safetensors")


@pytest.fixture(scope="session")
def pipe(tiny_dir):
    from iconmatting_core.pipeline import IconMattingPipeline, load_model

    return IconMattingPipeline(load_model(tiny_dir / "head.safetensors", tiny_dir / "sd", "fp32"))


# --- the node pack, as ComfyUI imports it, and what its nodes need around them (tests/unit/test_nodes*.py, ...) ---
PACK = "iconmatting_pack_under_test"


@pytest.fixture(scope="module")
def pack():
    """The pack imported as ComfyUI imports it (a package with relative imports), with ComfyUI's own
    modules; ComfyUI's tree goes at the end of sys.path so it shadows nothing of this repository."""
    from comfy_harness import comfy_root, stub_dir

    for path in (str(comfy_root()), str(stub_dir())):
        if path not in sys.path:
            sys.path.append(path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # CPU only, before comfy.model_management looks for a GPU
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    names = ["common", "model_nodes", "context_nodes", "target_nodes", "output_nodes", "iconmatting_nodes", "native_features"]
    ns = types.SimpleNamespace(**{n: importlib.import_module(f"{PACK}.nodes.{n}") for n in names})
    ns.core = types.SimpleNamespace(**{n: importlib.import_module(f"{PACK}.iconmatting_core.{n}")
                                       for n in ["pipeline", "context_file", "context", "matching", "postprocess"]})
    return ns


@pytest.fixture()
def input_dir(pack, tmp_path):
    import folder_paths

    saved = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    (tmp_path / "input").mkdir()
    yield tmp_path / "input"
    folder_paths.set_input_directory(saved)


@pytest.fixture()
def context_dir(pack, tmp_path):
    import folder_paths

    saved = folder_paths.folder_names_and_paths["iconmatting_contexts"]
    folder_paths.folder_names_and_paths["iconmatting_contexts"] = ([str(tmp_path / "contexts")], {".safetensors"})
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.pop("iconmatting_contexts", None)
    yield tmp_path / "contexts"
    folder_paths.folder_names_and_paths["iconmatting_contexts"] = saved
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.pop("iconmatting_contexts", None)


@pytest.fixture(scope="module")
def host_model(pack, request):
    """What Load gives the other nodes (ICONMATTING_MODEL), over the tiny diffusers model."""
    cached = os.environ.get("ICONMATTING_TINY_MODELS")  # mutation runs: tiny models written once (else the tiny_dir fixture)
    tiny_dir = Path(cached) if cached else request.getfixturevalue("tiny_dir")
    model = pack.core.pipeline.load_model(tiny_dir / "head.safetensors", tiny_dir / "sd", "fp32")
    pipe = pack.core.pipeline.IconMattingPipeline(model)
    return types.SimpleNamespace(model=model, extractor=model.extractor, pipeline=lambda features=True: pipe)


