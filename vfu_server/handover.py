"""Live handover: a successor process takes a running device over from its predecessor.

The client (QEMU) keeps its socket and never notices more than a pause: the predecessor stops
at a message boundary, lets in-flight device work complete, and passes over its control socket
(SCM_RIGHTS) the listening socket, the connected client socket, the bytes it had read but not
yet handled, the negotiated session, the DMA map table with its fds, the IRQ eventfds, BAR
memory, the device's own resources (a TAP fd, a peer socket, a RAM disk) and the device state
in a migration format both sides know. The successor loads all that, says ``ready``, gets
``go``, answers ``ack`` and serves; only then does the predecessor drop its copies and exit.
Anything short of the ``ack`` (a refusal, a corrupt stream, a crash, a timeout) and the
predecessor resumes where it stopped. docs/handover.md specifies the exchange.

Predecessor side: :func:`give` (the control socket's ``handover`` command). Successor side:
:class:`Successor`, which :func:`vfu_server.server.serve` runs before serving
(``vfu-server DEVICE --take-over CTL``). :func:`snapshot` is the control socket's
``snapshot``: the live device's state, written without a handover.
"""

from __future__ import annotations

import array
import base64
import dataclasses
import errno
import gc
import itertools
import json
import logging
import os
import signal
import socket
import struct
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from .migration.errors import MigrationError
from .pci.migration import migration_formats_of
from .protocol.connection import ConnectionState
from .protocol.errors import ProtocolError

if TYPE_CHECKING:
    from .migration.formats import FormatSet, StateFormat
    from .pci.device import PciDevice
    from .server import Adopted, HandoverHost, Server

log = logging.getLogger("vfu_server.handover")

PROTOCOL = 1
#: how long either side waits for the other at each step, unless the successor asks for less
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 60.0
#: fds per line: below the kernel's SCM_MAX_FD (253); more go in ``fds`` carrier lines first
FDS_PER_LINE = 200
MAX_LINE = 256 << 20
_RECV = 1 << 20
#: seconds the predecessor serves between its warm-up and the hold
WARM_UP_BREATHER = 0.005


