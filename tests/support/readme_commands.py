"""The commands the documentation shows, as runnable plans: what tests/jobs/test_readme_commands.py runs.

Which files: every Markdown file of the repository (:func:`doc_files`: README.md, web/docs/*.md and any
``.md`` added later, outside hidden folders and virtual environments), so a new page with commands is
covered without a change here.

What counts as a command:

* every logical line of a shell block (```` ```bash ````, ``sh``, ``shell``, ``console``, ``zsh``; lines
  joined at a trailing ``\\``, ``# comments`` and a ``$`` prompt removed). Each is a *product command*
  (``python``/``python3 -m iconmatting_core`` or ``-m iconmatting_core.eval``, the ``iconmatting``
  command, a launcher ``.../iconmatting.py``, ``torchrun ... -m iconmatting_core``, a
  ``benchmarks/*.py`` script), a ``cd`` into a folder of :data:`DIRS`, or a line of :data:`NOT_RUN`
  (installing, cloning, starting Ray daemons, the test suite itself), each with its reason. Any other line
  is an error saying what to add;
* in a block without a language (a folder tree, say), only the lines that start a product command;
* an inline code span that starts a product command (```python benchmarks/benchmark.py```), unless it
  is only a mention (```python -m iconmatting_core```, ```iconmatting ...```). One that equals a command of
  a block is run there (reported as the same).

Placeholders, each filled by one documented rule (anything else is an error naming the table to extend):

* ``[--opt value]`` (a bracketed group starting with ``--``): optional; the command runs twice, with
  every optional group and with none;
* ``...same arguments...``: the arguments of the previous command of the same program and subcommand
  in the same block (``train ...same arguments... --resume latest``);
* ``--option ...`` or ``--option <what>``: the value :data:`OPTION_VALUES` gives that option (the name
  the README uses for it elsewhere);
* a bare ``...`` after a value (``matte --engine ray --address auto ...``): the previous same-program,
  same-subcommand command of the document, minus the options already written.

``VAR=value`` words before a command set its environment. Shell pipelines and redirections (``|``, ``&&``,
``>``) are not run: such a line is an error saying so.

Paths: every argument that is a value or a positional and looks like a path (has a ``/`` or a file
suffix) is an *input*, which must be a key of :data:`INPUTS` (the fixture it stands for, made in the
run's sandbox folder at that path, relative to the current ``cd``), or an *output* (the value of
``--out``, or ``convert``'s second positional), which may be any relative path inside the sandbox.
Commands run as written, in a sandbox whose files have the names the README uses: no argument is
rewritten, except the placeholders above.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[2]
THIS = "tests/support/readme_commands.py"

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
PYTHON_LANGS = {"python", "py"}

#: Python interpreters a command may start with (resolved on the PATH the test sets: the test's venv first).
PYTHONS = {"python", "python3", ".venv/bin/python"}
#: Modules of ours that ``python -m`` runs, and their program kind.
MODULES = {"iconmatting_core": "iconmatting_core", "iconmatting_core.eval": "eval"}
#: Console scripts (pyproject ``[project.scripts]``); the test writes a wrapper for each on the PATH.
CONSOLE_SCRIPTS = {"iconmatting": "iconmatting_core"}
#: Script paths run as ``python SCRIPT``: the pack's launcher, whose folder the sandbox links to this
#: repository (the README's ``git clone ... comfyui-iconmatting``).
LAUNCHERS = {"custom_nodes/comfyui-iconmatting/iconmatting.py": "custom_nodes/comfyui-iconmatting"}

#: Lines that are shown but not run, by the start of the line (a regular expression), with the reason.
#: ``rest_of_block``: the block's later commands need what this line would have made, so they are not
#: run either (their options are still checked against the parser by tests/unit/test_readme_mapping.py).
NOT_RUN: List[Tuple[str, str, bool]] = [
    (r"python3 -m venv |\.venv/bin/pip |pip install ",
     "installs packages: the tests run in this repository's .venv, built by the README's set-up line "
     "(.ci/run runs it; tests/unit/test_repo.py checks that .ci/run runs exactly that line)", False),
    (r"\.venv/bin/python -m pytest( |$)",
     "runs this test suite itself (.ci/run runs it; tests/unit/test_repo.py checks the README's test command)", False),
    (r"git clone ",
     "clones the published repository (no network in CI; the sandbox links the pack's folder to this checkout)", False),
    (r"git -C /tmp/icm checkout |\.venv/bin/python tests/fixtures/train_(loss|step)/make_fixture\.py ",
     "regenerates the fixtures from a checkout of the authors' code, which CI has not (tests/fixtures/README.md)", False),
    (r"ray start ",
     "starts Ray cluster daemons that outlive the command (a head node on port 6379, worker nodes joining "
     "it from other machines); `matte --engine ray` with a local Ray (the block before) runs as written", True),
    (r"\.venv/bin/python tests/support/frontend_harness\.py templates",
     "a developer's tool that rewrites workflows/*.json and their cards (tests/browser checks its output)", False),
]

#: Benchmarks (and other scripts) the README shows but CI cannot run as written, with the reason. Their
#: options are still checked: each must be one the script's argument parser defines (tests/unit).
SCRIPTS_NOT_RUN = {
    "benchmarks/benchmark.py": "builds full-size SD 2.1 with random weights and mattes 768-px images in "
                               "batches of 1, 8 and 32 (the README's 384-px table took minutes per target here)",
    "benchmarks/benchmark_native.py": "boots ComfyUI twice with full-size SD 2.1 (the README's run: 35 min, 16 GB)",
    "benchmarks/benchmark_gpu.py": "needs a CUDA GPU; its CPU smoke mode is run by tests/jobs/test_benchmark_gpu.py",
    "benchmarks/benchmark_train.py": "trains the full-size head on full-size SD 2.1; its smoke mode "
                                     "(--device cpu --image-size 128 --tiny) is run by tests/jobs/test_train.py",
    "benchmarks/benchmark_scale.py": "mattes 150- and 1,500-frame clips, 8 clips and 32 images on Ray with 1 and 2 "
                                     "workers (minutes); tests/jobs/test_ray.py runs that machinery",
    "benchmarks/benchmark_folder.py": "boots ComfyUI and runs the folder template and `matte` over folders of 4 and 20 "
                                      "photos, three times each (about 10 minutes here)",
    "benchmarks/benchmark_cutout.py": "restores a 768-px alpha to a 4000x3000 photo with the previous and the "
                                      "current code in separate processes (about 80 s here)",
}

#: ``cd`` targets: folders made in the sandbox (an empty ComfyUI folder: what a command needs below it is
#: made like any input).
DIRS = {"ComfyUI", "ComfyUI/custom_nodes"}

#: Input paths as the documentation writes them (a trailing ``/`` ignored) -> the fixture standing for it.
INPUTS = {
    "ref.jpg": "reference_jpg",
    "ref_mask.png": "reference_mask",
    "photos": "photos",
    "clip.mp4": "clip",
    "manifest.txt": "manifest",
    "ref_context.safetensors": "context",
    "icm.ckpt": "authors_head",
    "models/iconmatting/icm.ckpt": "authors_head",
    "icm.safetensors": "head",
    "v2-1_768-ema-pruned.safetensors": "sd",
    "datasets/ICM57": "icm57",
    "datasets/train": "train_groups",
    "my_mattes": "train_groups",
    "my_mattes_val": "val_groups",
}

#: ``--option ...`` or ``--option <what>`` -> the value it stands for: the name the README gives it elsewhere.
OPTION_VALUES = {"--reference": "ref.jpg", "--mask": "ref_mask.png", "--targets": "photos/", "--out": "mattes/",
                 "--context": "ref_context.safetensors"}

#: Options whose value is written by the command, per subcommand (``*``: every subcommand).
OUTPUT_OPTIONS = {"*": {"--out"}}
#: Positionals written by the command: subcommand -> their indexes among the positionals.
OUTPUT_POSITIONALS = {"convert": {1}}

#: Undefined names a ``python`` block may use -> what the test binds them to (see the test's prelude).
PYTHON_NAMES = {
    "ref_image": "the reference image, HxWx3 floats in [0, 1] (ref.jpg)",
    "ref_mask": "its mask, HxW floats (ref_mask.png)",
    "target_images": "the photos/ images, a list of HxWx3 float arrays",
}

ELLIPSIS = "..."
SAME_ARGS = "\x00same-arguments\x00"
_ANGLE = re.compile(r"<[^<>]+>")
_ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SHELL_OPERATORS = {"|", "||", "&&", ";", "&"}
_REDIRECTION = re.compile(r"^(\d?>{1,2}|&>|<)(?![^<>]*>$)")  # > f, 2>f, <f; not a <placeholder>
_PATH_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{1,11}$")


class MappingError(ValueError):
    """A documented command the harness cannot run as written: the message says what to add, and where."""


# --------------------------------------------------------------------------- documents


def doc_files(root: Path = ROOT) -> List[Path]:
    """Every Markdown file of the repository (not in hidden folders, virtual environments or node_modules)."""
    skip = {".venv", "venv", "node_modules", "__pycache__"}
    out = []
    for p in sorted(root.rglob("*.md")):
        parts = p.relative_to(root).parts
        if any(part.startswith(".") or part in skip for part in parts[:-1]):
            continue
        out.append(p)
    return out


@dataclass
class Line:
    ref: str   # "README.md:523"
    text: str  # the logical line as written (continuations joined)


@dataclass
class Block:
    ref: str          # "README.md:521" (its first line)
    lang: str         # "bash", "python", "" (no language), "inline"
    lines: List[Line]
    source: str = ""  # python blocks: the code


_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def read_blocks(path: Path, root: Path = ROOT) -> List[Block]:
    """The fenced blocks and the command-like inline code spans of one Markdown file, in order."""
    name = path.relative_to(root).as_posix()
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    blocks: List[Block] = []
    prose: List[Tuple[int, str]] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        body: List[Tuple[int, str]] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        if lang in PYTHON_LANGS:
            blocks.append(Block(f"{name}:{start + 1}", "python", [], "\n".join(t for _, t in body) + "\n"))
        else:
            blocks.append(Block(f"{name}:{start + 1}", lang, _logical_lines(name, body)))
    blocks += _inline_spans(name, prose)
    return blocks


def _logical_lines(name: str, body: List[Tuple[int, str]]) -> List[Line]:
    out, pending, first = [], "", None
    for number, raw in body:
        line = raw.rstrip()
        if first is None:
            first = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        text = (pending + line.strip()).strip()
        pending = ""
        if text.startswith("$ "):
            text = text[2:]
        if text and not text.startswith("#"):
            out.append(Line(f"{name}:{first}", text))
        first = None
    return out


def _inline_spans(name: str, prose: List[Tuple[int, str]]) -> List[Block]:
    """Inline code spans (possibly broken over lines within a paragraph) that start a product command."""
    out = []
    paragraph: List[Tuple[int, str]] = []
    for number, line in prose + [(0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        if paragraph:
            joined, starts = "", []
            for n, t in paragraph:
                starts.append((len(joined), n))
                joined += t + "\n"
            for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined):
                span = " ".join(m.group(1).split())
                line_no = max(n for pos, n in starts if pos <= m.start())
                if _is_inline_command(span):
                    out.append(Block(f"{name}:{line_no}", "inline", [Line(f"{name}:{line_no}", span)]))
        paragraph = []
    return out


def _is_inline_command(span: str) -> bool:
    words = span.split()
    if not words or not _starts_program(words):
        return False
    rest = words[1:]
    if words[0] in PYTHONS and rest[:1] == ["-m"]:
        rest = rest[2:]
    elif words[0] in PYTHONS:
        return bool(rest) and rest[0].endswith(".py")
    if words[0] == "torchrun":
        return len(words) > 1  # a bare `torchrun` is a mention
    # `python -m iconmatting_core`, `iconmatting ...`, `python -m iconmatting_core matte`: mentions
    return len([w for w in rest if w != ELLIPSIS]) >= 2


def _starts_program(words: List[str]) -> bool:
    return words[0] in PYTHONS or words[0] in CONSOLE_SCRIPTS or words[0] == "torchrun"


# --------------------------------------------------------------------------- plans


@dataclass
class Step:
    ref: str
    text: str                               # as written
    kind: str                               # "run", "cd", "skip"
    argv: List[str] = field(default_factory=list)  # as run (placeholders filled)
    cwd: str = ""                           # sandbox-relative folder it runs in
    program: str = ""                       # "iconmatting_core", "eval", "script"
    launcher: str = ""                      # "python -m" | "console" | "launcher" | "torchrun" | "script"
    script: str = ""                        # the script path (launcher, benchmark)
    subcommand: str = ""                    # matte, encode, convert, train; "eval"
    args: List[str] = field(default_factory=list)  # the program's arguments (subcommand first)
    inputs: Dict[str, str] = field(default_factory=dict)   # cwd-relative path -> fixture
    outputs: Dict[str, str] = field(default_factory=dict)  # option (or "#1") -> cwd-relative path
    reason: str = ""                        # kind "skip": why
    env: Dict[str, str] = field(default_factory=dict)  # VAR=value words before the command


@dataclass
class Plan:
    """One runnable unit: a block (or inline command) with one choice of its optional parts."""

    id: str                 # "README.md:521" or "README.md:484[all-optional]"
    steps: List[Step]
    python: str = ""        # python blocks: the code
    same_as: str = ""       # an inline command already run by this block
    error: str = ""         # why it cannot be mapped (MappingError's message); the plan's test fails with it

    @property
    def runs(self) -> List[Step]:
        return [s for s in self.steps if s.kind == "run"]


def plans(root: Path = ROOT) -> List[Plan]:
    """Every plan of every document. A block that cannot be mapped gives one plan carrying the
    MappingError's message (the other blocks still run)."""
    out: List[Plan] = []
    seen: Dict[Tuple[str, ...], str] = {}
    for doc in doc_files(root):
        history: List[Step] = []  # the document's product commands so far (a bare "..." looks back here)
        for block in read_blocks(doc, root):
            if block.lang == "python":
                if "iconmatting" in block.source:
                    out.append(Plan(block.ref, [], python=block.source))
                continue
            try:
                out += _block_plans(block, history, seen)
            except MappingError as exc:
                out.append(Plan(block.ref, [], error=str(exc)))
                continue
            history += [s for s in _plan_block(block, history, True) if s.subcommand]
    return out


