"""Mutation run over the node pack with mutmut's own mutation operators (mutmut 2.x, installed with
``pip install -c constraints.txt mutmut``; not a requirement of the project). mutmut's ``run`` command
trips over its result cache on these modules, so this drives ``mutmut.list_mutations``/``mutate``
itself: each mutant is written in place, the tests that exercise its module run (``-x``), the file
is restored. Not mutated: ``define_schema`` declarations (tooltips, descriptions) and the parts of
postprocess the nodes do not use.

Run from a scratch copy of the repository (files are rewritten while it runs)::

    ICONMATTING_TINY_MODELS=<dir with head.safetensors and sd/> python tests/mutmut_nodes.py FILE... > results.jsonl
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from mutmut import ALL, Context, list_mutations, mutate

PYTEST = f"{sys.executable} -m pytest -q -x -p no:cacheprovider"
TESTS = {
    "iconmatting_core/postprocess.py": "tests/test_nodes_postprocess.py",
    "nodes/common.py": "tests/test_nodes.py",
    "nodes/model_nodes.py": "tests/test_nodes.py -k 'load or head or patched or registered or missing_file'",
    "nodes/context_nodes.py": "tests/test_nodes.py -k 'encode or context or registered'",
    "nodes/target_nodes.py": "tests/test_nodes.py -k 'folder or match or registered'",
    "nodes/output_nodes.py": "tests/test_nodes.py -k 'composite or decode or registered'",
}
POSTPROCESS_SECTION = "# --- compositing and previews"


def skipped_lines(filename, source):
    lines = set()
    if filename.endswith("postprocess.py"):
        start = next(i for i, line in enumerate(source.splitlines()) if line.startswith(POSTPROCESS_SECTION))
        lines.update(range(0, start))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "define_schema":
            lines.update(range(node.lineno - 1, node.end_lineno))
    return lines


def main(files):
    for name in files:
        path = Path(name)
        source = path.read_text()
        skip = skipped_lines(name, source)
        for mutation in list_mutations(Context(source=source, mutation_id=ALL, filename=name)):
            if mutation.line_number in skip:
                continue
            mutated, count = mutate(Context(source=source, mutation_id=mutation, filename=name))
            if count != 1 or mutated == source:
                continue
            path.write_text(mutated)
            try:
                proc = subprocess.run(f"{PYTEST} {TESTS[name]}", shell=True, capture_output=True, text=True, timeout=600)
                status = {0: "survived", 1: "killed"}.get(proc.returncode, f"error {proc.returncode}")
                tail = (proc.stdout.strip().splitlines() or [""])[-1]
            except subprocess.TimeoutExpired:
                status, tail = "killed (timeout)", ""
            finally:
                path.write_text(source)
            new_line = mutated.splitlines()[mutation.line_number] if mutation.line_number < len(mutated.splitlines()) else ""
            print(json.dumps({"file": name, "line": mutation.line_number + 1, "index": mutation.index, "status": status,
                              "original": mutation.line.strip(), "mutant": new_line.strip(), "tests": tail}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main(sys.argv[1:])
