"""The project's promises about itself: README commands == CI, requirements, layout."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n# set up\n(.+)\n# run the tests\n(.+)\n```", text)
    assert block, "README must show the set-up and test commands"
    return block.group(1).strip(), block.group(2).strip()


def test_ci_runs_exactly_the_readme_commands():
    setup, test = _readme_commands()
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert setup in ci and test in ci
    assert ci.index(setup) < ci.index(test)


def test_pytest_runs_every_folder_of_tests():
    """``testpaths`` lists the folders in the order they run; a new folder of tests not listed there would
    never run under the README's command."""
    listed = re.search(r"^testpaths = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    folders = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")}
    assert folders and folders == set(re.findall(r'"([^"]+)"', listed)), (folders, listed)


def test_torch_is_never_a_requirement():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            assert not re.match(r"\s*torch\b", line), f"{name} must not list torch"
    assert "torch" not in re.search(r"dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)


def test_core_never_imports_comfyui():
    for path in (ROOT / "iconmatting_core").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(comfy|folder_paths|nodes)\b", text, re.M), path


REPO_PATH = re.compile(r"(?<![\w./-])((?:tests|benchmarks|tools|iconmatting_core|nodes|web|workflows)/"
                       r"[\w./-]*\w\.(?:py|md|json|js))(?![\w/])")


def _tracked_text_files():
    import subprocess

    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".toml", ".js")) and (ROOT / n).is_file()]


def test_every_file_path_the_repository_names_exists():
    """A path to one of our files written in a document, docstring or comment (``tests/host/test_comfy_pack.py``)
    points at a file that exists: moved files leave no stale directions behind."""
    missing = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for named in REPO_PATH.findall(line):
                if named.upper() != named and "NAME" not in named and not (ROOT / named).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {named}")
    assert not missing, "\n".join(missing)
