"""The NBD backend, on libnbd (Debian's ``python3-libnbd``): ``nbd://``, ``nbds://`` (TLS with
certificates, ``?tls-certificates=DIR``, or a pre-shared key, ``?tls-psk-file=FILE``),
``nbd+unix://`` and ``nbds+unix://``, structured replies, and several connections when the
server offers multi-conn.

Driving libnbd from trio: the handshake (and TLS's) runs in a worker thread with libnbd's
blocking ``connect_uri``, since it may also resolve names; nothing else touches the handle
meanwhile. After that every command goes through libnbd's asynchronous API on the event loop:
``aio_pread``/``aio_pwrite``/... queue a command and send what the socket takes at once, and
one pump task per connection waits for the direction libnbd asks for
(``aio_get_direction``) with trio and calls ``aio_notify_read``/``aio_notify_write``, which
run the completion callbacks. An issue that leaves bytes to send wakes the pump from its read
wait so it waits for the socket to take them. The pumps live as long as the backend, not as
long as its caller's tasks: they run in shielded scopes that only the end of :meth:`NbdBackend.open`
cancels, after the close has flushed and sent NBD_CMD_DISC through them (a device's tasks are
cancelled at shutdown and after a handover; the close's flush must still get its reply).
A connection whose pump has stopped, however it stopped, is dead and has failed every command
in flight, so no waiter is left for a reply nobody will read.

Buffers: libnbd keeps a reference to a command's buffer until the command is retired, even
when the caller gave up waiting. So reads land in a buffer of our own and are copied into the
guest's views only once they succeeded, and writes send a copy: a cancelled request can
never write into guest memory the device has handed back, and an in-flight command never
keeps DMA_UNMAP from closing a mapping. (The copy is about 1 us per 4 KiB here.)

Other clients: a live handover's successor opens connections of its own while this one is
still connected. A write's reply does not make it visible there; a flush does (with
multi-conn, by the protocol's promise; without, it is what empties a per-connection cache), so
:meth:`NbdBackend.make_writes_visible` flushes when the device quiesces, before the state is
taken.

Failure: a server that goes away fails every command in flight on that connection and every
later one with :class:`BlockIOError` (EIO or libnbd's errno); a write is reported done only
when the server acknowledged it. Nothing raises into the device's nursery.

The project had an NBD client of its own before (fixed-newstyle handshake, simple replies, one
connection, no TLS); libnbd replaced it after beating it in the same run
(docs/performance.md, "NBD on libnbd"), and brings TLS, structured replies and multi-conn.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .base import BlockBackend, byte_views, iov_length
from .errors import BackendSpecError, BlockIOError

__all__ = ["NbdBackend", "NbdTarget", "load", "parse_nbd_uri"]

log = logging.getLogger(__name__)

#: Connections opened when the server offers multi-conn (one when it does not).
MULTI_CONN = int(os.environ.get("VFU_NBD_CONNECTIONS", "4"))
#: Largest payload of one command (libnbd refuses more than 64 MiB; servers often 32 MiB).
DEFAULT_MAX_PAYLOAD = 32 << 20
_MAX_LENGTH_ONLY = 1 << 30
DEFAULT_PORT = 10809
#: How long a close waits for the server to see NBD_CMD_DISC and close each connection.
_DISCONNECT_WAIT = 2.0
#: How long the flush at close may take (a server that stopped answering).
_CLOSE_FLUSH_TIMEOUT = 30.0
_TLS_QUERY = {"tls-certificates", "tls-psk-file", "tls-verify-peer"}


@dataclass(frozen=True)
class NbdTarget:
    """Where an NBD export lives: a Unix socket path, or a TCP host and port."""

    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None
    tls: bool = False
    #: the URI as the operator wrote it: libnbd takes it as it is (TLS parameters included)
    given: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.host is None) == (self.socket_path is None):
            raise BackendSpecError("NBD target needs exactly one of host or socket_path")

    @property
    def uri(self) -> str:
        """The target as an NBD URI (the form ``parse_nbd_uri`` accepts)."""
        if self.given is not None:
            return self.given
        name = urllib.parse.quote(self.export)
        scheme = "nbds" if self.tls else "nbd"
        if self.socket_path is not None:
            return f"{scheme}+unix:///{name}?socket={urllib.parse.quote(self.socket_path)}"
        assert self.host is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{name}"


def parse_nbd_uri(uri: str) -> NbdTarget:
    """Parse ``nbd[s]://[USER@]host[:port]/export[?TLS]`` or
    ``nbd[s]+unix:///export?socket=/path[&TLS]``, where TLS is ``tls-certificates=DIR``,
    ``tls-psk-file=FILE`` or ``tls-verify-peer=false`` (nbds only; USER names the PSK identity).

    Raises :class:`BackendSpecError` (a ValueError) with a one-line reason.
    """
    try:
        u = urllib.parse.urlsplit(uri)
        port = u.port
    except ValueError as exc:
        raise BackendSpecError(f"bad NBD URI {uri!r}: {exc}") from None
    scheme = u.scheme.lower()
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    query = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    tls = scheme.startswith("nbds")
    tls_keys = {k for k in query if k.startswith("tls-")}
    if tls_keys and not tls:
        raise BackendSpecError(f"bad NBD URI {uri!r}: {sorted(tls_keys)} need nbds:// (TLS)")
    if tls_keys - _TLS_QUERY:
        raise BackendSpecError(f"bad NBD URI {uri!r}: unknown {sorted(tls_keys - _TLS_QUERY)} "
                               f"(known: {', '.join(sorted(_TLS_QUERY))})")
    for key in tls_keys:
        query.pop(key)
    if scheme in ("nbd", "nbd+tcp", "nbds", "nbds+tcp"):
        if not u.hostname:
            raise BackendSpecError(f"bad NBD URI {uri!r}: no host (nbd://HOST[:PORT]/EXPORT)")
        if query:
            raise BackendSpecError(f"bad NBD URI {uri!r}: unexpected query {sorted(query)}")
        return NbdTarget(export=export, host=u.hostname, port=port or DEFAULT_PORT, tls=tls, given=uri)
    if scheme in ("nbd+unix", "nbds+unix"):
        if u.hostname:
            raise BackendSpecError(
                f"bad NBD URI {uri!r}: nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)"
            )
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise BackendSpecError(f"bad NBD URI {uri!r}: needs exactly one ?socket=PATH")
        if query:
            raise BackendSpecError(f"bad NBD URI {uri!r}: unexpected query {sorted(query)}")
        return NbdTarget(export=export, socket_path=sockets[0], tls=tls, given=uri)
    raise BackendSpecError(f"bad NBD URI {uri!r}: scheme must be nbd://, nbds://, nbd+unix:// or nbds+unix://")




def load() -> Any:
    """libnbd's Python module, or None when it is not installed."""
    try:
        import nbd
    except ImportError:
        return None
    return nbd