def _block_plans(block: Block, history: List[Step], seen: Dict[Tuple[str, ...], str]) -> List[Plan]:
    """The block's plans: one, or one without and one with its optional groups. ``seen``: argv -> the plan
    that runs it (an inline command equal to a block's is run there only)."""
    out = []
    optional = any(_has_brackets(line.text) for line in block.lines)
    for variant, keep in ([("no-optional", False), ("all-optional", True)] if optional else [("", False)]):
        plan = Plan(block.ref + (f"[{variant}]" if variant else ""), _plan_block(block, history, keep))
        keys = [tuple(s.argv) for s in plan.runs]
        if block.lang == "inline" and keys and all(k in seen for k in keys):
            plan.same_as = seen[keys[0]]
        for s in plan.runs:
            seen.setdefault(tuple(s.argv), plan.id)
        out.append(plan)
    return out


def _has_brackets(text: str) -> bool:
    return bool(re.search(r"(^|\s)\[--", text))


def _expand_brackets(ref: str, words: List[str], keep: bool) -> List[str]:
    """Drop (``keep`` False) or unwrap (True) every ``[--option ...]`` group."""
    out, inside = [], False
    for w in words:
        if not inside and w.startswith("[--"):
            inside, w = True, w[1:]
        elif w.startswith("[--") or (not inside and w.endswith("]") and "--" in w):
            raise MappingError(f"{ref}: nested or unbalanced optional group at {w!r}; write optional parts as "
                               f"[--option value ...], one level deep")
        closes = inside and w.endswith("]")
        if closes:
            w = w[:-1]
        if w and (keep or not inside):
            out.append(w)
        if closes:
            inside = False
    if inside:
        raise MappingError(f"{ref}: an optional group opened with '[' is never closed")
    return out


