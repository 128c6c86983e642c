"""Every import of the shipped code resolves, including lazy imports inside functions (tests/support/import_check.py).

The second half plants one bad import at a time into a real file's text (inside a function, where only the
line that runs it would have failed) and checks that the checker names it; the first, that today's tree
has none. ComfyUI's modules resolve against the test host's tree (0.3.75, comfy_harness)."""
import ast

import pytest

from import_check import ROOT, ImportChecker, checked_files


@pytest.fixture(scope="module")
def checker():
    from comfy_harness import comfy_root, stub_dir

    return ImportChecker(comfy_roots=[comfy_root(), stub_dir()])


def test_the_check_covers_the_shipped_code():
    files = {p.relative_to(ROOT).as_posix() for p in checked_files()}
    for expected in ("__init__.py", "iconmatting.py", "iconmatting_core/training/trainer.py", "nodes/common.py",
                     "benchmarks/benchmark.py", "tools/api_to_ui.py", "iconmatting_core/job/outputs.py"):
        assert expected in files


def test_every_import_resolves(checker):
    assert checker.check() == []


def _planted(rel: str, function: str, line: str) -> str:
    """The file's text with ``line`` as the first statement of ``function`` (a def anywhere in the file,
    e.g. a method), indented like that function's body."""
    path = ROOT / rel
    source = path.read_text(encoding="utf-8")
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and n.name == function)
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(node.body) > 1:
        first = node.body[1]  # after the docstring
    lines = source.splitlines(keepends=True)
    lines.insert(first.lineno - 1, " " * first.col_offset + line + "\n")
    return "".join(lines)


# (file, function, planted line, a fragment of the expected message); each was a bug class before this check
PLANTED_BAD = [
    # the bug: trainer.run's lazy import of a module removed in the job refactor
    ("iconmatting_core/training/trainer.py", "run", "from ..batch import Progress", "no module ..batch"),
    ("iconmatting_core/__main__.py", "_user_errors", "from .job.outputs import NoSuchName", "defines no NoSuchName"),
    ("iconmatting_core/job/matte.py", "run", "import iconmatting_core.batch", "no module iconmatting_core.batch"),
    ("iconmatting_core/job/local.py", "run_local", "from ...outside import x", "goes above iconmatting_core"),
    ("iconmatting_core/training/trainer.py", "run", "from .losses import recipe_losses, NoSuchLoss",
     "defines no NoSuchLoss"),
    ("nodes/common.py", "split_images", "from iconmatting_core import pipeline", "imports its library relatively"),
    ("nodes/common.py", "split_images", "from ..iconmatting_core.job import no_such_module", "defines no no_such_module"),
    ("nodes/common.py", "split_images", "import comfy.no_such_module", "neither ours, ComfyUI's nor installed"),
    ("iconmatting_core/pipeline.py", "load_pipeline", "import not_installed_anywhere_xyz", "nor installed"),
    ("benchmarks/benchmark.py", "main", "from tiny_models import no_such_helper", "defines no no_such_helper"),
    ("iconmatting.py", None, "from .iconmatting_core import x", "a relative import in a script"),
]

PLANTED_GOOD = [
    ("iconmatting_core/training/trainer.py", "run", "from ..job.outputs import Progress"),
    ("iconmatting_core/pipeline.py", "load_pipeline", "from .job import outputs"),  # a submodule
    ("nodes/common.py", "split_images", "from ..iconmatting_core.context_file import load_context"),
    ("nodes/common.py", "split_images", "import comfy.model_management"),
    ("iconmatting_core/pipeline.py", "load_pipeline", "import numpy.linalg"),
]


def _source(rel, function, line):
    if function is None:
        return (ROOT / rel).read_text(encoding="utf-8") + line + "\n"
    return _planted(rel, function, line)


@pytest.mark.parametrize("rel, function, line, message", PLANTED_BAD, ids=[f"{b[0]}:{b[2]}" for b in PLANTED_BAD])
def test_a_planted_bad_import_is_named(checker, rel, function, line, message):
    problems = checker.check_file(ROOT / rel, _source(rel, function, line))
    assert len(problems) == 1 and line.split(" import ")[0] in problems[0] and message in problems[0], problems


@pytest.mark.parametrize("rel, function, line", PLANTED_GOOD, ids=[f"{g[0]}:{g[2]}" for g in PLANTED_GOOD])
def test_a_planted_good_import_passes(checker, rel, function, line):
    assert checker.check_file(ROOT / rel, _source(rel, function, line)) == []


def test_a_missing_optional_dependency_is_allowed_only_under_try(checker):
    rel = "iconmatting_core/pipeline.py"
    guarded = "try:\n    import not_installed_anywhere_xyz\nexcept ImportError:\n    pass\n"
    assert checker.check_file(ROOT / rel, (ROOT / rel).read_text() + guarded) == []
    # our own modules are never optional
    guarded_ours = "try:\n    from .batch import Progress\nexcept ImportError:\n    pass\n"
    assert len(checker.check_file(ROOT / rel, (ROOT / rel).read_text() + guarded_ours)) == 1


def test_star_imports_and_module_getattr_are_followed(tmp_path):
    pkg = tmp_path / "iconmatting_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import *\n")
    (pkg / "b.py").write_text("def f():\n    pass\n")
    (pkg / "c.py").write_text("def __getattr__(name):\n    return name\n")
    (pkg / "d.py").write_text("def g():\n    from .a import f\n    from .c import anything\n    from .a import h\n")
    problems = ImportChecker(tmp_path).check_file(pkg / "d.py")
    assert len(problems) == 1 and "defines no h" in problems[0], problems
