"""CI cannot pass by skipping: under CI=true, tests/conftest.py reports every skip as a failure (a skip in a
test, in a fixture, or a whole module's ``importorskip``), with the skip's reason; outside CI a skip stays
a skip. Checked on a throwaway test file run with this project's conftest as a plugin."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SAMPLE = textwrap.dedent('''
    import pytest

    @pytest.fixture
    def needs_tool():
        pytest.skip("no tool here")

    def test_runs():
        pass

    def test_skips_in_test():
        pytest.skip("no package here")

    def test_skips_in_fixture(needs_tool):
        pass
''')
MODULE_SKIP = "import pytest\npytest.importorskip('no_such_package_xyz')\n\ndef test_x():\n    pass\n"


def _pytest(tmp_path, source, ci):
    (tmp_path / "test_sample.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(TESTS)  # "-p conftest" loads tests/conftest.py as a plugin
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_sample.py")], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_under_ci_every_skip_is_a_failure_with_its_reason(tmp_path):
    proc = _pytest(tmp_path, SAMPLE, "true")
    assert proc.returncode == 1, proc.stdout
    assert "1 passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout
    assert "FAILED test_sample.py::test_skips_in_test" in proc.stdout
    assert "ERROR test_sample.py::test_skips_in_fixture" in proc.stdout  # a fixture's skip fails at setup
    assert "every test must run: Skipped: no package here" in proc.stdout
    assert "every test must run: Skipped: no tool here" in proc.stdout


def test_a_module_skipped_at_import_fails_under_ci(tmp_path):
    proc = _pytest(tmp_path, MODULE_SKIP, "true")
    assert proc.returncode != 0 and "no_such_package_xyz" in proc.stdout, proc.stdout
    assert "skipped" not in proc.stdout.splitlines()[-1], proc.stdout


def test_outside_ci_a_skip_stays_a_skip(tmp_path):
    proc = _pytest(tmp_path, SAMPLE, None)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("1 passed, 2 skipped"), proc.stdout
