"""A warm Python for the README-command tests: ``python -m MODULE ARGS`` and ``python SCRIPT ARGS`` without
paying, per command, the ~4 s of CPU that importing torch and diffusers costs on a 2-core machine.

``python warm_python.py SOCKET`` (started by tests/jobs/test_readme_commands.py with the environment every
command gets) imports the heavy *third-party* modules -- torch and diffusers' UNet/VAE, never a module of
this repository -- and then serves requests on the Unix socket ``SOCKET``. A request is a JSON object
(``argv`` as written, ``cwd``, ``env``, ``path``: what ``PYTHONPATH`` adds) plus three file descriptors
(the command's stdin, stdout, stderr: a pseudo-terminal or files). For each, a handler process is forked;
it forks the command's process and reports its exit status on the connection (one line, after the pid
line). The command's process becomes what the interpreter would have started:

* a new session (its own process group, for Ctrl-C), the three descriptors as 0, 1, 2, the working
  folder and the environment of the request, default signal handling (SIGINT raises KeyboardInterrupt);
* ``sys.stdin/stdout/stderr`` made afresh on 0, 1, 2, line-buffered on a terminal as at start-up;
* ``sys.argv`` and ``sys.path[0]`` as the interpreter sets them (``-m``: the working folder, the
  module run by ``runpy._run_module_as_main``, the function behind ``-m``; a script: its folder, symlinks
  resolved), then the request's ``PYTHONPATH`` entries, then the interpreter's own (stdlib, site-packages);
* at the end, what interpreter shutdown does: non-daemon threads joined, ``atexit`` handlers, streams
  flushed; an uncaught exception prints its traceback and exits 1 (KeyboardInterrupt: dies of SIGINT).

Only the import of torch and diffusers is shared; everything of ours is imported by each command.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys


def _preload() -> None:
    import torch  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401

    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("iconmatting_core", "nodes"))
    if ours:
        raise RuntimeError(f"the warm interpreter must not import our modules before a command: {ours}")


def _run_command(req: dict, base_path: list) -> int:
    import io
    import runpy
    import traceback
    import types

    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    argv = req["argv"]
    if argv[1:2] == ["-m"]:
        module, first = argv[2], os.getcwd()
        sys.argv = ["-m", *argv[3:]]
    else:
        module, first = None, os.path.dirname(os.path.realpath(argv[1]))
        sys.argv = argv[1:]
    sys.path[:] = [first, *req["path"], *base_path]
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        tty = os.isatty(fd)
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(buffered, encoding="utf-8", errors="strict" if name != "stderr" else "backslashreplace",
                                  line_buffering=mode == "w" and (tty or name == "stderr"))
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    code = 0
    try:
        if module:
            sys.modules["__main__"] = types.ModuleType("__main__")  # a fresh namespace, not this file's
            runpy._run_module_as_main(module, alter_argv=True)
        else:
            runpy.run_path(argv[1], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:  # the interpreter prints it and dies of SIGINT
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    return code


def _shutdown(code: int) -> None:
    import atexit
    import threading

    try:
        threading._shutdown()  # join non-daemon threads, as at interpreter exit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _handle(conn: socket.socket, base_path: list) -> None:
    """In the handler process: fork the command, report its pid and then its exit status."""
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    req = json.loads(msg.decode())
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        os.setsid()
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            if fd > 2:
                os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = 1
        try:
            code = _run_command(req, base_path)
        finally:
            _shutdown(code)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    conn.close()


def serve(sock_path: str) -> None:
    own = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base_path = [p for p in sys.path[1:] if p not in own]  # the interpreter's own entries
    _preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path + ".tmp")
    server.listen(16)
    os.rename(sock_path + ".tmp", sock_path)  # appears once it accepts
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            try:
                _handle(conn, base_path)
            finally:
                os._exit(0)
        conn.close()


class WarmProcess:
    """The client's handle on one command: ``pid`` (its process group too), ``poll()``, ``wait()``,
    ``returncode`` (negative: killed by that signal), like ``subprocess.Popen``."""

    def __init__(self, sock_path: str, argv, cwd, env: dict, path, fds):
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(sock_path)
        socket.send_fds(self.conn, [json.dumps({"argv": list(argv), "cwd": str(cwd), "env": env,
                                                "path": [str(p) for p in path]}).encode()], list(fds))
        self.buf, self.returncode = b"", None
        self.pid = int(self._line(block=True))

    def _line(self, block: bool):
        while b"\n" not in self.buf:
            self.conn.setblocking(block)
            try:
                data = self.conn.recv(64)
            except BlockingIOError:
                return None
            if not data:
                raise RuntimeError("the warm interpreter's handler ended without an exit status")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def poll(self):
        if self.returncode is None:
            line = self._line(block=False)
            if line is not None:
                self.returncode = int(line)
                self.conn.close()
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = int(self._line(block=True))
            self.conn.close()
        return self.returncode


if __name__ == "__main__":
    serve(sys.argv[1])
