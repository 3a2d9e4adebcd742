"""systemd integration by systemd's own protocols, without libsystemd.

* **Readiness** (``Type=notify``): datagrams to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an
  abstract socket), one ``KEY=value`` per line: ``READY=1`` once the server really serves (its
  listening socket bound and its device started), ``STATUS=`` lines as clients come and go,
  ``STOPPING=1`` when a signal starts the shutdown, and ``RELOADING=1`` when a reload starts
  a successor (:meth:`Notifier.reloading`). ``systemctl reload`` (SIGHUP) is
  :mod:`vfu_server.reload`: ``RELOADING=1`` from this process, then ``MAINPID=`` and ``READY=1``
  from its successor, or ``READY=1`` again from this one when the reload failed.
* **Watchdog**: when ``$WATCHDOG_USEC`` is set (and ``$WATCHDOG_PID``, if set, is ours),
  :func:`watchdog_task` sends ``WATCHDOG=1`` at half the interval *from the event loop*, so a
  loop that is stuck stops the pings and systemd restarts the service.
* **Socket activation**: :func:`activated_sockets` takes the fds systemd passed
  (``$LISTEN_FDS`` starting at fd 3, for ``$LISTEN_PID``) with their ``$LISTEN_FDNAMES``; the
  vfio-user socket is the one named ``vfio-user``, the control socket the one named ``control``
  (``FileDescriptorName=`` in the .socket units). Unnamed fds (all named alike, as when one
  .socket unit has two ``ListenStream=`` lines) are taken in order: vfio-user first, control
  second.

Every function here is a no-op or returns None when its variables are absent, so the server
runs the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import trio

log = logging.getLogger("vfu_server.systemd")

#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: ``FileDescriptorName=`` of the vfio-user socket and of the control socket.
VFIO_USER_NAME = "vfio-user"
CONTROL_NAME = "control"


class ActivationError(Exception):
    """The socket-activation variables are inconsistent; the message says how, in one line."""


class Notifier:
    """Sends notifications to the service manager. Sending never raises: a manager that went
    away must not take the server with it (the failure is logged once)."""

    def __init__(self, address: str) -> None:
        # "@name" is Linux's abstract namespace, spelled with a leading NUL on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        """The notifier of ``$NOTIFY_SOCKET``, or None outside a ``Type=notify`` service."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address or not (address.startswith("/") or address.startswith("@")):
            return None
        return cls(address)

    def send(self, **fields: str | int) -> bool:
        """One datagram with ``KEY=value`` lines (keys upper-cased); True if it was sent."""
        text = "".join(f"{key.upper()}={value}\n" for key, value in fields.items())
        try:
            self.sock.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify the service manager at %r: %s",
                            self.address.replace("\0", "@"), exc.strerror)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status, mainpid=os.getpid())

    def status(self, text: str) -> None:
        self.send(status=text)

    def stopping(self, status: str = "stopping: draining in-flight I/O") -> None:
        self.send(stopping=1, status=status)

    def watchdog(self) -> None:
        self.send(watchdog=1)

    def reloading(self, status: str) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (which ``Type=notify-reload`` requires):
        a reload started. It ends in the successor's ``READY=1`` (with its MAINPID) or, when
        it failed and this server keeps serving, in this one's."""
        self.send(reloading=1, status=status, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def close(self) -> None:
        self.sock.close()


#: The process's notifier, set by :func:`install`; None outside systemd.
current: Notifier | None = None


def install(environ: Mapping[str, str] | None = None) -> Notifier | None:
    global current
    current = Notifier.from_environ(environ)
    return current


def status(text: str) -> None:
    """A ``STATUS=`` line, when running under systemd."""
    if current is not None:
        current.status(text)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two pings systemd expects at most, or None when no watchdog is on
    (or it is meant for another process of the service)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number; no watchdog pings", usec)
        return None
    return value / 1e6 if value > 0 else None


async def watchdog_task(notifier: Notifier, interval: float) -> None:
    """Ping at half the interval (sd_watchdog_enabled()'s advice) for as long as the event
    loop runs tasks: a handler that never returns stops this too."""
    while True:
        notifier.watchdog()
        await trio.sleep(interval / 2)


@dataclass
class ActivatedSockets:
    vfio_user: socket.socket | None
    control: socket.socket | None


def activated_sockets(environ: Mapping[str, str] | None = None, *, unset: bool = True) -> ActivatedSockets | None:
    """The sockets systemd passed to this process, or None when it passed none.

    ``unset``: remove the variables, so that processes the server starts do not take the fds
    for theirs (sd_listen_fds(1) does the same)."""
    env = os.environ if environ is None else environ
    count_text = env.get("LISTEN_FDS", "")
    if not count_text:
        return None
    pid = env.get("LISTEN_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent that exec'd us without passing them)
    try:
        count = int(count_text)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count_text!r} is not a number") from None
    if not 1 <= count <= 2:
        raise ActivationError(f"LISTEN_FDS={count}: expected the vfio-user socket and at most a control socket")
    names_text = env.get("LISTEN_FDNAMES", "")
    names = names_text.split(":") if names_text else []
    if names and len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES has {len(names)} names for {count} fds")
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + count))
    by_name: dict[str, int] = {}
    if set(names) & {VFIO_USER_NAME, CONTROL_NAME}:
        for fd, name in zip(fds, names, strict=True):
            if name not in (VFIO_USER_NAME, CONTROL_NAME):
                raise ActivationError(f"fd {fd} is named {name!r}; expected {VFIO_USER_NAME!r} or {CONTROL_NAME!r}")
            if name in by_name:
                raise ActivationError(f"two fds are named {name!r}")
            by_name[name] = fd
    else:
        by_name = dict(zip((VFIO_USER_NAME, CONTROL_NAME), fds, strict=False))
    if VFIO_USER_NAME not in by_name:
        raise ActivationError(f"no fd named {VFIO_USER_NAME!r} among LISTEN_FDNAMES={names_text!r}")
    socks = {name: _listening_unix(fd, name) for name, fd in by_name.items()}
    if unset and environ is None:
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    return ActivatedSockets(socks[VFIO_USER_NAME], socks.get(CONTROL_NAME))


def _listening_unix(fd: int, name: str) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"fd {fd} ({name}): {exc.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(f"fd {fd} ({name}): not a Unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"fd {fd} ({name}): not listening")
    os.set_inheritable(fd, False)
    return sock
