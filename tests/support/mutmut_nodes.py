"""Mutation run over the node pack with mutmut's own mutation operators (mutmut 2.x, installed with
``pip install -c constraints.txt mutmut``; not a requirement of the project). mutmut's ``run`` command
trips over its result cache on these modules, so this drives ``mutmut.list_mutations``/``mutate``
itself: each mutant is written in place, the tests that exercise its module run (``-x``), the file
is restored. Not mutated: ``define_schema`` declarations (tooltips, descriptions) and the parts of
postprocess the nodes do not use.

Run from a scratch copy of the repository (files are rewritten while it runs)::

    ICONMATTING_TINY_MODELS=<dir with head.safetensors and sd/> python tests/support/mutmut_nodes.py FILE... > results.jsonl

``MUTMUT_NODES_FORK=1``: import torch, diffusers and ComfyUI once and run each mutant's tests in a
forked child (much faster; Linux only). ``MUTMUT_NODES_TIMEOUT``: seconds a mutant's tests may run
(default 600); past it the mutant counts as killed (timeout), e.g. a loop that no longer ends.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from mutmut import ALL, Context, list_mutations, mutate

PYTEST = f"{sys.executable} -m pytest -q -x -n 0 -p no:cacheprovider"
TESTS = {
    "iconmatting_core/postprocess.py": "tests/unit/test_nodes_postprocess.py",
    "nodes/common.py": "tests/unit/test_nodes_common.py tests/unit/test_model_nodes.py tests/unit/test_context_nodes.py "
                       "tests/unit/test_nodes.py",
    "nodes/model_nodes.py": "tests/unit/test_model_nodes.py tests/unit/test_nodes.py "
                            "-k 'model_nodes or load_validation or unet_widths or patched or registered'",
    "nodes/context_nodes.py": "tests/unit/test_context_nodes.py tests/unit/test_nodes.py -k 'encode or context or registered'",
    "nodes/target_nodes.py": "tests/unit/test_nodes.py -k 'folder or match or registered'",
    "nodes/output_nodes.py": "tests/unit/test_nodes.py -k 'composite or decode or registered'",
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


def preload():
    """Import the heavy libraries once; each mutant's tests run in a forked child (``fork_pytest``),
    which imports this repository's modules (the mutated one included) afresh."""
    sys.path.insert(0, str(Path("tests/support").resolve()))
    # pytest imports the repository's __init__.py as the top-level module "__init__" (its folder's name
    # is no identifier); with comfy importable that module tries its relative import of the nodes and
    # every test errors at setup. Import it now, while comfy is not importable, as a plain run does.
    import importlib.util

    spec = importlib.util.spec_from_file_location("__init__", Path("__init__.py").resolve())
    sys.modules["__init__"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["__init__"])
    import diffusers  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import pytest  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from comfy_harness import comfy_root, stub_dir

    for extra in (str(comfy_root()), str(stub_dir())):
        sys.path.append(extra)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy_api.latest  # noqa: F401
    import folder_paths  # noqa: F401


def fork_pytest(args, timeout):
    import shlex
    import signal

    pid = os.fork()
    if pid == 0:
        import pytest

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os._exit(int(pytest.main(shlex.split(args))))
    signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
    signal.alarm(timeout)
    _, status = os.waitpid(pid, 0)
    signal.alarm(0)
    return os.waitstatus_to_exitcode(status)


def already_done():
    """(file, line, index) of mutants in the JSON-lines files of $MUTMUT_NODES_DONE (colon-separated)."""
    done = set()
    for results in filter(None, os.environ.get("MUTMUT_NODES_DONE", "").split(":")):
        for line in Path(results).read_text().splitlines():
            r = json.loads(line)
            done.add((r["file"], r["line"], r["index"]))
    return done


def run_tests(name):
    """Exit code of the tests of module ``name`` (as the driver runs them), and the last line they printed."""
    if FORK:
        return fork_pytest(f"-q -x -n 0 -p no:cacheprovider {TESTS[name]}", TIMEOUT), ""
    proc = subprocess.run(f"{PYTEST} {TESTS[name]}", shell=True, capture_output=True, text=True, timeout=TIMEOUT)
    return proc.returncode, (proc.stdout.strip().splitlines() or [""])[-1]


def main(files):
    done = already_done()
    for name in files:
        path = Path(name)
        source = path.read_text()
        code, tail = run_tests(name)
        if code != 0:  # a failing baseline would count every mutant as killed
            sys.exit(f"The tests of {name} fail without any mutation (exit code {code}) {tail}")
        skip = skipped_lines(name, source)
        for mutation in list_mutations(Context(source=source, mutation_id=ALL, filename=name)):
            if mutation.line_number in skip or (name, mutation.line_number + 1, mutation.index) in done:
                continue
            mutated, count = mutate(Context(source=source, mutation_id=mutation, filename=name))
            if count != 1 or mutated == source:
                continue
            path.write_text(mutated)
            try:
                code, tail = run_tests(name)
                status = {0: "survived", 1: "killed"}.get(code, "killed (timeout)" if code == -9 else f"error {code}")
            except subprocess.TimeoutExpired:
                status, tail = "killed (timeout)", ""
            finally:
                path.write_text(source)
            new_line = mutated.splitlines()[mutation.line_number] if mutation.line_number < len(mutated.splitlines()) else ""
            print(json.dumps({"file": name, "line": mutation.line_number + 1, "index": mutation.index, "status": status,
                              "original": mutation.line.strip(), "mutant": new_line.strip(), "tests": tail}), flush=True)


FORK = os.environ.get("MUTMUT_NODES_FORK") == "1"
TIMEOUT = int(os.environ.get("MUTMUT_NODES_TIMEOUT", "600"))

if __name__ == "__main__":
    sys.dont_write_bytecode = True
    if FORK:
        preload()
    main(sys.argv[1:])