class _Op:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error = 0

    def callback(self, error: Any) -> int:
        # libnbd passes the command's errno in a ctypes int; returning 1 retires the command.
        self.error = int(getattr(error, "value", error) or 0)
        self.done.set()
        return 1


class _Conn:
    """One libnbd handle and the pump that runs its state machine."""

    def __init__(self, nbd: Any, handle: Any, uri: str) -> None:
        self.nbd = nbd
        self.h = handle
        self.uri = uri
        self.fd = handle.aio_get_fd()
        self.ops: set[_Op] = set()
        self.dead: tuple[int, str] | None = None
        self.read_scope = trio.CancelScope()
        #: The pump's own scope. It is shielded: a cancellation of the tasks around the backend
        #: (the device's, at shutdown or after a handover) must not stop the pump while the
        #: backend's close still flushes through it. Only :meth:`NbdBackend.open` cancels it,
        #: after the close.
        self.scope = trio.CancelScope(shield=True)
        self.stopped = trio.Event()
        self.closing = False

    def issue(self, start: Callable[[Callable[[Any], int]], Any]) -> _Op:
        """Start a command (``start(completion)``); raises BlockIOError when it cannot."""
        if self.dead is not None:
            raise BlockIOError(*self.dead)
        op = _Op()
        ops = self.ops

        def completion(error: Any) -> int:
            # Also for a request whose waiter gave up: it leaves the in-flight set here.
            ops.discard(op)
            return op.callback(error)

        try:
            start(completion)
        except self.nbd.Error as exc:
            raise BlockIOError(_errno_of(exc), f"NBD {self.uri}: {exc.string}") from None
        self.ops.add(op)
        self.kick()
        return op

    def kick(self) -> None:
        """After libnbd queued bytes to send: wake the pump from its read wait."""
        if self.h.aio_get_direction() & self.nbd.AIO_DIRECTION_WRITE:
            self.read_scope.cancel()  # the pump waits to read; it must wait to write first

    async def wait(self, op: _Op) -> None:
        await op.done.wait()
        if op.error:
            if self.dead is not None:
                raise BlockIOError(*self.dead)
            raise BlockIOError(op.error, f"NBD {self.uri}: server error {errno.errorcode.get(op.error, op.error)}")

    def fail(self, code: int, reason: str) -> None:
        if self.dead is None:
            self.dead = (code, f"NBD {self.uri}: {reason}")
            log.warning("%s", self.dead[1])
        for op in self.ops:
            if not op.done.is_set():
                op.error = code
                op.done.set()
        self.ops.clear()

    async def pump(self) -> None:
        """Run libnbd's state machine until the connection closes, fails or the backend is
        closed. Whichever way it ends, the connection is dead afterwards and every command in
        flight has failed: nothing waits for a reply that no pump will deliver."""
        try:
            with self.scope:
                await self._pump()
        finally:
            if self.dead is None:
                if self.closing:
                    self.dead = (errno.ESHUTDOWN, f"NBD {self.uri}: closed")
                    self.fail(*self.dead)
                else:
                    self.fail(errno.EIO, "server closed the connection")
            self.stopped.set()

    async def _pump(self) -> None:
        nbd, h, fd = self.nbd, self.h, self.fd
        read_bit, write_bit = nbd.AIO_DIRECTION_READ, nbd.AIO_DIRECTION_WRITE
        try:
            while self.dead is None:
                d = h.aio_get_direction()
                if d & write_bit and d & read_bit:
                    ready = await _wait_either(fd)
                    if ready & write_bit:
                        h.aio_notify_write()
                    if ready & read_bit:
                        h.aio_notify_read()
                elif d & write_bit:
                    await trio.lowlevel.wait_writable(fd)
                    h.aio_notify_write()
                elif d & read_bit:
                    self.read_scope = trio.CancelScope()
                    if h.aio_get_direction() & write_bit:
                        continue
                    with self.read_scope:
                        await trio.lowlevel.wait_readable(fd)
                    if not self.read_scope.cancelled_caught:
                        h.aio_notify_read()
                else:
                    break  # closed or dead: libnbd waits for nothing
                if h.aio_is_dead() or h.aio_is_closed():
                    break
        except nbd.Error as exc:
            if not self.closing:
                self.fail(_errno_of(exc), exc.string or "connection failed")
        except OSError as exc:  # the fd was closed under a wait
            self.fail(_errno_of(exc), exc.strerror or "connection failed")