class HandoverError(Exception):
    """A handover step failed or was refused; ``errno`` and a one-line ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        reason = " ".join(str(reason).split())
        super().__init__(code, reason)
        self.errno = code
        self.reason = reason

    def __str__(self) -> str:
        return self.reason

    def reply(self) -> dict[str, Any]:
        return {"ok": False, "errno": self.errno, "error": errno.errorcode.get(self.errno, str(self.errno)),
                "reason": self.reason}


class HandoverRefused(HandoverError):
    """The successor could not take over; the predecessor kept serving."""


# -- the wire: JSON lines with fds -------------------------------------------------------------


class Link:
    """One JSON object per line over a Unix stream socket; a line's fds (SCM_RIGHTS) travel
    with its first byte and ``"nfds"`` says how many belong to it. Lines with more than
    :data:`FDS_PER_LINE` fds are preceded by ``{"msg": "fds"}`` carrier lines whose fds belong
    to the next real line."""

    def __init__(self, sock: trio.socket.SocketType, buffered: bytes = b"") -> None:
        self.sock = sock
        self._buf = bytearray(buffered)
        self._fds: deque[int] = deque()
        self._carried: list[int] = []

    async def send(self, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
        fds = list(fds)
        while len(fds) > FDS_PER_LINE:
            await self._send_line({"msg": "fds", "nfds": FDS_PER_LINE}, fds[:FDS_PER_LINE])
            fds = fds[FDS_PER_LINE:]
        await self._send_line({**obj, "nfds": len(fds)}, fds)

    async def _send_line(self, obj: dict[str, Any], fds: Sequence[int]) -> None:
        view = memoryview(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        if fds:
            sent = await self.sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            view = view[sent:]
        while len(view):
            sent = await self.sock.send(view)
            view = view[sent:]

    async def receive(self) -> tuple[dict[str, Any], list[int]]:
        """The next line and its fds (ours from now on). EOF is an EPIPE HandoverError."""
        while True:
            line = await self._line()
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise HandoverError(errno.EPROTO, f"not JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise HandoverError(errno.EPROTO, "a line that is not a JSON object")
            n = obj.get("nfds", 0)
            if not isinstance(n, int) or not 0 <= n <= len(self._fds):
                raise HandoverError(errno.EPROTO, f"line names {n!r} fds, {len(self._fds)} arrived")
            fds = [self._fds.popleft() for _ in range(n)]
            if obj.get("msg") == "fds":
                self._carried += fds
                continue
            fds, self._carried = self._carried + fds, []
            return obj, fds

    async def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return line
            if len(self._buf) > MAX_LINE:
                raise HandoverError(errno.E2BIG, "handover line too long")
            data, anc, flags, _ = await self.sock.recvmsg(_RECV, socket.CMSG_SPACE(253 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise HandoverError(errno.EPROTO, "fds were truncated")
            if not data:
                raise HandoverError(errno.EPIPE, "the other side closed the control connection")
            self._buf += data

    def close(self) -> None:
        _close(list(self._fds) + self._carried)
        self._fds.clear()
        self._carried = []
        self.sock.close()


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- format negotiation ------------------------------------------------------------------------


def format_offer(formats: FormatSet) -> list[dict[str, Any]]:
    """What a successor states it can load: every format with its minor range."""
    return [{"uuid": str(f.uuid), "name": f.name, "kind": f.kind, "minor_min": f.minor_min,
             "minor_max": f.minor_max} for f in formats]


def choose_format(mine: FormatSet, offered: Any, insist: Any = None) -> tuple[StateFormat, int]:
    """The predecessor's choice: the format it produces at the highest minor both sides know.
    ``insist`` (``{"uuid": ..., "minor": ...}``) is the successor's ``--migration-format``;
    otherwise standard formats come before opaque ones, in the predecessor's order."""
    loads: dict[uuid.UUID, tuple[int, int]] = {}
    try:
        for d in offered:
            loads[uuid.UUID(str(d["uuid"]))] = (int(d["minor_min"]), int(d["minor_max"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise HandoverError(errno.EINVAL, f"bad format list from the successor: {exc}") from None

    def common(fmt: StateFormat, minor: int | None = None) -> int | None:
        if fmt.uuid not in loads:
            return None
        lo, hi = loads[fmt.uuid]
        top = min(fmt.minor_max, hi) if minor is None else minor
        return top if max(fmt.minor_min, lo) <= top <= min(fmt.minor_max, hi) else None

    if insist:
        try:
            want = uuid.UUID(str(insist["uuid"]))
            minor = insist.get("minor")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise HandoverError(errno.EINVAL, f"bad insisted format {insist!r}") from None
        fmt = mine.by_uuid.get(want)
        if fmt is None:
            raise HandoverError(errno.ENOTSUP, f"format {insist.get('name', want)} ({want}) is not one this "
                                f"server produces ({', '.join(f.name for f in mine)})")
        chosen = common(fmt, minor)
        if chosen is None:
            raise HandoverError(errno.ENOTSUP, f"format {fmt.name}: no minor version both sides know "
                                f"(this server {fmt.minor_min}..{fmt.minor_max}, successor {loads.get(want)})")
        return fmt, chosen
    order = [f for f in mine if f.kind == "standard"] + [f for f in mine if f.kind != "standard"]
    for fmt in order:
        chosen = common(fmt)
        if chosen is not None:
            return fmt, chosen
    raise HandoverError(errno.ENOTSUP, "no common state format: this server produces "
                        f"{', '.join(f.name for f in mine)}, the successor loads "
                        f"{', '.join(str(d.get('name', d.get('uuid'))) for d in offered) or 'nothing'}")


def profile_hex(device: PciDevice) -> str | None:
    from .migration.generic import profile_to_record

    prof = device.migration_profile()
    return profile_to_record(prof).payload.hex() if prof is not None else None


def profile_difference(device: PciDevice, theirs: str | None) -> str | None:
    """None when the successor's guest-visible profile is ours, else which field differs."""
    mine = profile_hex(device)
    if mine == theirs:
        return None
    if not isinstance(theirs, str) or mine is None:
        return "one side has no profile"
    from .migration.generic import PROFILE, profile_from_record

    try:
        their_profile = profile_from_record(*PROFILE.unpack(bytes.fromhex(theirs)))
    except (ValueError, MigrationError) as exc:
        return f"unreadable successor profile ({exc})"
    my_profile = device.migration_profile()
    if my_profile.device_abi != their_profile.device_abi:
        try:
            diff = _difference("device", device.decode_device_abi(my_profile.device_abi),
                               device.decode_device_abi(their_profile.device_abi))
        except (ValueError, MigrationError):
            diff = None
        return diff or "device ABI differs"
    return _difference("", my_profile, their_profile) or "profiles differ"


def _difference(path: str, mine: Any, theirs: Any) -> str | None:
    """The first field in which two (nested) dataclasses differ, as ``path: ours vs theirs``."""
    if mine == theirs:
        return None
    if dataclasses.is_dataclass(mine) and type(mine) is type(theirs):
        for f in dataclasses.fields(mine):
            found = _difference(f"{path}.{f.name}".lstrip("."), getattr(mine, f.name), getattr(theirs, f.name))
            if found:
                return found
    if isinstance(mine, tuple) and isinstance(theirs, tuple) and len(mine) == len(theirs):
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            found = _difference(f"{path}[{i}]", a, b)
            if found:
                return found

    def show(v: Any) -> str:
        text = v.hex(":") if isinstance(v, bytes) and len(v) <= 16 else repr(v)
        return text if len(text) <= 80 else text[:80] + "..."

    return f"{path}: this server {show(mine)}, successor {show(theirs)}"


def _descriptor(fmt: StateFormat, minor: int) -> dict[str, Any]:
    return {"uuid": str(fmt.uuid), "name": fmt.name, "kind": fmt.kind, "minor": minor}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError as exc:
        raise HandoverError(errno.EPROTO, f"bad base64: {exc}") from None


# -- predecessor ---------------------------------------------------------------------------------


def _refusal_before_hold(host: HandoverHost, hello: dict[str, Any]) -> HandoverError | None:
    device, server = host.server.device.device, host.server
    if hello.get("protocol") != PROTOCOL:
        return HandoverError(errno.EPROTONOSUPPORT, f"handover protocol {hello.get('protocol')!r}, "
                             f"this server speaks {PROTOCOL}")
    if device.migration is None:
        return HandoverError(errno.ENOTSUP, f"{device.name} has no migration formats: it cannot hand over its state")
    reason = device.handover_refusal()
    if reason is not None:
        return HandoverError(errno.ENOTSUP, f"{device.name} cannot hand over: {reason}")
    if hello.get("device") != device.name:
        return HandoverError(errno.EINVAL, f"this server runs {device.name}, the successor {hello.get('device')!r}")
    if server.stopping:
        return HandoverError(errno.ESHUTDOWN, "this server is shutting down")
    if server.hold is not None:
        return HandoverError(errno.EBUSY, "another handover or snapshot is in progress")
    busy = _migration_busy(device)
    if busy:
        return HandoverError(errno.EBUSY, busy)
    diff = profile_difference(device, hello.get("profile"))
    if diff is not None:
        return HandoverError(errno.EINVAL, f"guest-visible profile differs: {diff}")
    return None


def _import_migration_code(cls: type[PciDevice]) -> None:
    """What a first save or load would import (the format module, the device's
    ``migration_imports``): 30-120 ms of imports that must neither stall the event loop nor
    count in the pause. Run in a worker thread; touches no device state."""
    import importlib

    from .migration import session  # noqa: F401

    migration_formats_of(cls)
    for name in cls.migration_imports:
        importlib.import_module(name)


def _warm_up(device: PciDevice, formats: Sequence[tuple[StateFormat, int | None]]) -> None:
    """Save (and load-check) the device's state once in each format before the pause, so
    that what a format builds on first use does not count in the pause. A running device's
    state is only read here (as PRE_COPY does)."""
    from .migration.session import LoadSession, SaveSession

    try:
        state = device.save_state()
        for fmt, minor in formats:
            save = SaveSession(fmt, minor=minor)
            save.stop_copy(state)
            load = LoadSession([fmt], expect=fmt)
            load.write(save.read(save.pending_bytes))
            load.finish()
    except Exception as exc:  # a device bug here must not stop the handover; it shows later
        log.info("handover warm-up: %s", exc)


def _migration_busy(device: PciDevice) -> str | None:
    mig = device.migration
    assert mig is not None
    if mig.state.name != "RUNNING":
        return f"the device is migrating (state {mig.state.name})"
    if mig.dirty is not None:
        return "the client has DMA dirty logging on (a migration is in progress)"
    ctl = mig._controller
    if ctl is not None and (ctl.save is not None or ctl.load is not None):
        return "a migration stream is open"
    return None


def info(host: HandoverHost) -> dict[str, Any]:
    """The control socket's ``handover-info``: where this server's sockets are, which a
    successor needs to confine itself (removing them at exit) before it asks for the device."""
    return {"ok": True, "protocol": PROTOCOL, "device": host.server.device.device.name,
            "socket_path": host.socket_path, "control_path": host.control_path}


def _timeout(hello: dict[str, Any]) -> float:
    t = hello.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return DEFAULT_TIMEOUT
    return min(max(float(t), 0.1), MAX_TIMEOUT)


async def give(host: HandoverHost, sock: trio.socket.SocketType, hello: dict[str, Any], buffered: bytes = b"") -> None:
    """Hand the device over to the successor at the other end of ``sock`` (which sent
    ``hello``), or stay exactly as we were. Never raises: every failure is a rollback."""
    link = Link(sock, buffered)
    server, device = host.server, host.server.device.device
    try:
        await trio.to_thread.run_sync(_import_migration_code, type(device))
    except Exception as exc:  # the refusal below or the handover itself will say what is wrong
        log.info("handover: importing migration code: %s", exc)
    fmt_choice: tuple[StateFormat, int] | None = None
    try:
        refusal = _refusal_before_hold(host, hello)
        if refusal is None:
            fmt_choice = choose_format(migration_formats_of(type(device)), hello.get("formats"), hello.get("insist"))
    except HandoverError as exc:
        refusal = exc
    except Exception as exc:  # a hello no check foresaw: refused, never a dead server
        refusal = HandoverError(errno.EINVAL, f"bad handover request: {type(exc).__name__}: {exc}")
    if refusal is not None:
        log.warning("handover refused: %s", refusal.reason)
        with trio.move_on_after(1):
            try:
                await link.send(refusal.reply())
            except OSError:
                pass
        link.close()
        return
    assert fmt_choice is not None and device.migration is not None
    timeout = _timeout(hello)
    hold = server.start_hold(stop_reading=False)  # no other handover or snapshot from here
    _warm_up(device, [fmt_choice])
    clock = time.perf_counter
    committed = False
    quiesced = False
    try:
        # The warm-up held the event loop for a few ms: let the I/O it held back complete
        # before the pause, or the client sees that stall and the pause as one gap.
        await trio.sleep(WARM_UP_BREATHER)
        gc.disable()  # no collection of the whole heap (5-40 ms) inside the pause
        marks = [clock()]
        # Quiesce first, while the connection still reads: in-flight work that reaches guest
        # memory through DMA_READ/DMA_WRITE needs the client's replies to complete. What the
        # client sends meanwhile only updates registers, which the saved state then holds.
        with trio.fail_after(timeout):
            quiesced = True
            await device.migration.quiesce()
        marks.append(clock())
        with trio.fail_after(timeout):
            while True:
                server.stop_reading()
                await hold.parked.wait()
                # A device reset handled before the boundary resumes the device: stop it again.
                await device.migration.quiesce()
                conn = server.connection
                if conn is None or not len(conn._pending):
                    break
                # A request of the device's (DMA_READ/DMA_WRITE) waits for the client's reply,
                # which only the connection can read: let it read until that came, then park.
                hold = server.rehold()
                while len(conn._pending) and not conn.channel.closed:
                    await trio.sleep(0.0005)
        marks.append(clock())
        busy = _migration_busy(device)  # a client's migration may have started meanwhile
        if busy:
            raise HandoverError(errno.EBUSY, busy)
        fmt, minor = fmt_choice
        log.info("handover: format %s minor %d", fmt.name, minor)
        with trio.fail_after(timeout):
            await link.send({"ok": True, "msg": "accept", "format": _descriptor(fmt, minor)})
            for obj, fds in _messages(host, fmt, minor):
                await link.send(obj, fds)
        marks.append(clock())
        with trio.fail_after(timeout):
            answer, fds = await link.receive()
        _close(fds)
        marks.append(clock())
        if answer.get("msg") != "ready":
            raise HandoverError(int(answer.get("errno") or errno.ECANCELED),
                                f"successor: {answer.get('reason', answer.get('msg'))}")
        await link.send({"msg": "go"})
        # From here the successor may serve as soon as it has answered; it answers before it
        # reads a byte from the client, so an EOF instead of the answer is a safe rollback.
        with trio.move_on_after(timeout) as waiting:
            answer, fds = await link.receive()
            _close(fds)
        if waiting.cancelled_caught:
            await _fence(sock)
            raise HandoverError(errno.ETIMEDOUT, "no ack from the successor after go (it was killed)")
        if answer.get("msg") != "ack":
            raise HandoverError(errno.EPROTO, f"expected ack, got {answer.get('msg')!r}")
        committed = True
        marks.append(clock())
        steps = [f"{(b - a) * 1000:.1f}" for a, b in itertools.pairwise(marks)]
        log.warning("handed over to the successor after a pause of %.1f ms (quiesce %s, park %s, send %s, "
                    "successor load %s, go/ack %s ms); exiting", (marks[-1] - marks[0]) * 1000, *steps)
    except Exception as exc:
        # Whatever went wrong (a device hook that raised included), this server goes on.
        if isinstance(exc, trio.TooSlowError):
            failure = HandoverError(errno.ETIMEDOUT, f"timed out after {timeout:.1f} s")
        elif isinstance(exc, HandoverError):
            failure = exc
        elif isinstance(exc, OSError):
            failure = HandoverError(exc.errno or errno.EIO, f"control connection: {exc.strerror or exc}")
        else:
            log.error("handover: device or server error", exc_info=exc)
            failure = HandoverError(errno.EIO, f"{type(exc).__name__}: {exc}")
        log.warning("handover failed: %s; resuming", failure.reason)
        with trio.move_on_after(0.5):
            try:
                await link.send(failure.reply())
            except OSError:
                pass
    finally:
        gc.enable()
        link.close()
        if committed:
            # Our copies of the eventfds and DMA maps go now: whatever this process still
            # does on its way out (a backend's task ending) can never reach the guest.
            device.irqs.close()
            device.dma.clear()
            device.handover_released()
            server.end_hold(True)
        else:
            if quiesced:
                device.migration.sync_running()
                if server.connection is None:
                    # No client: back to what the device was told when its last one left (a
                    # controller kept for the next client stays stopped until it writes).
                    await _no_client(device)
            server.end_hold(False)


def _messages(host: HandoverHost, fmt: StateFormat, minor: int) -> list[tuple[dict[str, Any], list[int]]]:
    """Everything the successor gets, in the order docs/handover.md specifies. The fds are ours
    (the kernel sends copies)."""
    from .migration.session import SaveSession

    server, device = host.server, host.server.device.device
    conn = server.connection
    out: list[tuple[dict[str, Any], list[int]]] = []
    # 1. sockets
    sock_fds: list[int] = []
    if host.listener is not None:
        sock_fds.append(host.listener.fileno())
    if conn is not None:
        sock_fds.append(conn.channel.sock.fileno())
    if host.control is not None:
        sock_fds.append(host.control.fileno())
    out.append(({"msg": "sockets", "listener": host.listener is not None, "client": conn is not None,
                 "control": host.control is not None, "socket_path": host.socket_path,
                 "control_path": host.control_path}, sock_fds))
    # 2. the session and the client's bytes read but not handled
    if conn is not None:
        state, state_fds = conn.core.snapshot().to_dict()
        out.append(({"msg": "session", **state}, state_fds))
        # 3. the DMA map table
        regions = device.dma.regions
        out.append(({"msg": "dma", "regions": [
            {"iova": r.iova, "size": r.size, "flags": r.flags, "offset": r.offset, "fd": r.fd is not None}
            for r in regions]}, [r.fd for r in regions if r.fd is not None]))
        # 4. interrupts
        irq_data, irq_fds = device.irqs.export()
        out.append(({"msg": "irqs", **irq_data}, irq_fds))
    # 5. BAR memory
    bars: list[dict[str, Any]] = []
    bar_fds: list[int] = []
    for index, backing in enumerate(device.backing):
        if backing is None or backing.memory is None:
            continue
        if backing.fd is not None:
            bars.append({"index": index, "memfd": True})
            bar_fds.append(backing.fd)
        else:
            bars.append({"index": index, "memfd": False, "data": _b64(bytes(backing.memory))})
    out.append(({"msg": "bars", "bars": bars}, bar_fds))
    # 6. the device's own resources
    dev_data, dev_fds = device.handover_export()
    out.append(({"msg": "device", "data": dev_data}, dev_fds))
    # 7. the device state, in the chosen format
    save = SaveSession(fmt, minor=minor)
    save.stop_copy(device.save_state())
    stream = save.read(save.pending_bytes)
    out.append(({"msg": "state", "format": _descriptor(fmt, minor), "stream": _b64(stream)}, []))
    out.append(({"msg": "end"}, []))
    return out


async def _fence(sock: trio.socket.SocketType) -> None:
    """A successor that got ``go`` but did not answer may be serving or about to: kill it
    (SO_PEERCRED) and wait until it is gone before we serve again."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
    except OSError:
        return
    if pid <= 0 or pid == os.getpid():
        return
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        log.warning("handover: killing successor %d, which did not answer go", pid)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with trio.move_on_after(5):
            await trio.lowlevel.wait_readable(pidfd)
    except OSError:
        pass
    finally:
        os.close(pidfd)


# -- successor -----------------------------------------------------------------------------------


@dataclass
class Taken:
    """What a successor took over (serve() serves it)."""

    listener: trio.socket.SocketType | None
    control: trio.socket.SocketType | None
    adopted: Adopted | None
    socket_path: str | None
    control_path: str | None
    format: dict[str, Any]


class Successor:
    """Takes a device over from the server whose control socket is ``control_path``.

    ``insist``: a format name, alias or UUID[:minor] of this device the predecessor must use
    (``--migration-format``); ``timeout``: how long either side waits at each step."""

    def __init__(self, control_path: str, *, insist: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.control_path = control_path
        self.insist = insist
        self.timeout = timeout
        self.format: dict[str, Any] | None = None
        #: what was taken over, once it was
        self.taken: Taken | None = None
        #: the predecessor's (socket_path, control_path) as ``handover-info`` gave them
        self.probed: tuple[str | None, str | None] | None = None
        self._link: Link | None = None

    def close(self) -> None:
        """Give up before :meth:`take_over` (the predecessor was never paused)."""
        if self._link is not None:
            self._link.close()
            self._link = None

    def hello(self, device: PciDevice) -> dict[str, Any]:
        formats = migration_formats_of(type(device))
        insist = None
        if self.insist:
            try:
                fmt, minor = formats.find(self.insist)
            except MigrationError as exc:
                raise HandoverRefused(exc.errno, f"--migration-format: {exc.reason}") from None
            insist = {"uuid": str(fmt.uuid), "name": fmt.name, "minor": minor}
        return {"cmd": "handover", "protocol": PROTOCOL, "device": device.name, "formats": format_offer(formats),
                "insist": insist, "profile": profile_hex(device), "timeout": self.timeout}

    def filter_stream(self, stream: bytes) -> bytes:
        """The received state stream before it is loaded (tests override it to damage it)."""
        return stream

    def before_ack(self) -> None:
        """Called between ``go`` and ``ack`` (tests override it to hang there)."""

    async def prepare(self, device: PciDevice) -> tuple[str | None, str | None] | None:
        """Everything that can happen before the predecessor pauses: the migration code
        imported and run once, the control connection open (its socket made now, before a
        sandbox may forbid ``socket()``), and the predecessor's socket paths asked for
        (``handover-info``), so that the caller can confine this process now instead of after
        the ``ack``, where it would add to the client's pause. Returns ``(socket_path,
        control_path)``, or None when the predecessor does not answer ``handover-info``
        (another implementation: confine after the take-over, with the paths it sends)."""
        if device.migration is None:
            raise HandoverRefused(errno.ENOTSUP, f"{device.name} has no migration formats: it cannot take over")
        link = await self._open(device)
        try:
            with trio.fail_after(self.timeout + 5):
                await link.send({"cmd": "handover-info"})
                reply, fds = await link.receive()
        except (HandoverError, OSError, trio.TooSlowError) as exc:
            link.close()
            self._link = None
            reason = "it did not answer in time" if isinstance(exc, trio.TooSlowError) else str(exc)
            raise HandoverRefused(getattr(exc, "errno", None) or errno.ETIMEDOUT,
                                  f"control connection to {self.control_path}: {reason}") from None
        _close(fds)
        paths = (reply.get("socket_path"), reply.get("control_path"))
        if not reply.get("ok") or not all(p is None or isinstance(p, str) for p in paths):
            return None
        self.probed = paths
        return paths

    async def _open(self, device: PciDevice) -> Link:
        """The control connection, opened once (by :meth:`prepare` or :meth:`take_over`),
        after the migration code has run once here, outside any pause."""
        if self._link is None:
            _import_migration_code(type(device))
            _warm_up(device, [(f, None) for f in migration_formats_of(type(device))])
            # Stopped and at power-on state before the pause; the load below needs both.
            assert device.migration is not None
            await device.migration.quiesce()
            device.reset_state()
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.connect(self.control_path)
            except OSError as exc:
                sock.close()
                raise HandoverRefused(exc.errno or errno.ECONNREFUSED,
                                      f"cannot connect to {self.control_path}: {exc.strerror}") from None
            self._link = Link(sock)
        return self._link

    async def take_over(self, device: PciDevice, server: Server) -> Taken:
        if device.migration is None:
            raise HandoverRefused(errno.ENOTSUP, f"{device.name} has no migration formats: it cannot take over")
        link = await self._open(device)
        self._link = None  # closed below, whatever happens
        received: dict[str, tuple[dict[str, Any], list[int]]] = {}
        # What start-up left on the heap is collected now and never scanned again, and no
        # collection runs until the device does: a full one (5-40 ms) would be in the pause,
        # and right after it, in the first moments of serving.
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            # The predecessor waits up to the timeout at each of its steps; a little more here.
            with trio.fail_after(self.timeout * 3 + 5):
                await link.send(self.hello(device))
                accept, fds = await link.receive()
                _close(fds)
                if not accept.get("ok"):
                    raise HandoverRefused(int(accept.get("errno") or errno.ECANCELED), str(accept.get("reason")))
                self.format = accept.get("format")
                while True:
                    msg, fds = await link.receive()
                    if msg.get("ok") is False:
                        _close(fds)
                        raise HandoverRefused(int(msg.get("errno") or errno.ECANCELED), str(msg.get("reason")))
                    kind = msg.get("msg")
                    if kind == "end":
                        _close(fds)
                        break
                    if not isinstance(kind, str) or kind in received:
                        _close(fds)
                        raise HandoverError(errno.EPROTO, f"unexpected message {kind!r}")
                    received[kind] = (msg, fds)
            try:
                taken = await self._install(device, received)
            except Exception as exc:  # anything the predecessor sent that does not load
                code = getattr(exc, "errno", None) or errno.EINVAL
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                with trio.move_on_after(1):
                    try:
                        await link.send({"msg": "abort", "errno": code, "reason": reason})
                    except OSError:
                        pass
                raise HandoverRefused(code, reason) from None
            with trio.fail_after(self.timeout * 2 + 5):
                await link.send({"msg": "ready"})
                go, fds = await link.receive()
                _close(fds)
                if go.get("msg") != "go":
                    raise HandoverRefused(int(go.get("errno") or errno.ECANCELED),
                                          str(go.get("reason", f"expected go, got {go.get('msg')!r}")))
                # Answer before touching the client: the predecessor may roll back until then.
                self.before_ack()
                await link.send({"msg": "ack"})
        except trio.TooSlowError:
            raise HandoverRefused(errno.ETIMEDOUT, "the predecessor did not answer in time") from None
        except HandoverRefused:
            raise
        except HandoverError as exc:
            raise HandoverRefused(exc.errno, exc.reason) from None
        except OSError as exc:
            raise HandoverRefused(exc.errno or errno.EIO, f"control connection: {exc.strerror or exc}") from None
        finally:
            gc.enable()
            for _, fds in received.values():
                _close([fd for fd in fds if fd >= 0])
            link.close()
        # The device runs from the handed-over state at once (the ack is in the predecessor's
        # socket buffer: it commits even if we die now), except that with DMA through
        # messages it needs its connection serving first.
        if taken.adopted is not None and device.dma.message_mode:
            taken.adopted.on_serving = device.migration.sync_running
        else:
            device.migration.sync_running()
            if taken.adopted is None:
                await _no_client(device)
        self.taken = taken
        if self.probed is not None and self.probed != (taken.socket_path, taken.control_path):
            log.warning("the predecessor's sockets moved since handover-info (%s, %s): this server's "
                        "sandbox may not let it remove them at exit", taken.socket_path, taken.control_path)
        log.info("took over %s (format %s)", device.name, taken.format.get("name"))
        return taken

    async def _install(self, device: PciDevice, received: dict[str, tuple[dict[str, Any], list[int]]]) -> Taken:
        """Load everything; the device stays stopped until go. Takes the fds it uses out of
        ``received`` (marking them -1); the rest is closed by the caller."""
        from .migration.session import LoadSession

        def take(kind: str, required: bool = True) -> tuple[dict[str, Any], list[int]]:
            if kind not in received:
                if required:
                    raise HandoverError(errno.EPROTO, f"the predecessor sent no {kind!r}")
                return {}, []
            msg, fds = received[kind]
            mine = list(fds)
            fds[:] = [-1] * len(fds)
            return msg, mine

        # The state first: the cheapest refusal (format, profile, checksum) comes before any
        # fd is adopted.
        state_msg, _ = take("state")
        formats = migration_formats_of(type(device))
        fmt_uuid = uuid.UUID(str(state_msg["format"]["uuid"]))
        fmt = formats.by_uuid.get(fmt_uuid)
        if fmt is None:
            raise HandoverError(errno.ENOTSUP, f"the predecessor chose format {fmt_uuid}, which this device cannot load")
        stream = self.filter_stream(_unb64(state_msg["stream"]))
        load = LoadSession(formats, expect=fmt, local_profile=device.migration_profile())
        load.write(stream)
        state = load.finish()

        socks, sock_fds = take("sockets")
        want = sum(bool(socks.get(k)) for k in ("listener", "client", "control"))
        if len(sock_fds) != want:
            _close(sock_fds)
            raise HandoverError(errno.EPROTO, f"{len(sock_fds)} socket fds, {want} announced")
        made: list[trio.socket.SocketType] = []
        try:
            it = iter(sock_fds)
            listener = client = control = None
            for key in ("listener", "client", "control"):
                if socks.get(key):
                    made.append(_unix_socket(next(it)))
                    if key == "listener":
                        listener = made[-1]
                    elif key == "client":
                        client = made[-1]
                    else:
                        control = made[-1]
            return self._adopt(device, take, state, socks, listener, client, control, state_msg["format"])
        except BaseException:
            # Our copies only: the predecessor still serves with its own.
            _close(list(it))
            for sock in made:
                sock.close()
            device.dma.clear()
            device.irqs.close()
            raise

    def _adopt(self, device: PciDevice, take: Any, state: Any, socks: dict[str, Any],
               listener: trio.socket.SocketType | None, client: trio.socket.SocketType | None,
               control: trio.socket.SocketType | None, fmt: dict[str, Any]) -> Taken:
        from .server import Adopted

        adopted = None
        if client is not None:
            sess, unread_fds = take("session")
            try:
                conn_state = ConnectionState.from_dict(sess, unread_fds)
            except ProtocolError as exc:
                _close(unread_fds)
                raise HandoverError(errno.EPROTO, str(exc)) from None
            adopted = Adopted(client, conn_state)
            dma, dma_fds = take("dma")
            it = iter(dma_fds)
            try:
                for r in dma["regions"]:
                    fd = next(it) if r["fd"] else None
                    device.dma.add(int(r["iova"]), int(r["size"]), int(r["flags"]), fd, int(r["offset"]))
            finally:
                _close(list(it))
        bars, bar_fds = take("bars", required=False)
        it = iter(bar_fds)
        try:
            for b in bars.get("bars", []):
                backing = device.backing[int(b["index"])]
                if backing is None:
                    raise HandoverError(errno.EINVAL, f"BAR{b['index']}: this device has no memory there")
                if b["memfd"]:
                    backing.adopt_fd(next(it))
                elif isinstance(backing.memory, bytearray):
                    data = _unb64(b["data"])
                    if len(data) != len(backing.memory):
                        raise HandoverError(errno.EINVAL, f"BAR{b['index']}: {len(data)} bytes, expected {len(backing.memory)}")
                    backing.memory[:] = data
        finally:
            _close(list(it))
        dev, dev_fds = take("device", required=False)
        device.handover_adopt(dev.get("data", {}), dev_fds)
        device.load_state(state)
        if client is not None:
            irqs, irq_fds = take("irqs")
            device.irqs.adopt(irqs, irq_fds)
        return Taken(listener, control, adopted, socks.get("socket_path"), socks.get("control_path"), fmt)


async def _no_client(device: PciDevice) -> None:
    with trio.CancelScope(shield=True):
        try:
            result = device.client_disconnected()
            if result is not None:
                await result
        except Exception:
            log.exception("device error in client_disconnected")


def _unix_socket(fd: int) -> trio.socket.SocketType:
    raw = socket.socket(fileno=fd)
    if raw.family != socket.AF_UNIX:
        raw.detach()
        os.close(fd)
        raise HandoverError(errno.EPROTO, "a handed-over socket is not a Unix socket")
    raw.setblocking(False)
    return trio.socket.from_stdlib_socket(raw)


# -- snapshot --------------------------------------------------------------------------------------


async def snapshot(host: HandoverHost, msg: dict[str, Any]) -> dict[str, Any]:
    """The control socket's ``snapshot``: the live device's state in a format (``"format"``,
    default the selected outgoing one), base64 in ``"stream"``. The device pauses as briefly
    as a handover's quiesce; the client stays attached."""
    from .migration.session import SaveSession

    server, device = host.server, host.server.device.device
    reply: dict[str, Any] = {"id": msg["id"]} if "id" in msg else {}
    mig = device.migration
    try:
        if mig is None:
            raise HandoverError(errno.ENOTSUP, f"{device.name} has no migration formats")
        busy = _migration_busy(device)
        if busy:
            raise HandoverError(errno.EBUSY, busy)
        if server.hold is not None:
            raise HandoverError(errno.EBUSY, "a handover or another snapshot is in progress")
        ctl = mig.controller
        if msg.get("format"):
            try:
                fmt, minor = ctl.formats.find(str(msg["format"]))
                minor = fmt._minor(minor)
            except MigrationError as exc:
                raise HandoverError(exc.errno, exc.reason) from None
        else:
            fmt, minor = ctl.selected, ctl.selected.minor_max if ctl.selected_minor is None else ctl.selected_minor
        # Held like a handover, so that neither can resume the device under the other.
        server.start_hold()
        try:
            await mig.quiesce()
            state = device.save_state()
        finally:
            mig.sync_running()
            server.end_hold(False)
        save = SaveSession(fmt, minor=minor)
        save.stop_copy(state)
        stream = save.read(save.pending_bytes)
        reply.update(ok=True, format=_descriptor(fmt, minor), bytes=len(stream), stream=_b64(stream))
    except HandoverError as exc:
        reply.update(exc.reply())
    return reply
