"""Every import of the shipped code resolves: a static check of each ``import``/``from ... import``
statement (absolute and relative, at any depth: in functions, methods, ``try`` blocks), so a lazy import
of a module that no longer exists fails CI the day it is made, not the day a user reaches that line.

Which files (:data:`CHECKED`): the library (``iconmatting_core/``), the node pack (``__init__.py``,
``nodes/``), the launcher (``iconmatting.py``), ``benchmarks/`` and ``tools/``.

How each import must resolve, by where the file is:

* ``iconmatting_core/``: a standalone package (the wheel): relative imports stay inside it; absolute ones
  are ``iconmatting_core`` itself or installed packages;
* the node pack (``__init__.py``, ``nodes/``): ComfyUI imports the repository folder as one package, so
  relative imports stay inside the repository; absolute ones are ComfyUI's modules (resolved against a
  prepared ComfyUI tree, the test host's, and its stand-ins) or installed packages -- never our own
  (``iconmatting_core`` or ``nodes`` by absolute name are not on ComfyUI's path; ``nodes`` is ComfyUI's);
* scripts (``iconmatting.py``, ``benchmarks/``, ``tools/``): no relative imports; absolute ones are found
  in the script's folder, the repository and ``tests/support`` (the folders they put on ``sys.path``),
  ComfyUI's tree (scripts run inside ComfyUI, e.g. ``benchmarks/comfy_bench_script.py``) or installed.

Installed packages are checked by their top-level name (found, not imported).

For our own modules the imported *names* are checked too (``from .job.outputs import Progress``): each
is defined at the module's top level (a def, class, assignment or import, also inside top-level
``if``/``try``/``with``/``for``), is a submodule, comes from a star import, or the module has a
``__getattr__``. An installed package that is missing counts only outside a ``try`` that catches
``ImportError`` (an optional dependency); our own modules are never optional.
"""
from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("iconmatting_core", "nodes", "__init__.py", "iconmatting.py", "benchmarks", "tools")
_CATCHES_IMPORT_ERROR = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def checked_files(root: Path = ROOT) -> List[Path]:
    out = []
    for name in CHECKED:
        p = root / name
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else []
    return [p for p in out if "__pycache__" not in p.parts]


@dataclass
class _Where:
    kind: str            # "core", "pack", "script"
    top: Path            # the folder relative imports may not leave (core: iconmatting_core/, pack: the repo)
    search: Sequence[Path]  # roots for absolute imports of modules in the tree (ours; scripts: their sys.path)


def _where(path: Path, root: Path) -> _Where:
    rel = path.relative_to(root)
    if rel.parts[0] == "iconmatting_core":
        return _Where("core", root / "iconmatting_core", [root])
    if rel.parts[0] == "nodes" or rel.as_posix() == "__init__.py":
        return _Where("pack", root, [])
    return _Where("script", path.parent, [path.parent, root, root / "tests" / "support"])


def _module_file(base: Path, dotted: Sequence[str], namespace: bool = False) -> Optional[Path]:
    """The file (a module, or a package's __init__.py) of ``dotted`` under ``base``; every step a package
    (``namespace``: a folder without __init__.py counts as one, as ComfyUI's ``comfy`` is); None if absent."""
    here = base
    for i, part in enumerate(dotted):
        if i == len(dotted) - 1 and (here / f"{part}.py").is_file():
            return here / f"{part}.py"
        if (here / part / "__init__.py").is_file() or namespace and (here / part).is_dir():
            here = here / part
            continue
        return None
    init = here / "__init__.py"
    return init if init.is_file() else here if namespace and here.is_dir() and dotted else None