async def _wait_either(fd: int) -> int:
    """Wait until ``fd`` is readable or writable; which of the two (libnbd's bits)."""
    import nbd

    ready = 0
    async with trio.open_nursery() as nursery:

        async def side(wait: Callable[[int], Any], bit: int) -> None:
            nonlocal ready
            await wait(fd)
            ready |= bit
            nursery.cancel_scope.cancel()

        nursery.start_soon(side, trio.lowlevel.wait_readable, nbd.AIO_DIRECTION_READ)
        nursery.start_soon(side, trio.lowlevel.wait_writable, nbd.AIO_DIRECTION_WRITE)
    return ready


class NbdBackend(BlockBackend):
    """A block backend on an NBD export through libnbd; create it with :meth:`open`."""

    def __init__(self, nbd: Any, conns: list[_Conn], uri: str, size: int | None, read_only: bool) -> None:
        first = conns[0].h
        self.nbd = nbd
        self.conns = conns
        self.uri = uri
        self.export_size = first.get_size()
        if size is not None and size > self.export_size:
            raise BackendSpecError(f"NBD {uri}: export is {self.export_size} bytes, smaller than --size {size}")
        self.size = self.export_size if size is None else size
        self.read_only = read_only or bool(first.is_read_only())
        min_block = first.get_block_size(nbd.SIZE_MINIMUM) or 1
        self.block_size = 512 if min_block <= 512 else 4096
        self.max_payload = min(first.get_block_size(nbd.SIZE_MAXIMUM) or DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PAYLOAD)
        self.can_fua = bool(first.can_fua())
        self.can_flush = bool(first.can_flush())
        self.can_zero = bool(first.can_zero())
        self.can_trim = bool(first.can_trim())
        self._next = 0
        self._closed = False
        #: modifying commands (write, zero, trim) that have ended, successfully or not
        self._writes_ended = 0
        #: how many of them the last successful flush covers (those ended when it was sent)
        self._writes_flushed = 0

    # -- construction --------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, target: NbdTarget | str, *, size: int | None = None, read_only: bool = False,
                   timeout: float = 30.0, connections: int = MULTI_CONN) -> AsyncIterator[NbdBackend]:
        """``async with NbdBackend.open(uri) as backend:``: connect (several connections
        when the server offers multi-conn), yield, flush and disconnect."""
        uri = (target if isinstance(target, NbdTarget) else parse_nbd_uri(target)).uri
        nbd = load()
        if nbd is None:
            raise BlockIOError(errno.ENOSYS, "libnbd is not installed (Debian's python3-libnbd)")
        first = await _connect(nbd, uri, timeout)
        handles = [first]
        try:
            if connections > 1 and first.can_multi_conn():
                async with trio.open_nursery() as nursery:
                    more: list[Any] = []

                    async def one() -> None:
                        try:
                            more.append(await _connect(nbd, uri, timeout))
                        except BlockIOError as exc:  # one connection is enough to serve
                            log.info("NBD %s: extra connection failed: %s", uri, exc)

                    for _ in range(connections - 1):
                        nursery.start_soon(one)
                handles += more
            conns = [_Conn(nbd, h, uri) for h in handles]
            self = cls(nbd, conns, uri, size, read_only)
        except BaseException:
            for h in handles:
                _close(h)
            raise
        try:
            async with trio.open_nursery() as nursery:
                for c in conns:
                    nursery.start_soon(c.pump, name=f"libnbd {uri}")
                try:
                    yield self
                finally:
                    # The pumps are shielded (``_Conn.scope``), so they still deliver the
                    # final flush's reply when the caller's tasks were cancelled.
                    try:
                        with trio.CancelScope(shield=True):
                            await self.aclose()
                    finally:
                        for c in conns:
                            c.scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            for c in conns:
                _close(c.h)

    # -- commands ------------------------------------------------------------------------------

    def _conn(self) -> _Conn:
        """The live connection with the fewest commands in flight."""
        live = [c for c in self.conns if c.dead is None]
        if not live:
            raise BlockIOError(*self.conns[0].dead) if self.conns[0].dead else BlockIOError(errno.EIO, "NBD: closed")
        return min(live, key=lambda c: len(c.ops))

    async def _run(self, start: Callable[[Any, Callable[[Any], int]], Any]) -> None:
        conn = self._conn()
        op = conn.issue(lambda cb: start(conn.h, cb))
        await conn.wait(op)

    async def _run_write(self, start: Callable[[Any, Callable[[Any], int]], Any]) -> None:
        """:meth:`_run` for a command that modifies the export: counted once it ended (a
        failed one may have written part of its range), for :meth:`make_writes_visible`."""
        try:
            await self._run(start)
        finally:
            self._writes_ended += 1

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        views = byte_views(bufs)
        length = iov_length(views)
        self._check_range(offset, length)
        pos = 0
        while pos < length:
            n = min(length - pos, self.max_payload)
            bounce = bytearray(n)
            await self._run(lambda h, cb, o=offset + pos, b=bounce: h.aio_pread(b, o, completion=cb))
            _scatter(views, pos, bounce)
            pos += n

    async def writev(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        self._check_writable()
        views = byte_views(bufs)
        length = iov_length(views)
        self._check_range(offset, length)
        data = views[0].tobytes() if len(views) == 1 else b"".join(views)
        flags = self.nbd.CMD_FLAG_FUA if fua and self.can_fua else 0
        pos = 0
        while pos < length:
            n = min(length - pos, self.max_payload)
            chunk = data[pos : pos + n] if n != length else data
            await self._run_write(lambda h, cb, o=offset + pos, c=chunk: h.aio_pwrite(c, o, completion=cb, flags=flags))
            pos += n
        if fua and not self.can_fua:
            await self.flush()

    async def flush(self) -> None:
        if self.read_only or not self.can_flush:
            self._conn()  # raises when no connection is left
            return
        # With multi-conn, a flush on one connection covers writes completed on every one.
        covered = self._writes_ended
        await self._run(lambda h, cb: h.aio_flush(completion=cb))
        self._writes_flushed = max(self._writes_flushed, covered)

    async def make_writes_visible(self) -> None:
        """A flush, when a write ended since the last one. A write's reply alone does not make
        it visible on another connection (a successor's): with multi-conn
        (NBD_FLAG_CAN_MULTI_CONN) the NBD protocol makes the effects of a flush visible on
        every connection once its reply came; without multi-conn it promises nothing across
        connections (the server may cache per connection), and a flush is still what puts
        this connection's writes where the others read. A server that offers no flush has no
        cache to empty: nothing to do. Raises when the flush fails or no connection is left."""
        if self.read_only or self._writes_ended == self._writes_flushed:
            return
        if not self.can_flush:
            self._writes_flushed = self._writes_ended
            return
        await self.flush()

    async def _zero(self, offset: int, length: int, *, punch: bool) -> None:
        self._check_writable()
        self._check_range(offset, length)
        flags = 0 if punch else self.nbd.CMD_FLAG_NO_HOLE
        while length:
            n = min(length, _MAX_LENGTH_ONLY if self.can_zero else self.max_payload)
            if self.can_zero:
                await self._run_write(lambda h, cb, o=offset, n=n: h.aio_zero(n, o, completion=cb, flags=flags))
            else:
                await self.writev(offset, [memoryview(bytes(n))])
            offset += n
            length -= n

    async def discard(self, offset: int, length: int) -> None:
        # Zeroing that may deallocate: discarded ranges must read back as zeroes, which
        # NBD_CMD_TRIM does not promise.
        await self._zero(offset, length, punch=True)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        await self._zero(offset, length, punch=may_unmap)

    async def trim(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM: advisory, the range's contents are undefined afterwards."""
        self._check_writable()
        self._check_range(offset, length)
        if self.can_trim:
            await self._run_write(lambda h, cb: h.aio_trim(length, offset, completion=cb))

    @property
    def connected(self) -> bool:
        return any(c.dead is None for c in self.conns) and not self._closed

    @property
    def connections(self) -> int:
        return len(self.conns)

    async def aclose(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and self.connected:
                with trio.move_on_after(_CLOSE_FLUSH_TIMEOUT) as waited:
                    await self.flush()
                if waited.cancelled_caught:
                    log.warning("NBD %s: final flush got no reply within %ss", self.uri, _CLOSE_FLUSH_TIMEOUT)
        except BlockIOError as exc:
            log.warning("NBD %s: final flush failed: %s", self.uri, exc)
        finally:
            self._closed = True
            # NBD_CMD_DISC on every connection; the pumps send it and see the server close
            # (briefly: a server that does not answer is simply dropped).
            for c in self.conns:
                c.closing = True
                if c.dead is None:
                    try:
                        c.h.aio_disconnect(0)
                        c.kick()
                    except self.nbd.Error:
                        c.scope.cancel()
            with trio.move_on_after(_DISCONNECT_WAIT):
                for c in self.conns:
                    await c.stopped.wait()
            for c in self.conns:
                if c.dead is None:
                    c.dead = (errno.ESHUTDOWN, f"NBD {self.uri}: closed")
                    c.fail(*c.dead)

    def describe(self) -> dict[str, Any]:
        return {"kind": "nbd", "uri": self.uri, "size": self.size, "client": "libnbd",
                "connections": len(self.conns)}


def _errno_of(exc: Any) -> int:
    """The errno of a libnbd error (the 1.14 bindings give its name, e.g. "ENOENT")."""
    code = getattr(exc, "errno", None)
    if isinstance(code, str):
        return int(getattr(errno, code, errno.EIO))
    return int(code) if code else errno.EIO


def _close(h: Any) -> None:
    """Close a handle now where the bindings can (newer libnbd), else when it is collected
    (1.14 closes in the destructor; the last reference goes with the backend)."""
    close = getattr(h, "close", None)
    if close is not None:
        close()


def _scatter(views: list[memoryview], start: int, data: bytearray) -> None:
    """Copy ``data`` into the concatenation of ``views`` from byte ``start`` on."""
    pos = 0
    src = memoryview(data)
    for v in views:
        n = v.nbytes
        if start >= n:
            start -= n
            continue
        take = min(n - start, len(src) - pos)
        v[start : start + take] = src[pos : pos + take]
        pos += take
        start = 0
        if pos == len(src):
            return


async def _connect(nbd: Any, uri: str, timeout: float) -> Any:
    """A connected handle (the handshake and TLS in a worker thread)."""
    h = nbd.NBD()
    try:
        # The operator wrote the URI: let it name local files (a PSK file, a Unix socket).
        h.set_uri_allow_local_file(True)
        h.set_handle_name("vfu-server")
        h.set_request_structured_replies(True)
        with trio.fail_after(timeout):
            await trio.to_thread.run_sync(h.connect_uri, uri, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise BlockIOError(errno.ETIMEDOUT, f"NBD {uri}: no handshake within {timeout}s") from None
    except nbd.Error as exc:
        _close(h)
        raise BlockIOError(_errno_of(exc), f"NBD {uri}: {exc.string}") from None
    return h
