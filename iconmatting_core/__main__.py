"""Command line: ``python -m iconmatting_core {encode,matte,convert,train} ...``: argument parsing and
dispatch only. Each subcommand is a module with ``add_parser(subparsers)`` and ``run(args) -> exit
status``; adding one is one entry in :data:`COMMANDS`.

Every problem a user can cause is one line on stderr: exit 2 for a usage, model-file or
context-file problem, 1 when some targets failed (or the job stopped), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = (".job.encode", ".job.matte", ".job.convert", ".training.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the usage block
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see --help)\n")


def _commands():
    for name in COMMANDS:
        yield importlib.import_module(name, __package__)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m iconmatting_core", description="In-context matting (IconMatting).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in _commands():
        module.add_parser(sub)
        for name, action in sub.choices.items():
            action.set_defaults(_run=action.get_default("_run") or module.run)
    return parser


def _user_errors():
    from .checkpoint import CheckpointError
    from .context_file import ContextFileError
    from .job.matte import UsageError
    from .job.model_files import ModelFileError
    from .job.outputs import OutputError
    from .job.ray_engine import WorkerSetupError

    return (UsageError, ModelFileError, OutputError, ContextFileError, CheckpointError, WorkerSetupError)


def main(argv: Optional[Sequence[str]] = None, pipe_factory=None) -> int:
    """Run one command; ``pipe_factory`` (tests, benchmarks) builds the pipeline instead of the model files."""
    from .job.cli_args import pipeline_factory

    try:
        args = build_parser().parse_args(argv)
        with pipeline_factory(pipe_factory):  # tests: a ready pipeline instead of model files
            return args._run(args)
    except BaseException as exc:  # noqa: BLE001 - sorted below; anything else goes on as it came
        if interrupted_by_user(exc):
            print("interrupted; re-run the same command to resume (finished outputs are kept)", file=sys.stderr)
            return 130
        if isinstance(exc, _user_errors()):
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        raise


def interrupted_by_user(exc: Optional[BaseException]) -> bool:
    """Whether ``exc`` is a Ctrl-C, or an error raised while one unwound the stack: a KeyboardInterrupt
    lands between any two bytecodes, also inside a library's bookkeeping (torch's function-mode stack,
    seen under torchrun), whose cleanup then fails with an error of its own. The user pressed Ctrl-C
    either way, so the answer is the same one line."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