def _optional(node: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    """Inside the body of a ``try`` one of whose handlers catches ImportError."""
    child, p = node, parents.get(node)
    while p is not None:
        if isinstance(p, ast.Try) and child in p.body:
            for h in p.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                if h.type is None or any(isinstance(n, ast.Name) and n.id in _CATCHES_IMPORT_ERROR for n in names):
                    return True
        child, p = p, parents.get(p)
    return False


class _Names:
    """Top-level names a module of ours defines (cached per file)."""

    def __init__(self):
        self.cache: Dict[Path, Tuple[Set[str], bool, List[Tuple[Path, int, str]]]] = {}

    def of(self, file: Path) -> Tuple[Set[str], bool, List[ast.ImportFrom]]:
        if file not in self.cache:
            tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
            names, stars, dynamic = set(), [], False
            todo = list(tree.body)
            while todo:
                node = todo.pop()
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                    dynamic |= node.name == "__getattr__"
                elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    for a in node.names:
                        if a.name == "*":
                            stars.append(node)
                        else:
                            names.add(a.asname or a.name.split(".")[0])
                elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                    for field in ("body", "orelse", "finalbody", "handlers"):
                        todo += getattr(node, field, [])
                elif isinstance(node, ast.ExceptHandler):
                    todo += node.body
            self.cache[file] = (names, dynamic, stars)
        return self.cache[file]


class ImportChecker:
    def __init__(self, root: Path = ROOT, comfy_roots: Sequence[Path] = (), allowed: Iterable[str] = ()):
        """comfy_roots: folders where ComfyUI's own modules resolve (a prepared host tree and its stand-ins);
        allowed: top-level names accepted without resolving (an explicit allow-list, e.g. ComfyUI's
        modules when no host tree is given)."""
        self.root, self.comfy_roots, self.allowed = root, list(comfy_roots), set(allowed)
        self.names = _Names()

    # ------------------------------------------------------------------ one file
    def check_file(self, path: Path, source: Optional[str] = None) -> List[str]:
        """Problems of one file (``source``: check this text as if it were the file's)."""
        source = path.read_text(encoding="utf-8") if source is None else source
        tree = ast.parse(source, str(path))
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        where = _where(path, self.root)
        problems = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    problems += self._absolute(path, where, node, a.name, None, _optional(node, parents))
            elif isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
                if node.level:
                    problems += self._relative(path, where, node, names)
                elif node.module != "__future__":
                    problems += self._absolute(path, where, node, node.module, names, _optional(node, parents))
        return problems

    def check(self, files: Optional[Iterable[Path]] = None) -> List[str]:
        return [p for f in (files or checked_files(self.root)) for p in self.check_file(f)]

    # ------------------------------------------------------------------ pieces
    def _say(self, path: Path, node: ast.AST, what: str) -> str:
        return f"{path.relative_to(self.root)}:{node.lineno}: {ast.unparse(node)}: {what}"

    def _relative(self, path: Path, where: _Where, node: ast.ImportFrom, names: List[str]) -> List[str]:
        if where.kind == "script":
            return [self._say(path, node, "a relative import in a script (it is no package)")]
        package = path.parent
        for _ in range(node.level - 1):
            package = package.parent
        if package != where.top and where.top not in package.parents:
            what = "iconmatting_core (the wheel holds it alone)" if where.kind == "core" else "the pack's folder"
            return [self._say(path, node, f"goes above {what}")]
        dotted = node.module.split(".") if node.module else []
        file = _module_file(package, dotted)
        if file is None:
            return [self._say(path, node, f"no module {'.' * node.level}{node.module or ''} "
                                          f"(looked in {package.relative_to(self.root).as_posix() or 'the pack'})")]
        return self._names(path, node, file, names)

    def _absolute(self, path: Path, where: _Where, node: ast.AST, module: str, names: Optional[List[str]],
                  optional: bool) -> List[str]:
        dotted, top = module.split("."), module.split(".")[0]
        if where.kind == "pack" and top == "iconmatting_core":
            return [self._say(path, node, "the pack imports its library relatively (ComfyUI puts the pack's "
                                          "folder on no path)")]
        if where.kind != "core" and self._comfy(dotted):  # the pack, and scripts run inside ComfyUI
            return []
        if where.kind != "core" and self._comfy([top]) and not optional:
            return [self._say(path, node, f"{module} is neither ours, ComfyUI's nor installed (ComfyUI has no such "
                                          f"module; an optional one belongs in a try/except ImportError)")]
        if where.kind != "pack":
            base = next((b for b in where.search if (b / top).is_dir() or (b / f"{top}.py").is_file()), None)
            if base is not None:  # ours (or, for a script, a module of its own sys.path)
                file = _module_file(base, dotted)
                if file is None:
                    return [self._say(path, node, f"no module {module} (looked in {base})")]
                return self._names(path, node, file, names)
        if top in self.allowed or self._installed(module) or optional:
            return []
        return [self._say(path, node, f"{module} is neither ours, ComfyUI's nor installed (an optional dependency "
                                      f"belongs in a try/except ImportError)")]

    def _comfy(self, dotted: List[str]) -> bool:
        return any(_module_file(r, dotted, namespace=True) is not None for r in self.comfy_roots)

    @staticmethod
    def _installed(module: str) -> bool:
        """An installed top-level package or module (found on sys.path without importing anything; a stand-in
        another test left in sys.modules does not count)."""
        top = module.split(".")[0]
        if top in sys.builtin_module_names:
            return True
        try:
            return importlib.machinery.PathFinder.find_spec(top) is not None
        except (ImportError, ValueError):
            return False

    def _names(self, path: Path, node: ast.AST, file: Path, names: Optional[List[str]], seen=None) -> List[str]:
        if not names:
            return []
        defined, dynamic, stars = self.names.of(file)
        if dynamic:
            return []
        missing = []
        for name in names:
            if name == "*" or name in defined:
                continue
            if file.name == "__init__.py" and _module_file(file.parent, [name]) is not None:
                continue  # a submodule
            if any(not self._names(path, node, f, [name]) for f in self._star_sources(file, stars)):
                continue
            missing.append(name)
        return [self._say(path, node, f"{file.relative_to(self.root)} defines no {n}") for n in missing]

    def _star_sources(self, file: Path, stars: List[ast.ImportFrom]) -> List[Path]:
        out = []
        for s in stars:
            base = file.parent
            for _ in range(max(s.level - 1, 0)):
                base = base.parent
            target = _module_file(base if s.level else self.root, (s.module or "").split(".") if s.module else [])
            if target is not None:
                out.append(target)
        return out
