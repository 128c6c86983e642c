"""mutmut 2 hooks for the node pack's mutation run (copy to the repository root as mutmut_config.py):
only behaviour is mutated (not the define_schema declarations: tooltips, descriptions), only the
postprocess functions the nodes use, and each module runs the tests that exercise it."""
import ast
import functools
import os

PYTEST = "python -m pytest -q -x -p no:cacheprovider"
TESTS = {
    "iconmatting_core/postprocess.py": "tests/test_nodes_postprocess.py",
    "nodes/common.py": "tests/test_nodes.py",
    "nodes/model_nodes.py": "tests/test_nodes.py -k 'load or head or patched or registered or missing_file'",
    "nodes/context_nodes.py": "tests/test_nodes.py -k 'encode or context or registered'",
    "nodes/target_nodes.py": "tests/test_nodes.py -k 'folder or match or registered'",
    "nodes/output_nodes.py": "tests/test_nodes.py -k 'composite or decode or registered'",
}
POSTPROCESS_SECTION = "# --- compositing and previews"


@functools.lru_cache(None)
def skipped_lines(filename):
    source = open(filename).read()
    lines = set()
    if filename.endswith("postprocess.py"):
        start = next(i for i, line in enumerate(source.splitlines()) if line.startswith(POSTPROCESS_SECTION))
        lines.update(range(0, start))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "define_schema":
            lines.update(range(node.lineno - 1, node.end_lineno))
    return lines


def pre_mutation(context):
    name = os.path.relpath(context.filename)
    if context.current_line_index in skipped_lines(name) or name not in TESTS:
        context.skip = True
        return
    context.config.test_command = f"{PYTEST} {TESTS[name]}"
