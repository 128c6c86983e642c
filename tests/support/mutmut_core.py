"""Mutation run over one module of the library (``iconmatting_core``) with mutmut 2's mutation operators
(``pip install -c constraints.txt mutmut``; not a requirement of the project). The node pack has its own
driver, ``tests/support/mutmut_nodes.py`` (ComfyUI preloaded).

The parent imports the heavy third-party packages once. Each mutant runs in a forked child that serves the
mutated source for the module through an import hook (the file on disk is never rewritten, so this runs in
the repository itself), imports the library afresh and runs the pytest stages in order (``-x``); the mutant
is killed when a stage fails. The unmutated module must pass first. From the repository root::

    python tests/support/mutmut_core.py iconmatting_core/job/outputs.py iconmatting_core.job.outputs out.json \\
        -- "tests/unit/test_job_units.py" ";;" "tests/jobs/test_faults.py -k progress"

Each stage is one argument (quoted), ``;;`` between them optional. Prints one line per mutant and the score; ``out.json`` keeps every mutant
with its diff and result. ``MUTMUT_CORE_TIMEOUT``: seconds per stage (default 120; past it the mutant
counts as killed, e.g. a loop that no longer ends).
"""
import difflib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shlex
import signal
import sys
import time

import numpy  # noqa: F401  (imported once, before the forks)
import PIL.Image  # noqa: F401
import pytest
import safetensors.torch  # noqa: F401
import torch  # noqa: F401
from mutmut import Context, list_mutations, mutate


class MutantLoader(importlib.machinery.SourceFileLoader):
    """Loads module ``name`` from its own path but with ``code`` as its source (no bytecode cache)."""

    def __init__(self, name, path, code):
        super().__init__(name, path)
        self.code = code

    def get_data(self, path):
        return self.code.encode() if path == self.path else super().get_data(path)

    def path_stats(self, path):
        raise OSError("a mutant is never cached")


class MutantSource(importlib.abc.MetaPathFinder):
    """Serves ``code`` as module ``name`` (from ``path``) to every import in this process."""

    def __init__(self, name, path, code):
        self.name, self.loader = name, MutantLoader(name, os.path.abspath(path), code)

    def find_spec(self, fullname, search_path, target=None):
        if fullname == self.name:
            return importlib.util.spec_from_file_location(fullname, self.loader.path, loader=self.loader)
        return None


def run_stages(name, path, code, stages, timeout):
    """0 when every stage passes with ``code`` as the module's source, else ``"stage<i>:<exit code>"``."""
    for index, stage in enumerate(stages, 1):
        pid = os.fork()
        if pid == 0:
            signal.alarm(timeout)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                sys.meta_path.insert(0, MutantSource(name, path, code))
                exit_code = int(pytest.main(["-x", "-q", "-n", "0", "-p", "no:cacheprovider", *stage]))
            except BaseException:
                exit_code = 3
            os._exit(exit_code)
        _, status = os.waitpid(pid, 0)
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0:
            return f"stage{index}:{exit_code}"
    return 0


def changed_lines(source, new):
    return [line for line in difflib.unified_diff(source.splitlines(), new.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def main(argv):
    path, name, out, separator, *rest = argv
    if separator != "--":
        raise SystemExit(__doc__)
    stages = [shlex.split(stage) for stage in rest if stage != ";;"]
    timeout = int(os.environ.get("MUTMUT_CORE_TIMEOUT", "120"))
    sys.path.insert(0, os.getcwd())
    source = open(path).read()
    if run_stages(name, path, source, stages, timeout) != 0:
        raise SystemExit(f"the tests fail on the unmutated {path}; fix them first")
    results, started = [], time.time()
    for mutation in list_mutations(Context(source=source, filename=path)):
        new, count = mutate(Context(source=source, filename=path, mutation_id=mutation))
        if count == 0 or new == source:
            continue
        diff = changed_lines(source, new)
        try:
            compile(new, path, "exec")
        except SyntaxError:
            result = "syntax"
        else:
            result = run_stages(name, path, new, stages, timeout)
        results.append({"line": mutation.line_number + 1, "diff": diff, "result": result})
        print("SURVIVED" if result == 0 else f"killed ({result})", mutation.line_number + 1, " | ".join(diff)[:200], flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    killed = sum(1 for r in results if r["result"] != 0)
    print(f"{path}: {killed}/{len(results)} killed ({100 * killed / max(1, len(results)):.0f}%), {time.time() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
