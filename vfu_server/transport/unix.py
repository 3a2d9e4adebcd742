"""Listening on a Unix socket path (created 0600) or an inherited fd."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

import trio


class SocketPathError(Exception):
    """The socket path cannot be used; the message says why in one line."""


def _check_path(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale socket of a server that is gone
        return
    finally:
        probe.close()
    raise SocketPathError(f"{path}: another server is already listening there")


def open_unix_listener(path: str, backlog: int = 4) -> trio.socket.SocketType:
    """Bind and listen on ``path``; the socket file is created with mode 0600."""
    _check_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SocketPathError(f"{path}: directory {directory} does not exist")
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which the socket is reachable by others
    try:
        raw.bind(path)
    except OSError as exc:
        raw.close()
        raise SocketPathError(f"{path}: cannot bind: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    raw.listen(backlog)
    return trio.socket.from_stdlib_socket(raw)


def inherited_socket(fd: int) -> tuple[trio.socket.SocketType, bool]:
    """Wrap an inherited socket fd. Returns ``(socket, is_listening)``."""
    try:
        st = os.fstat(fd)
    except OSError:
        raise SocketPathError(f"--fd {fd}: not an open file descriptor") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"--fd {fd}: not a socket")
    raw = socket.socket(fileno=fd)
    if raw.family != socket.AF_UNIX or raw.type != socket.SOCK_STREAM:
        raw.detach()
        raise SocketPathError(f"--fd {fd}: not a Unix stream socket")
    listening = bool(raw.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    return trio.socket.from_stdlib_socket(raw), listening


def remove_socket(path: str | None) -> None:
    """Remove the socket file at exit; a failure (a --user that may not write the directory)
    is a warning, never a crash on the way out."""
    if path is None:
        return
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logging.getLogger("vfu_server").warning("cannot remove socket %s: %s", path, exc.strerror)


def is_disconnect(exc: OSError) -> bool:
    return exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EBADF)