def _words(ref: str, text: str) -> List[str]:
    text = re.sub(r"\.\.\.same arguments\.\.\.", f" {SAME_ARGS} ", text)
    other = re.search(r"\.\.\.[a-z][a-z ]*\.\.\.", text)
    if other:
        raise MappingError(f"{ref}: unknown placeholder {other.group(0)!r}; the harness knows `...same arguments...` "
                           f"and `...` (see {THIS})")
    try:
        return shlex.split(text, comments=True)
    except ValueError as exc:
        raise MappingError(f"{ref}: cannot split {text!r} into words: {exc}") from None


def _plan_block(block: Block, history: List[Step], keep: bool) -> List[Step]:
    steps: List[Step] = []
    cwd, after_skipped = "", ""
    for line in block.lines:
        if block.lang not in SHELL_LANGS and block.lang != "inline" and not _starts_program(line.text.split()):
            continue  # a block without a shell language: only lines that start a command of ours count
        rule = next(((reason, rest) for rx, reason, rest in NOT_RUN if re.match(rx, line.text)), None)
        if rule:
            steps.append(Step(line.ref, line.text, "skip", reason=rule[0]))
            if rule[1] and not after_skipped:
                after_skipped = f"needs what `{line.text.split('#')[0].strip()}` ({line.ref}) starts, which is not run"
            continue
        words = _words(line.ref, line.text)
        if words[:1] == ["cd"]:
            if len(words) != 2 or words[1] not in DIRS:
                raise MappingError(f"{line.ref}: `{line.text}`: cd into a folder the sandbox does not know; "
                                   f"add it to DIRS in {THIS}")
            cwd = words[1] if not cwd else f"{cwd}/{words[1]}"
            steps.append(Step(line.ref, line.text, "cd", cwd=cwd))
            continue
        env = {}
        while words and _ENV_WORD.match(words[0]):  # VAR=value python -m ...: the command's environment
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        if not words or not _starts_program(words):
            raise MappingError(
                f"{line.ref}: `{line.text}` is neither a command of ours (python -m iconmatting_core, the "
                f"iconmatting command, iconmatting.py, torchrun, benchmarks/*.py) nor a line listed in NOT_RUN "
                f"with its reason: add it to one of them in {THIS}")
        operators = [w for w in words if w in _SHELL_OPERATORS or _REDIRECTION.match(w)]
        if operators:
            raise MappingError(f"{line.ref}: `{line.text}`: the harness runs commands, not shell pipelines or "
                               f"redirections ({' '.join(operators)}); show the command alone, or teach {THIS}")
        step = _program(line, _expand_brackets(line.ref, words, keep), cwd, steps + history)
        step.env = env
        if after_skipped:
            step.kind, step.reason = "skip", after_skipped
        elif step.script in SCRIPTS_NOT_RUN:
            step.kind, step.reason = "skip", SCRIPTS_NOT_RUN[step.script]
        steps.append(step)
    return steps


