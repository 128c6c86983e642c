"""How the suite is split over processes (tests/conftest.py): which tests one process runs whole, from the ids the
controller sees, and the check that a test sharing a session fixture lands in that fixture's unit."""
import types

import pytest

from work_units import shared_setup, work_unit


@pytest.mark.parametrize("nodeid, unit", [
    # host tests: one unit per ComfyUI version (one boot runs every host job of that host)
    ("tests/host/test_comfy_pack.py::test_composite_workflow_runs[comfy0.3.75]", "comfy0.3.75"),
    ("tests/host/test_workflows.py::test_template_runs[comfy0.28.2-Matte a video clip (IconMatting).json]",
     "comfy0.28.2"),
    # browser tests: one unit per frontend configuration (one server each), the frontend version whole
    ("tests/browser/test_frontend.py::test_vue_nodes[comfy0.28.2-frontend1.58.1-vue-nodes]", "comfy0.28.2-frontend1.58.1"),
    ("tests/browser/test_nodes_search.py::test_words[alpha-comfy0.3.75-frontendpinned]", "comfy0.3.75-frontendpinned"),
    ("tests/browser/test_frontend.py::test_app_starts[comfy0.28.2-frontendpinned]", "comfy0.28.2-frontendpinned"),
    # everything else: its module, whatever its id says
    ("tests/browser/test_frontend.py::test_there_are_workflows", "tests/browser/test_frontend.py"),
    ("tests/jobs/test_install_requirements.py::test_installing[comfy0.3.75]", "tests/jobs/test_install_requirements.py"),
    ("tests/host/test_comfy_harness_selfcheck.py::test_a_job_during_which_comfyui_dies", "tests/host/test_comfy_harness_selfcheck.py"),
    ("tests/unit/test_nodes.py::test_x[comfy0.3.75-frontendpinned]", "tests/unit/test_nodes.py"),
])
def test_work_unit_of_an_id(nodeid, unit):
    assert work_unit(nodeid) == unit


def _item(fixtures, params):
    return types.SimpleNamespace(fixturenames=fixtures, callspec=types.SimpleNamespace(params=params))


def test_what_a_test_shares_comes_from_its_fixtures():
    assert shared_setup(_item(["comfy_host", "comfy_jobs", "tmp_path"], {"comfy_host": "0.28.2"})) == "comfy0.28.2"
    # a host job with its own hosts: the version is the job fixture's parameter
    assert shared_setup(_item(["trained_run", "comfy_jobs"], {"trained_run": "0.3.75"})) == "comfy0.3.75"
    assert shared_setup(_item(["newest_app", "browser"], {"newest_app": ("0.28.2", "1.58.1")})) == "comfy0.28.2-frontend1.58.1"
    assert shared_setup(_item(["app", "browser"], {"app": ("0.3.75", None)})) == "comfy0.3.75-frontendpinned"
    assert shared_setup(_item(["comfy_host", "tmp_path"], {"comfy_host": "0.3.75"})) is None  # a host, but no shared boot
