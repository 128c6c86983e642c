"""How the command line ends when the user presses Ctrl-C: one line and exit 130, also when the interrupt
landed inside a library's bookkeeping and its cleanup failed with an error of its own (seen in CI: a
`torchrun ... train` rank printed torch's "trying to pop from empty mode stack" traceback after Ctrl-C)."""
from __future__ import annotations

import argparse
import sys

import pytest
import torch

import iconmatting_core.__main__ as cli
from iconmatting_core.features import ChannelsLastConvolutions
from iconmatting_core.job.matte import UsageError

INTERRUPTED = "interrupted; re-run the same command to resume (finished outputs are kept)\n"


def _main_running(monkeypatch, run):
    class Parser:
        def parse_args(self, argv):
            return argparse.Namespace(_run=run)
    monkeypatch.setattr(cli, "build_parser", Parser)
    return cli.main([])


def _interrupt_inside_the_layout_mode(args):
    conv, x = torch.nn.Conv2d(2, 2, 1), torch.zeros(1, 2, 4, 4)
    with ChannelsLastConvolutions():
        conv(x)
        # what torch's own _pop_mode_temporarily leaves behind when the signal lands after its pop
        torch._C._pop_torch_function_stack()
        raise KeyboardInterrupt


def test_ctrl_c_inside_a_library_cleanup_is_still_one_line_and_130(monkeypatch, capsys):
    assert _main_running(monkeypatch, _interrupt_inside_the_layout_mode) == 130
    assert capsys.readouterr().err == INTERRUPTED
    assert not torch._C._is_torch_function_mode_enabled()


def test_plain_ctrl_c_is_one_line_and_130(monkeypatch, capsys):
    def run(args):
        raise KeyboardInterrupt
    assert _main_running(monkeypatch, run) == 130
    assert capsys.readouterr().err == INTERRUPTED


def test_a_user_error_raised_while_ctrl_c_unwinds_is_the_interrupt(monkeypatch, capsys):
    def run(args):
        try:
            raise KeyboardInterrupt
        finally:
            raise UsageError("the output folder went away")
    assert _main_running(monkeypatch, run) == 130
    assert capsys.readouterr().err == INTERRUPTED


def test_a_user_error_without_ctrl_c_is_its_own_line_and_2(monkeypatch, capsys):
    def run(args):
        try:
            raise ValueError("handled")
        except ValueError:
            raise UsageError("--targets   names no images")
    assert _main_running(monkeypatch, run) == 2
    assert capsys.readouterr().err == "error: --targets names no images\n"


def test_any_other_error_is_not_passed_off_as_an_interrupt(monkeypatch):
    def run(args):
        try:
            raise KeyError("x")
        except KeyError:
            raise RuntimeError("trying to pop from empty mode stack")
    with pytest.raises(RuntimeError, match="empty mode stack"):
        _main_running(monkeypatch, run)


def test_a_status_the_command_returns_is_the_exit_status(monkeypatch):
    assert _main_running(monkeypatch, lambda args: 1) == 1


def test_the_trainers_data_workers_leave_ctrl_c_to_it():
    import signal

    from iconmatting_core.training.trainer import leave_ctrl_c_to_the_trainer

    before, hook = signal.getsignal(signal.SIGINT), sys.excepthook
    try:
        leave_ctrl_c_to_the_trainer(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
        sys.excepthook = hook