def _program(line: Line, words: List[str], cwd: str, earlier: List[Step]) -> Step:
    step = Step(line.ref, line.text, "run", cwd=cwd)
    w = list(words)
    if w[0] in PYTHONS:
        if w[1:2] == ["-m"]:
            if len(w) < 3 or w[2] not in MODULES:
                raise MappingError(f"{line.ref}: `python -m {w[2] if len(w) > 2 else ''}` is not a module the harness "
                                   f"runs ({', '.join(MODULES)}); add it to MODULES or NOT_RUN in {THIS}")
            step.launcher, step.program, args = "python -m", MODULES[w[2]], w[3:]
        else:
            script = w[1] if len(w) > 1 else ""
            if script in LAUNCHERS:
                step.launcher, step.program, step.script = "launcher", "iconmatting_core", script
            elif script.startswith("benchmarks/") and script.endswith(".py"):
                step.launcher, step.program, step.script = "script", "script", script
                if script not in SCRIPTS_NOT_RUN:
                    raise MappingError(f"{line.ref}: benchmark {script} is neither run nor listed in SCRIPTS_NOT_RUN "
                                       f"with its reason: add it in {THIS}")
            else:
                raise MappingError(f"{line.ref}: `python {script}`: a script the harness does not know; add it to "
                                   f"LAUNCHERS or SCRIPTS_NOT_RUN in {THIS}")
            args = w[2:]
    elif w[0] in CONSOLE_SCRIPTS:
        step.launcher, step.program, args = "console", CONSOLE_SCRIPTS[w[0]], w[1:]
    else:  # torchrun [its options] -m module args
        if "-m" not in w or w.index("-m") + 1 >= len(w) or w[w.index("-m") + 1] not in MODULES:
            raise MappingError(f"{line.ref}: torchrun must run `-m iconmatting_core ...` ({THIS})")
        at = w.index("-m")
        step.launcher, step.program, args = "torchrun", MODULES[w[at + 1]], w[at + 2:]
    head = w[:len(w) - len(args)]
    if step.program == "iconmatting_core":
        if not args or args[0].startswith("-") or args[0] in (ELLIPSIS, SAME_ARGS):
            raise MappingError(f"{line.ref}: `{line.text}` names no subcommand")
        step.subcommand = args[0]
    elif step.program == "eval":
        step.subcommand = "eval"
    args = _fill(line, step, args, earlier)
    step.args = args
    step.argv = head + args
    _paths(line, step)
    return step


