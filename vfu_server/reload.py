"""``systemctl reload``: upgrade a running server in place through a live handover.

On SIGHUP (``ExecReload=/bin/kill -HUP $MAINPID``) a server with a control socket notifies
``RELOADING=1`` and starts its successor, ``python -m vfu_server`` with its own device options
and ``--take-over CTL`` in place of its socket options, so that the package on disk now is what
runs. The successor takes the device, the client and the sockets over (docs/handover.md),
notifies ``MAINPID=<its pid>`` and ``READY=1`` (``NotifyAccess=all``), and the predecessor
exits 0. A successor that fails or is refused reports one line, which the predecessor logs; it
notifies ``READY=1`` again (``STATUS=reload failed: ...``) and serves on.

The sandbox forbids a running server to start programs, so the successor is started by a
*launcher*: a small process the server starts before it confines itself (``python -m
vfu_server.reload``), which waits on a socket pair for one JSON request per reload and answers
with the successor's outcome. The successor tells the launcher through a pipe
(``$VFU_RELOAD_STATUS_FD``): ``ready`` once it serves, or ``failed: REASON``. The launcher ends
when the server's end of the socket pair closes; a successor it started lives on (own session).

``$VFU_RELOAD_TEST_ARGS`` (tests only): extra arguments for the successor's command line.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import trio

from . import _reload_launcher
from ._reload_launcher import LAUNCHER_FD_ENV, STATUS_FD_ENV, SUCCESSOR_TIMEOUT

__all__ = ["SUCCESSOR_TIMEOUT", "Reloader", "report", "successor_argv", "successor_env", "take_status_fd"]

log = logging.getLogger("vfu_server.reload")

TEST_ARGS_ENV = "VFU_RELOAD_TEST_ARGS"

#: options naming where the server listens: the successor takes its sockets over instead
_SOCKET_OPTIONS = ("--socket-path", "--fd", "--take-over", "--control-socket")

# -- the successor's side ---------------------------------------------------------------------------

_status_fd: int | None = None


def take_status_fd() -> None:
    """Called at start-up: a successor started by a reload keeps the fd to report to, and the
    variable is removed so that its own successors do not inherit it."""
    global _status_fd
    text = os.environ.pop(STATUS_FD_ENV, "")
    if text.isdigit():
        _status_fd = int(text)


def report(line: str) -> None:
    """Tell the launcher that started this server how its start went (once); a no-op for a
    server not started by a reload."""
    global _status_fd
    if _status_fd is None:
        return
    fd, _status_fd = _status_fd, None
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
        os.close(fd)
    except OSError:
        pass


# -- the predecessor's side -------------------------------------------------------------------------


def successor_argv(argv: Sequence[str], control_path: str) -> list[str]:
    """This server's command line (``argv``: after the program name) with its socket options
    replaced by ``--take-over control_path``, and ``$VFU_RELOAD_TEST_ARGS`` appended."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _SOCKET_OPTIONS:
            skip = True
            continue
        if arg.startswith(tuple(f"{opt}=" for opt in _SOCKET_OPTIONS)):
            continue
        out.append(arg)
    out += ["--take-over", control_path]
    out += shlex.split(os.environ.get(TEST_ARGS_ENV, ""))
    return out


def successor_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The successor's environment: ``NOTIFY_SOCKET`` stays, the socket-activation variables go
    (the sockets come through the handover), and so does ``WATCHDOG_PID``, which names this
    process: systemd moves the watchdog to the new ``MAINPID``, and the successor pings it."""
    env = dict(os.environ if environ is None else environ)
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID", STATUS_FD_ENV, LAUNCHER_FD_ENV):
        env.pop(key, None)
    return env


class Reloader:
    """The server's end of its launcher. :meth:`start` before the sandbox, :meth:`reload` on
    SIGHUP."""

    def __init__(self, argv: Sequence[str], notifier: Any) -> None:
        self.argv = list(argv)
        self.notifier = notifier
        self.sock: trio.socket.SocketType | None = None
        self.launcher: subprocess.Popen[bytes] | None = None
        self.busy = False
        #: set once a reload's successor said it serves (this server then ends)
        self.succeeded = trio.Event()
        self._buf = b""

    def start(self) -> None:
        """Start the launcher (before the sandbox forbids starting programs)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = successor_env()
        env[LAUNCHER_FD_ENV] = str(theirs.fileno())
        # -I: the launcher needs the standard library only (and no module of this directory).
        self.launcher = subprocess.Popen([sys.executable, "-I", _reload_launcher.__file__], env=env,
                                         stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                                         start_new_session=True)
        theirs.close()
        self.sock = trio.socket.from_stdlib_socket(ours)

    def close(self) -> None:
        if self.sock is not None:
            os.close(self.sock.detach())  # the launcher sees EOF and exits (trio has ended)
            self.sock = None
        if self.launcher is not None:
            try:
                self.launcher.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.launcher.kill()
                self.launcher.wait()

    def _notify(self, **fields: Any) -> None:
        if self.notifier is not None:
            self.notifier.send(**fields)

    async def reload(self, control_path: str) -> None:
        assert self.sock is not None
        self.busy = True
        try:
            argv = successor_argv(self.argv, control_path)
            if self.notifier is not None:
                self.notifier.reloading("reloading: starting the successor")
            log.warning("SIGHUP: reloading: starting vfu-server %s", shlex.join(argv))
            request = {"argv": [sys.executable, "-m", "vfu_server", *argv], "env": successor_env()}
            try:
                await self.sock.send((json.dumps(request) + "\n").encode())
                reply = await self._reply()
            except OSError as exc:
                reply = {"ok": False, "reason": f"the launcher is gone ({exc.strerror})"}
            if reply.get("ok"):
                log.warning("reload: successor %s serves; this server ends", reply.get("pid"))
                self.succeeded.set()
                return
            reason = str(reply.get("reason", "no reason given"))
            log.error("reload failed: %s; still serving", reason)
            self._notify(ready=1, status=f"reload failed: {reason}; serving")
        finally:
            self.busy = False

    async def _reply(self) -> dict[str, Any]:
        assert self.sock is not None
        while b"\n" not in self._buf:
            chunk = await self.sock.recv(4096)
            if not chunk:
                return {"ok": False, "reason": "the launcher exited"}
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)