def _fill(line: Line, step: Step, args: List[str], earlier: List[Step]) -> List[str]:
    """Fill ``...same arguments...``, ``--option ...`` and a bare ``...``."""
    def previous(within_block: bool) -> Step:
        for s in reversed(earlier):
            if s.program == step.program and s.subcommand == step.subcommand and s.args:
                return s
        where = "block" if within_block else "document"
        raise MappingError(f"{line.ref}: `{line.text}`: no earlier `{step.subcommand}` command in this {where} "
                           f"to take the arguments from")

    sub = 1 if step.program == "iconmatting_core" else 0
    out = list(args[:sub])
    for i, a in enumerate(args[sub:], start=sub):
        prev_word = args[i - 1] if i > 0 else ""
        if a == SAME_ARGS:
            out += previous(True).args[sub:]
        elif (a == ELLIPSIS or _ANGLE.fullmatch(a)) and prev_word.startswith("--"):
            if prev_word not in OPTION_VALUES:
                raise MappingError(f"{line.ref}: `{prev_word} {a}`: no value for {prev_word} in OPTION_VALUES "
                                   f"({THIS}); add the name the README uses for it")
            out.append(OPTION_VALUES[prev_word])
        elif _ANGLE.search(a) or a == ELLIPSIS and not prev_word:
            raise MappingError(f"{line.ref}: placeholder {a!r} in `{line.text}`: the harness fills `--option ...`, "
                               f"`--option <what>`, a `...` after a value, and `...same arguments...` ({THIS})")
        elif a == ELLIPSIS:
            given = {x for x in out if x.startswith("--")}
            rest, skip = [], False
            for x in previous(False).args[sub:]:
                if x.startswith("--"):
                    skip = x in given
                if not skip:
                    rest.append(x)
            out += rest
        else:
            out.append(a)
    return out


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def looks_like_path(word: str) -> bool:
    return not _is_number(word) and ("/" in word or bool(_PATH_SUFFIX.search(word)))


def _paths(line: Line, step: Step) -> None:
    """Sort the arguments that look like paths into inputs (fixtures) and outputs."""
    sub = 1 if step.program == "iconmatting_core" else 0
    outputs_opt = OUTPUT_OPTIONS["*"] | OUTPUT_OPTIONS.get(step.subcommand, set())
    option, positional = "", 0
    for a in step.args[sub:]:
        if a.startswith("-") and not _is_number(a):
            option = a
            continue
        if not option:
            role = "output" if positional in OUTPUT_POSITIONALS.get(step.subcommand, set()) else "input"
            key = f"#{positional}"
            positional += 1
        else:
            role = "output" if option in outputs_opt else "input"
            key = option
        if not looks_like_path(a) and a.rstrip("/") not in INPUTS:
            continue
        rel = a.rstrip("/")
        if a.startswith("/") or ".." in Path(rel).parts:
            raise MappingError(f"{line.ref}: {a!r}: paths must be relative to the folder the command runs in")
        if role == "output":
            step.outputs[key] = rel
        elif rel in INPUTS:
            step.inputs[rel] = INPUTS[rel]
        else:
            raise MappingError(
                f"{line.ref}: input path {a!r} of `{line.text}` is not in INPUTS ({THIS}): add it with the fixture "
                f"it stands for (one of {sorted(set(INPUTS.values()))}, or a new one made by the test)")


def iter_commands(root: Path = ROOT) -> Iterator[Tuple[Plan, Step]]:
    """Every command of every mapped plan (run or not)."""
    for plan in plans(root):
        for step in plan.steps:  # (a plan with an error has none)
            if step.kind in ("run", "skip") and step.argv:
                yield plan, step


def python_block_needs(ref: str, source: str) -> Tuple[Dict[str, str], List[str]]:
    """A python block's inputs (string constants that look like paths -> fixtures) and the undefined names
    it uses (each must be one of :data:`PYTHON_NAMES`); MappingError otherwise."""
    import ast
    import builtins

    tree = ast.parse(source)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
    used = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound)
    unknown = [n for n in used if n not in PYTHON_NAMES]
    if unknown:
        raise MappingError(f"{ref}: the python block uses {unknown}, defined nowhere in it: add each to PYTHON_NAMES "
                           f"({THIS}) and bind it in the test's prelude")
    inputs = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and looks_like_path(node.value):
            rel = node.value.rstrip("/")
            if rel not in INPUTS:
                raise MappingError(f"{ref}: path {node.value!r} of the python block is not in INPUTS ({THIS})")
            inputs[rel] = INPUTS[rel]
    return inputs, used
